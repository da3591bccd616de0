"""ptunifier_min.load: the README snippet verbatim on a tiny trained checkpoint, agreement with the training code's own
embedding path, bf16, fine-tuned predictions, and the refusals (unknown config keys, missing tokenizer / meta)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import train
import ptunifier_min
from ptunifier_min import checkpoint, retrieval

SNIPPET = '''
import ptunifier_min
m = ptunifier_min.load("runs/pretrain")        # model in eval mode + its tokenizer + its image transform
zi = m.encode_images(["a.jpg", pil_image])     # [N, d] L2-normalised ITC embeddings
zt = m.encode_texts(["pleural effusion", "no effusion"])
s = m.similarity(zi, zt)                       # cosine x logit scale
p = m.match(["a.jpg"], ["small left effusion"])  # ITM probability of a match
f = m.features(image="a.jpg", text="...")      # pooled [2D] and token states, any of the three pass kinds
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny pre-training run at <root>/runs/pretrain and a tiny CheXpert fine-tuning run, with a.jpg beside."""
    root = tmp_path_factory.mktemp("api")
    synth = str(root / "world")
    train.main(["--preset", "tiny", "--synth-root", synth, "--out", str(root / "runs" / "pretrain"), "--steps", "2",
                "--eval-pairs", "0"])
    finetune.main(["--preset", "tiny", "--synth-root", synth, "--task", "chexpert", "--init", "scratch",
                   "--out", str(root / "runs" / "chexpert"), "--steps", "2", "--eval-every", "2"])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(root / "a.jpg")
    return root


def test_readme_snippet_runs_verbatim_and_agrees_with_training_code(runs, monkeypatch):
    monkeypatch.chdir(runs)
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the API read a pickle (trainer.pt)"))
    env = {"pil_image": Image.open("a.jpg").convert("RGB").rotate(90)}
    exec(SNIPPET, env)
    monkeypatch.setattr(torch, "load", real_load)
    m, zi, zt, s, p, f = (env[k] for k in ("m", "zi", "zt", "s", "p", "f"))
    cfg = m.cfg.model
    assert zi.shape == (2, cfg.itc_dim) and zt.shape == (2, cfg.itc_dim) and not m.model.training
    torch.testing.assert_close(zi.norm(dim=-1), torch.ones(2))
    # the same numbers as the training code's retrieval path (a different implementation of the same passes)
    ref_i = retrieval.embed_images(m.backbone, ["a.jpg"], cfg.image_size, torch.device("cpu"))
    ref_t = retrieval.embed_texts(m.backbone, ["pleural effusion", "no effusion"], m.tok, cfg.max_text_len,
                                  torch.device("cpu"))
    torch.testing.assert_close(zi[:1], ref_i)
    torch.testing.assert_close(zt, ref_t)
    assert not torch.allclose(zi[0], zi[1])  # the rotated PIL image is another image
    torch.testing.assert_close(s, zi @ zt.t() * m.backbone.itc_scale())
    assert p.shape == (1,) and 0 < float(p) < 1
    assert f["pooled"].shape == (1, 2 * cfg.dim) and f["hidden"].shape[0] == 1 and f["n_visual"] == 17
    # batched: a batch size of 1 gives the same embeddings; bf16 runs and stays close
    m.batch_size = 1
    torch.testing.assert_close(m.encode_texts(["pleural effusion", "no effusion"]), zt)
    bf = ptunifier_min.load("runs/pretrain", dtype=torch.bfloat16)
    assert (bf.encode_images(["a.jpg"]) - zi[:1]).abs().max() < 0.1


def test_predict_of_a_finetuning_run(runs):
    m = ptunifier_min.load(str(runs / "runs" / "chexpert"))
    out = m.predict(image=[str(runs / "a.jpg")] * 3)
    ckpt = checkpoint.resolve_checkpoint(str(runs / "runs" / "chexpert"))
    with open(os.path.join(ckpt, "meta.json")) as f:  # finetune.py copied the task's meta.json in
        names = json.load(f)["label_names"]
    assert len(out) == 3 and out[0] == out[2] and list(out[0]) == names
    x = m._images([str(runs / "a.jpg")])
    with torch.no_grad():
        ref = m.model({"image": x}).sigmoid()[0].tolist()
    assert list(out[0].values()) == pytest.approx(ref)
    with pytest.raises(ValueError, match="pre-training one"):
        ptunifier_min.load(str(runs / "runs" / "pretrain")).predict(image="a.jpg")


def test_refusals_name_the_file(runs, tmp_path):
    ckpt = checkpoint.resolve_checkpoint(str(runs / "runs" / "pretrain"))
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["config"]["model"]["rotary"] = True  # a key of another version
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(checkpoint.CheckpointError, match="model.rotary"):
        ptunifier_min.load(str(bad))
    shutil.rmtree(bad)
    shutil.copytree(ckpt, bad)
    os.remove(bad / "tokenizer.json")
    with pytest.raises(checkpoint.CheckpointError, match="no tokenizer.json or vocab.txt"):
        ptunifier_min.load(str(bad))


def test_every_text_pass_of_the_api_and_retrieval_says_whether_it_pads(runs, monkeypatch):
    """Issue 11: the model reads the mask on the device (a host wait) only when the caller leaves `padded` to it; the
    API and retrieval know it from the host's copy of the mask, and the answer must be right."""
    from ptunifier_min.model import PTUnifier
    calls = []
    real = PTUnifier.forward

    def spy(self, image=None, input_ids=None, attention_mask=None, manual_attention=False, padded=None, read="all"):
        if input_ids is not None:
            calls.append((padded, not bool(attention_mask.all())))
        return real(self, image, input_ids, attention_mask, manual_attention, padded, read)

    monkeypatch.setattr(PTUnifier, "forward", spy)
    m = ptunifier_min.load(str(runs / "runs" / "pretrain"))
    img = str(runs / "a.jpg")
    m.encode_texts(["pleural effusion", "no effusion seen in the left lung today"])  # padded
    m.encode_texts(["effusion"])  # one text: not padded
    m.match([img], ["small left effusion"])
    m.features(image=img, text="a b c")
    cfg = m.cfg.model
    retrieval.embed_texts(m.backbone, ["a", "a b c d e f"], m.tok, cfg.max_text_len, torch.device("cpu"))
    # ITM re-ranking's pass
    retrieval.itm_margins(m.backbone, img, ["small left effusion", "no effusion seen in the lung"],
                          m.tok, cfg.image_size, cfg.max_text_len, torch.device("cpu"))
    ft = ptunifier_min.load(str(runs / "runs" / "chexpert"))
    ft.predict(image=img)  # image-only task: no text pass
    assert len(calls) == 6 and {c[1] for c in calls} == {True, False}
    assert all(given == actual for given, actual in calls), calls
