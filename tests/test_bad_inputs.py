"""Bad inputs, what catches them and what happens: every row of the README's table of
bad inputs names its test here.

Odd but valid images load as grayscale; undecodable ones stop prepare (or, with --on-bad-image skip,
are dropped and counted) and are always an error at training time; bad text, columns, labels and
lines are errors naming file and row; an interrupted prepare is refused downstream; nothing
unpickles, evals or writes outside its folder.
"""

import ast
import glob
import json
import os
import random
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image

from ptunifier_min.images import ImageTransform, load_image
from ptunifier_min.tokenizer import encode_pairs, encode_texts, load_tokenizer, special_ids
from ptunifier_min import data as D
from ptunifier_min import config, data, metrics, tasks
from ptunifier_min.datasets import prepare as P, source
from ptunifier_min.datasets.source import tokenizer_record, tokenizer_record_path, train_tokenizer
from test_prepare import (_csv, _img, _json, _lines, _vqa_rad_row, make_chexpert, make_mimic,
                          make_roco, make_rsna, make_vqa_rad)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def _ramp(w=40, h=30):
    # [h, w], 0..255 left to right
    return (np.arange(w)[None, :] * 255 // (w - 1)).repeat(h, 0).astype(np.uint8)


def _prepared(folder, records, split="train", extra_lines=()):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records)
                + "".join(line + "\n" for line in extra_lines))
    _json(os.path.join(folder, "meta.json"),
          {"dataset": os.path.basename(folder), "counts": {split: len(records)}})
    return str(folder)


def _through_transform(img):
    for t in (ImageTransform(32), ImageTransform(32, train=True, random_resized_crop=True)):
        x = t.pixels(img, random.Random(0))
        assert x.shape == (1, 32, 32) and x.dtype == torch.uint8


# ---- images --------------------------------------------------------------------------------------
def test_corrupt_jpeg_and_truncated_png_name_the_file(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    with pytest.raises(ValueError, match=r"cannot read image .*corrupt\.jpg"):
        load_image(str(bad))
    full = _save(Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64),
                                                                  dtype=np.uint8)),
                 tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes(open(full, "rb").read()[:400])
    with pytest.raises(ValueError, match=r"cannot read image .*truncated\.png"):
        load_image(str(tmp_path / "truncated.png"))


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    # 0..59950: a cast to uint8 would clip
    x = np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50
    img = load_image(_save(Image.fromarray(x), tmp_path / "deep.png"))
    y = np.asarray(img).astype(int)
    assert img.mode == "L" and y.min() == 0 and y.max() == 255 and len(np.unique(y)) > 200
    assert (np.diff(y.ravel()) >= 0).all()  # order kept: min-max scaling
    _through_transform(img)


def test_cmyk_jpeg_loads_as_luma(tmp_path):
    k = Image.fromarray(_ramp())  # black ink from 0 (white paper) to 255 (black)
    zero = Image.new("L", k.size, 0)
    img = load_image(_save(Image.merge("CMYK", [zero, zero, zero, k]),
                           tmp_path / "cmyk.jpg", quality=95))
    y = np.asarray(img).astype(int)
    assert img.mode == "L" and y[:, 0].mean() > 245 and y[:, -1].mean() < 10
    _through_transform(img)


def test_rgba_drops_alpha(tmp_path):
    g = Image.fromarray(_ramp())
    alpha = Image.fromarray(np.where(np.arange(40)[None, :] < 20, 0, 255)
                            .repeat(30, 0).astype(np.uint8))
    img = load_image(_save(Image.merge("RGBA", [g, g, g, alpha]), tmp_path / "rgba.png"))
    # the fully transparent left half keeps its gray values: alpha
    # dropped, not composited onto black
    assert img.mode == "L" and np.array_equal(np.asarray(img), _ramp())
    _through_transform(img)


def test_palette_image_maps_through_its_palette(tmp_path):
    idx = np.arange(40 * 30).reshape(30, 40) % 4
    pal = Image.new("P", (40, 30))
    pal.putdata(idx.ravel().tolist())
    pal.putpalette([v for g in (0, 80, 160, 240) for v in (g, g, g)])  # index k -> gray level k
    img = load_image(_save(pal, tmp_path / "palette.png", transparency=0))
    assert img.mode == "L" and np.array_equal(np.asarray(img), np.array([0, 80, 160, 240])[idx])
    _through_transform(img)


def test_1x1_image(tmp_path):
    img = load_image(_save(Image.new("RGB", (1, 1), (90, 90, 90)), tmp_path / "dot.png"))
    assert img.mode == "L" and img.size == (1, 1) and img.getpixel((0, 0)) == 90
    _through_transform(img)
    x = ImageTransform(16).pixels(img)
    assert torch.equal(x, torch.full_like(x, 90))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_an_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    # 144 pixels: PIL only warns; 400 > 2 x 100: PIL raises. Both are errors here.
    for side in (12, 20):
        path = _save(Image.new("L", (side, side)), tmp_path / f"big{side}.png")
        with pytest.raises(ValueError,
                           match=rf"cannot read image .*big{side}\.png: .*decompression bomb"):
            load_image(path)


def test_missing_image_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*gone\.jpg"):
        load_image(str(tmp_path / "gone.jpg"))
    rows = [_vqa_rad_row(1, "synpic1.jpg", "yes", "freeform")]
    raw = make_vqa_rad(str(tmp_path / "raw"), rows)
    os.remove(os.path.join(raw, "VQA_RAD Image Folder", "synpic1.jpg"))
    with pytest.raises(FileNotFoundError,
                       match=r"record 1 \(qid 1\): image file not found: .*synpic1\.jpg"):
        P.prepare("vqa_rad", raw, str(tmp_path / "out"))
    folder = _prepared(tmp_path / "prep" / "roco", [{"id": "a", "image": str(tmp_path / "gone.jpg"),
                                                    "texts": ["one two three"]}])
    with pytest.raises(FileNotFoundError, match=r"roco/train\.jsonl, id a: image file not found"):
        D.load_pretrain_records(os.path.dirname(folder), ["roco"], "train")


# ---- the skip policy: prepare --on-bad-image error|skip ------------------------------------------
def _roco_with_bad_image(tmp_path):
    raw = make_roco(str(tmp_path / "raw"))
    bad = os.path.join(raw, "data", "train", "radiology", "images", "ROCO_00007.jpg")
    with open(bad, "r+b") as f:
        f.truncate(40)  # a download cut short
    return raw, bad


def test_bad_image_stops_prepare_by_default(tmp_path):
    raw, bad = _roco_with_bad_image(tmp_path)
    with pytest.raises(ValueError, match=r"roco train, id ROCO_00007: cannot read image "
                                         r".*ROCO_00007\.jpg.*--on-bad-image skip"):
        P.prepare("roco", raw, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")  # checked before the first file is written


def test_bad_image_skipped_and_counted(tmp_path, capsys):
    raw, bad = _roco_with_bad_image(tmp_path)
    out = str(tmp_path / "out")
    P.main(["roco", "--root", raw, "--out", out, "--on-bad-image", "skip"])
    assert f"skipped: cannot read image {bad}" in capsys.readouterr().out
    for name in ("roco", "roco_retrieval"):
        meta = D.read_meta(os.path.join(out, name))
        assert meta["dropped"] == {"non_radiology": 1, "short_caption": 1, "bad_image": 1}
        assert meta["counts"]["train"] == 1 and "bad_image" in meta["rules"]
        assert [r["id"] for r in D.read_split(os.path.join(out, name), "train")] == ["ROCO_00005"]


def test_failing_image_at_training_time_is_an_error(tmp_path):
    raw, bad = _roco_with_bad_image(tmp_path)
    ds = D.PretrainDataset([{"id": "x", "image": bad, "texts": ["a b c."]}],
                           ImageTransform(32).pixels)
    with pytest.raises(ValueError, match=r"cannot read image .*ROCO_00007\.jpg"):
        ds[0]


# ---- text ----------------------------------------------------------------------------------------
def test_empty_and_punctuation_only_captions_count_as_short(tmp_path):
    raw = make_roco(str(tmp_path / "raw"))
    with open(os.path.join(raw, "data", "train", "radiology", "captions.txt"), "a") as f:
        # empty; punctuation only (3 pieces, no word)
        f.write("ROCO_00040\t\nROCO_00041\t... !! --\n")
    (folder, _) = P.prepare("roco", raw, str(tmp_path / "out"))
    assert D.read_meta(folder)["dropped"] == {"non_radiology": 1, "short_caption": 1 + 2}


def test_empty_and_punctuation_only_text_without_a_rule_is_an_error(tmp_path):
    rows = [_vqa_rad_row(1, "synpic1.jpg", "yes", "freeform", q=" ?? ")]
    with pytest.raises(ValueError, match=r"Public\.json, record 1 \(qid 1\): question '\?\?' "
                                         r"has no letter or digit"):
        P.prepare("vqa_rad", make_vqa_rad(str(tmp_path / "raw"), rows), str(tmp_path / "out"))
    raw = tmp_path / "nli"
    for name in ("mli_train_v1.jsonl", "radnli_dev_v1.jsonl", "radnli_test_v1.jsonl"):
        _lines(str(raw / name), [json.dumps({"pair_id": "1", "sentence1": "a b c", "sentence2": "",
                                             "gold_label": "neutral"})])
    with pytest.raises(ValueError, match=r"mli_train_v1\.jsonl, line 1: empty sentence2"):
        P.prepare("radnli", str(raw), str(tmp_path / "out"))


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    raw = make_roco(str(tmp_path / "roco"))
    with open(os.path.join(raw, "data", "test", "radiology", "captions.txt"), "ab") as f:
        f.write("ROCO_00022\tCaf\xe9 au lait spots on CT.\n".encode("latin-1"))  # a Latin-1 export
    with pytest.raises(ValueError,
                       match=r"test/radiology/captions\.txt, line 2: not UTF-8 \(byte 0xe9"):
        P.prepare("roco", raw, str(tmp_path / "out"))
    raw = make_rsna(str(tmp_path / "rsna"), 3)
    with open(os.path.join(raw, "stage_2_train_labels.csv"), "ab") as f:
        f.write(b"pid-\xff,,,,,0\r\n")
    with pytest.raises(ValueError,
                       match=r"stage_2_train_labels\.csv, line 6: not UTF-8 \(byte 0xff"):
        P.prepare("rsna", raw, str(tmp_path / "out"))
    raw = make_mimic(str(tmp_path / "mimic"))
    with open(os.path.join(raw, "files", "p12", "p12000002", "s50000003.txt"), "ab") as f:
        f.write(b" COMPARISON: none\x81\n")
    with pytest.raises(ValueError, match=r"s50000003\.txt, line 5: not UTF-8 \(byte 0x81"):
        P.prepare("mimic_cxr", raw, str(tmp_path / "out"))


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    raw = make_rsna(str(tmp_path / "raw"), 4)
    path = os.path.join(raw, "stage_2_train_labels.csv")
    body = open(path, "rb").read()
    with open(path, "wb") as f:
        # what a spreadsheet writes; the first column would be "\ufeffpatientId"
        f.write(b"\xef\xbb\xbf" + body)
    (folder,) = P.prepare("rsna", raw, str(tmp_path / "out"))
    assert sum(D.read_meta(folder)["counts"].values()) == 4


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = ["The heart size is normal and the lungs are clear.",
              "Small left pleural effusion."] * 5
    return train_tokenizer(corpus, 120, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_very_long_text_is_truncated_keeping_sep(tok):
    sp = special_ids(tok)
    long = "the heart size is normal " * 2000  # 10,000 words
    ids, mask = encode_texts(tok, [long, "clear"], 24)
    assert (ids.shape == (2, 24) and ids[0, 0] == sp["cls"] and ids[0, -1] == sp["sep"]
            and mask[0].all())
    assert ids[1, 2] == sp["sep"] and not mask[1, 3:].any()
    ids, mask = encode_pairs(tok, [long], ["small left pleural effusion"], 24)
    row = ids[0].tolist()
    assert (len(row) == 24 and row[0] == sp["cls"] and row[-1] == sp["sep"]
            and row.count(sp["sep"]) == 2)
    batch = D.pretrain_collate(tok, 24)([{"image": torch.zeros(3, 8, 8), "text": long,
                                          "index": 0, "image_id": 0}])
    assert batch["input_ids"].shape == (1, 24) and batch["input_ids"][0, -1] == sp["sep"]


# ---- tables, lines, labels -----------------------------------------------------------------------
def test_csv_with_a_missing_column(tmp_path):
    raw = make_chexpert(str(tmp_path / "raw"), [{}, {}])
    path = os.path.join(raw, "CheXpert-v1.0-small", "valid.csv")
    _csv(path, ["Path", "Frontal/Lateral", "Atelectasis"], [])
    with pytest.raises(ValueError, match=r"valid\.csv: missing column\(s\) \['Cardiomegaly', "
                                         r".*'Pleural Effusion'\]; columns found: \['Path', "
                                         r"'Frontal/Lateral', 'Atelectasis'\]"):
        P.prepare("chexpert", raw, str(tmp_path / "out"))


def test_malformed_json_line(tmp_path):
    raw = tmp_path / "raw"
    def good(pid):  # ids differ across the three files, as in the release
        return json.dumps({"pair_id": pid, "sentence1": "a b c", "sentence2": "d e f",
                           "gold_label": "neutral"})
    for name in ("mli_train_v1.jsonl", "radnli_dev_v1.jsonl", "radnli_test_v1.jsonl"):
        _lines(str(raw / name), [good(name)])
    _lines(str(raw / "radnli_test_v1.jsonl"), [good("1"), "", '{"pair_id": 2,'])
    with pytest.raises(ValueError, match=r"radnli_test_v1\.jsonl, line 3: malformed JSON"):
        P.prepare("radnli", str(raw), str(tmp_path / "out"))
    folder = _prepared(tmp_path / "prep" / "x", [{"id": "a"}], extra_lines=['{"id": "b"'])
    with pytest.raises(ValueError, match=r"x/train\.jsonl, line 2: malformed JSON"):
        D.read_split(folder, "train")


def test_label_out_of_range(tmp_path):
    raw = make_chexpert(str(tmp_path / "raw"), [{"Cardiomegaly": "2.0"}])
    with pytest.raises(ValueError, match=r"train\.csv, line 2: Cardiomegaly = '2\.0'; "
                                         r"expected 1\.0, 0\.0, -1\.0"):
        P.prepare("chexpert", raw, str(tmp_path / "out"))
    raw = tmp_path / "nli"
    row = {"pair_id": "1", "sentence1": "a b c", "sentence2": "d e f", "gold_label": "neutral"}
    for name in ("mli_train_v1.jsonl", "radnli_dev_v1.jsonl", "radnli_test_v1.jsonl"):
        _lines(str(raw / name), [json.dumps({**row, "pair_id": name})])
    _lines(str(raw / "radnli_dev_v1.jsonl"), [json.dumps(row),
                                              json.dumps({**row, "pair_id": "2",
                                                          "gold_label": "maybe"})])
    with pytest.raises(ValueError,
                       match=r"radnli_dev_v1\.jsonl, line 2: gold_label 'maybe' is not one of"):
        P.prepare("radnli", str(raw), str(tmp_path / "out"))


def test_vqa_answer_outside_the_vocabulary(tmp_path):
    rows = [_vqa_rad_row(i, "synpic1.jpg", ["yes", "no"][i % 2], "freeform") for i in range(10)]
    rows += [_vqa_rad_row(20, "synpic1.jpg", "yes", "test_freeform"),
             _vqa_rad_row(21, "synpic1.jpg", "left lobe", "test_freeform", t="OPEN")]
    (folder,) = P.prepare("vqa_rad", make_vqa_rad(str(tmp_path / "raw"), rows),
                          str(tmp_path / "out"))
    meta = D.read_meta(folder)
    test = sorted(D.read_split(folder, "test"), key=lambda r: r["id"])
    assert ([r["label"] for r in test] == [meta["answers"].index("yes"), -1]
            and meta["oov_test_share"] == 0.5)
    # -1 is never predicted, so it counts as wrong; the question stays in the
    # denominator and its share is recorded
    m = metrics.vqa_accuracy(np.array([r["label"] for r in test]).clip(0),
                             np.array([r["label"] for r in test]), [r["answer_type"] for r in test])
    assert m == {"overall": 0.5, "open": 0.0, "closed": 1.0, "oov_share": 0.5}


# ---- sizes ---------------------------------------------------------------------------------------
def test_empty_split_is_an_error_where_a_stage_needs_it(tmp_path):
    folder = _prepared(tmp_path / "prep" / "medicat", [])
    # reading is fine (an empty val can be legitimate)...
    assert D.read_split(folder, "train") == []
    with pytest.raises(ValueError, match=r"medicat/train\.jsonl: the train split has no records"):
        # ...training on it is not
        D.load_pretrain_records(str(tmp_path / "prep"), ["medicat"], "train")


def test_batch_larger_than_the_data():
    with pytest.raises(ValueError, match=r"global batch 8 x 2 is larger than the 10 training "
                                         r"samples: lower --batch-size"):
        data.BatchOrder(10, 8, world=2, rank=0, seed=0)
    assert data.BatchOrder(16, 8, world=2, rank=1, seed=0).per_epoch == 1


@pytest.mark.parametrize("argv, message", [(["--bogus", "1"], "unrecognized arguments: --bogus"),
                                           (["--preset", "huge"],
                                            "argument --preset: invalid choice: 'huge'")])
def test_unknown_flag_or_preset_stops_train(argv, message, capsys):
    import train
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_unknown_task_is_tested_by_finetune():
    # the README table points at this test of tests/test_finetune.py; keep the pointer true
    with open(os.path.join(ROOT, "tests", "test_finetune.py")) as f:
        assert "def test_unknown_task_lists_the_tasks(" in f.read()


# ---- an interrupted prepare ----------------------------------------------------------------------
@pytest.mark.parametrize("earlier_run", [False, True])
def test_interrupted_prepare_leaves_nothing_complete(tmp_path, monkeypatch, earlier_run):
    raw, out = make_mimic(str(tmp_path / "raw")), str(tmp_path / "out")
    if earlier_run:  # complete folders from before must not stay beside the half-written new ones
        P.prepare("mimic_cxr", raw, out, allow_empty=True)  # 3 studies: some splits are empty
    write = P._write_atomic

    def crash_in_the_second_folder(path, lines):
        if path.endswith(os.path.join("mimic_gen", "val.jsonl")):
            raise OSError(28, "No space left on device")
        write(path, lines)

    monkeypatch.setattr(P, "_write_atomic", crash_in_the_second_folder)
    with pytest.raises(OSError, match="No space left"):
        P.prepare("mimic_cxr", raw, out, allow_empty=True)
    # finished in this run: complete and current
    assert D.read_meta(os.path.join(out, "mimic_cxr"))["counts"]
    # half written; not written (an older one, with earlier_run)
    for name in ("mimic_gen", "mimic_sum"):
        folder = os.path.join(out, name)
        assert (os.path.exists(os.path.join(folder, "train.jsonl"))
                == (name == "mimic_gen" or earlier_run))
        for refuse in (lambda: D.read_meta(folder), lambda: D.read_split(folder, "train")):
            with pytest.raises(FileNotFoundError, match="incomplete or missing preparation"):
                refuse()
    cfg = types.SimpleNamespace(data_root=out, tokenizer="", model=None)
    with pytest.raises(SystemExit, match=r"no complete preparation of mimic_gen, mimic_sum; "
                                         r"run:\n  python -m "
                                         r"ptunifier_min\.datasets\.prepare mimic_cxr"):
        source.ensure_prepared(cfg, ["mimic_cxr", "mimic_gen", "mimic_sum"], proc=None,
                               print0=lambda *a: None)


# ---- security ------------------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_calls(source, name="<string>"):
    """Where source may unpickle, eval or exec: pickle-family imports, eval / exec / compile /
    __import__ calls, torch.load without weights_only=True, a *pickle* keyword not set to False, any
    name or attribute with "pickle" in it (pd.read_pickle, ...)."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] + ([node.module]
                                                   if isinstance(node, ast.ImportFrom) else [])
            if any(m and m.split(".")[0] in UNSAFE_MODULES for m in mods):
                found.append(f"{where}: imports {mods}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and "load" in mods:
                found.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "compile", "__import__"):
                found.append(f"{where}: {f.id}()")
            if isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) \
                    and f.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                           and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{where}: torch.load without weights_only=True")
        elif isinstance(node, ast.keyword) and node.arg and "pickle" in node.arg.lower():
            if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                found.append(f"{where}: {node.arg}=")
        elif isinstance(node, (ast.Name, ast.Attribute)):
            ident = node.id if isinstance(node, ast.Name) else node.attr
            if "pickle" in ident.lower():
                found.append(f"{where}: {ident}")
    return found


def test_the_scanner_finds_what_it_looks_for():
    bad = ("import pickle\nfrom torch import load\nx = torch.load(p)\ny = torch.load(p, "
           "weights_only=False)\neval('1')\nexec('x=1')\nnp.load(p, "
           "allow_pickle=True)\npd.read_pickle(p)\nmodel.eval()\n")
    assert len(unsafe_calls(bad)) == 8  # model.eval() is a method, not the builtin
    assert unsafe_calls("torch.load(p, map_location='cpu', "
                        "weights_only=True)\nmodel.eval()\n") == []


def test_no_unpickling_eval_or_exec_in_the_code():
    files = sorted(glob.glob(os.path.join(ROOT, "ptunifier_min", "**", "*.py"), recursive=True) +
                   glob.glob(os.path.join(ROOT, "tools", "*.py")) +
                   glob.glob(os.path.join(ROOT, "*.py")))
    assert any(f.endswith("train.py") for f in files) and any(f.endswith("data.py") for f in files)
    assert any(f.endswith(os.path.join("tools", "ablations.py")) for f in files)
    found = [hit for f in files for hit in unsafe_calls(open(f, encoding="utf-8").read(),
                                                        os.path.relpath(f, ROOT))]
    assert found == []


def test_configuration_is_data_never_code(tmp_path, monkeypatch):
    from ptunifier_min.config import PRESETS, TrainConfig, from_dict, parse_args, to_dict
    monkeypatch.chdir(tmp_path)
    payload = "__import__('os').system('touch pwned')"
    cfg = parse_args(TrainConfig, PRESETS, ["--data", payload, "--out", payload])
    assert (cfg.data == payload
            and from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))).out == payload)
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, PRESETS, ["--steps", payload])  # typed: not an int, not evaluated
    assert not os.path.exists(tmp_path / "pwned")


@pytest.mark.parametrize("name", ["../../outside.jpg", "/etc/hostname", "sub/../../outside.jpg"])
def test_file_names_from_the_data_cannot_leave_the_release(tmp_path, name):
    rows = [_vqa_rad_row(1, "synpic1.jpg", "yes", "freeform")]
    raw = make_vqa_rad(str(tmp_path / "raw"), rows)
    _img(str(tmp_path / "outside.jpg"))
    _json(os.path.join(raw, "VQA_RAD Dataset Public.json"), [{**rows[0], "image_name": name}])
    with pytest.raises(ValueError, match=r"record 1 \(qid 1\): file name .* points outside "
                                         r".*VQA_RAD Image Folder"):
        P.prepare("vqa_rad", raw, str(tmp_path / "out"))


def test_hostile_ids_are_written_inside_files_only(tmp_path):
    hostile = ["../../../escaped", "/tmp/absolute", "..", "a/b\\c"]
    rows = [_vqa_rad_row(q, "synpic1.jpg", "yes", "freeform") for q in hostile]
    rows += [_vqa_rad_row(f"t{i}", "synpic1.jpg", "no", "test_freeform") for i in range(2)]
    raw, out = make_vqa_rad(str(tmp_path / "raw"), rows), tmp_path / "nest" / "out"
    before = set(glob.glob(str(tmp_path / "**"), recursive=True))
    # 4 train questions: no val carved
    (folder,) = P.prepare("vqa_rad", raw, str(out), allow_empty=True)
    written = set(glob.glob(str(tmp_path / "**"), recursive=True)) - before
    expected = {str(out / "vqa_rad" / f) for f in ["meta.json"] + [f"{s}{e}" for s in P.SPLITS
                                                                  for e in (".jsonl", "_ids.txt")]}
    assert written == expected | {str(tmp_path / "nest"), str(out), str(out / "vqa_rad")}
    # kept, as data
    assert set(hostile) <= {r["id"] for s in P.SPLITS for r in D.read_split(folder, s)}
    with pytest.raises(ValueError, match="unknown dataset '../x'"):
        P.prepare("../x", raw, str(out))
    _json(os.path.join(raw, "VQA_RAD Dataset Public.json"),
          rows + [_vqa_rad_row("a\nb", "synpic1.jpg", "no", "freeform")])
    with pytest.raises(ValueError, match=r"id 'a\\nb' in \w+ is empty or holds a line break"):
        P.prepare("vqa_rad", raw, str(out), allow_empty=True)


# ---- tokenizers: bound to their data, read and written safely ------------------------------------
def test_corrupt_tokenizer_file_names_its_path(tmp_path):
    empty = tmp_path / "tokenizer.json"
    empty.write_bytes(b"")  # what a full disk left before tokenizer.json was written atomically
    with pytest.raises(ValueError, match=r"cannot read tokenizer .*tokenizer\.json \(0 "
                                         r"bytes\): EOF while parsing"):
        load_tokenizer(str(empty))
    (tmp_path / "half.json").write_text('{"version": "1.0", "model": {"type": "WordPi')
    with pytest.raises(ValueError, match=r"cannot read tokenizer .*half\.json"):
        load_tokenizer(str(tmp_path / "half.json"))
    (tmp_path / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe\x00binary\n")
    with pytest.raises(ValueError, match=r"cannot read vocabulary .*vocab\.txt: not UTF-8"):
        load_tokenizer(str(tmp_path / "vocab.txt"))


def _pretrain_root(root, names_and_sizes):
    """Prepared pre-training folders with a few records each (images exist:
    load_pretrain_records checks them)."""
    img = os.path.join(root, "img.png")
    _img(img)
    for name, n in names_and_sizes:
        _prepared(os.path.join(root, name),
                  [{"id": f"{name}{i}", "image": img,
                    "texts": [f"{name} finding number {i}. Heart size normal."]}
                   for i in range(n)])
    return str(root)


def test_tokenizer_is_refused_for_other_pretraining_corpora(tmp_path):
    root = _pretrain_root(tmp_path / "prep", [("roco", 3)])
    cfg = types.SimpleNamespace(data_root=root, tokenizer="",
                                model=types.SimpleNamespace(vocab_size=200))
    d = types.SimpleNamespace(main=True, world=1)
    _, tok_path = source.ensure_prepared(cfg, ["roco"], d, print0=lambda *a: None)
    assert tokenizer_record(tok_path)["corpora"] == {"roco": {"records": 3, "texts": 3}}
    # the same corpora: reused
    assert source.ensure_prepared(cfg, ["roco"], d, print0=lambda *a: None)[1] == tok_path
    # then MIMIC-CXR is prepared into the same root
    _pretrain_root(tmp_path / "prep", [("mimic_cxr", 4)])
    with pytest.raises(SystemExit, match=r"tokenizer\.json was trained on roco \(3 train "
                                         r"records\), but the prepared pre-training corpora are "
                                         r"now mimic_cxr \(4 train records\), roco \(3 train "
                                         r"records\): delete it .* or pass --tokenizer"):
        source.ensure_prepared(cfg, ["roco", "mimic_cxr"], d, print0=lambda *a: None)
    # the user's explicit choice is used
    explicit = types.SimpleNamespace(**{**vars(cfg), "tokenizer": tok_path})
    assert (source.ensure_prepared(explicit, ["roco", "mimic_cxr"], d, print0=lambda *a: None)[1]
            == tok_path)
    os.remove(tokenizer_record_path(tok_path))  # a tokenizer.json of unknown origin is refused too
    with pytest.raises(SystemExit,
                       match=r"tokenizer\.json has no record of the corpora it was trained on"):
        source.ensure_prepared(cfg, ["roco"], d, print0=lambda *a: None)
    os.remove(tok_path)  # deleted, as the message says: retrained on both, and recorded
    source.ensure_prepared(cfg, ["roco", "mimic_cxr"], d, print0=lambda *a: None)
    assert sorted(tokenizer_record(tok_path)["corpora"]) == ["mimic_cxr", "roco"]
    with open(tok_path, "w") as f:
        f.write("")  # emptied or replaced behind the record's back: named, not loaded
    with pytest.raises(SystemExit,
                       match=r"tokenizer\.json is not the file its record .*tokenizer\.meta\.json"):
        source.ensure_prepared(cfg, ["roco"], d, print0=lambda *a: None)


def _disk_full_on(monkeypatch, name):
    """open() as usual, except that writing a temporary of `name` fails as a full disk does."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return (Full(f) if "w" in mode and os.path.basename(str(path)).startswith(name + ".tmp")
                else f)

    monkeypatch.setattr("builtins.open", fake_open)


def test_disk_full_while_writing_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    folder = tmp_path / "tok"
    train_tokenizer(["the heart is normal"] * 4, 60, str(folder))
    before = (folder / "tokenizer.json").read_bytes()
    _disk_full_on(monkeypatch, "tokenizer.json")
    with pytest.raises(OSError, match=r"disk full .* while writing .*tok/tokenizer\.json"):
        train_tokenizer(["a small left pleural effusion"] * 4, 60, str(folder))
    monkeypatch.undo()
    # the previous file is untouched, never half written
    assert (folder / "tokenizer.json").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["tokenizer.json", "tokenizer.meta.json"]
    raw, out = make_rsna(str(tmp_path / "raw"), 20), tmp_path / "out"
    _disk_full_on(monkeypatch, "train.jsonl")
    with pytest.raises(OSError, match=r"disk full .* while writing .*rsna/train\.jsonl"):
        P.prepare("rsna", raw, str(out))
    monkeypatch.undo()
    assert [f for f in os.listdir(out / "rsna") if "tmp" in f] == []


# ---- releases read strictly ----------------------------------------------------------------------
def _medicat(raw, rows):
    for r in rows:
        _img(str(raw / "figures" / f"{r['pdf_hash']}_{r['fig_uri']}"), "PNG")
    _lines(str(raw / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"),
           [json.dumps(r) for r in rows])
    return str(raw)


def _figure(k, **kw):
    return {"pdf_hash": f"h{k:02d}", "fig_uri": "1-Figure1-1.png",
            "s2_caption": f"Axial CT number {k} of the chest.", "s2orc_references": None,
            "radiology": True, **kw}


def test_field_of_the_wrong_json_type_names_file_and_row(tmp_path):
    # a string where the list belongs: read as a list of characters, each "too
    # short", and dropped in silence
    raw = _medicat(tmp_path / "medicat", [_figure(k) for k in range(20)] +
                   [_figure(20, s2orc_references="The mass is seen in the left lobe.")])
    with pytest.raises(ValueError, match=r"public\.jsonl, line 21: field "
                                         r"'s2orc_references' is a string \('The mass is "
                                         r"seen.*'\); expected a list or null"):
        P.prepare("medicat", raw, str(tmp_path / "out"))
    raw = _medicat(tmp_path / "medicat2",
                   [_figure(k) for k in range(20)] + [_figure(20, s2orc_references=[3])])
    with pytest.raises(ValueError, match=r"line 21: s2orc_references holds a number \('3'\); "
                                         r"expected a list of strings"):
        P.prepare("medicat", raw, str(tmp_path / "out"))
    # a list where the string belongs: "['Is there', 'a fracture?']" would become the question
    rows = [_vqa_rad_row(1, "synpic1.jpg", "yes", "freeform", q=["Is there", "a fracture?"])]
    with pytest.raises(ValueError, match=r"Public\.json, record 1 \(qid 1\): field 'question' is a "
                                         r"list .*expected a string"):
        P.prepare("vqa_rad", make_vqa_rad(str(tmp_path / "vqa"), rows), str(tmp_path / "out"))
    raw = tmp_path / "nli"
    for k, name in enumerate(("mli_train_v1.jsonl", "radnli_dev_v1.jsonl", "radnli_test_v1.jsonl")):
        _lines(str(raw / name), [json.dumps({"pair_id": str(k), "sentence1": "a b c",
                                             "sentence2": 42, "gold_label": "neutral"})])
    with pytest.raises(ValueError, match=r"mli_train_v1\.jsonl, line 1: field 'sentence2' "
                                         r"is a number \('42'\)"):
        P.prepare("radnli", str(raw), str(tmp_path / "out"))


def test_record_that_is_not_a_json_object(tmp_path):
    raw = _medicat(tmp_path / "medicat", [_figure(k) for k in range(20)])
    with open(os.path.join(raw, "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"),
              "a") as f:
        f.write('["h99", "1-Figure1-1.png"]\n')
    with pytest.raises(ValueError, match=r"public\.jsonl, line 21: the record is a list; "
                                         r"expected a JSON object"):
        P.prepare("medicat", raw, str(tmp_path / "out"))


def test_duplicate_id_in_one_split_names_file_and_row(tmp_path):
    rows = [_vqa_rad_row(i, "synpic1.jpg", "yes", "freeform") for i in range(10)]
    rows += [_vqa_rad_row(3, "synpic1.jpg", "no", "freeform"),
             _vqa_rad_row(20, "synpic1.jpg", "no", "test_para")]
    with pytest.raises(ValueError, match=r"Public\.json, record 11 \(qid 3\): id '3' occurs again; "
                                         r"first at .*Public\.json, record 4 \(qid 3\)"):
        P.prepare("vqa_rad", make_vqa_rad(str(tmp_path / "raw"), rows), str(tmp_path / "out"))


def test_same_id_in_two_splits_is_refused(tmp_path):
    from test_prepare import make_slake
    raw = make_slake(str(tmp_path / "slake"))
    test = json.load(open(os.path.join(raw, "test.json")))
    # qid 1 is a train question
    _json(os.path.join(raw, "test.json"), test + [{**test[0], "qid": 1}])
    with pytest.raises(ValueError, match=r"test\.json, record 4 \(qid 1\): id '1' occurs again; "
                                         r"first at .*train\.json, record 1"):
        P.prepare("slake", raw, str(tmp_path / "out"))
    # the same figure twice in MedICaT: the seeded split may put the
    # copies in train and test (a leak)
    raw = _medicat(tmp_path / "medicat", [_figure(k) for k in range(20)] + [_figure(7)])
    with pytest.raises(ValueError, match=r"public\.jsonl, line 21: id 'h07_1-Figure1-1' occurs "
                                         r"again; first at .*line 8"):
        P.prepare("medicat", raw, str(tmp_path / "out"))


def test_split_that_would_be_written_empty_stops_prepare(tmp_path):
    # 10% of 4 rounds to no val
    rows = [_vqa_rad_row(i, "synpic1.jpg", "yes", "freeform") for i in range(4)]
    rows += [_vqa_rad_row(9, "synpic1.jpg", "no", "test_para")]
    raw, out = make_vqa_rad(str(tmp_path / "raw"), rows), tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        P.main(["vqa_rad", "--root", raw, "--out", str(out)])
    assert e.value.code not in (0, None)
    assert ("vqa_rad: the val split(s) would be written empty (kept train 4 / val 0 / test 1"
            in str(e.value))
    assert "--allow-empty-splits" in str(e.value) and not os.path.exists(out / "vqa_rad")
    # a deliberate cut-down release
    P.main(["vqa_rad", "--root", raw, "--out", str(out), "--allow-empty-splits"])
    assert D.read_meta(str(out / "vqa_rad"))["counts"] == {"train": 4, "val": 0, "test": 1}


def test_rule_dropping_most_of_a_folder_stops_prepare(tmp_path):
    from test_prepare import make_slake
    raw = make_slake(str(tmp_path / "slake"))
    # every q_lang upper-cased by a re-export
    for name in ("train.json", "validate.json", "test.json"):
        path = os.path.join(raw, name)
        _json(path, [{**r, "q_lang": r["q_lang"].upper()} for r in json.load(open(path))])
    with pytest.raises(ValueError, match=r"slake: the rules drop 8 of 8 records \(100%, over "
                                         r"90%\): non_english 8 \(questions with q_lang != 'en' "
                                         r"are dropped\); kept train 0 / val 0 / test 0"):
        P.prepare("slake", raw, str(tmp_path / "out"))


def test_two_image_files_for_one_id_are_refused(tmp_path):
    raw = make_rsna(str(tmp_path / "rsna"), 20)
    _img(os.path.join(raw, "stage_2_train_images", "pid-004.jpg"), "JPEG")  # beside pid-004.png
    with pytest.raises(ValueError, match=r"line \d+ \(pid-004\): image file: 2 candidates "
                                         r"for one input: .*pid-004\.png and "
                                         r".*pid-004\.jpg; remove or rename"):
        P.prepare("rsna", raw, str(tmp_path / "out"))
    # ROCO_00005 is stored under its dlinks.txt name, PMC1-fig2.jpg
    raw = make_roco(str(tmp_path / "roco"))
    _img(os.path.join(raw, "data", "train", "radiology", "images", "ROCO_00005.jpg"))
    with pytest.raises(ValueError,
                       match=r"captions\.txt, line 3 \(ROCO_00005\): image file: 2 candidates"):
        P.prepare("roco", raw, str(tmp_path / "out"))


def test_two_candidate_files_or_folders_for_one_input_are_refused(tmp_path):
    raw = make_mimic(str(tmp_path / "mimic"), gz=True)
    make_mimic(raw, gz=False)  # unpacked beside the .csv.gz, perhaps edited since
    with pytest.raises(ValueError, match=r"mimic-cxr-2\.0\.0-split CSV: 2 candidates for one "
                                         r"input: .*split\.csv\.gz and .*split\.csv;"):
        P.prepare("mimic_cxr", raw, str(tmp_path / "out"))
    raw = make_roco(str(tmp_path / "roco"))
    make_roco(raw, val_name="val")  # both validation/ and val/
    with pytest.raises(ValueError, match=r"ROCO val folder: 2 candidates for one input: "
                                         r".*validation and .*val;"):
        P.prepare("roco", raw, str(tmp_path / "out"))


def test_exif_orientation_is_applied(tmp_path):
    ramp = _ramp(40, 30)  # dark at the left, bright at the right
    exif = Image.Exif()
    # "rotate 90 degrees clockwise to display": what a camera or a scanner app writes
    exif[0x0112] = 6
    path = _save(Image.fromarray(ramp), tmp_path / "rotated.jpg", exif=exif, quality=95)
    img = load_image(path)
    assert img.size == (30, 40)  # displayed upright: portrait
    # clockwise: the ramp now runs from top (dark) to bottom (bright)
    shown = np.rot90(ramp, k=-1).astype(int)
    assert np.abs(np.asarray(img).astype(int) - shown).mean() < 3
    _through_transform(img)


def test_unwritable_out_is_refused_before_any_image_is_decoded(tmp_path, monkeypatch):
    raw = make_roco(str(tmp_path / "raw"))
    decoded = []
    monkeypatch.setattr(P, "load_image", lambda path: decoded.append(path))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(OSError, match=r"--out .*a_file/out is not a writable folder"):
        P.prepare("roco", raw, str(tmp_path / "a_file" / "out"))
    assert decoded == []
    # root writes into read-only folders; the check above covers the same path for root
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        with pytest.raises(OSError,
                           match=r"--out .*ro/out is not a writable folder \(Permission denied"):
            P.prepare("roco", raw, str(tmp_path / "ro" / "out"))
        assert decoded == []
    # a folder that does not exist yet is fine
    P.prepare("roco", raw, str(tmp_path / "new" / "out"))
    assert len(decoded) == 4



# ---- prepared manifests: checked where they are read ------------------------------------------
@pytest.mark.parametrize("field, value, message", [
    ("id", 7, r"field 'id' is a number \('7'\); expected a non-empty string"),
    ("texts", "The heart is normal.",
     r"field 'texts' is a string .*expected a non-empty list of non-empty strings"),
    ("texts", ["fine", 3], r"field 'texts' is a list .*expected a non-empty list of non-empty"),
    ("labels", [1, 2, 0], r"field 'labels' is a list \('\[1, 2, 0\]'\); expected a list of 0 / 1"),
    ("labels", [1, 0], r"field 'labels' holds 2 values; expected one per label of meta\.json"),
    ("label", 5, r"field 'label' is 5; expected -1 \.\. 1 \(meta\.json lists 2 classes\)"),
    ("label", True, r"field 'label' is true or false .*expected an integer class index"),
    ("answer_type", "OPEN", r"field 'answer_type' is a string \('OPEN'\); expected 'open' or"),
    ("question", None, r"field 'question' is null .*expected a non-empty string"),
])
def test_prepared_manifest_fields_are_type_checked_where_read(tmp_path, field, value, message):
    """A hand-edited or foreign {split}.jsonl fails when it is read, naming file, line and field
    (before: a string of texts was read character by character, labels of 2 trained a BCE head,
    a bool was a class)."""
    good = {"id": "q1", "image": "a.png", "question": "is it?", "answer": "yes",
            "answer_type": "open", "label": 0, "labels": [1, 0, 0], "texts": ["The heart."]}
    folder = _prepared(tmp_path / "prep" / "x", [good, {**good, "id": "q2", field: value}])
    _json(os.path.join(folder, "meta.json"), {"dataset": "x", "counts": {"train": 2},
                                              "answers": ["yes", "no"],
                                              "label_names": ["a", "b", "c"]})
    with pytest.raises(ValueError, match=r"x/train\.jsonl, line 2: " + message):
        D.read_split(folder, "train")


def test_a_record_without_a_field_its_reader_needs_names_it(tmp_path):
    record = {"id": "q1", "image": "a.png", "answer_type": "open", "label": 0}
    folder = _prepared(tmp_path / "prep" / "vqa", [record])
    assert len(D.read_split(folder, "train")) == 1  # a reader that needs only the id
    with pytest.raises(ValueError,
                       match=r"vqa/train\.jsonl, line 1: missing field\(s\) \['question'\]"):
        D.read_split(folder, "train", required=tasks.TASKS["vqa_rad"].fields)
    folder = _prepared(tmp_path / "prep" / "x", [{"id": "a", "texts": ["one"]},
                                                 {"id": "a", "texts": ["two"]}])
    with pytest.raises(ValueError,
                       match=r"x/train\.jsonl, line 2: id 'a' occurs again; first at line 1"):
        D.read_split(folder, "train")


@pytest.mark.parametrize("given, read", [(" roco, medicat ", "roco,medicat"),
                                         ("roco,,mimic_cxr,", "roco,mimic_cxr")])
def test_data_flag_drops_spaces_around_the_names(given, read):
    cfg = config.parse_args(config.TrainConfig, config.PRESETS, ["--data", given])
    assert cfg.data == read and cfg.data_sets() == read.split(",")


@pytest.mark.parametrize("given, message", [
    ("roco,medicat,roco", r"--data names roco twice \(got 'roco,medicat,roco'\)"),
    ("", r"--data names no pre-training set \(got ''\): give the prepared folders to train on, "
         r"e\.g\. --data roco"),
    (" , ", r"--data names no pre-training set"),
])
def test_data_flag_naming_a_set_twice_or_none_is_refused(given, message, capsys):
    with pytest.raises(SystemExit):
        config.parse_args(config.TrainConfig, config.PRESETS, ["--data", given])
    assert re.search(message, capsys.readouterr().err)
