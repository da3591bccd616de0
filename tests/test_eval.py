"""eval.py: zero-shot retrieval where the answer is known, zero-shot evaluation from a
pre-training checkpoint, the re-evaluation of fine-tuned checkpoints (it must reproduce
results.json), and Table 2 from results files."""

import json
import os
import re
import shutil
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import eval as eval_script
import finetune
import train

from ptunifier_min.images import ImageTransform
import ptunifier_min
from ptunifier_min import checkpoint, data, grounding, manifests, metrics, optim, retrieval, tasks
from ptunifier_min.api import Model
from ptunifier_min.config import FINETUNE_PRESETS, FinetuneConfig, build
from ptunifier_min.datasets import prepare as P
from ptunifier_min.model import PTUnifier, normalize, pixel_table
from ptunifier_min.datasets.source import train_tokenizer
# world: the shared tiny synthetic world fixture
from test_finetune import TASK_KEYS, killed_at, run, world  # noqa: F401

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


class MatchedEncoder(torch.nn.Module):
    """A stand-in backbone whose ITC embeddings are made to match: image i (gray level 20 i +
    10) and the text WORDS[i] both embed to one-hot(i); `shift` moves every image to
    one-hot(i + shift) instead."""

    def __init__(self, tok, shift=0):
        super().__init__()
        self.shift = shift
        self.word_index = {tok.token_to_id(w): i for i, w in enumerate(WORDS)}

    def forward(self, image=None, input_ids=None, attention_mask=None, padded=None, read="all"):
        if image is not None:
            if image.dtype == torch.uint8:  # the loaders' pixels, which PTUnifier normalises itself
                image = normalize(image, pixel_table())
            level = (image[:, 0].mean((1, 2)) * 0.5 + 0.5) * 255  # back to the pixel value
            k = ((level - 10) / 20).round().long()
        else:
            # the token after [CLS]
            k = torch.tensor([self.word_index[int(t)] for t in input_ids[:, 1]])
        return SimpleNamespace(pooled=F.one_hot(k, len(WORDS)).float(),
                               modality="text" if image is None else "image")

    def itc_embed(self, enc):
        pooled = enc.pooled.roll(self.shift, 1) if enc.modality == "image" else enc.pooled
        return F.normalize(pooled, dim=-1)


def sizes(cfg):
    return cfg.model.image_size, cfg.model.max_text_len


@pytest.fixture
def toy(tmp_path):
    tok = train_tokenizer(WORDS * 3, 200, str(tmp_path / "tokenizer.json"))
    assert all(tok.token_to_id(w) is not None for w in WORDS)  # each word is one token
    records = []
    for i, w in enumerate(WORDS):
        path = str(tmp_path / f"img{i}.png")
        Image.fromarray(np.full((40, 48), 20 * i + 10, np.uint8)).save(path)
        records.append({"id": f"r{i}", "image": path, "texts": [w]})
    return tok, records


def test_zero_shot_retrieval_on_a_toy_set_with_known_answers(toy):
    tok, records = toy
    cfg = build(FinetuneConfig, FINETUNE_PRESETS["tiny"])
    m = retrieval.retrieval_metrics(MatchedEncoder(tok), records, tok, *sizes(cfg),
                                    torch.device("cpu"))
    assert (all(m[f"{d}_r{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
            and m["pairs"] == 8)
    # every image now matches the next image's text: its own text ties with 6 others
    # behind that one -> rank 8 of 8
    m = retrieval.retrieval_metrics(MatchedEncoder(tok, shift=1), records, tok, *sizes(cfg),
                                    torch.device("cpu"))
    assert [m[f"i2t_r{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 1.0]
    assert [m[f"t2i_r{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 1.0]


class ITMKnowsBetter(MatchedEncoder):
    """Shifted ITC embeddings (every image ranks the wrong text first), but an ITM
    head that knows the true pairs."""

    def forward(self, image=None, input_ids=None, attention_mask=None, padded=None, read="all"):
        if image is not None and input_ids is not None:
            ki = super().forward(image=image).pooled.argmax(1)
            kt = super().forward(input_ids=input_ids).pooled.argmax(1)
            return SimpleNamespace(pooled=(ki == kt).float()[:, None])
        return super().forward(image, input_ids, attention_mask)

    def itm_logits(self, pooled):
        return torch.cat([-pooled, pooled], 1)


def test_itm_reranking_changes_image_to_text_only(toy):
    tok, records = toy
    cfg = build(FinetuneConfig, FINETUNE_PRESETS["tiny"])
    m = retrieval.retrieval_metrics(ITMKnowsBetter(tok, shift=1), records, tok, *sizes(cfg),
                                    torch.device("cpu"), rerank_top=8)
    # ITM puts every image's own text first
    assert [m[f"i2t_r{k}"] for k in (1, 5, 10)] == [1.0, 1.0, 1.0]
    # text-to-image stays the ITC ranking
    assert [m[f"t2i_r{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 1.0]


class ITMMargins(ITMKnowsBetter):
    """An ITM head that orders every candidate list correctly, with margins around `offset`: offset
    + 1 for the true pair, offset for every other pair."""

    def __init__(self, tok, offset):
        super().__init__(tok)
        self.offset = offset

    def itm_logits(self, pooled):
        return torch.cat([torch.zeros_like(pooled), self.offset + pooled], 1)


@pytest.mark.parametrize("offset", [-10.0, -3.0, -1.5, -0.5, 0.0, 2.0, 10.0])
def test_itm_reranked_candidates_stay_on_top_whatever_the_margins(toy, offset):
    """The re-ranked top-k stays above the rest of its row, ordered by the ITM margin.
    (A score of max|sim| + 1 + margin would sink the whole top-k under the other candidates for
    margins below about -1.) The re-ranking works from the embeddings, with no matrix to inspect:
    each image's own text, 3rd by ITC, comes first with the top 3 re-ranked, and keeps its ITC
    rank (3rd) when only the top 2 are."""
    tok, records = toy
    n = len(records)
    # [N_img, N_txt]: the own text 3rd by ITC
    sim = -0.1 * ((torch.arange(n)[None, :] - torch.arange(n)[:, None] + 2) % n).float()
    cfg = build(FinetuneConfig, FINETUNE_PRESETS["tiny"])
    paths, texts, txt_image = retrieval.pairs(records)
    model = ITMMargins(tok, offset)

    def margins(i, cand):
        return retrieval.itm_margins(model, paths[i], [texts[j] for j in cand.tolist()], tok,
                                     *sizes(cfg), torch.device("cpu"))

    for top, r1 in ((3, 1.0), (4, 1.0), (2, 0.0)):
        m = retrieval.embedding_recall(torch.eye(n), sim.t(), txt_image, ks=(1, 3, 4),
                                       rerank_top=top, itm_margins=margins)
        assert (m["i2t_r1"], m["i2t_r3"], m["i2t_r4"]) == (r1, 1.0, 1.0), top


def test_one_itc_embedding_for_pretraining_retrieval_fine_tuning_and_the_api(toy):
    """Retrieval, the fine-tuning ITC head and the Python API embed an image or a
    text exactly as the reference computation (projection of the pooled single-modality pass,
    L2-normalised), and a pair is refused."""
    tok, records = toy
    cfg = build(FinetuneConfig, FINETUNE_PRESETS["tiny"])
    cfg.model.vocab_size = tok.get_vocab_size()
    torch.manual_seed(0)
    model = PTUnifier(cfg.model).eval()
    size, length = sizes(cfg)
    ds = data.TaskDataset(records, tasks.TASKS["roco_retrieval"], ImageTransform(size).pixels)
    batch = data.task_collate(tok, length, 0)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        ref_image = F.normalize(model.itc_image_proj(model(image=batch["image"]).pooled), dim=-1)
        ref_text = F.normalize(model.itc_text_proj(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooled),
            dim=-1)
        zi, zt = tasks.TaskModel(model, tasks.TASKS["roco_retrieval"])(batch)
        api = Model(model, tok, cfg)
        paths, texts = [r["image"] for r in records], [r["texts"][0] for r in records]
        for image, text in ((zi, zt), (retrieval.embed_images(model, paths, size,
                                                              torch.device("cpu")),
                                       retrieval.embed_texts(model, texts, tok, length,
                                                             torch.device("cpu"))),
                            (api.encode_images(paths), api.encode_texts(texts))):
            torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-6)
            torch.testing.assert_close(text, ref_text, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="ITM's input"):
            model.itc_embed(model(image=batch["image"], input_ids=batch["input_ids"]))


def test_zero_shot_retrieval_through_the_one_evaluation(toy):
    """eval.py's zero-shot retrieval and finetune.py's evaluation are the one tasks.evaluate, with
    explicit settings: a bare backbone (the ITC head is its own) gives the same recalls as
    retrieval_metrics, and says its timing."""
    tok, records = toy
    cfg = build(FinetuneConfig, FINETUNE_PRESETS["tiny"])
    said = []
    m = tasks.evaluate(MatchedEncoder(tok, shift=1), tasks.TASKS["roco_retrieval"], records, tok,
                       image_size=cfg.model.image_size, max_text_len=cfg.model.max_text_len,
                       device=torch.device("cpu"), print0=said.append)
    assert [m[f"i2t_r{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 1.0] and m["pairs"] == 8
    assert (len(said) == 1
            and said[0].startswith("retrieval: 8 images x 8 texts = 16 encoder passes"))


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("pre"))
    train.main(["--preset", "tiny", "--synth-root", world[0], "--steps", "2",
                "--eval-pairs", "0", "--out", out])
    return out


def test_zero_shot_from_a_pretraining_checkpoint(pretrained, tmp_path, capsys):
    out = tmp_path / "zs"
    eval_script.main(["--task", "roco_retrieval", "--ckpt", pretrained, "--rerank-top", "4",
                      "--num-workers", "0", "--out", str(out)])
    r = json.loads((out / "results.json").read_text())
    assert (r["zero_shot"] is True and r["task"] == "roco_retrieval"
            and TASK_KEYS[tasks.RETRIEVE] <= set(r["metrics"]))
    assert "encoder passes and one matrix product" in capsys.readouterr().out
    eval_script.main(["--task", "chexpert", "--ckpt", pretrained,
                      "--num-workers", "0", "--out", str(out)])
    r = json.loads((out / "results.json").read_text())
    assert r["metrics"]["prompts"][:2] == ["atelectasis", "no atelectasis"]
    assert set(r["metrics"]["per_class"]) == {"Atelectasis", "Cardiomegaly", "Consolidation",
                                              "Edema", "Pleural Effusion"}
    with pytest.raises(SystemExit, match="fine-tune first"):
        eval_script.main(["--task", "vqa_rad", "--ckpt", pretrained])


@pytest.mark.parametrize("name", ["vqa_rad", "mimic_gen"])
def test_eval_reproduces_the_fine_tuning_test_metrics(name, world, tmp_path):  # noqa: F811
    out = tmp_path / "ft"
    run(world, "--task", name, "--init", "scratch", "--out", str(out))
    expected = json.loads((out / "results.json").read_text())
    eval_script.main(["--ckpt", str(out), "--num-workers", "0", "--out", str(tmp_path / "again")])
    got = json.loads((tmp_path / "again" / "results.json").read_text())
    assert got["task"] == name and got["zero_shot"] is False and got["init"] == "scratch"
    assert got["metrics"] == expected["metrics"]
    with pytest.raises(SystemExit, match=f"fine-tuned on {name}"):
        eval_script.main(["--ckpt", str(out), "--task", "rsna"])


def _fake_results(folder, task, metrics, init, frac=1.0):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"task": task, "metrics": metrics, "init": init,
                   "config": {"data_frac": frac}}, f)


def test_table_from_results_files(tmp_path, capsys):
    _fake_results(tmp_path / "a", "chexpert", {"auroc": 0.9012}, "/runs/pretrain/step_0001500")
    _fake_results(tmp_path / "b", "roco_retrieval", {"i2t_r1": 0.21, "t2i_r1": 0.208}, "scratch")
    _fake_results(tmp_path / "c" / "deeper", "chexpert", {"auroc": 0.5}, "scratch", frac=0.01)
    eval_script.main(["--table", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| run | CheXpert AUROC | RSNA AUROC | RadNLI Acc |")
    assert lines[2] == "| pre-trained | 90.1 | - | - | - | - | - | - | - | - | - |"
    assert lines[3] == "| scratch | - | - | - | - | - | 21.0 | 20.8 | - | - | - |"
    assert lines[4].startswith("| scratch, 1% train | 50.0 | -")
    table = json.loads((tmp_path / "table.json").read_text())
    assert [r["run"] for r in table["rows"]] == ["pre-trained", "scratch", "scratch, 1% train"]
    assert (table["rows"][0]["cells"]["CheXpert AUROC"]["runs"]
            == [str(tmp_path / "a" / "results.json")])


def test_eval_errors(tmp_path):
    with pytest.raises(SystemExit, match="needs --ckpt"):
        eval_script.main([])
    with pytest.raises(SystemExit, match="chexpert, rsna"):
        eval_script.main(["--task", "mnist", "--ckpt", str(tmp_path)])
    with pytest.raises(SystemExit, match="no results.json"):
        eval_script.main(["--table", str(tmp_path)])


def test_fine_tuning_at_a_longer_text_length_than_pre_training(
        pretrained, world, tmp_path, monkeypatch):  # noqa: F811
    """--max-text-len 40 from a checkpoint pre-trained at 24: the position table is extended
    (the learned rows kept, rows 1..23 repeated after them) before training, the fine-tuned
    checkpoint records 40, and eval.py rebuilds it and reproduces the test metrics. (Before:
    refused as 'another architecture'.)"""
    extended, real = {}, finetune.set_text_len

    def keep_a_copy(backbone, n):  # the table as fine-tuning starts from it
        real(backbone, n)
        extended["table"] = backbone.position_embeddings.weight.detach().clone()

    monkeypatch.setattr(finetune, "set_text_len", keep_a_copy)
    out = tmp_path / "ft"
    run(world, "--task", "vqa_rad", "--init", pretrained, "--max-text-len", "40", "--out", str(out))
    old = load_file(os.path.join(checkpoint.resolve_checkpoint(pretrained), "model.safetensors"))
    old = old["position_embeddings.weight"]
    assert old.shape == (24, 32) and extended["table"].shape == (40, 32)
    torch.testing.assert_close(extended["table"][:24], old, rtol=0, atol=0)
    torch.testing.assert_close(extended["table"][24:], old[1:17], rtol=0, atol=0)
    after = load_file(os.path.join(checkpoint.resolve_checkpoint(str(out)), "model.safetensors"))
    assert after["backbone.position_embeddings.weight"].shape == (40, 32)
    expected = json.loads((out / "results.json").read_text())
    assert expected["config"]["model"]["max_text_len"] == 40
    assert expected["text_lengths"]["inputs"]["by"] == "--max-text-len"
    eval_script.main(["--ckpt", str(out), "--num-workers", "0", "--out", str(tmp_path / "again")])
    got = json.loads((tmp_path / "again" / "results.json").read_text())
    assert got["config"]["model"]["max_text_len"] == 40 and got["metrics"] == expected["metrics"]


def _eval_worker(rank, world_size, port, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    eval_script.main(argv)


def test_eval_under_torchrun_shares_the_work_and_rank_0_writes(pretrained, tmp_path, monkeypatch):
    """Behaviour changed: eval.py refused to run under torchrun (every rank would have evaluated
    everything and written the same files). Now each rank evaluates its share, here of the ITM
    re-ranking, and rank 0 writes results.json with the metrics of one process."""
    argv = ["--task", "roco_retrieval", "--ckpt", pretrained, "--rerank-top", "3",
            "--num-workers", "0"]
    eval_script.main([*argv, "--out", str(tmp_path / "one")])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_eval_worker, args=(2, port, [*argv, "--out", str(tmp_path / "two")]), nprocs=2,
             join=True)
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["metrics"]
                for d in ("one", "two"))
    assert one.pop("seconds") > 0 and two.pop("seconds") > 0
    assert two == one
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="not under torchrun"):  # --table only reads files
        eval_script.main(["--table", str(tmp_path)])


# ---- records that never mislead --------------------------------------------------------------
def _results(folder, auroc, **extra):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump({"task": "chexpert", "metrics": {"auroc": auroc}, "init": "scratch", **extra}, f)


def test_table_counts_the_test_results_of_live_runs_each_checkpoint_once(tmp_path, capsys):
    """Before: the run --overwrite moved aside, a val result and a re-evaluation of the same
    checkpoint were averaged in ("52.5 (n=4)")."""
    step = "runs/a/step_0000004"  # finetune.py's record, relative to where it ran
    _results(tmp_path / "a", 0.8, checkpoint=step)
    _results(tmp_path / "a" / ".replaced-20250101-120000", 0.3, checkpoint=step)
    _results(tmp_path / "val", 0.1, split="val", checkpoint=str(tmp_path / "b"), eval_config={})
    _results(tmp_path / "again", 0.8, split="test", eval_config={},
             checkpoint=str(tmp_path / "a" / "step_0000004"))
    eval_script.main(["--table", str(tmp_path)])
    out = capsys.readouterr()
    assert "| scratch | 80.0 | - |" in out.out and "(n=" not in out.out
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["rows"][0]["cells"]["CheXpert AUROC"]["runs"] == \
        [str(tmp_path / "a" / "results.json")]
    assert [line.split(":")[0] for line in table["not_counted"]] == \
        [str(tmp_path / "again" / "results.json"), str(tmp_path / "val" / "results.json")]
    assert "val results (Table 2 reports test)" in out.err
    assert "the same checkpoint and task as" in out.err


@pytest.mark.parametrize("text, problem", [
    ("", "an empty file"), ("{not json", r"not JSON \("), ("[0.9]", "a list, not an object"),
    ('{"accuracy": 0.9}', "no 'task' name and 'metrics' object"),
    ('{"task": "chexpert", "metrics": {"auroc": "high"}}', "metric 'auroc' is a string"),
])
def test_table_names_a_results_file_it_cannot_read(tmp_path, text, problem):
    """An error naming the file, not a skip: a table that leaves a run out in silence misstates its
    n (before: a JSONDecodeError or a TypeError that named no file)."""
    _results(tmp_path / "a", 0.8)
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "results.json").write_text(text)
    path = re.escape(str(tmp_path / "other" / "results.json"))
    with pytest.raises(SystemExit, match=f"{path}: {problem}.*Move it out of"):
        eval_script.main(["--table", str(tmp_path)])


@pytest.fixture(scope="module")
def finetuned(world, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ft") / "vqa"
    run(world, "--task", "vqa_rad", "--init", "scratch", "--out", str(out))
    return out


def test_eval_never_writes_over_a_fine_tuning_runs_results(finetuned):
    before = (finetuned / "results.json").read_bytes()
    with pytest.raises(SystemExit, match=r"--out .*vqa holds a training run \(config\.json, .*"
                                         r"results\.json\): eval\.py never writes over it; .*"
                                         r"--out .*vqa-eval"):
        eval_script.main(["--ckpt", str(finetuned), "--num-workers", "0", "--out", str(finetuned)])
    # its test metrics, val_metrics and best_step are kept
    assert (finetuned / "results.json").read_bytes() == before


def test_eval_refuses_other_splits_than_those_trained_against(finetuned, world, tmp_path):  # noqa
    """vqa_rad prepared again with another --seed: its val questions go back into train and others
    come out. Refused, naming both hashes (before: scored). The same data at another place is
    scored as before."""
    reseeded = tmp_path / "reseeded"
    P.prepare("vqa_rad", os.path.join(world[0], "tiny", "raw", "vqa_rad"), str(reseeded), seed=1)
    then = checkpoint.read_data_record(str(finetuned))["splits"]["vqa_rad"]["train"]
    now = manifests.ids_hash(data.read_split(str(reseeded / "vqa_rad"), "train"))
    with pytest.raises(SystemExit, match=rf"was trained against another vqa_rad train split than "
                                         rf".*reseeded/vqa_rad/train\.jsonl holds: ids sha256 "
                                         rf"{then[:16]} then, {now[:16]} now"):
        eval_script.main(["--ckpt", str(finetuned), "--num-workers", "0",
                          "--data-root", str(reseeded)])
    shutil.copytree(os.path.join(world[1], "vqa_rad"), tmp_path / "copy" / "vqa_rad")
    eval_script.main(["--ckpt", str(finetuned), "--num-workers", "0",
                      "--data-root", str(tmp_path / "copy"), "--out", str(tmp_path / "again")])
    expected = json.loads((finetuned / "results.json").read_text())["metrics"]
    assert json.loads((tmp_path / "again" / "results.json").read_text())["metrics"] == expected


def test_eval_on_an_unfinished_fine_tuning_run_says_how_to_finish_it(world, tmp_path,  # noqa
                                                                     monkeypatch):
    """A run killed after its step-2 validation has no selected weights: eval.py says so and how
    to resume it (before: 'no checkpoint at ...' as a traceback); its train_state is not scored
    as if it were the result."""
    out = tmp_path / "killed"
    monkeypatch.setattr(optim, "optimizer_step", killed_at(3, optim.optimizer_step))
    with pytest.raises(KeyboardInterrupt):
        run(world, "--task", "vqa_rad", "--init", "scratch", "--out", str(out))
    state = checkpoint.resolve_checkpoint(str(out / "train_state"))
    # a resumed run keeps its own tokenizer
    assert os.path.isfile(os.path.join(state, "tokenizer.json"))
    with pytest.raises(SystemExit, match=rf"{out} is an unfinished fine-tuning run: it stopped at "
                                         rf"step 2 of 4 .*python finetune\.py --task vqa_rad "
                                         rf"\.\.\. --out {out} --resume {out}"):
        eval_script.main(["--ckpt", str(out)])
    with pytest.raises(SystemExit, match=rf"{state} is the resumable state of the fine-tuning run "
                                         rf"{out}: .*--ckpt {out}"):
        eval_script.main(["--ckpt", str(out / "train_state"), "--num-workers", "0"])


def test_retrieval_pairs_are_the_papers_protocol_or_the_whole_split(
        pretrained, world, tmp_path, capsys):  # noqa: F811
    """--retrieval-pairs N scores the first N of the 2,000 pairs prepare.py drew (here: a prepared
    root whose roco_retrieval test split holds 5 of the ROCO test split's 8), all the whole ROCO
    split."""
    root = tmp_path / "prepared"
    for name in ("roco", "roco_retrieval"):
        shutil.copytree(os.path.join(world[1], name), root / name)
    lines = (root / "roco_retrieval" / "test.jsonl").read_text().splitlines()
    assert len(lines) == 8
    (root / "roco_retrieval" / "test.jsonl").write_text("\n".join(lines[:5]) + "\n")
    base = ["--task", "roco_retrieval", "--ckpt", pretrained, "--num-workers", "0",
            "--data-root", str(root)]
    for pairs, n in (("2000", 5), ("3", 3), ("all", 8)):
        eval_script.main([*base, "--retrieval-pairs", pairs, "--out", str(tmp_path / pairs)])
        r = json.loads((tmp_path / pairs / "results.json").read_text())
        assert r["metrics"]["pairs"] == n and r["eval_config"]["retrieval_pairs"] == pairs
    out = capsys.readouterr().out
    assert "retrieval pairs: 5 of the 5 prepared for the paper's protocol" in out
    assert f"retrieval pairs: all 8 of the ROCO test split ({root / 'roco'})" in out
    with pytest.raises(SystemExit, match="--retrieval-pairs must be a number of pairs"):
        eval_script.main([*base, "--retrieval-pairs", "some"])
    with pytest.raises(SystemExit, match="chexpert is not a retrieval task"):
        eval_script.main(["--task", "chexpert", "--ckpt", pretrained, "--retrieval-pairs", "all"])


def test_zero_shot_grounding_of_ms_cxr_with_overlays_and_the_api(
        pretrained, world, tmp_path):  # noqa: F811
    """eval.py --task ms_cxr scores each map method and the two baselines on the prepared test
    split, draws the overlays, and the API's ground gives the very maps eval.py scored."""
    out = tmp_path / "ground"
    eval_script.main(["--task", "ms_cxr", "--ckpt", pretrained, "--num-workers", "0",
                      "--overlays", "2", "--precision", "fp32", "--out", str(out)])
    r = json.loads((out / "results.json").read_text())
    m = r["metrics"]
    test = data.read_split(os.path.join(world[1], "ms_cxr"), "test")
    assert r["zero_shot"] and r["task"] == "ms_cxr" and m["pairs"] == len(test) > 0
    assert set(grounding.METHODS) | {"uniform", "box_prior"} <= set(m)
    assert m["method"] == grounding.DEFAULT and m["cnr"] == m[grounding.DEFAULT]["cnr"]
    # a constant map has no contrast and, min-max scaled, selects nothing but the whole film at
    # every threshold
    assert m["uniform"]["cnr"] == 0.0
    films = [Image.open(test[i]["image"]) for i in range(2)]
    pngs = sorted((out / "overlays").glob("*.png"))
    assert [p.name for p in pngs] == sorted(f"{t['id']}.png" for t in test[:2])
    for t, film in zip(test[:2], films):
        with Image.open(out / "overlays" / f"{t['id']}.png") as png:
            assert png.size == (len(grounding.METHODS) * film.width, film.height)
    # the API's maps are over the film's own pixels and score what eval.py scored for the default
    # method
    model = ptunifier_min.load(pretrained)
    maps = model.ground([test[i]["image"] for i in range(len(test))], [t["text"] for t in test])
    assert [tuple(x.shape) for x in maps] == [(t["height"], t["width"]) for t in test]
    scores = [metrics.cnr(x, metrics.box_mask(t["boxes"], t["width"], t["height"]))
              for x, t in zip(maps, test)]
    assert abs(float(np.mean(scores)) - m["cnr"]) < 1e-4
