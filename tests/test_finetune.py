"""finetune.py: every task end to end on the tiny synthetic world, initialisation from a
pre-training checkpoint (weights, architecture, tokenizer, image-size change), the refusals, the
training subsets, the heads' gradient coverage, the position-embedding interpolation and extension,
the text lengths chosen from the data and the truncated shares, and exact resume (1 process, and 2
DDP processes that each restore their own RNG), after a kill or a stop signal."""

import dataclasses
import gc
import json
import os
import signal
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

import finetune
import train
from ptunifier_min.tokenizer import load_tokenizer, special_ids
from ptunifier_min import checkpoint, data, distributed, optim, tasks
from ptunifier_min.config import FINETUNE_PRESETS, FinetuneConfig, ModelConfig, build
from ptunifier_min.model import PTUnifier
from ptunifier_min.pretrained import (interpolate_pos_embed, resize_text_positions, set_image_size,
                                      set_text_len)
from ptunifier_min.datasets.source import ensure_prepared, train_tokenizer
from conftest import signals_at

TASK_KEYS = {  # the metric keys results.json must hold for each kind of task (by its Task.kind)
    tasks.MULTI_LABEL: {"auroc", "per_class", "undefined"},
    tasks.ONE_OF: {"accuracy"}, tasks.ANSWER: {"overall", "open", "closed", "oov_share"},
    tasks.RETRIEVE: {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"},
    tasks.GENERATE: {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny synthetic world, every task folder prepared, shared by the tests of this module (and
    test_eval.py, which finds it at the same place)."""
    root = str(tmp_path_factory.getbasetemp() / "ptu_world")
    cfg = build(FinetuneConfig, {**FINETUNE_PRESETS["tiny"], "synth_root": root})
    prepared, tok = ensure_prepared(cfg, [t.folder for t in tasks.TASKS.values()],
                                    distributed.Dist(), lambda *a: None)
    return root, prepared


def killed_at(n, real):
    """A stand-in for `real` (e.g. optim.optimizer_step) that raises
    KeyboardInterrupt, a kill, at its n-th call."""
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)
    return step


def run(world, *flags):
    # --max-gen-len 12: beam search over the tiny world's 95th-percentile targets (64
    # tokens) would dominate the suite
    finetune.main(["--preset", "tiny", "--synth-root", world[0], "--steps", "4",
                   "--eval-every", "2", "--max-gen-len", "12", *flags])


@pytest.mark.parametrize("name", [n for n, t in tasks.TASKS.items() if t.kind.fine_tunes])
def test_every_task_end_to_end(name, world, tmp_path, monkeypatch):
    # no runs/pretrain here: the default init falls back to scratch, out is the default
    monkeypatch.chdir(tmp_path)
    run(world, "--task", name)
    task = tasks.TASKS[name]
    out = tmp_path / "runs" / "finetune" / f"{name}-scratch"
    r = json.loads((out / "results.json").read_text())
    assert r["task"] == name and r["init"] == "scratch"
    assert (TASK_KEYS[task.kind] <= set(r["metrics"])
            and TASK_KEYS[task.kind] <= set(r["val_metrics"]))
    main = r["metrics"][task.selection_metric]
    assert main is None or 0.0 <= main <= 1.0
    assert r["best_step"] in (2, 4) and r["config"]["task"] == name and r["config"]["steps"] == 4
    # the hash covers exactly the prepared splits (data_frac 1), and the selected
    # weights are the saved checkpoint
    folder = os.path.join(world[1], task.folder)
    assert r["split_hash"] == data.split_hash({s: data.read_split(folder, s)
                                               for s in ("train", "val", "test")})
    ckpt = checkpoint.resolve_checkpoint(str(out))
    assert (ckpt.endswith(f"step_{r['best_step']:07d}")
            and os.path.isfile(os.path.join(ckpt, "tokenizer.json")))
    assert checkpoint.read_checkpoint_config(ckpt)["config"]["task"] == name


def test_init_from_pretraining_checkpoint(world, tmp_path):
    pre = str(tmp_path / "pre")
    train.main(["--preset", "tiny", "--synth-root", world[0], "--steps", "2",
                "--eval-pairs", "0", "--out", pre])
    out = tmp_path / "ft"
    # backbone LR 0: the fine-tuned backbone must still be the pre-trained one, so
    # loading is checked tensor by tensor
    run(world, "--task", "chexpert", "--init", pre, "--image-size", "40",
        "--lr-backbone", "0", "--out", str(out))
    r = json.loads((out / "results.json").read_text())
    assert r["init"] == os.path.abspath(checkpoint.resolve_checkpoint(pre))
    assert r["config"]["model"]["image_size"] == 40 and r["config"]["model"]["dim"] == 32
    assert r["config"]["tokenizer"].startswith(checkpoint.resolve_checkpoint(pre))
    before = load_file(os.path.join(checkpoint.resolve_checkpoint(pre), "model.safetensors"))
    after = load_file(os.path.join(checkpoint.resolve_checkpoint(str(out)), "model.safetensors"))
    for k in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight",
              "word_embeddings.weight", "cls_token"):
        torch.testing.assert_close(after[f"backbone.{k}"], before[k], rtol=0, atol=0)
    assert (after["backbone.pos_embed"].shape == (1, 1 + 5 * 5, 32)
            and before["pos_embed"].shape == (1, 1 + 4 * 4, 32))
    torch.testing.assert_close(after["backbone.pos_embed"][:, 0],
                               before["pos_embed"][:, 0], rtol=0, atol=0)
    assert "head.fc1.weight" in after  # the fresh classification head

    with pytest.raises(SystemExit,
                       match=r"(?s)another architecture.*dim: checkpoint 32 vs requested 48"):
        run(world, "--task", "chexpert", "--init", pre, "--dim", "48",
            "--out", str(tmp_path / "refused"))
    with pytest.raises(SystemExit, match="fine-tuned chexpert checkpoint"):
        run(world, "--task", "rsna", "--init", str(out), "--out", str(tmp_path / "refused"))


def test_init_that_does_not_exist_is_an_error(world, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        run(world, "--task", "rsna", "--init", str(tmp_path / "nowhere"),
            "--out", str(tmp_path / "x"))


def test_unknown_task_lists_the_tasks():
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", "mnist"])
    assert "mnist" in str(e.value) and all(name in str(e.value) for name in tasks.TASKS)


def test_parse_args_knows_the_flags_given_and_refuses_abbreviations():
    """finetune.py with --init compares only the model flags the user gave with the
    checkpoint's (config.given)."""
    from ptunifier_min.config import parse_args
    cfg = parse_args(FinetuneConfig, FINETUNE_PRESETS,
                     ["--dim", "4", "--image-size=48", "--depth", "3", "--steps", "2"])
    assert (sorted(cfg.given & {f.name for f in dataclasses.fields(ModelConfig)})
            == ["depth", "dim", "image_size"])
    # `--dep` would have meant --depth to argparse's prefix matching
    with pytest.raises(SystemExit):
        parse_args(FinetuneConfig, FINETUNE_PRESETS, ["--dep", "3"])


def test_data_frac_subsets_are_seeded_nested_and_not_too_small():
    records = [{"id": f"r{i:03d}"} for i in range(500)]
    one, ten = data.subset(records, 0.01, 0), data.subset(records, 0.1, 0)
    assert len(one) == data.MIN_TRAIN and len(ten) == 50
    assert {r["id"] for r in one} <= {r["id"] for r in ten}  # 1% inside 10%
    assert data.subset(list(reversed(records)), 0.1, 0) == ten  # independent of the file order
    assert data.subset(records, 0.1, 1) != ten and data.subset(records, 1.0, 0) == records
    with pytest.raises(SystemExit):
        data.subset(records, 0.0, 0)
    val = data.cap(records, 10, 0)
    assert (len(val) == 10 and val == sorted(val, key=lambda r: r["id"])
            and val == data.cap(records, 10, 0))
    assert data.cap(records, 0, 0) == records and data.cap(records, 900, 0) == records


def test_data_frac_run_records_its_subset(world, tmp_path):
    out = tmp_path / "frac"
    run(world, "--task", "rsna", "--init", "scratch", "--data-frac", "0.1", "--out", str(out))
    r = json.loads((out / "results.json").read_text())
    full = data.read_split(os.path.join(world[1], "rsna"), "train")
    assert r["counts"]["train"] == min(len(full), max(data.MIN_TRAIN, round(0.1 * len(full))))
    splits = {s: data.read_split(os.path.join(world[1], "rsna"), s) for s in ("val", "test")}
    assert r["split_hash"] == data.split_hash({"train": data.subset(full, 0.1, 0), **splits})
    assert r["split_hash"] != data.split_hash({"train": full, **splits})


def test_the_task_table_reads_what_each_task_needs(tmp_path):
    """Every task's dataset items, as read from its row of the table, hold exactly what the task
    needs (written out here per task), and training draws any caption of a ROCO record while
    evaluation reads its first."""
    path = str(tmp_path / "x.png")
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(path)
    record = {"id": "r", "image": path, "labels": [1, 0], "label": 1, "question": "q",
              "text_a": "a", "text_b": "b", "texts": ["c0", "c1", "c2", "c3"], "target": "t",
              "answer_type": "open", "text": "s", "boxes": [[1, 2, 3, 4]], "width": 8, "height": 8}
    expected = {"chexpert": {"image": path, "labels": [1, 0]},
                "rsna": {"image": path, "labels": [1, 0]},
                "radnli": {"text_a": "a", "text_b": "b", "label": 1},
                "mimic_sum": {"text": "a", "target": "t"},
                "roco_retrieval": {"image": path, "text": "c0"},
                "mimic_gen": {"image": path, "target": "t"},
                "ms_cxr": {"image": path, "text": "s"},
                **{n: {"image": path, "text": "q", "label": 1}
                   for n in ("vqa_rad", "slake", "medvqa2019")}}
    assert set(expected) == set(tasks.TASKS)
    for name, task in tasks.TASKS.items():
        # the "transform" returns the path
        item = data.TaskDataset([record], task, lambda img, rng: path)[0]
        assert item == {"index": 0, **expected[name]}, name
    roco = data.TaskDataset([record] * 40, tasks.TASKS["roco_retrieval"],
                            lambda img, rng: img, train=True)
    drawn = {roco[i]["text"] for i in range(40)}
    assert drawn == set(record["texts"])
    assert {tasks.num_outputs(t, {"label_names": ["x"] * 5, "answers": ["y"] * 7})
            for t in tasks.TASKS.values()
            if isinstance(t.kind, tasks.Classify)} == {5, 1, 7}


def _fake_batch(n_labels, B=3, V=50, T=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.randint(0, 2, (B, 5), generator=g).float()[:, :n_labels],
            "label": torch.tensor([0, 2, 1]), "target_ids": ids}


@pytest.mark.parametrize("name", ["chexpert", "radnli", "vqa_rad", "roco_retrieval",
                                  "mimic_sum", "mimic_gen"])
def test_every_trainable_parameter_gets_a_gradient(name):
    """What freeze_unreached leaves trainable is exactly what the task's loss reaches
    (DDP needs no unused search)."""
    task = tasks.TASKS[name]
    torch.manual_seed(0)
    model = tasks.TaskModel(
        PTUnifier(ModelConfig(**{k: v for k, v in FINETUNE_PRESETS["tiny"].items()
                                 if k in ModelConfig.__dataclass_fields__}, vocab_size=50)),
        task, n_out=5 if task.kind is tasks.MULTI_LABEL else 3, max_gen_len=12)
    batch = _fake_batch(5 if task.kind is tasks.MULTI_LABEL else 1)
    frozen = optim.freeze_unreached(model, task.kind.loss(model, model(batch), batch, 0)[0])
    assert "backbone.itm_head.fc1.weight" in frozen  # no fine-tuning task uses the ITM head
    loss, _ = task.kind.loss(model, model(batch), batch, 0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    uses_image = task.image
    assert ("backbone.patch_embed.proj.weight" in frozen) != uses_image


def test_pos_embed_interpolation_keeps_cls_and_resizes_the_grid():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 4 * 4, 8, generator=g)
    new = interpolate_pos_embed(pos, 6)
    assert new.shape == (1, 1 + 6 * 6, 8)
    torch.testing.assert_close(new[:, 0], pos[:, 0], rtol=0, atol=0)  # the [IMG_CLS] row is kept
    torch.testing.assert_close(interpolate_pos_embed(pos, 4), pos)  # same grid: unchanged
    # a grid that is constant along rows stays constant along rows: the
    # patches are resized as a 2-D image
    # value = row index
    ramp = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1).expand(1, 16, 8)
    out = interpolate_pos_embed(torch.cat([torch.zeros(1, 1, 8), ramp], 1), 8)[0, 1:].view(8, 8, 8)
    torch.testing.assert_close(out, out[:, :1].expand(8, 8, 8))
    assert bool((out[1:, 0, 0] >= out[:-1, 0, 0]).all()) and not torch.allclose(out[0], out[-1])
    # a backbone moved to another image size reads images of that size
    model = PTUnifier(ModelConfig(image_size=32, patch_size=8, dim=16, depth=1, heads=2,
                                  pool_size=8, k_v=4, k_l=3))
    set_image_size(model, 48)
    assert (model.cfg.image_size == 48
            and model(image=torch.randn(2, 3, 48, 48)).hidden.shape[1] == 1 + 36 + 3 + 2)


def test_killed_run_resumes_exactly(world, tmp_path, monkeypatch):
    """A run that dies after its step-4 validation and is restarted with --resume ends where
    the uninterrupted run ends: same per-step losses, same selected step and test metrics,
    same saved weights. Only what is on disk survives the 'kill' (an exception out of the
    training loop), as with SIGKILL."""
    flags = ["--task", "chexpert", "--steps", "8", "--eval-every", "2", "--log-every", "1"]
    finetune.main(["--preset", "tiny", "--synth-root", world[0], *flags, "--init", "scratch",
                   "--out", str(tmp_path / "ref")])
    real = optim.optimizer_step
    dies_at_step_6 = killed_at(6, real)

    monkeypatch.setattr(optim, "optimizer_step", dies_at_step_6)
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        finetune.main(["--preset", "tiny", "--synth-root", world[0], *flags,
                       "--init", "scratch", "--out", out])
    monkeypatch.setattr(optim, "optimizer_step", real)
    assert checkpoint.resolve_checkpoint(os.path.join(out, "train_state")).endswith("step_0000004")
    finetune.main(["--preset", "tiny", "--synth-root", world[0], *flags, "--init", "scratch",
                   "--out", out, "--resume", out])

    def losses(path):
        rows = [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}  # the last line of a step counts

    ref, res = losses(tmp_path / "ref"), losses(out)
    assert sorted(res) == list(range(1, 9)) and res == ref
    assert_same_selection(tmp_path / "ref", out)


def assert_same_selection(ref, out):
    """Two fine-tuning runs selected the same step, scored it alike and saved the same weights."""
    a, b = (json.loads(open(os.path.join(p, "results.json")).read()) for p in (ref, out))
    assert a["best_step"] == b["best_step"] and a["metrics"] == b["metrics"]
    wa, wb = (load_file(os.path.join(checkpoint.resolve_checkpoint(str(p)), "model.safetensors"))
              for p in (ref, out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stop_signal_saves_the_step_in_flight_and_resumes_to_the_uninterrupted_end(
        world, tmp_path, monkeypatch, stop_lines):
    """SIGTERM during step 3, between validations (every 4 steps): the step finishes and its
    resumable state is saved (there was none before); resumed, the run selects, tests and saves
    what the uninterrupted run does."""
    flags = ["--preset", "tiny", "--synth-root", world[0], "--task", "chexpert", "--init",
             "scratch", "--steps", "6", "--eval-every", "4", "--log-every", "1"]
    finetune.main([*flags, "--out", str(tmp_path / "ref")])
    out = str(tmp_path / "stopped")
    real = optim.optimizer_step
    monkeypatch.setattr(optim, "optimizer_step", signals_at(3, real, signal.SIGTERM))
    with pytest.raises(SystemExit) as e:
        finetune.main([*flags, "--out", out])
    monkeypatch.setattr(optim, "optimizer_step", real)
    assert e.value.code == 128 + signal.SIGTERM
    ckpt = checkpoint.resolve_checkpoint(os.path.join(out, "train_state"))
    assert ckpt.endswith("step_0000003") and checkpoint.load_trainer_state(ckpt)["step"] == 3
    assert stop_lines == [f"SIGTERM: stopped; the last checkpoint is {ckpt}: run the same command "
                          f"with --resume {out}"]
    finetune.main([*flags, "--out", out, "--resume", out])
    assert_same_selection(tmp_path / "ref", out)


# ---- text lengths at fine-tuning (long inputs and targets) ---------------------------------------
def test_text_positions_are_extended_with_the_learned_rows_or_truncated():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(5, 4, generator=g)
    longer = resize_text_positions(pos, 12)
    assert longer.shape == (12, 4)
    # the learned rows are kept as they are
    torch.testing.assert_close(longer[:5], pos, rtol=0, atol=0)
    # then rows 1..4 repeated
    torch.testing.assert_close(longer[5:], pos[[1, 2, 3, 4, 1, 2, 3]], rtol=0, atol=0)
    torch.testing.assert_close(resize_text_positions(pos, 3), pos[:3], rtol=0, atol=0)
    torch.testing.assert_close(resize_text_positions(pos, 5), pos, rtol=0, atol=0)
    # a backbone moved to a longer text length reads texts of that length
    model = PTUnifier(ModelConfig(image_size=32, patch_size=8, max_text_len=8, dim=16, depth=1,
                                  heads=2, pool_size=8, k_v=4, k_l=3))
    old = model.position_embeddings.weight.detach().clone()
    set_text_len(model, 20)
    assert model.cfg.max_text_len == 20 and model.position_embeddings.weight.requires_grad
    torch.testing.assert_close(model.position_embeddings.weight[:8], old, rtol=0, atol=0)
    ids = torch.randint(5, 50, (2, 20))
    assert model(input_ids=ids).hidden.shape[1] == 1 + 4 + 20


def test_length_to_cover_is_the_rounded_up_95th_percentile():
    lengths = list(range(1, 101))
    # 95 texts of 100 fit in 95 tokens; 96 is the next multiple of 8
    assert tasks.length_to_cover(lengths) == (96, 95)
    assert tasks.length_to_cover([3] * 19 + [100]) == (8, 3)  # 19 of 20 texts (95%) fit in 3 tokens
    assert tasks.length_to_cover([3] * 18 + [100, 100]) == (104, 100)  # 18 of 20 is only 90%
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 40, 333):  # against numpy's nearest-rank percentile
        lengths = torch.randint(3, 200, (n,), generator=g).tolist()
        p = int(np.percentile(lengths, 95, method="inverted_cdf"))
        assert tasks.length_to_cover(lengths) == (8 * -(-p // 8), p)


WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def test_truncation_shares_on_a_hand_made_case(tmp_path):
    tok = train_tokenizer(WORDS * 3, 200, str(tmp_path / "tokenizer.json"))
    # one token per word
    assert all(len(tok.encode(w, add_special_tokens=False).ids) == 1 for w in WORDS)
    # 1..8 words = 3..10 tokens with [CLS] and [SEP]
    texts = [" ".join(WORDS[:n]) for n in range(1, 9)]
    # VQA questions at 8 tokens: the 7- and 8-word questions (9 and 10 tokens) are cut, 2 of 8
    vqa = [{"question": t} for t in texts]
    lengths = tasks.text_lengths(tasks.TASKS["vqa_rad"], vqa, tok)
    assert lengths == {"inputs": list(range(3, 11))}
    assert tasks.truncated_shares(lengths, 8, 6) == {"inputs": 0.25}
    # summarisation: findings (1..8 words) -> impression (the reverse order):
    # inputs at 6 tokens, targets at 9
    summ = [{"text_a": a, "target": b} for a, b in zip(texts, reversed(texts))]
    assert (tasks.truncated_shares(tasks.text_lengths(tasks.TASKS["mimic_sum"], summ, tok), 6, 9)
            == {"inputs": 4 / 8, "targets": 1 / 8})
    # RadNLI pairs: [CLS] a [SEP] b [SEP] = words + 3; (1 + 1) .. (8 + 8) words,
    # cut above 10 tokens: 4..8 + 4..8
    nli = [{"text_a": t, "text_b": t} for t in texts]
    assert (tasks.truncated_shares(tasks.text_lengths(tasks.TASKS["radnli"], nli, tok), 10, 6)
            == {"inputs": 5 / 8})
    # the shares are those of the texts the collate actually shortens (words kept vs words given)
    items = {"vqa_rad": [{"index": i, "text": r["question"]} for i, r in enumerate(vqa)],
             "mimic_sum": [{"index": i, "text": r["text_a"], "target": r["target"]}
                           for i, r in enumerate(summ)],
             "radnli": [{"index": i, "text_a": r["text_a"], "text_b": r["text_b"]}
                        for i, r in enumerate(nli)]}
    for name, records, max_len, max_gen in (("vqa_rad", vqa, 8, 6), ("mimic_sum", summ, 6, 9),
                                            ("radnli", nli, 10, 6)):
        task = tasks.TASKS[name]
        batch = data.task_collate(tok, max_len, max_gen)(items[name])
        kept = (batch["attention_mask"].sum(1) - (3 if len(task.text) == 2 else 2)).tolist()
        given = [sum(len(v.split()) for k, v in it.items() if k in ("text", "text_a", "text_b"))
                 for it in items[name]]
        shares = tasks.truncated_shares(tasks.text_lengths(task, records, tok), max_len, max_gen)
        assert shares["inputs"] == sum(k < n for k, n in zip(kept, given)) / len(records)
        if "targets" in shares:
            kept = ((batch["target_ids"] != special_ids(tok)["pad"]).sum(1) - 2).tolist()
            assert shares["targets"] == sum(k < len(r["target"].split())
                                            for k, r in zip(kept, records)) / len(records)


def test_lengths_default_to_the_95th_percentile_of_the_training_split(world, tmp_path, capsys):
    """mimic_sum from scratch without --max-text-len / --max-gen-len: each is the nearest-rank 95th
    percentile of the whole training split's token counts rounded up to 8 (the input length not
    below the preset's 24), and results.json holds the truncated shares of every split."""
    out = tmp_path / "sum"
    finetune.main(["--preset", "tiny", "--synth-root", world[0], "--task", "mimic_sum",
                   "--init", "scratch", "--steps", "2", "--eval-every", "2",
                   "--data-frac", "0.5", "--out", str(out)])
    tok = load_tokenizer(os.path.join(world[1], "tokenizer.json"))
    splits = {s: data.read_split(os.path.join(world[1], "mimic_sum"), s)
              for s in ("train", "val", "test")}

    def count(text):
        return len(tok.encode(text, add_special_tokens=False).ids) + 2

    def cover(texts):
        return 8 * -(-int(np.percentile([count(t) for t in texts], 95, method="inverted_cdf")) // 8)

    # the whole split, not the 50% subset
    max_text_len = max(24, cover([r["text_a"] for r in splits["train"]]))
    max_gen_len = cover([r["target"] for r in splits["train"]])
    r = json.loads((out / "results.json").read_text())
    assert ((r["config"]["model"]["max_text_len"], r["config"]["max_gen_len"])
            == (max_text_len, max_gen_len))
    # the tiny world's findings are longer than the preset: the default did extend
    assert max_text_len > 24
    assert (r["text_lengths"]["inputs"]["by"] == "data"
            and r["text_lengths"]["targets"]["length"] == max_gen_len)
    splits["train"] = data.subset(splits["train"], 0.5, 0)
    for s, recs in splits.items():
        assert r["truncated"][s] == {"inputs": sum(count(x["text_a"]) > max_text_len
                                                   for x in recs) / len(recs),
                                     "targets": sum(count(x["target"]) > max_gen_len
                                                    for x in recs) / len(recs)}
    printed = capsys.readouterr().out
    assert (f"mimic_sum input length {max_text_len}: the 95th percentile" in printed
            and "truncated: train" in printed)
    saved = checkpoint.read_checkpoint_config(checkpoint.resolve_checkpoint(str(out)))["config"]
    assert saved["model"]["max_text_len"] == max_text_len and saved["max_gen_len"] == max_gen_len


# ---- resume under DDP: each rank restores its own RNG --------------------------------------------
def _resume_worker(rank, world, synth_root, out, ports):
    """One rank of a 2-process fine-tune with dropout: a run killed after its step-2 validation
    and resumed, then the same run uninterrupted. Dropout masks come from each rank's own
    global RNG (seeded seed + rank)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    flags = ["--preset", "tiny", "--synth-root", synth_root, "--task", "radnli",
             "--init", "scratch", "--steps", "4", "--eval-every", "2", "--log-every", "1",
             "--dropout", "0.3", "--max-text-len", "24"]
    real = optim.optimizer_step
    dies_at_step_3 = killed_at(3, real)

    optim.optimizer_step = dies_at_step_3
    try:
        finetune.main([*flags, "--out", f"{out}/killed"])
    except KeyboardInterrupt:
        pass
    # the killed run's DDP wrapper lives on in a reference cycle (the traceback's frames): freed
    # now, while its process group is still registered (distributed.leave says why)
    gc.collect()
    optim.optimizer_step = real
    # ends the process group
    finetune.main([*flags, "--out", f"{out}/killed", "--resume", f"{out}/killed"])
    os.environ["MASTER_PORT"] = str(ports[1])
    finetune.main([*flags, "--out", f"{out}/ref"])


def test_resume_under_ddp_restores_each_ranks_rng(world, tmp_path):
    """2 gloo processes, dropout on: the killed-and-resumed run ends exactly where the uninterrupted
    one ends (losses, weights), which needs rank 1 to restore rank 1's RNG state, not rank 0's."""
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    mp.spawn(_resume_worker, args=(2, world[0], str(tmp_path), ports), nprocs=2, join=True)
    state = checkpoint.load_trainer_state(os.path.join(tmp_path, "ref", "train_state"))
    assert (len(state["rng"]) == 2
            and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"]))

    def losses(path):
        rows = [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}  # the last line of a step counts

    ref, res = losses(tmp_path / "ref"), losses(tmp_path / "killed")
    assert sorted(res) == [1, 2, 3, 4] and res == ref
    wa, wb = (load_file(os.path.join(
                  checkpoint.resolve_checkpoint(os.path.join(tmp_path, p, "train_state")),
                  "model.safetensors"))
              for p in ("ref", "killed"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def skipped_at(n, real):
    """A stand-in for optim.optimizer_step whose n-th call meets non-finite gradients: no update,
    None, as the real one returns then."""
    calls = {"n": 0}

    def step(model, opt, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            opt.zero_grad(set_to_none=True)
            return None
        return real(model, opt, *args, **kwargs)
    return step


@pytest.mark.parametrize("script", ["train.py", "finetune.py"])
def test_a_skipped_last_step_is_saved_and_logged_alike_by_both_scripts(script, world, tmp_path,
                                                                       monkeypatch):
    """The last step is non-finite: the guard logs it as skipped, the finite steps of its logging
    window are logged at it, and the run's checkpoint is of that step (the weights of the step
    before it), in pre-training and in fine-tuning alike."""
    import train
    monkeypatch.setattr(optim, "optimizer_step", skipped_at(4, optim.optimizer_step))
    out = tmp_path / "run"
    if script == "train.py":
        train.main(["--preset", "tiny", "--synth-root", world[0], "--steps", "4", "--log-every",
                    "2", "--eval-pairs", "0", "--out", str(out)])
        ckpt = checkpoint.resolve_checkpoint(str(out))
    else:
        run(world, "--task", "chexpert", "--init", "scratch", "--log-every", "2", "--out", str(out))
        ckpt = checkpoint.resolve_checkpoint(str(out / "train_state"))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log if "skipped" in r] == [4]
    assert [r["step"] for r in log if "loss" in r] == [2, 4]  # step 3 logged at step 4
    assert ckpt.endswith("step_0000004")
