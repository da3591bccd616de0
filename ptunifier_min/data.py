"""What training and evaluation read: prepared manifests, images, the WordPiece tokenizer and the
pre-training dataset.

    records = load_pretrain_records("data/prepared", ["roco", "medicat", "mimic_cxr"], "train")
    ds = PretrainDataset(records, ImageTransform(288).pixels, seed=0); ds.set_epoch(epoch)
    loader = DataLoader(ds, batch_size=B,
                        collate_fn=pretrain_collate(load_tokenizer(path), max_len=48))

Folders come from prepare.py (one per downstream task, meta.json written last). Images are
grayscale: the loaders yield uint8 [1, S, S] pixels (ImageTransform.pixels) and the model normalises
them on the device (`normalize`: replicated to 3 channels, each with its config's pixel_mean and
pixel_std: MEAN = STD = 0.5, to [-1, 1], from scratch; an imported encoder's own), 12x less
host-to-device traffic than float RGB. The paper resizes and center-crops to 288 x 288 and, since
medical texts are multi-sentence narratives, samples one random sentence of the text at every
access; both choices (and the random crop option) are a pure function of (seed, epoch, index), so a
resumed run sees the same data.
A file that cannot be read is an error naming it, never a skipped sample (prepare.py --on-bad-image
drops bad images before training). A tokenizer we train is bound to its corpora by a record beside
it (tokenizer_record).
"""

import errno
import hashlib
import json
import math
import os
import random
import re

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from . import manifests, stopping

MEAN, STD = 0.5, 0.5
# ids 0..4 in a tokenizer we train
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_atomic(path, text):
    """Write text (UTF-8) through a temporary file and a rename: a reader, or a crash, never leaves
    half a file.

    The temporary name holds the pid, so two processes writing the same file never share (and
    clobber) one; a failed write removes its temporary, and a full disk is said as such, with the
    path (a bare ENOSPC names no file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC,
                          f"disk full (No space left on device) while writing {path}; the previous "
                          "file, if any, is unchanged: free some space and run again") from None
        raise


def _read_dicom(path):
    try:
        import pydicom  # optional: only real RSNA data is DICOM
    except ImportError:
        raise ImportError(f"{path} is a DICOM file; reading it needs pydicom: "
                          "pip install pydicom") from None
    ds = pydicom.dcmread(path)
    x = ds.pixel_array.astype(np.float32)
    x = x * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        # MONOCHROME1 stores bright as low values; flip so that bone is white as everywhere else
        x = x.max() - x
    return _to_uint8(x)


def _to_uint8(x):
    lo, hi = float(x.min()), float(x.max())
    x = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    return Image.fromarray(x.round().astype(np.uint8))  # 2-D uint8 -> mode "L"


# the EXIF tag; 1 = upright, 2..8 = the flips and rotations a viewer undoes
_EXIF_ORIENTATION = 0x0112


def grayscale(img):
    """A PIL image in any mode -> the grayscale ("L") image the model sees, as a viewer shows it.

    Shared by load_image (files) and the Python API (PIL images, arrays), so that the same pixels
    give the same input whichever way they arrive. A viewer applies the EXIF orientation of a JPEG
    (a phone photo of a film, a rotated export): so do we, or left and right would be swapped in
    the pixels but not in the report. Odd but valid modes are converted, not refused: 16-bit and
    32-bit grayscale are rescaled from their own min-max to 0..255 (a cast would clip a 12-bit
    radiograph to white); RGB, CMYK and palette images go through PIL's luma conversion; an alpha
    channel (RGBA, LA, palette transparency) is dropped, not composited, so that an export with a
    broken alpha cannot black out the image.
    """
    # checked first: exif_transpose copies even when upright
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    # I;16, I;16B, I (32-bit), F: rescale, do not clip
    if img.mode.startswith("I") or img.mode == "F":
        return _to_uint8(np.asarray(img, dtype=np.float32))
    return img.convert("L")


def load_image(path):
    """A grayscale ("L") PIL image from a JPEG / PNG (or DICOM through the optional pydicom), as a
    viewer shows it (`grayscale`: EXIF orientation, 16-bit rescaled, alpha dropped).

    `path` is a str or an os.PathLike. DICOM MONOCHROME1 is inverted (see _read_dicom). Every
    failure is an error that names the file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"image file not found: {path}")
    if path.lower().endswith(".dcm"):
        try:
            return _read_dicom(path)
        except ImportError:
            raise
        except Exception as e:
            raise ValueError(f"cannot read DICOM image {path}: {e}") from None
    try:
        with Image.open(path) as img:
            # PIL raises above 2 x MAX_IMAGE_PIXELS but only warns between 1x and 2x, and a warning
            # scrolls past unseen while a huge decode eats the memory of every data-loader worker:
            # refuse both, naming the file.
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{img.width}x{img.height} pixels exceed PIL.Image.MAX_IMAGE_PIXELS = "
                    f"{Image.MAX_IMAGE_PIXELS}")
            img.load()  # decode now, so that a truncated file fails here and names the path
            return grayscale(img)
    # the warning under -W error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"cannot read image {path}: {e} (a possible decompression bomb; if the "
                         "file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def pixel_table(mean=(MEAN,) * 3, std=(STD,) * 3):
    """[3, 256] float32: what each of the 256 values of a uint8 pixel normalises to in each of the
    R, G, B channels, computed once, on the host, with the formula of the float transform this
    project always had (np.float32 pixel / 255.0, then (x - mean) / std).

    Normalising is then a table look-up, which gives these exact floats on every device: on a GPU,
    `x / 255.0` is computed as x * (1 / 255.0), which differs in the last bit for some pixels (and a
    compiled kernel may reorder it again)."""
    x = np.arange(256, dtype=np.float32) / 255.0  # [256]
    mean, std = (np.asarray(v, dtype=np.float32)[:, None] for v in (mean, std))  # [3, 1]
    # in numpy: a host tensor even where the model is built under torch.device("meta")
    return torch.from_numpy((x - mean) / std)


PIXEL_VALUES = pixel_table()  # [3, 256], the from-scratch model's


def normalize(pixels, table=PIXEL_VALUES):
    """uint8 pixels [..., 1, S, S] (a grayscale film) or [..., 3, S, S] -> the model's float input
    [..., 3, S, S].

    `table` is a pixel_table on the pixels' device (the model keeps its own as a buffer, so that
    this runs there). A grayscale image is replicated to the 3 channels of the ViT's patch
    embedding, each channel normalised with its own mean and std: summing its RGB filters into one
    would change the sums' rounding, so not every result would stay bit-identical."""
    channel = torch.arange(3, device=pixels.device)[:, None, None]  # [3, 1, 1]
    return table[channel, pixels.long()]  # broadcast over [..., 1 or 3, S, S] -> [..., 3, S, S]


class ImageTransform:
    """PIL "L" image -> uint8 pixels [1, size, size] (`pixels`, what the data loaders yield) or the
    model's float input [3, size, size] (calling it: normalize(pixels) with `mean` and `std`, which
    must be the model config's pixel_mean and pixel_std; the scripts hand the model uint8 pixels,
    which it normalises itself).

    Default (eval, and training as in the paper): resize the shorter side to `size`, then center
    crop.
    train=True with random_resized_crop=True: a random crop of `scale` of the area and aspect ratio
    in [3/4, 4/3] (torchvision's RandomResizedCrop), drawn from `rng` so that it can be replayed. No
    flips: left and right matter in radiology (heart, situs, laterality words in the reports).
    """

    def __init__(self, size, train=False, random_resized_crop=False, scale=(0.5, 1.0),
                 mean=(MEAN,) * 3, std=(STD,) * 3):
        self.size, self.train, self.random_resized_crop, self.scale = (
            size, train, random_resized_crop, tuple(scale))
        self.table = pixel_table(mean, std)

    def _random_box(self, w, h, rng):
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = round((target * ratio) ** 0.5), round((target / ratio) ** 0.5)
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return left, top, left + cw, top + ch
        return self._center_box(w, h)  # the rare fallback of torchvision

    @staticmethod
    def _center_box(w, h):
        m = min(w, h)  # resize-shorter-side + center crop == resize of the central square
        left, top = (w - m) // 2, (h - m) // 2
        return left, top, left + m, top + m

    def pixels(self, img, rng=None):
        """uint8 [1, S, S]: one channel, not normalised (a quarter of a float's bytes, a third of
        RGB's)."""
        w, h = img.size
        if self.train and self.random_resized_crop:
            box = self._random_box(w, h, rng if rng is not None else random)
        else:
            box = self._center_box(w, h)
        img = img.convert("L").resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        # a copy: PIL's buffer is read-only
        return torch.from_numpy(np.array(img, dtype=np.uint8))[None]

    def __call__(self, img, rng=None):
        return normalize(self.pixels(img, rng), self.table)  # [3, S, S] float32


def read_meta(folder):
    path = os.path.join(folder, "meta.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"incomplete or missing preparation: {folder} "
                                "(no meta.json; run prepare.py)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_split(folder, split, allow_empty=True, required=("id",)):
    """The records of {folder}/{split}.jsonl, each checked against the manifests' contract
    (manifests.check_record; `required`: the fields the caller reads) and with its file paths
    resolved: prepare.py writes those inside the prepared root relative to it, so that a root copied
    elsewhere keeps working (older manifests hold absolute paths, read as they are).
    allow_empty=False for a stage that cannot run on an empty split."""
    meta = read_meta(folder)  # the jsonl files of an interrupted preparation are not to be trusted
    path = os.path.join(folder, f"{split}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"split file not found: {path}")
    root = os.path.dirname(os.path.normpath(folder))
    records, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: malformed JSON ({e})") from None
            problem = manifests.check_record(r, meta, required)
            if problem is None and seen.setdefault(r["id"], n) != n:
                problem = f"id {r['id']!r} occurs again; first at line {seen[r['id']]}"
            if problem:
                raise ValueError(f"{path}, line {n}: {problem}")
            for key in ("image", "image_cache"):
                if key in r and not os.path.isabs(r[key]):
                    r[key] = os.path.join(root, r[key])
            records.append(r)
    if not records and not allow_empty:
        raise ValueError(f"{path}: the {split} split has no records "
                         f"(prepared counts: {meta.get('counts')}); "
                         "this stage needs some")
    return records


def image_path(record):
    """The file to read for a record's image: its resized copy when prepare made one ("image_cache",
    see prepare.py --cache-short-side), else the original ("image"). Every reader of records' images
    goes through here (read_split has made both paths usable from the current folder)."""
    return record.get("image_cache") or record["image"]


# what a pre-training record must hold: an image and its texts
PRETRAIN_FIELDS = ("id", "image", "texts")


def load_pretrain_records(prepared_root, datasets, split):
    """Concatenate the pre-training records of several prepared folders; each record gains its
    "dataset" name."""
    records = []
    for name in datasets:
        folder = os.path.join(prepared_root, name)
        for r in read_split(folder, split, allow_empty=False, required=PRETRAIN_FIELDS):
            if not os.path.exists(image_path(r)):
                raise FileNotFoundError(f"{folder}/{split}.jsonl, id {r['id']}: " + (
                    f"image cache file not found: {r['image_cache']} "
                    f"(the resized copy of {r['image']}); run prepare again to rebuild it"
                    if r.get("image_cache") else f"image file not found: {r['image']}"))
            records.append({**r, "dataset": name})
    return records


# A sentence ends at . ! or ? followed by whitespace and a character that is not lower case
# ("e.g. the" stays whole).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[^a-z])")


def split_sentences(text):
    """Split a caption or report into sentences; never returns an empty list for a non-empty
    text."""
    parts = [p.strip() for p in _SENTENCE_END.split(text.strip()) if p.strip()]
    sentences = []
    for p in parts:
        # "1." / "2)" list numbers and other letterless fragments belong to the sentence that
        # follows them
        if sentences and not re.search(r"[A-Za-z]", sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {p}"
        else:
            sentences.append(p)
    return sentences or [text.strip()]


def _bert_pipeline(tok, lowercase):
    # BERT's pipeline (Devlin et al.): clean text + lower case, split on whitespace and punctuation,
    # '##' pieces
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def _continuation_pieces(texts, normalizer, pre_tokenizer):
    """'##c' for every character c that can continue a word of the corpus (i.e. is not split off as
    punctuation)."""
    chars = set()
    for t in texts:
        chars.update(t)
    chars = set(normalizer.normalize_str("".join(sorted(chars)))) - {" "}
    return ["##" + c for c in sorted(chars) if len(pre_tokenizer.pre_tokenize_str("a" + c)) == 1]


def train_tokenizer(texts, vocab_size, path, corpora=None):
    """Train a lower-cased BERT WordPiece tokenizer; save it as tokenizer.json (`path` is that file
    or its folder).

    corpora ({dataset: {"records": n, "texts": m}}, what `texts` came from) is written beside it as
    its record (see tokenizer_record), so that the tokenizer is never silently reused for other
    data."""
    texts = list(texts)
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the '##c' pieces in hash-map order, and merge ties are broken by those
    # numbers, so the vocabulary changes from run to run (huggingface/tokenizers#1794). Handing it
    # every '##c' up front, in sorted order, makes training deterministic; they are then made
    # ordinary vocabulary entries again below.
    pieces = _continuation_pieces(texts, normalizer, pre_tokenizer)
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=SPECIAL_TOKENS + pieces,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok = Tokenizer(models.WordPiece(tok.get_vocab(), unk_token="[UNK]",
                                     continuing_subword_prefix="##"))
    tok.add_special_tokens(SPECIAL_TOKENS)  # already in the vocabulary: ids 0..4 stay
    tok = _bert_pipeline(tok, lowercase=True)
    out = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    # what tok.save writes; written here through write_atomic instead
    text = tok.to_str(pretty=True)
    # The record first: a crash between the two writes leaves a record whose sha256 matches no
    # tokenizer.json (or none at all), which tokenizer_record refuses, never a tokenizer without a
    # word on what it was trained on.
    record = {"corpora": corpora, "texts": len(texts), "vocab_size": tok.get_vocab_size(),
              "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    write_atomic(tokenizer_record_path(out), json.dumps(record, indent=1) + "\n")
    write_atomic(out, text)
    return tok


def tokenizer_record_path(path):
    """tokenizer.json -> tokenizer.meta.json. A file beside it, not a key inside: the tokenizers
    library does not promise to keep (or to accept) keys of its own JSON format it does not know,
    and a record that another program may drop on a re-save would bind nothing."""
    return os.path.splitext(path)[0] + ".meta.json"


def tokenizer_record(path):
    """The record of a tokenizer.json that train_tokenizer wrote: {"corpora", "texts", "vocab_size",
    "sha256"}.

    None when there is no record (a tokenizer made elsewhere, or by an older version); an error
    naming the files when the record is unreadable or describes another file than the tokenizer
    beside it (replaced, or a crash between the two writes)."""
    meta = tokenizer_record_path(path)
    if not os.path.exists(meta):
        return None
    try:
        with open(meta, encoding="utf-8") as f:
            record = json.load(f)
        sha = record["sha256"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{meta}: not a readable tokenizer record ({e}); "
                         f"delete it and {path} to retrain") from None
    with open(path, "rb") as f:
        if hashlib.sha256(f.read()).hexdigest() != sha:
            raise ValueError(f"{path} is not the file its record {meta} describes "
                             "(replaced, damaged, or written half): delete both to retrain it")
    return record


def load_tokenizer(path):
    """tokenizer.json, a BERT-style vocab.txt (one token per line) or RoBERTa's vocab.json (with
    merges.txt beside it); a folder holding a tokenizer.json or vocab.txt also works. Padding and
    truncation are off whatever the file says: encode_texts / encode_pairs do both.

    A file that does not parse (a 0-byte tokenizer.json, what a full disk used to leave) is an error
    naming it."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocab.txt"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name))
        raise FileNotFoundError(f"no tokenizer.json or vocab.txt in {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    # RoBERTa's byte-level BPE: vocab.json + merges.txt beside it
    if os.path.basename(path) == "vocab.json":
        return _byte_level_bpe(path)
    if path.endswith(".json"):
        try:
            tok = Tokenizer.from_file(path)
        # the library raises a bare Exception ("EOF while parsing a value ...")
        except Exception as e:
            size = os.path.getsize(path)
            raise ValueError(f"cannot read tokenizer {path} ({size} bytes): {e}; delete it "
                             "(a tokenizer trained from the prepared data is retrained) "
                             "or pass a valid one") from None
        # transformers saves the padding and truncation a tokenizer was last called with: left on,
        # every text would be padded to that length (and [SEP] put after the pads) or cut. Our
        # collate truncates and pads, so the file's settings are switched off.
        tok.no_padding()
        tok.no_truncation()
        return tok
    try:
        with open(path, encoding="utf-8") as f:
            vocab = [line.rstrip("\r\n") for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read vocabulary {path}: not UTF-8 text "
                         f"({e.reason} at byte {e.start})") from None
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{path}: vocabulary lacks special token(s) {missing}")
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                     continuing_subword_prefix="##"))
    # an uncased vocabulary (bert-base-uncased, PubMedBERT uncased) has no upper-case tokens besides
    # [SPECIAL]s
    cased = any(t != t.lower() for t in vocab if not (t.startswith("[") and t.endswith("]")))
    # so that decode() leaves them out, as for a trained tokenizer
    tok.add_special_tokens(SPECIAL_TOKENS)
    return _bert_pipeline(tok, lowercase=not cased)


# RoBERTa's names for the same five roles
ROBERTA_SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]


def _byte_level_bpe(path):
    """RoBERTa's tokenizer from vocab.json and the merges.txt beside it (as transformers'
    RobertaTokenizerFast)."""
    merges = os.path.join(os.path.dirname(path), "merges.txt")
    if not os.path.exists(merges):
        raise FileNotFoundError(f"{path} needs the merges.txt beside it (RoBERTa's BPE): "
                                f"not found: {merges}")
    tok = Tokenizer(models.BPE.from_file(path, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    missing = [t for t in ROBERTA_SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{path}: vocabulary lacks special token(s) {missing}")
    # already in the vocabulary: ids stay, decode() leaves them out
    tok.add_special_tokens(ROBERTA_SPECIAL_TOKENS)
    return tok


def special_ids(tok):
    names = (ROBERTA_SPECIAL_TOKENS
             if tok.token_to_id("[CLS]") is None and tok.token_to_id("<s>") is not None
             else SPECIAL_TOKENS)
    ids = {k: tok.token_to_id(t) for k, t in zip(("pad", "unk", "cls", "sep", "mask"), names)}
    missing = [names[i] for i, v in enumerate(ids.values()) if v is None]
    if missing:
        raise ValueError(f"tokenizer lacks special token(s) {missing}")
    return ids


# byte-level BPE (GPT-2, RoBERTa) writes a space before a word as this character
BYTE_LEVEL_SPACE = "\u0120"  # 'Ġ'


def continuation_table(tok):
    """[V] bool, True for the vocabulary entries that continue a word (whole-word masking).

    WordPiece marks continuations ('##ing'); byte-level BPE marks the other side, the pieces that
    start a word after a space ('Ġeff', 'usion' continues it), so there every piece without the
    marker continues a word. Words are then whitespace-delimited, as in RoBERTa's own text:
    "x-ray," is one word of three pieces. A text's first word has no marker (no prefix space):
    mask_tokens starts a word after [CLS]. Special and other added tokens are never
    continuations. Other tokenizers (SentencePiece, Unigram) are refused, naming what they are.
    """
    vocab = tok.get_vocab()
    added = set(tok.get_added_tokens_decoder())
    prefix = getattr(tok.model, "continuing_subword_prefix", None)
    if prefix:
        cont = [i for t, i in vocab.items() if t.startswith(prefix)]
    elif _byte_level(tok):
        cont = [i for t, i in vocab.items() if not t.startswith(BYTE_LEVEL_SPACE)]
    else:
        raise ValueError(f"--whole-word needs a WordPiece ('##' pieces) or a byte-level BPE "
                         f"(space-marked pieces) tokenizer; this one is a "
                         f"{type(tok.model).__name__} model with the "
                         f"{type(tok.pre_tokenizer).__name__} pre-tokenizer")
    table = torch.zeros(tok.get_vocab_size(), dtype=torch.bool)
    table[[i for i in cont if i not in added]] = True
    return table


def _byte_level(tok):
    """Whether the tokenizer splits words as GPT-2 does (a ByteLevel pre-tokenizer, alone or in a
    Sequence)."""
    pre = json.loads(tok.to_str()).get("pre_tokenizer") or {}
    return "ByteLevel" in {p.get("type") for p in [pre, *pre.get("pretokenizers", [])]}


def _pad(rows, pad_id):
    T = max(len(r) for r in rows)
    # [B, T], T = longest row
    ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[True] * len(r) + [False] * (T - len(r)) for r in rows])  # [B, T]
    return ids, mask


def encode_texts(tok, texts, max_len):
    """[CLS] text [SEP] per text, truncated to max_len with the final [SEP] kept, padded with [PAD]
    to the longest."""
    sp = special_ids(tok)
    rows = [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    rows = [[sp["cls"]] + r[:max_len - 2] + [sp["sep"]] for r in rows]
    return _pad(rows, sp["pad"])


def encode_pairs(tok, a, b, max_len):
    """[CLS] a [SEP] b [SEP] (RadNLI); when too long, tokens come off the end of the longer text
    first (BERT)."""
    if len(a) != len(b):  # zip would drop the unpaired rest
        raise ValueError(f"text pairs: {len(a)} first texts but {len(b)} second texts")
    sp = special_ids(tok)
    ea = [e.ids for e in tok.encode_batch(list(a), add_special_tokens=False)]
    eb = [e.ids for e in tok.encode_batch(list(b), add_special_tokens=False)]
    rows = []
    for x, y in zip(ea, eb):
        x, y = list(x), list(y)
        while len(x) + len(y) > max_len - 3:
            (x if len(x) > len(y) else y).pop()
        rows.append([sp["cls"]] + x + [sp["sep"]] + y + [sp["sep"]])
    return _pad(rows, sp["pad"])


class PretrainDataset(torch.utils.data.Dataset):
    """Image-text pairs for pre-training: each access draws one text of the record and one sentence
    of that text.

    transform(img, rng) makes the image tensor: ImageTransform(size).pixels in the scripts (uint8
    [1, S, S], normalised on the device), or any other callable, e.g. an ImageTransform itself
    (float [3, S, S])."""

    def __init__(self, records, transform, seed=0):
        self.records, self.transform, self.seed, self.epoch = records, transform, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        # An image that fails to load is an error naming the file, never a skipped sample: skipping
        # here would leave one DDP rank with a shorter batch than the others, and the ITC all-gather
        # needs equal shapes on every rank. Bad images are dropped at prepare time instead
        # (prepare --on-bad-image skip).
        r = self.records[i]
        # seeded by a string (hashed with SHA-512 by random): the same in every worker, process and
        # Python run
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        text = rng.choice(split_sentences(rng.choice(r["texts"])))
        image = self.transform(load_image(image_path(r)), rng)
        return {"image": image, "text": text, "index": i, "image_id": file_id(r["image"])}


def file_id(path):
    """An int64 identity of an image file: 8 bytes of the BLAKE2 hash of its resolved path (not
    Python's hash(), which differs between processes). ITM needs it: the same figure can appear
    under two record ids, and a tensor of these can be gathered across ranks."""
    digest = hashlib.blake2b(os.path.realpath(path).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def pretrain_collate(tok, max_len):
    def collate(batch):
        ids, mask = encode_texts(tok, [b["text"] for b in batch], max_len)
        return {"image": torch.stack([b["image"] for b in batch]),  # [B, 1, S, S] uint8 pixels
                "input_ids": ids, "attention_mask": mask,  # [B, T]
                # known here, on the host; the model would otherwise ask the device
                # (PTUnifier.forward's `padded`)
                "padded": not bool(mask.all()),
                "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
                # [B] which file
                "image_id": torch.tensor([b["image_id"] for b in batch], dtype=torch.long)}
    return collate


# ---- batch order ---------------------------------------------------------------------------------
class BatchOrder:
    """Seeded epoch permutations cut into global batches; rank r takes rows [r*B, (r+1)*B) of each
    global batch.

    So 1 process with batch W*B and W processes with batch B see the same samples per step (DDP
    equivalence), and the order is a pure function of (seed, epoch): resuming at micro-batch k of an
    epoch just skips k global batches.
    """

    def __init__(self, n, batch_size, world, rank, seed, shuffle=True, drop_last=True):
        self.n, self.B, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.per_epoch = (n // (batch_size * world) if drop_last
                          else math.ceil(n / (batch_size * world)))
        if self.per_epoch == 0:
            raise ValueError(f"global batch {batch_size} x {world} is larger than the {n} "
                             "training samples: lower --batch-size")

    def batches(self, epoch, start=0):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
                 if self.shuffle else torch.arange(self.n))
        G = self.B * self.world
        for b in range(start, self.per_epoch):
            rows = order[b * G:(b + 1) * G][self.rank * self.B:(self.rank + 1) * self.B]
            if len(rows):
                yield rows.tolist()


def micro_batches(dataset, order, collate, num_workers, start_micro=0):
    """Endless (epoch, micro-batch index, batch) from a BatchOrder, starting at a global micro-batch
    count."""
    epoch, start = divmod(start_micro, order.per_epoch)
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global
        # RNG, and a resumed run, which makes a loader where the uninterrupted one did not, would
        # then draw other dropout masks
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=list(order.batches(epoch, start)), collate_fn=collate,
            num_workers=num_workers, generator=torch.Generator(), persistent_workers=False,
            pin_memory=torch.cuda.is_available(), worker_init_fn=stopping.leave_to_the_run)
        for batch in loader:
            yield batch
        epoch, start = epoch + 1, 0


def next_micro_batches(batches, grad_accum, device):
    """The micro-batches of the next optimizer step, on the device. All of them are fetched before
    the first forward pass, so that what depends on the whole step (pre-training's MLM token count)
    can be computed first."""
    return [to_device(next(batches), device) for _ in range(grad_accum)]


def to_device(batch, device):
    """A batch's tensors on the device, copied without making the host wait. On CUDA they are copied
    from pinned memory (the loader pins its own; the host's draws added after it are pinned here): a
    copy from pageable memory may wait for the device."""
    pin = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if pin and not v.is_pinned() else v).to(device, non_blocking=True)
            if torch.is_tensor(v) else v for k, v in batch.items()}


# ---- downstream tasks ----------------------------------------------------------------------------
class TaskDataset(torch.utils.data.Dataset):
    """A prepared split of a downstream task as model inputs: what its tasks.Task entry says it
    reads (the image, the text fields) and its target. Random choices (crop, caption) are a pure
    function of (seed, epoch, i)."""

    def __init__(self, records, task, transform, seed=0, train=False):
        self.records, self.task, self.transform, self.seed, self.train, self.epoch = \
            records, task, transform, seed, train, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r, task = self.records[i], self.task
        rng = random.Random(f"{self.seed}-{self.epoch}-{i}")
        item = {"index": i}
        if task.image:
            item["image"] = self.transform(load_image(image_path(r)), rng)
        # a field with several texts (ROCO's captions): training reads any one, whole; evaluation
        # the first
        texts = [(rng.choice(r[f]) if self.train else r[f][0]) if isinstance(r[f], list) else r[f]
                 for f in task.text]
        if len(texts) == 2:
            item["text_a"], item["text_b"] = texts
        elif texts:
            item["text"] = texts[0]
        if task.target:
            item[task.target] = r[task.target]
        return item


def task_collate(tok, max_len, max_gen_len):
    """TaskDataset items -> a batch: images, labels, the encoded text or pair (at max_len) and the
    target text (at max_gen_len), whichever the items hold."""
    def collate(batch):
        out = {"index": torch.tensor([b["index"] for b in batch])}
        if "image" in batch[0]:
            out["image"] = torch.stack([b["image"] for b in batch])  # [B, 1, S, S] uint8 pixels
        if "labels" in batch[0]:
            out["labels"] = torch.tensor([b["labels"] for b in batch], dtype=torch.float)  # [B, C]
        if "label" in batch[0]:
            out["label"] = torch.tensor([b["label"] for b in batch], dtype=torch.long)  # [B]
        if "text_a" in batch[0]:  # [CLS] premise [SEP] hypothesis [SEP]
            out["input_ids"], out["attention_mask"] = encode_pairs(
                tok, [b["text_a"] for b in batch], [b["text_b"] for b in batch], max_len)
        elif "text" in batch[0]:
            out["input_ids"], out["attention_mask"] = encode_texts(
                tok, [b["text"] for b in batch], max_len)
        if "attention_mask" in out:  # known here, on the host (see pretrain_collate)
            out["padded"] = not bool(out["attention_mask"].all())
        # [CLS] w1 .. wn [SEP] [PAD]..: [CLS] is the decoder's bos, [SEP] its eos
        if "target" in batch[0]:
            out["target_ids"], _ = encode_texts(tok, [b["target"] for b in batch], max_gen_len)
        return out
    return collate
