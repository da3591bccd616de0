"""finetune.py: every task end to end on the tiny synthetic world, initialisation from a pre-training checkpoint
(weights, architecture, tokenizer, image-size change), the refusals, the training subsets, the heads' gradient
coverage and the position-embedding interpolation."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import finetune
import train
from ptunifier_min import data, engine, tasks
from ptunifier_min.config import FINETUNE_PRESETS, FinetuneConfig, ModelConfig, build
from ptunifier_min.model import PTUnifier
from ptunifier_min.world import ensure_prepared

TASK_KEYS = {  # the metric keys results.json must hold for each kind of task
    "multilabel": {"auroc", "per_class", "undefined"}, "binary": {"auroc", "per_class", "undefined"},
    "nli": {"accuracy"}, "vqa": {"overall", "open", "closed", "oov_share"},
    "retrieval": {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean"},
    "summarize": {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr"},
}
TASK_KEYS["generate"] = TASK_KEYS["summarize"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny synthetic world, every task folder prepared, shared by the tests of this module (and test_eval.py,
    which finds it at the same place)."""
    root = str(tmp_path_factory.getbasetemp() / "ptu_world")
    cfg = build(FinetuneConfig, {**FINETUNE_PRESETS["tiny"], "synth_root": root})
    prepared, tok = ensure_prepared(cfg, [t.folder for t in tasks.TASKS.values()], engine.Dist(), lambda *a: None)
    return root, prepared


def run(world, *flags):
    finetune.main(["--preset", "tiny", "--synth-root", world[0], "--steps", "4", "--eval-every", "2", *flags])


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_every_task_end_to_end(name, world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/pretrain here: the default init falls back to scratch, out is the default
    run(world, "--task", name)
    task = tasks.TASKS[name]
    out = tmp_path / "runs" / "finetune" / f"{name}-scratch"
    r = json.loads((out / "results.json").read_text())
    assert r["task"] == name and r["init"] == "scratch"
    assert TASK_KEYS[task.kind] <= set(r["metrics"]) and TASK_KEYS[task.kind] <= set(r["val_metrics"])
    main = r["metrics"][task.main]
    assert main is None or 0.0 <= main <= 1.0
    assert r["best_step"] in (2, 4) and r["config"]["task"] == name and r["config"]["steps"] == 4
    # the hash covers exactly the prepared splits (data_frac 1), and the selected weights are the saved checkpoint
    folder = os.path.join(world[1], task.folder)
    assert r["split_hash"] == tasks.split_hash({s: data.read_split(folder, s) for s in ("train", "val", "test")})
    ckpt = engine.resolve_checkpoint(str(out))
    assert ckpt.endswith(f"step_{r['best_step']:07d}") and os.path.isfile(os.path.join(ckpt, "tokenizer.json"))
    assert engine.read_checkpoint_config(ckpt)["config"]["task"] == name


def test_init_from_pretraining_checkpoint(world, tmp_path):
    pre = str(tmp_path / "pre")
    train.main(["--preset", "tiny", "--synth-root", world[0], "--steps", "2", "--eval-pairs", "0", "--out", pre])
    out = tmp_path / "ft"
    # backbone LR 0: the fine-tuned backbone must still be the pre-trained one, so loading is checked tensor by tensor
    run(world, "--task", "chexpert", "--init", pre, "--image-size", "40", "--lr-backbone", "0", "--out", str(out))
    r = json.loads((out / "results.json").read_text())
    assert r["init"] == os.path.abspath(engine.resolve_checkpoint(pre))
    assert r["config"]["model"]["image_size"] == 40 and r["config"]["model"]["dim"] == 32
    assert r["config"]["tokenizer"].startswith(engine.resolve_checkpoint(pre))
    before = load_file(os.path.join(engine.resolve_checkpoint(pre), "model.safetensors"))
    after = load_file(os.path.join(engine.resolve_checkpoint(str(out)), "model.safetensors"))
    for k in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "word_embeddings.weight", "cls_token"):
        torch.testing.assert_close(after[f"backbone.{k}"], before[k], rtol=0, atol=0)
    assert after["backbone.pos_embed"].shape == (1, 1 + 5 * 5, 32) and before["pos_embed"].shape == (1, 1 + 4 * 4, 32)
    torch.testing.assert_close(after["backbone.pos_embed"][:, 0], before["pos_embed"][:, 0], rtol=0, atol=0)
    assert "head.fc1.weight" in after  # the fresh classification head

    with pytest.raises(SystemExit, match=r"(?s)another architecture.*dim: checkpoint 32 vs requested 48"):
        run(world, "--task", "chexpert", "--init", pre, "--dim", "48", "--out", str(tmp_path / "refused"))
    with pytest.raises(SystemExit, match="fine-tuned chexpert checkpoint"):
        run(world, "--task", "rsna", "--init", str(out), "--out", str(tmp_path / "refused"))


def test_init_that_does_not_exist_is_an_error(world, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        run(world, "--task", "rsna", "--init", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"))


def test_unknown_task_lists_the_tasks():
    with pytest.raises(SystemExit) as e:
        finetune.main(["--task", "mnist"])
    assert "mnist" in str(e.value) and all(name in str(e.value) for name in tasks.TASKS)


def test_given_model_flags_resolves_abbreviations():
    assert finetune.given_model_flags(["--dim", "4", "--image-size=48", "--dep", "3", "--steps", "2"]) == \
        ["depth", "dim", "image_size"]


def test_data_frac_subsets_are_seeded_nested_and_not_too_small():
    records = [{"id": f"r{i:03d}"} for i in range(500)]
    one, ten = tasks.subset(records, 0.01, 0), tasks.subset(records, 0.1, 0)
    assert len(one) == tasks.MIN_TRAIN and len(ten) == 50
    assert {r["id"] for r in one} <= {r["id"] for r in ten}  # 1% inside 10%
    assert tasks.subset(list(reversed(records)), 0.1, 0) == ten  # independent of the file order
    assert tasks.subset(records, 0.1, 1) != ten and tasks.subset(records, 1.0, 0) == records
    with pytest.raises(SystemExit):
        tasks.subset(records, 0.0, 0)
    val = tasks.cap(records, 10, 0)
    assert len(val) == 10 and val == sorted(val, key=lambda r: r["id"]) and val == tasks.cap(records, 10, 0)
    assert tasks.cap(records, 0, 0) == records and tasks.cap(records, 900, 0) == records


def test_data_frac_run_records_its_subset(world, tmp_path):
    out = tmp_path / "frac"
    run(world, "--task", "rsna", "--init", "scratch", "--data-frac", "0.1", "--out", str(out))
    r = json.loads((out / "results.json").read_text())
    full = data.read_split(os.path.join(world[1], "rsna"), "train")
    assert r["counts"]["train"] == min(len(full), max(tasks.MIN_TRAIN, round(0.1 * len(full))))
    splits = {s: data.read_split(os.path.join(world[1], "rsna"), s) for s in ("val", "test")}
    assert r["split_hash"] == tasks.split_hash({"train": tasks.subset(full, 0.1, 0), **splits})
    assert r["split_hash"] != tasks.split_hash({"train": full, **splits})


def _fake_batch(kind, B=3, V=50, T=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "labels": torch.randint(0, 2, (B, 5), generator=g).float()[:, :5 if kind == "multilabel" else 1],
            "label": torch.tensor([0, 2, 1]), "target_ids": ids}


@pytest.mark.parametrize("name", ["chexpert", "radnli", "vqa_rad", "roco_retrieval", "mimic_sum", "mimic_gen"])
def test_every_trainable_parameter_gets_a_gradient(name):
    """What freeze_unreached leaves trainable is exactly what the task's loss reaches (DDP needs no unused search)."""
    task = tasks.TASKS[name]
    torch.manual_seed(0)
    model = tasks.TaskModel(PTUnifier(ModelConfig(**{k: v for k, v in FINETUNE_PRESETS["tiny"].items()
                                                     if k in ModelConfig.__dataclass_fields__}, vocab_size=50)),
                            task, n_out=5 if task.kind == "multilabel" else 3, max_gen_len=12)
    batch = _fake_batch(task.kind)
    frozen = tasks.freeze_unreached(model, tasks.task_loss(model, task, model(batch), batch, 0)[0])
    assert "backbone.itm_head.fc1.weight" in frozen  # no fine-tuning task uses the ITM head
    loss, _ = tasks.task_loss(model, task, model(batch), batch, 0)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    uses_image = task.kind in tasks.IMAGE_INPUT
    assert ("backbone.patch_embed.proj.weight" in frozen) != uses_image


def test_pos_embed_interpolation_keeps_cls_and_resizes_the_grid():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 4 * 4, 8, generator=g)
    new = tasks.interpolate_pos_embed(pos, 6)
    assert new.shape == (1, 1 + 6 * 6, 8)
    torch.testing.assert_close(new[:, 0], pos[:, 0], rtol=0, atol=0)  # the [IMG_CLS] row is kept
    torch.testing.assert_close(tasks.interpolate_pos_embed(pos, 4), pos)  # same grid: unchanged
    # a grid that is constant along rows stays constant along rows: the patches are resized as a 2-D image
    ramp = torch.arange(4.0).repeat_interleave(4).view(1, 16, 1).expand(1, 16, 8)  # value = row index
    out = tasks.interpolate_pos_embed(torch.cat([torch.zeros(1, 1, 8), ramp], 1), 8)[0, 1:].view(8, 8, 8)
    torch.testing.assert_close(out, out[:, :1].expand(8, 8, 8))
    assert bool((out[1:, 0, 0] >= out[:-1, 0, 0]).all()) and not torch.allclose(out[0], out[-1])
    # a backbone moved to another image size reads images of that size
    model = PTUnifier(ModelConfig(image_size=32, patch_size=8, dim=16, depth=1, heads=2, pool_size=8, k_v=4, k_l=3))
    tasks.set_image_size(model, 48)
    assert model.cfg.image_size == 48 and model(image=torch.randn(2, 3, 48, 48)).hidden.shape[1] == 1 + 36 + 3 + 2


def test_killed_run_resumes_exactly(world, tmp_path, monkeypatch):
    """A run that dies after its step-4 validation and is restarted with --resume ends where the uninterrupted run ends:
    same per-step losses, same selected step and test metrics, same saved weights. Only what is on disk survives the
    'kill' (an exception out of the training loop), as with SIGKILL."""
    flags = ["--task", "chexpert", "--steps", "8", "--eval-every", "2", "--log-every", "1"]
    finetune.main(["--preset", "tiny", "--synth-root", world[0], *flags, "--init", "scratch", "--out",
                   str(tmp_path / "ref")])
    real, calls = engine.optimizer_step, {"n": 0}

    def dies_at_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "optimizer_step", dies_at_step_6)
    out = str(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        finetune.main(["--preset", "tiny", "--synth-root", world[0], *flags, "--init", "scratch", "--out", out])
    monkeypatch.setattr(engine, "optimizer_step", real)
    assert engine.resolve_checkpoint(os.path.join(out, "train_state")).endswith("step_0000004")
    finetune.main(["--preset", "tiny", "--synth-root", world[0], *flags, "--init", "scratch", "--out", out,
                   "--resume", out])

    def losses(path):
        rows = [json.loads(line) for line in open(os.path.join(path, "log.jsonl"))]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}  # the last line of a step counts

    ref, res = losses(tmp_path / "ref"), losses(out)
    assert sorted(res) == list(range(1, 9)) and res == ref
    a, b = (json.loads(open(os.path.join(p, "results.json")).read()) for p in (tmp_path / "ref", out))
    assert a["best_step"] == b["best_step"] and a["metrics"] == b["metrics"]
    wa, wb = (load_file(os.path.join(engine.resolve_checkpoint(str(p)), "model.safetensors")) for p in (tmp_path / "ref", out))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
