"""eval.py: zero-shot retrieval where the answer is known, zero-shot evaluation from a pre-training checkpoint, the
re-evaluation of fine-tuned checkpoints (it must reproduce results.json), and Table 2 from results files."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval as eval_script
import train
from ptunifier_min import data, tasks
from ptunifier_min.config import FINETUNE_PRESETS, FinetuneConfig, build
from test_finetune import TASK_KEYS, run, world  # noqa: F401  (world: the shared tiny synthetic world fixture)

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


class MatchedEncoder(torch.nn.Module):
    """A stand-in backbone whose ITC embeddings are made to match: image i (gray level 20 i + 10) and the text WORDS[i]
    both embed to one-hot(i); `shift` moves every image to one-hot(i + shift) instead."""

    def __init__(self, tok, shift=0):
        super().__init__()
        self.shift = shift
        self.word_index = {tok.token_to_id(w): i for i, w in enumerate(WORDS)}

    def forward(self, image=None, input_ids=None, attention_mask=None):
        if image is not None:
            level = (image[:, 0].mean((1, 2)) * data.STD + data.MEAN) * 255  # back to the pixel value
            k = ((level - 10) / 20).round().long()
        else:
            k = torch.tensor([self.word_index[int(t)] for t in input_ids[:, 1]])  # the token after [CLS]
        return SimpleNamespace(pooled=F.one_hot(k, len(WORDS)).float())

    def itc_features(self, pooled, modality):
        if modality == "image":
            pooled = pooled.roll(self.shift, 1)
        return F.normalize(pooled, dim=-1)


@pytest.fixture
def toy(tmp_path):
    tok = data.train_tokenizer(WORDS * 3, 200, str(tmp_path / "tokenizer.json"))
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
    m = tasks.retrieval_metrics(MatchedEncoder(tok), records, tok, cfg, torch.device("cpu"))
    assert all(m[f"{d}_r{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10)) and m["pairs"] == 8
    # every image now matches the next image's text: its own text ties with 6 others behind that one -> rank 8 of 8
    m = tasks.retrieval_metrics(MatchedEncoder(tok, shift=1), records, tok, cfg, torch.device("cpu"))
    assert [m[f"i2t_r{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 1.0]
    assert [m[f"t2i_r{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 1.0]


class ITMKnowsBetter(MatchedEncoder):
    """Shifted ITC embeddings (every image ranks the wrong text first), but an ITM head that knows the true pairs."""

    def forward(self, image=None, input_ids=None, attention_mask=None):
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
    m = tasks.retrieval_metrics(ITMKnowsBetter(tok, shift=1), records, tok, cfg, torch.device("cpu"), rerank_top=8)
    assert [m[f"i2t_r{k}"] for k in (1, 5, 10)] == [1.0, 1.0, 1.0]  # ITM puts every image's own text first
    assert [m[f"t2i_r{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 1.0]  # text-to-image stays the ITC ranking


@pytest.fixture(scope="module")
def pretrained(world, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("pre"))
    train.main(["--preset", "tiny", "--synth-root", world[0], "--steps", "2", "--eval-pairs", "0", "--out", out])
    return out


def test_zero_shot_from_a_pretraining_checkpoint(pretrained, tmp_path, capsys):
    out = tmp_path / "zs"
    eval_script.main(["--task", "roco_retrieval", "--ckpt", pretrained, "--rerank-top", "4", "--num-workers", "0",
                      "--out", str(out)])
    r = json.loads((out / "results.json").read_text())
    assert r["zero_shot"] is True and r["task"] == "roco_retrieval" and TASK_KEYS["retrieval"] <= set(r["metrics"])
    assert "encoder passes and one matrix product" in capsys.readouterr().out
    eval_script.main(["--task", "chexpert", "--ckpt", pretrained, "--num-workers", "0", "--out", str(out)])
    r = json.loads((out / "results.json").read_text())
    assert r["metrics"]["prompts"][:2] == ["atelectasis", "no atelectasis"]
    assert set(r["metrics"]["per_class"]) == {"Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                              "Pleural Effusion"}
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
        json.dump({"task": task, "metrics": metrics, "init": init, "config": {"data_frac": frac}}, f)


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
    assert table["rows"][0]["cells"]["CheXpert AUROC"]["runs"] == [str(tmp_path / "a" / "results.json")]


def test_eval_errors(tmp_path):
    with pytest.raises(SystemExit, match="needs --ckpt"):
        eval_script.main([])
    with pytest.raises(SystemExit, match="chexpert, rsna"):
        eval_script.main(["--task", "mnist", "--ckpt", str(tmp_path)])
    with pytest.raises(SystemExit, match="no results.json"):
        eval_script.main(["--table", str(tmp_path)])
