"""The tokenizers: a WordPiece tokenizer trained on the pre-training texts, or a user's BERT
(vocab.txt, tokenizer.json) or RoBERTa (vocab.json + merges.txt) one; and encoding texts for the
model.

    tok = load_tokenizer("data/prepared/tokenizer.json")
    ids, mask = encode_texts(tok, ["No effusion."], max_len=48)   # [CLS] text [SEP], padded
    ids, mask = encode_pairs(tok, premises, hypotheses, max_len)  # [CLS] a [SEP] b [SEP]

The tokenizer trained on a prepared root's pre-training texts is datasets/source.py's. Padding and
truncation saved in a tokenizer.json are switched off on load: the collates pad and truncate.
"""

import json
import os

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# ids 0..4 in a tokenizer we train
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_pipeline(tok, lowercase):
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
    return bert_pipeline(tok, lowercase=not cased)


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


