"""ptunifier_min.load: the README snippet verbatim on a tiny trained checkpoint, agreement with the
training code's own embedding path, bf16, fine-tuned predictions, and the refusals (unknown config
keys, missing tokenizer / meta)."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import train
import ptunifier_min
from ptunifier_min import checkpoint, retrieval, tasks
from ptunifier_min.api import Model
from ptunifier_min.datasets.source import train_tokenizer
from ptunifier_min.config import FINETUNE_PRESETS, FinetuneConfig, build
from ptunifier_min.model import PTUnifier

SNIPPET = '''
import ptunifier_min
# model in eval mode + its tokenizer + its image transform
m = ptunifier_min.load("runs/pretrain")
zi = m.encode_images(["a.jpg", pil_image])     # [N, d] L2-normalised ITC embeddings
zt = m.encode_texts(["pleural effusion", "no effusion"])
s = m.similarity(zi, zt)                       # cosine x logit scale
p = m.match(["a.jpg"], ["small left effusion"])  # ITM probability of a match
# pooled [2D] and token states, any of the three pass kinds
f = m.features(image="a.jpg", text="...")
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny pre-training run at <root>/runs/pretrain and a tiny CheXpert
    fine-tuning run, with a.jpg beside."""
    root = tmp_path_factory.mktemp("api")
    synth = str(root / "world")
    train.main(["--preset", "tiny", "--synth-root", synth, "--out", str(root / "runs" / "pretrain"),
                "--steps", "2", "--eval-pairs", "0"])
    finetune.main(["--preset", "tiny", "--synth-root", synth, "--task", "chexpert",
                   "--init", "scratch", "--out", str(root / "runs" / "chexpert"), "--steps", "2",
                   "--eval-every", "2"])
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(root / "a.jpg")
    return root


def test_readme_snippet_runs_verbatim_and_agrees_with_training_code(runs, monkeypatch):
    monkeypatch.chdir(runs)
    real_load = torch.load
    monkeypatch.setattr(torch, "load",
                        lambda *a, **k: pytest.fail("the API read a pickle (trainer.pt)"))
    env = {"pil_image": Image.open("a.jpg").convert("RGB").rotate(90)}
    exec(SNIPPET, env)
    monkeypatch.setattr(torch, "load", real_load)
    m, zi, zt, s, p, f = (env[k] for k in ("m", "zi", "zt", "s", "p", "f"))
    cfg = m.cfg.model
    assert zi.shape == (2, cfg.itc_dim) and zt.shape == (2, cfg.itc_dim) and not m.model.training
    torch.testing.assert_close(zi.norm(dim=-1), torch.ones(2))
    # the same numbers as the training code's retrieval path (a different
    # implementation of the same passes)
    ref_i = retrieval.embed_images(m.backbone, ["a.jpg"], cfg.image_size, torch.device("cpu"))
    ref_t = retrieval.embed_texts(m.backbone, ["pleural effusion", "no effusion"], m.tok,
                                  cfg.max_text_len, torch.device("cpu"))
    torch.testing.assert_close(zi[:1], ref_i)
    torch.testing.assert_close(zt, ref_t)
    assert not torch.allclose(zi[0], zi[1])  # the rotated PIL image is another image
    torch.testing.assert_close(s, zi @ zt.t() * m.backbone.itc_scale())
    assert p.shape == (1,) and 0 < float(p) < 1
    assert (f["pooled"].shape == (1, 2 * cfg.dim) and f["hidden"].shape[0] == 1
            and f["n_visual"] == 17)
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
    """The model reads the mask on the device (a host wait) only when the caller
    leaves `padded` to it; the API and retrieval know it from the host's copy of the mask,
    and the answer must be right."""
    calls = []
    real = PTUnifier.forward

    def spy(self, image=None, input_ids=None, attention_mask=None, manual_attention=False,
            padded=None, read="all"):
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
    retrieval.embed_texts(m.backbone, ["a", "a b c d e f"], m.tok, cfg.max_text_len,
                          torch.device("cpu"))
    # ITM re-ranking's pass
    retrieval.itm_margins(m.backbone, img, ["small left effusion", "no effusion seen in the lung"],
                          m.tok, cfg.image_size, cfg.max_text_len, torch.device("cpu"))
    ft = ptunifier_min.load(str(runs / "runs" / "chexpert"))
    ft.predict(image=img)  # image-only task: no text pass
    assert len(calls) == 6 and {c[1] for c in calls} == {True, False}
    assert all(given == actual for given, actual in calls), calls


# ---- inputs: one film whichever way it arrives, and refusals that name the argument -------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random tiny models behind the API (no training): a pre-training one and, by task name,
    fine-tuning ones (CheXpert: image; RadNLI: text and text_b; VQA-RAD: image and text)."""
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok = train_tokenizer(["no pleural effusion", "small left effusion"] * 3, 200, path)
    cfg = build(FinetuneConfig, FINETUNE_PRESETS["tiny"])
    cfg.model.vocab_size = tok.get_vocab_size()
    torch.manual_seed(0)
    out = {"pretrain": Model(PTUnifier(cfg.model).eval(), tok, cfg)}
    meta = {"label_names": ["a", "b", "c"], "answers": ["yes", "no"]}
    for name in ("chexpert", "radnli", "vqa_rad"):
        task = tasks.TASKS[name]
        model = tasks.TaskModel(PTUnifier(cfg.model), task, tasks.num_outputs(task, meta))
        out[name] = Model(model.eval(), tok, cfg, task, meta)
    return out


def _film(tmp_path):
    """A grayscale film [40, 50] using the full 0..255 range, as a PNG file."""
    g = np.random.default_rng(0).integers(0, 256, (40, 50), dtype=np.uint8)
    g[0, :2] = 0, 255
    Image.fromarray(g).save(tmp_path / "film.png")
    return g, str(tmp_path / "film.png")


def test_the_same_film_gives_the_same_embedding_whichever_way_it_arrives(tiny, tmp_path):
    m = tiny["pretrain"]
    g, path = _film(tmp_path)
    gray = Image.fromarray(g)
    deep = (g.astype(np.uint16) * 16)  # 12-bit pixels, rescaled from their min-max as in a file
    Image.fromarray(deep).save(tmp_path / "deep.png")  # a 16-bit PNG ("I;16")
    palette = Image.fromarray(g, "P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    rgb = Image.merge("RGB", [gray] * 3)
    alpha = Image.fromarray(np.random.default_rng(1).integers(0, 256, g.shape, dtype=np.uint8))
    ways = {"path": path, "PathLike": pathlib.Path(path), "L": gray,
            "16-bit file": str(tmp_path / "deep.png"), "I;16": Image.fromarray(deep),
            "I": Image.fromarray(deep).convert("I"), "RGB": rgb,
            "RGBA": Image.merge("RGBA", [gray] * 3 + [alpha]), "P": palette,
            "CMYK": rgb.convert("CMYK"), "LA": Image.merge("LA", [gray, alpha]),
            "numpy HxW uint8": g, "numpy HxWx3 uint8": np.stack([g] * 3, -1),
            "numpy HxW float": g / 255.0, "tensor HxW uint8": torch.from_numpy(g),
            "tensor 1xHxW float": torch.from_numpy(g)[None].float() / 255,
            "tensor 3xHxW uint8": torch.from_numpy(g).expand(3, -1, -1)}
    assert Image.fromarray(deep).mode == "I;16"
    ref = m.encode_images(path)
    for way, image in ways.items():
        assert torch.equal(m.encode_images([image]), ref), way
    # the check can fail: another film gives another embedding
    assert not torch.equal(m.encode_images(g.T.copy()), ref)


def test_a_pil_image_keeps_the_exif_orientation_its_file_has(tiny, tmp_path):
    m = tiny["pretrain"]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    g, _ = _film(tmp_path)
    Image.fromarray(g).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    opened = Image.open(tmp_path / "rotated.jpg")
    ref = m.encode_images(str(tmp_path / "rotated.jpg"))
    assert torch.equal(m.encode_images(opened), ref)
    assert torch.equal(m.encode_images(opened.convert("RGB")), ref)  # the tag travels with it
    stored = Image.open(tmp_path / "rotated.jpg")
    stored.load()
    assert not torch.equal(m.encode_images(np.asarray(stored)), ref)  # as stored: not turned


@pytest.mark.parametrize("image, message", [
    (torch.zeros(2, 3, 32, 32), r"images\[0\]: a tensor of shape \(2, 3, 32, 32\); images are "
                                r"\[H, W\] or \[C, H, W\] .*pass a list"),
    (np.zeros((3, 32, 32), np.uint8), r"images\[0\]: a numpy array of shape \(3, 32, 32\); "
                                      r"images are \[H, W\] or \[H, W, C\]"),
    (torch.zeros(32, 32, 3), r"a tensor of shape \(32, 32, 3\)"),
    (np.zeros((0, 32), np.uint8), r"shape \(0, 32\)"),
    (np.zeros((32, 32), np.uint16), r"images\[0\]: a numpy array of dtype uint16; .*uint8 "
                                    r".*float in \[0, 1\].*PIL.Image.fromarray"),
    (torch.zeros(32, 32, dtype=torch.int64), r"a tensor of dtype torch.int64"),
    (np.full((32, 32), 255.0), r"images\[0\]: float pixels must lie in \[0, 1\].*\[255.0, 255.0\]"),
    (np.full((32, 32), np.nan), r"float pixels must lie in \[0, 1\].*nan"),
    (None, r"images\[0\] is None; an image is a path \(str or os.PathLike\), a PIL image"),
    (b"a.jpg", r"images\[0\] is of type bytes"),
])
def test_images_outside_the_documented_layouts_are_refused_naming_index_shape_and_dtype(
        tiny, image, message):
    with pytest.raises((TypeError, ValueError), match=message):
        tiny["pretrain"].encode_images(image)


def test_a_pil_image_that_cannot_be_read_is_an_error_naming_its_index(tiny, tmp_path):
    _, path = _film(tmp_path)
    with Image.open(path) as closed:
        pass
    with pytest.raises(ValueError, match=r"images\[1\]: cannot read this PIL image \(mode L"):
        tiny["pretrain"].encode_images([path, closed])


def test_lists_read_together_must_have_equal_lengths(tiny, tmp_path):
    _, img = _film(tmp_path)
    pre, two = tiny["pretrain"], ["a", "b"]
    with pytest.raises(ValueError, match="match reads images and texts together.*2 in images, "
                                         "1 in texts"):
        pre.match([img, img], ["a"])
    with pytest.raises(ValueError, match="features reads image and text together.*1 in image, "
                                         "2 in text"):
        pre.features(image=[img], text=two)
    with pytest.raises(ValueError, match="predict reads text and text_b together.*2 in text, "
                                         "1 in text_b"):
        tiny["radnli"].predict(text=two, text_b=["a"])
    with pytest.raises(ValueError, match="predict reads image and text together.*1 in image"):
        tiny["vqa_rad"].predict(image=[img], text=two)
    # an input the task does not read is refused, not ignored
    with pytest.raises(ValueError, match="task chexpert reads image=, got image= and text="):
        tiny["chexpert"].predict(image=[img], text=["a"])
    with pytest.raises(ValueError, match="task radnli reads text= and text_b=, got text="):
        tiny["radnli"].predict(text=two)
    assert len(tiny["radnli"].predict(text=two, text_b=two)) == 2


def test_empty_lists_give_empty_results_of_the_right_shapes(tiny):
    pre = tiny["pretrain"]
    d, D = pre.cfg.model.itc_dim, pre.cfg.model.dim
    zi, zt = pre.encode_images([]), pre.encode_texts([])
    assert zi.shape == (0, d) and zt.shape == (0, d) and zi.dtype == torch.float32
    assert pre.similarity(zi, pre.encode_texts(["a"])).shape == (0, 1)
    assert pre.match([], []).shape == (0,)
    f = pre.features(image=[], text=[])
    assert f["pooled"].shape == (0, 2 * D) and f["hidden"].shape == (0, 0, D)
    assert tiny["chexpert"].predict(image=[]) == []
    assert tiny["radnli"].predict(text=[], text_b=[]) == []


def test_none_and_nan_texts_and_a_bad_batch_size_are_errors_naming_the_argument(tiny, tmp_path):
    pre, rad = tiny["pretrain"], tiny["radnli"]
    _, img = _film(tmp_path)
    with pytest.raises(TypeError, match=r"texts\[1\] is None, not a str"):
        pre.encode_texts(["a", None])
    with pytest.raises(TypeError, match=r"texts\[0\] is NaN \(pandas reads an empty cell"):
        pre.match([img], [float("nan")])
    with pytest.raises(TypeError, match=r"text_b\[1\] is NaN"):
        rad.predict(text=["a", "b"], text_b=["a", np.nan])
    with pytest.raises(TypeError, match=r"^texts is of type int, not a str"):
        pre.encode_texts(3)
    # any iterable of str is a list of texts (a numpy array, a pandas Series)
    assert torch.equal(pre.encode_texts(np.array(["a", "b"])), pre.encode_texts(["a", "b"]))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {bad}"):
            Model(pre.model, pre.tok, pre.cfg, batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        pre.batch_size = 0
    assert pre.batch_size == 32
