"""data.py: image loading and transforms, manifests, sentences, the tokenizers (WordPiece,
byte-level BPE, files transformers saved), whole-word continuations, encoding, PretrainDataset."""

import json
import os
import random

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers


from ptunifier_min.images import ImageTransform, load_image
from ptunifier_min.tokenizer import ROBERTA_SPECIAL_TOKENS, continuation_table, encode_pairs, \
    encode_texts, load_tokenizer, special_ids
from ptunifier_min import data as D
from ptunifier_min.model import normalize, pixel_table
from ptunifier_min.datasets.source import train_tokenizer


def floats(transform, img, rng=None):
    """The model's float input for an image: its uint8 pixels through the from-scratch table."""
    return normalize(transform.pixels(img, rng), pixel_table())


def _gradient(path, w=40, h=30, mode="L"):
    x = (np.arange(w)[None, :] * 255 // (w - 1)).repeat(h, 0).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(x, mode="L").convert(mode).save(path)
    return str(path)


def _prepared(folder, records, split="train"):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"dataset": os.path.basename(folder), "counts": {split: len(records)}}, f)
    return folder


CORPUS = ["There is no focal consolidation, pleural effusion or pneumothorax.",
          "The cardiomediastinal silhouette is normal. No acute cardiopulmonary process.",
          "Axial CT of the abdomen shows a large hepatic mass.",
          "Moderate left pleural effusion with adjacent atelectasis."] * 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, 300, str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def test_load_image_modes_and_errors(tmp_path):
    assert load_image(_gradient(tmp_path / "rgb.png", mode="RGB")).mode == "L"
    x16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(x16).save(tmp_path / "deep.png")  # 16-bit PNG: rescaled, not clipped at 255
    img = np.asarray(load_image(str(tmp_path / "deep.png")))
    assert img.min() == 0 and img.max() == 255 and len(np.unique(img)) > 32
    with pytest.raises(FileNotFoundError, match="image file not found: .*nothere.jpg"):
        load_image(str(tmp_path / "nothere.jpg"))
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*corrupt\.jpg"):
        load_image(str(bad))
    half = tmp_path / "truncated.jpg"
    Image.fromarray((np.random.RandomState(0).rand(64, 64) * 255).astype(np.uint8)).save(
        tmp_path / "full.jpg")
    half.write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    with pytest.raises(ValueError, match=r"cannot read image .*truncated\.jpg"):
        load_image(str(half))


def test_dicom_without_pydicom_says_how_to_install(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\0" * 200)
    try:
        import pydicom  # noqa: F401
        pytest.skip("pydicom is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"x\.dcm .*pip install pydicom"):
        load_image(str(path))


def test_dicom_monochrome1_is_inverted(tmp_path):
    pytest.importorskip("pydicom")  # optional dependency: runs where it is installed
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = (np.arange(64).reshape(8, 8) * 60).astype(np.uint16)
    for photometric in ("MONOCHROME2", "MONOCHROME1"):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = (
            "1.2.840.10008.5.1.4.1.1.7", generate_uid())
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.Rows, ds.Columns, ds.SamplesPerPixel = meta, 8, 8, 1
        ds.PhotometricInterpretation, ds.PixelRepresentation = photometric, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelData = 16, 12, 11, arr.tobytes()
        ds.save_as(str(tmp_path / f"{photometric}.dcm"), enforce_file_format=True)
    m2 = np.asarray(load_image(str(tmp_path / "MONOCHROME2.dcm")), dtype=int)
    m1 = np.asarray(load_image(str(tmp_path / "MONOCHROME1.dcm")), dtype=int)
    assert m2[0, 0] == 0 and m2.max() == 255 and (m1 == 255 - m2).all()


def test_eval_transform_center_crop(tmp_path):
    img = load_image(_gradient(tmp_path / "g.png", w=40, h=20))
    x = floats(ImageTransform(16), img)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # center crop of a left-to-right ramp: the central square keeps the
    # middle of the ramp, not its ends
    assert -0.6 < x[0, :, 0].mean() < -0.3 and 0.3 < x[0, :, -1].mean() < 0.6
    # training without RRC = the paper's center crop
    assert torch.equal(floats(ImageTransform(16, train=True), img), x)


def test_random_resized_crop(tmp_path):
    img = load_image(_gradient(tmp_path / "g.png", w=50, h=37))
    t = ImageTransform(24, train=True, random_resized_crop=True, scale=(0.3, 1.0))
    a, b = floats(t, img, random.Random(5)), floats(t, img, random.Random(5))
    assert a.shape == (3, 24, 24) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b)  # a pure function of the rng
    crops = {tuple(floats(t, img, random.Random(s))[0, 0, [0, -1]].tolist()) for s in range(8)}
    assert len(crops) > 1  # and it does crop differently for different draws
    assert torch.equal(floats(ImageTransform(24, train=False, random_resized_crop=True), img),
                       floats(ImageTransform(24), img))


def test_read_meta_and_split_errors(tmp_path):
    folder = _prepared(str(tmp_path / "roco"), [{"id": "a", "image": "x", "texts": ["t u v"]}])
    assert (D.read_meta(folder)["dataset"] == "roco"
            and D.read_split(folder, "train")[0]["id"] == "a")
    with open(os.path.join(folder, "train.jsonl"), "a") as f:
        f.write('{"id": "b", "image": \n')
    with pytest.raises(ValueError, match=r"roco/train\.jsonl, line 2: malformed JSON"):
        D.read_split(folder, "train")
    os.remove(os.path.join(folder, "meta.json"))
    with pytest.raises(FileNotFoundError, match="incomplete or missing preparation: .*roco"):
        D.read_meta(folder)


def test_load_pretrain_records(tmp_path):
    img = _gradient(tmp_path / "img" / "a.png")
    _prepared(str(tmp_path / "p" / "roco"),
              [{"id": "r1", "image": img, "texts": ["one two three"]}])
    _prepared(str(tmp_path / "p" / "medicat"),
              [{"id": "m1", "image": img, "texts": ["four five six"]},
               {"id": "m2", "image": img, "texts": ["seven eight nine"]}])
    recs = D.load_pretrain_records(str(tmp_path / "p"), ["roco", "medicat"], "train")
    assert ([(r["id"], r["dataset"]) for r in recs]
            == [("r1", "roco"), ("m1", "medicat"), ("m2", "medicat")])
    _prepared(str(tmp_path / "p" / "roco"),
              [{"id": "r9", "image": str(tmp_path / "gone.png"), "texts": ["a b c"]}])
    with pytest.raises(FileNotFoundError,
                       match=r"roco/train\.jsonl, id r9: image file not found: .*gone\.png"):
        D.load_pretrain_records(str(tmp_path / "p"), ["roco"], "train")


def test_split_sentences():
    assert D.split_sentences("No effusion. Heart size is normal!  Is there a mass? yes") == \
        ["No effusion.", "Heart size is normal!", "Is there a mass? yes"]
    assert D.split_sentences("1. Small effusion. 2. Mild edema, e.g. in the bases.") == \
        ["1. Small effusion.", "2. Mild edema, e.g. in the bases."]
    assert D.split_sentences("no period at the end") == ["no period at the end"]
    assert D.split_sentences("...") == ["..."]


def test_tokenizer_special_ids_and_round_trip(tok, tmp_path):
    assert special_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    text = "  The  cardiomediastinal silhouette is NORMAL, no pleural effusion.  "
    enc = tok.encode(text)
    assert enc.ids[0] == 2 and enc.ids[-1] == 3  # the post-processor adds [CLS] ... [SEP]
    assert tok.decode(enc.ids) == " ".join(text.split()).lower()


def tok_path(tmp_path):
    path = str(tmp_path / "t" / "tokenizer.json")
    # a folder path: saved as <folder>/tokenizer.json
    train_tokenizer(CORPUS, 300, str(tmp_path / "t"))
    assert os.path.exists(path)
    return path


def test_tokenizer_save_and_load(tok, tmp_path):
    loaded = load_tokenizer(tok_path(tmp_path))
    # training is deterministic (the '##' pieces are numbered in sorted order, see train_tokenizer)
    assert loaded.get_vocab() == tok.get_vocab() and 100 < tok.get_vocab_size() <= 300
    assert loaded.encode("pleural effusion").ids == tok.encode("pleural effusion").ids
    assert load_tokenizer(str(tmp_path / "t")).get_vocab_size() == tok.get_vocab_size()


def test_vocab_txt(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "pleural", "effusion", "eff",
             "##usion", ".", "mass"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = load_tokenizer(str(tmp_path / "vocab.txt"))
    assert special_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    enc = tok.encode("No pleural EFFUSION. Cyst")
    assert enc.tokens == ["[CLS]", "no", "pleural", "effusion", ".", "[UNK]", "[SEP]"]
    assert tok.decode(tok.encode("no pleural effusion.").ids) == "no pleural effusion."
    # a folder with a vocab.txt
    assert load_tokenizer(str(tmp_path)).encode("mass").ids == [2, 11, 3]
    (tmp_path / "bad.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"bad\.txt: vocabulary lacks special token"):
        load_tokenizer(str(tmp_path / "bad.txt"))


def test_encode_texts_truncation_and_padding(tok):
    ids, mask = encode_texts(tok, [CORPUS[0] * 3, "no effusion", ""], max_len=10)
    assert ids.shape == (3, 10) and mask.dtype == torch.bool
    assert ids[0, 0] == 2 and ids[0, -1] == 3 and mask[0].all()  # truncated, final [SEP] kept
    n = len(tok.encode("no effusion").ids)  # with [CLS] and [SEP]
    assert (ids[1, n - 1] == 3 and mask[1].sum() == n and (ids[1, n:] == 0).all()
            and not mask[1, n:].any())
    assert ids[2, :2].tolist() == [2, 3] and mask[2].sum() == 2
    short, _ = encode_texts(tok, ["no effusion"], max_len=48)
    assert short.shape == (1, n)  # padded to the longest in the batch, not to max_len


def test_encode_pairs(tok):
    ids, mask = encode_pairs(tok, ["no effusion", CORPUS[1] * 4],
                             ["normal heart", "mass"], max_len=12)
    row = ids[0][mask[0]].tolist()
    assert row[0] == 2 and row.count(3) == 2 and row[-1] == 3
    assert tok.decode(row[1:row.index(3)]) == "no effusion"
    assert ids.shape == (2, 12) and ids[1].tolist().count(3) == 2 and ids[1, -1] == 3
    assert tok.decode(ids[1].tolist()).endswith("mass")  # the longer text is the one truncated


def test_pretrain_dataset_is_a_function_of_seed_epoch_index(tmp_path, tok):
    img = _gradient(tmp_path / "a.png", w=48, h=40)
    texts = ["First sentence here. Second sentence here. Third one here.",
             "Other text. With two sentences."]
    recs = [{"id": str(i), "image": img, "texts": texts} for i in range(6)]
    t = ImageTransform(16, train=True, random_resized_crop=True)

    def epoch(ds, e):
        ds.set_epoch(e)
        return [ds[i] for i in range(len(ds))]

    a, b = D.PretrainDataset(recs, t.pixels, seed=3), D.PretrainDataset(recs, t.pixels, seed=3)
    e0, e0b, e1 = epoch(a, 0), epoch(b, 0), epoch(a, 1)
    assert all(x["text"] == y["text"] and torch.equal(x["image"], y["image"])
               for x, y in zip(e0, e0b))
    assert epoch(a, 0)[4]["text"] == e0[4]["text"]  # back to epoch 0: the same again (exact resume)
    assert [x["text"] for x in e0] != [x["text"] for x in e1]
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(e0, e1))
    sentences = set(D.split_sentences(texts[0]) + D.split_sentences(texts[1]))
    assert (all(x["text"] in sentences for x in e0 + e1)
            and [x["index"] for x in e0] == list(range(6)))
    other = epoch(D.PretrainDataset(recs, t.pixels, seed=4), 0)
    assert [x["text"] for x in other] != [x["text"] for x in e0]

    batch = D.pretrain_collate(tok, max_len=8)(e0[:4])
    assert batch["image"].shape == (4, 1, 16, 16) and batch["input_ids"].shape[0] == 4
    assert batch["input_ids"].shape[1] <= 8 and batch["attention_mask"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1, 2, 3]


# ---- lean batches: uint8 pixels from the loader, normalised on the device ------------------------
def _old_transform(t, img, rng=None):
    """The float transform as it was before the lean batches, written out: the reference
    every pixel must still equal."""
    w, h = img.size
    box = t._random_box(w, h, rng) if t.train and t.random_resized_crop else t._center_box(w, h)
    img = img.convert("L").resize((t.size, t.size), Image.Resampling.BICUBIC, box=box)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    return ((x - 0.5) / 0.5).unsqueeze(0).expand(3, -1, -1).contiguous()


def test_uint8_pixels_normalise_bit_for_bit_to_the_old_float_transform(tmp_path, tok):
    noise = Image.fromarray(np.random.RandomState(0).randint(0, 256, (37, 53), dtype=np.uint8))
    # all 256 levels, no resampling
    every_value = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16))
    for img in (load_image(_gradient(tmp_path / "g.png", w=50, h=37)), noise, every_value):
        for t in (ImageTransform(16), ImageTransform(24, train=True, random_resized_crop=True)):
            px = t.pixels(img, random.Random(3))
            assert px.shape == (1, t.size, t.size) and px.dtype == torch.uint8
            ref = _old_transform(t, img, random.Random(3))
            assert torch.equal(floats(t, img, random.Random(3)), ref)
    # the table's every entry was checked
    assert len(ImageTransform(16).pixels(every_value).unique()) == 256
    # what a dataset and its collate hand the loader: one channel of uint8,
    # normalised later to the same floats
    recs = [{"id": str(i), "image": _gradient(tmp_path / f"{i}.png", w=30 + i, h=20),
             "texts": ["a b."]}
            for i in range(3)]
    t = ImageTransform(16, train=True, random_resized_crop=True)
    ds = D.PretrainDataset(recs, t.pixels, seed=1)  # as train.py makes it
    batch = D.pretrain_collate(tok, 8)([ds[i] for i in range(3)])
    assert batch["image"].shape == (3, 1, 16, 16) and batch["image"].dtype == torch.uint8
    for i, r in enumerate(recs):
        # the dataset's rng draws a text and a sentence before the crop: replay them
        rng = random.Random(f"1-0-{i}")
        rng.choice(D.split_sentences(rng.choice(r["texts"])))
        ref = _old_transform(t, load_image(r["image"]), rng)
        assert torch.equal(normalize(batch["image"][i], pixel_table()), ref)


def test_a_per_channel_table_normalises_each_channel_with_its_own_statistics():
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]  # CLIP's
    table = pixel_table(mean, std)
    gray = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)  # every level
    x = torch.from_numpy(np.arange(256, dtype=np.float32).reshape(16, 16) / 255.0)
    out = normalize(gray, table)
    assert out.shape == (1, 3, 16, 16)
    for c in range(3):
        assert torch.equal(out[0, c], (x - torch.tensor(mean[c])) / torch.tensor(std[c]))
    assert torch.equal(normalize(gray.expand(1, 3, 16, 16), table), out)  # 3-channel uint8 input
    img = Image.fromarray(gray[0, 0].numpy())
    assert torch.equal(normalize(ImageTransform(16).pixels(img), table), out[0])


def test_model_reads_uint8_pixels_exactly_as_float_images():
    """The model normalises uint8 [B, 1, S, S] itself: every pass gives the same bits as the float
    [B, 3, S, S] input, in fp32, under bf16 autocast, and with the model cast to bf16 (the API's
    dtype=), and checkpoints are unchanged."""
    from ptunifier_min.config import PRESETS, TrainConfig, build
    from ptunifier_min.model import PTUnifier
    cfg = build(TrainConfig, {**PRESETS["tiny"], "vocab_size": 100})
    torch.manual_seed(0)
    model = PTUnifier(cfg.model).eval()
    S = cfg.model.image_size
    px = torch.randint(0, 256, (3, 1, S, S), dtype=torch.uint8)
    x = torch.stack([_old_transform(ImageTransform(S), Image.fromarray(p[0].numpy())) for p in px])
    ids = torch.randint(5, 100, (3, 7))
    with torch.no_grad():
        assert torch.equal(model(image=px).hidden, model(image=x).hidden)
        assert torch.equal(model(image=px, input_ids=ids).hidden,
                           model(image=x, input_ids=ids).hidden)
        assert torch.equal(model.forward_vision(px), model.forward_vision(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(image=px, input_ids=ids).hidden,
                               model(image=x, input_ids=ids).hidden)
        model.to(torch.bfloat16)
        assert torch.equal(model(image=px).hidden, model(image=x.to(torch.bfloat16)).hidden)
    # a constant of the input format, not a weight
    assert not any("pixel" in k for k in model.state_dict())


def test_training_reads_the_image_cache_and_no_longer_needs_the_originals(tmp_path):
    import shutil
    import types

    from ptunifier_min import retrieval
    from ptunifier_min.datasets import prepare as P
    from test_prepare import _noisy, make_roco
    raw, out = make_roco(str(tmp_path / "raw")), str(tmp_path / "out")
    images = os.path.join(raw, "data", "train", "radiology", "images")
    # larger than the short side: shrunk
    _noisy(os.path.join(images, "ROCO_00007.jpg"), (100, 80), seed=1)
    _noisy(os.path.join(images, "PMC1-fig2.jpg"), (40, 30), seed=2)  # smaller: kept pixel for pixel
    P.prepare("roco", raw, out, cache_short_side=64)
    transform = ImageTransform(32, train=True, random_resized_crop=True).pixels

    # the dataset's items, with every image read from the field `reading`
    def items(records, reading):
        ds = D.PretrainDataset([{**r, "image": r[reading], "image_cache": None}
                                for r in records], transform, seed=3)
        return {r["id"]: ds[i]["image"] for i, r in enumerate(records)}
    records = D.load_pretrain_records(out, ["roco"], "train")
    from_original, from_cache = items(records, "image"), items(records, "image_cache")
    shutil.rmtree(raw)  # the originals are gone: training reads the copies
    records = D.load_pretrain_records(out, ["roco"], "train")
    ds = D.PretrainDataset(records, transform, seed=3)
    for i, r in enumerate(records):
        item = ds[i]
        assert torch.equal(item["image"], from_cache[r["id"]])
        assert item["image_id"] == D.file_id(r["image"])  # the identity stays the original file's
    small = [i for i, r in enumerate(records) if r["id"] == "ROCO_00005"][0]
    # identical pixels for a small image
    assert torch.equal(ds[small]["image"], from_original["ROCO_00005"])
    task = types.SimpleNamespace(image=True, text=["texts"], target=None)
    cached = [{**r, "image": r["image_cache"], "image_cache": None} for r in records]
    assert torch.equal(D.TaskDataset(records, task, transform)[1]["image"],
                       D.TaskDataset(cached, task, transform)[1]["image"])
    assert retrieval.pairs(records)[0] == [r["image_cache"] for r in records]
    os.remove(records[0]["image_cache"])
    with pytest.raises(FileNotFoundError, match=r"roco/train\.jsonl, id ROCO_00005: image cache "
                                                r"file not found: .*image_cache/PMC1-fig2-\w+\.pgm "
                                                r".*run prepare again"):
        D.load_pretrain_records(out, ["roco"], "train")


def test_task_collate_says_on_the_host_whether_a_batch_is_padded(tmp_path):
    """The flag that spares the model a host read of the mask (PTUnifier.forward's
    `padded`) matches the mask."""
    path = str(tmp_path / "tokenizer.json")
    train_tokenizer(["a small effusion", "no effusion today at all"] * 20, 100, path)
    collate = D.task_collate(load_tokenizer(path), 16, 8)
    ragged = collate([{"index": 0, "text": "a small effusion", "label": 0},
                      {"index": 1, "text": "no effusion today at all", "label": 1}])
    even = collate([{"index": 0, "text": "a small effusion", "label": 0}] * 2)
    assert ragged["padded"] is True and not bool(ragged["attention_mask"].all())
    assert even["padded"] is False and bool(even["attention_mask"].all())


# texts of different lengths, longer and shorter than the saved truncation and padding lengths
SAVED_TEXTS = ["No effusion.", "The cardiomediastinal silhouette is normal, no pleural effusion.",
               "Mass", "Axial CT of the abdomen shows a large hepatic mass of 2.5 cm."]


def _hf_tokenizer(kind, folder, tok, byte_level_bpe):
    """transformers' (fast, tokenizers-backed) tokenizer for a BERT vocab.txt (the trained `tok`'s)
    or the RoBERTa BPE."""
    if kind == "roberta":
        return transformers.RobertaTokenizer(str(byte_level_bpe / "vocab.json"),
                                             str(byte_level_bpe / "merges.txt"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab))
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_a_tokenizer_saved_with_padding_and_truncation_on_encodes_as_transformers(
        kind, tok, byte_level_bpe, tmp_path):
    hf = _hf_tokenizer(kind, tmp_path, tok, byte_level_bpe)
    expected = hf(SAVED_TEXTS)["input_ids"]  # padding and truncation off
    assert len(set(map(len, expected))) == len(SAVED_TEXTS) and max(map(len, expected)) > 8
    # a batch call with padding and truncation, then a save: transformers writes both into the file
    hf(SAVED_TEXTS, padding=True, truncation=True, max_length=8)
    hf.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer.json").read_text())
    assert saved["padding"] and saved["truncation"]  # the file under test has them on
    ids, mask = encode_texts(load_tokenizer(str(tmp_path / "saved")), SAVED_TEXTS, max_len=64)
    assert [row[m].tolist() for row, m in zip(ids, mask)] == expected
    assert ids.shape[1] == max(map(len, expected))


def test_continuation_table_marks_hashes_in_wordpiece_and_unmarked_pieces_in_byte_level_bpe(
        tok, byte_level_bpe, tmp_path):
    def continuing(t):
        return {p for p, i in t.get_vocab().items() if continuation_table(t)[i]}
    assert continuing(tok) == {p for p in tok.get_vocab() if p.startswith("##")}
    # RoBERTa's own files, and the tokenizer.json transformers writes from them
    _hf_tokenizer("roberta", tmp_path, tok, byte_level_bpe).save_pretrained(tmp_path / "saved")
    for path in (byte_level_bpe / "vocab.json", tmp_path / "saved" / "tokenizer.json"):
        bpe = load_tokenizer(str(path))
        words = {p for p in bpe.get_vocab() if p.startswith("\u0120")}  # 'Ġ': after a space
        assert continuing(bpe) == set(bpe.get_vocab()) - words - set(ROBERTA_SPECIAL_TOKENS)
        assert {"\u0120ef", "fusion"} <= set(bpe.get_vocab())  # " effusion": both kinds
        assert "fusion" in continuing(bpe) and "\u0120ef" not in continuing(bpe)
    other = Tokenizer(models.WordLevel({"[UNK]": 0, "effusion": 1}, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match=r"--whole-word needs a WordPiece .* WordLevel model"):
        continuation_table(other)
