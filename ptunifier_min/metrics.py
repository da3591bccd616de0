"""Evaluation metrics for the downstream tasks, in numpy, each checked against its reference
implementation.

    auroc(scores, labels)                    # IC: one class; macro_auroc(...): CheXpert 5 / RSNA 1
    accuracy(pred, target)                   # TC (RadNLI)
    vqa_accuracy(pred, target, answer_type)  # VQA: overall / open / closed; OOV answers are wrong
    nlg_metrics(refs, hyps)                  # TS, ITG: BLEU-1..4, ROUGE-L, CIDEr(-D) [, METEOR]

Array arguments may be numpy arrays, lists or torch tensors (any device or dtype). The NLG functions
take dicts {sample id: [reference strings]} and {sample id: hypothesis string}; `bleu`, `rouge_l`,
`cider_d` and `meteor` expect text that is already tokenised (space-separated tokens, as
pycocoevalcap's scorers do), `nlg_metrics` tokenises first with `nlg_tokenize_captions`, a Python
port of pycocoevalcap's java PTBTokenizer. The NLG scorers re-derive pycocoevalcap 1.2 (the
coco-caption code that the report-generation literature uses); tests/test_metrics.py compares every
number and every token with it.
"""

import math
import re
import shutil
import unicodedata
from collections import Counter

import numpy as np


def _numpy(x):
    """Array-like (list, numpy, torch tensor on any device, bf16 included) -> numpy array, without
    importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # numpy has no bfloat16
        x = x.numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------------
# Classification


def auroc(scores, labels):
    """Area under the ROC curve of one binary task; None when `labels` hold a single value (AUROC is
    undefined).

    Computed as the Mann-Whitney statistic with average ranks for tied scores, which equals the
    trapezoidal area of sklearn.metrics.roc_auc_score, ties included. AUROC depends only on the
    order of the scores, so logits and sigmoid probabilities give the same value -- except that
    sigmoid in float32 saturates to exactly 1.0 for logits above ~17, creating ties the logits did
    not have; pass logits when you have them.
    """
    scores = _numpy(scores).astype(np.float64).ravel()
    labels = _numpy(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in size")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # average rank (1-based) of every score: a group of t tied values occupying ranks r+1..r+t gets
    # r + (t+1)/2
    _, group, size = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(size) - (size - 1) / 2.0)[group.ravel()]
    # pairs (pos, neg) ordered correctly, ties counting 1/2
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def macro_auroc(scores, labels, names):
    """Per-class AUROC of [N, C] scores and 0/1 labels, and their mean over the classes where it is
    defined.

    A class whose labels hold one value in this split (e.g. no positive Edema in a small validation
    set) has no AUROC: it is listed in "undefined", has None in "per_class", and is left out of the
    mean -- counting it as 0 or 0.5 would move the macro number by an amount that depends only on
    the split. "macro" is None if no class is defined.
    """
    scores, labels = _numpy(scores), _numpy(labels)
    if scores.ndim == 1:  # one class (RSNA) given as [N]
        scores, labels = scores[:, None], labels[:, None]
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be [N, C]")
    if len(names) != scores.shape[1]:
        raise ValueError(f"{len(names)} names for {scores.shape[1]} classes")
    per_class = {name: auroc(scores[:, c], labels[:, c]) for c, name in enumerate(names)}
    defined = [v for v in per_class.values() if v is not None]
    return {"macro": float(np.mean(defined)) if defined else None,
            "per_class": per_class,
            "undefined": [name for name, v in per_class.items() if v is None]}


def accuracy(pred, target):
    """Fraction of positions where pred == target (class indices)."""
    pred, target = _numpy(pred).ravel(), _numpy(target).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred {pred.shape} and target {target.shape} differ in size")
    if pred.size == 0:
        raise ValueError("accuracy of an empty set")
    return float((pred == target).mean())


def vqa_accuracy(pred, target, answer_type):
    """VQA accuracy over all questions and per answer type.

    pred, target: [N] answer indices into the train+val answer vocabulary; target -1 marks a test
    answer outside that vocabulary, which the classifier can never produce, so it counts as wrong
    (whatever pred is) -- the question stays in the denominator, as in the published numbers.
    answer_type: [N] "open" or "closed". Returns fractions in [0, 1]:
    {"overall", "open", "closed", "oov_share"}; a type with no questions gets None.
    """
    pred, target = _numpy(pred).ravel(), _numpy(target).ravel()
    answer_type = np.asarray([str(t) for t in answer_type])
    if not (pred.shape == target.shape == answer_type.shape):
        raise ValueError(f"pred {pred.shape}, target {target.shape}, "
                         f"answer_type {answer_type.shape} differ in size")
    if pred.size == 0:
        raise ValueError("accuracy of an empty set")
    if not np.isin(answer_type, ("open", "closed")).all():
        raise ValueError(f"answer_type must be 'open' or 'closed', "
                         f"got {sorted(set(answer_type) - {'open', 'closed'})}")
    correct = (pred == target) & (target >= 0)
    out = {"overall": float(correct.mean())}
    for kind in ("open", "closed"):
        sel = answer_type == kind
        out[kind] = float(correct[sel].mean()) if sel.any() else None
    out["oov_share"] = float((target < 0).mean())
    return out


# --------------------------------------------------------------------------------------------------
# Text generation: tokenisation
#
# pycocoevalcap's PTBTokenizer writes all captions, one a line, to a file, runs Stanford CoreNLP
# 3.4.1's PTBTokenizer on it (java, `-preserveLines -lowerCase`: default PTB3 escaping, no
# americanize, assimilations split) and drops the tokens
# '' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ; from each line. The lexer lower-cases
# BEFORE that filter, so bracket tokens come out as "-lrb-", "-rsb-", ... and survive: every
# published coco-caption score counts them, and so do we. Below is a port of that lexer,
# PTBLexer.flex at tag v3.4.1 of github.com/stanfordnlp/CoreNLP: its macros under their names and
# its rules in its order. JFlex semantics: at each position the rule with the longest match wins,
# the length of a rule `r1/r2` counting its trailing context r2 (which is left for the next token);
# ties go to the earlier rule. The spec is %caseless, which makes literal text case-insensitive but
# not character classes: "[A]rk" matches "Ark." and "ARK." but not "ark.", so here literals sit in
# (?i:...) and classes stay as written. Python's | takes the first alternative that matches, JFlex
# the longest: alternatives are ordered longest first.
# tests/test_metrics.py compares this port with the jar on thousands of generated report-like lines.

def _bmp_class(keep, extra=""):
    """A regex character class of the BMP characters for which keep(ch) holds (the lexer reads
    UTF-16 units)."""
    out, start = [], None
    for cp in range(0x10001):
        if cp < 0x10000 and keep(chr(cp)):
            start = cp if start is None else start
        elif start is not None:
            out.append(f"\\u{start:04x}" if start == cp - 1 else f"\\u{start:04x}-\\u{cp - 1:04x}")
            start = None
    return "[" + "".join(out) + extra + "]"


# JFlex [:letter:] = Java's Character.isLetter
_L = _bmp_class(lambda c: unicodedata.category(c)[0] == "L")
_UPPER = _bmp_class(lambda c: unicodedata.category(c) == "Lu")  # [:uppercase:]
_LD = _L[:-1] + r"\d]"  # [:letter:] or [:digit:] (Python's \d is Unicode Nd, as Java's isDigit)
_SPLET = r"&[aeiouAEIOU](?i:acute|grave|uml);"
# LETTER adds the soft hyphen and the combining marks and modifiers the spec lists to [:letter:]
_LETTER_EXTRA = (
    r"\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384"
    r"\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f"
    r"\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e"
    r"\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1"
    r"\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983"
    r"\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f"
    r"\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03"
    r"\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd")
_LETTER = rf"(?:{_L[:-1]}{_LETTER_EXTRA}]|{_SPLET})"  # (the extra ranges go inside _L's brackets)
# normal  normal.the  (not 1.severe)
_WORD = rf"{_LETTER}(?:{_LETTER}|\d)*(?:[.!?]{_LETTER}(?:{_LETTER}|\d)*)*"
_SPACE = r"[ \t\u00a0\u2000-\u200a\u3000]"
_NEWLINE = r"(?:\r\n?|[\n\u2028\u2029\x0b\x0c\x85])"
_SPACENL = rf"(?:{_SPACE}|{_NEWLINE})"
_SGML_NAME = r"[A-Za-z][A-Za-z0-9_:.\-]*"
# <br>  <XXXX>  </p>  <br/>  <p class='x'>: one token each
_SGML = (rf"<(?:[!?][A-Za-z\-][^>\r\n]*|/{_SGML_NAME}"
         rf"|{_SGML_NAME}(?:[ ]+(?:{_SGML_NAME}[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")|{_SGML_NAME}))*"
         rf"[ ]*/?)[ ]*>")
_SENTEND = rf"{_SPACENL}(?:{_SPACENL}|{_UPPER}|{_SGML})"
# 3.5  1,000  10:30  .5  (longer alternative first)
_NUM = r"(?:\d*(?:[.:,\u00ad\u066b\u066c]\d+)+|\d+)"
# 1/2  1-1/2  "2 1/2" (one token, space kept)
_FRAC = r"(?:\d{1,4}[\- \u00a0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}"
_HYPHEN = r"[\-_\u058a\u2010\u2011]"
_APOS = r"(?:['\u0092\u2019]|&(?i:apos);)"
_APOSETC = rf"(?:{_APOS}|[`\u0091\u2018\u201b])"
# x-ray a_b o'clock
_THING = rf"(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+(?:{_HYPHEN}(?:[dDoOlL]{_APOSETC}{_LD})?{_LD}+)*"
_AMP = r"&(?i:amp);"
_REDAUX = rf"{_APOS}(?:[msdMSD]|(?i:re|ve|ll))"
_SREDAUX = rf"(?i:n){_APOSETC}(?i:t)"
_ACRO = (r"(?:(?i:canada|sino|korean|eu|japan|non)-(?i:u\.s)|(?i:u\.s\.-(?:u\.k|u\.s\.s\.r))"
         r"|[A-Za-z](?:\.[A-Za-z])*)")
_ACRO2 = _ACRO.replace(r"(?:\.[A-Za-z])*", r"(?:\.[A-Za-z])+")
# 45-year-old 1.5-2 (not -2.5)
_HTHING = rf"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{_ACRO2}\.|[A-Za-z0-9\u00ad]+))+"
_INSENTP = r"[,;:\u3001]"
# Abbreviations: ABBREV1 is usually followed by a lower-case word, ABBREV2 by an upper-case one,
# ABBREV3 only counts before a number ("No. 5", "Fig. 3"). A bracketed capital in the spec ("[P]a")
# is a case-sensitive first letter: "PA." and "Pa." are Pennsylvania, "pa." is not.
_ABBREV1 = (
    # months, weekdays
    r"(?:(?i:jan|feb|mar|apr|jun|jul|aug|sept?|oct|nov|dec|mon|tues?|wed|thurs|thu|fri|"
    r"ala|ariz|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont|neb|nev|okla|penn|"
    r"tenn|va|vt|wisc?|wyo|inc|cos?|corp|ltd|plc|rt|bancorp|bhd|assn|univ|intl|sys|tel|est|ext|sq|"
    r"jr|sr|bros|(?:ed|ph)\.d|blvd|rd|esq|etc|al|seq|bldg)|(?i:pp?t)[ye](?i:s)?|"
    r"A(?i:z|rk)|D(?i:el)|I(?i:ll)|L(?i:a)|M(?i:ass|iss)|O(?i:re)|P(?i:a)|T(?i:ex)|W(?i:ash))\.")
_ABBREV4 = (r"(?:(?i:mrs?|ms|drs?|profs?|sens?|reps?|attys?|lt|col|gen|messrs|govs?|adm|rev|maj|"
            r"sgt|cpl|pvt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|mt|ft|adj|"
            r"adv|asst|assoc|ens|insp|mlle|mme|msgr|sfc|vs|alex|wm|jos|cie|a\.k\.a|cf|treas|ph|"
            r"invt|elec|natl|dept)|M(?i:iss)|(?i:m)[ft](?i:g)|" + _ACRO + ")")
_ABBREV3 = r"(?i:ca|figs?|prop|nos?|art|bldg|pp|op)\."
_LDOTS = r"(?:\.{3,5}|(?:\.[ \u00a0]){2,4}\.|[\x85\u2026])"
_QUOTES = (rf"(?:''|[`\u2018\u2019\u201a-\u201d\x91-\x94\u201e\u201f\u2039\u203a\xab\xbb]{{1,2}}"
           rf"|{_APOS})")
_DBLQUOT = r"(?:\"|&(?i:quot);)"
_MISCSYMBOL = ("[+%&~^|\\\\\xa6\xa7\xa8\xa9\xac\xae\xaf\xb0-\xb3\xb4-\xba\xd7\xf7"
               "\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614"
               "\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016"
               "\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e"
               "\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20"
               "\uff3b-\uff40\uff5b-\uff65]")
# words after which an acronym ends a sentence ("U.S. The");
# their capital is required, the rest is caseless
_ACRONYM_BEFORE = ("(?:A(?i:bout|ccording|dditionally|fter|n|s|t)?|B(?i:ut)|E(?i:arlier)|"
                   "H(?i:e|er|ere|owever)|I(?i:f|n|t)|L(?i:ast)|M(?i:any|ore|r\\.|s\\.)|N(?i:ow)|"
                   "O(?i:nce|ne|ther|ur)|S(?i:he|ince|o|ome|uch)|"
                   "T(?i:hat|he|heir|hen|here|hese|hey|his)|W(?i:e|hen|hile|hat)|Y(?i:et|ou))")


def _latex_quotes(tok, probably_left=False):
    """PTBLexer.latexQuotes: straight quotes by guessed side, curly ones by their side, to
    ` `` ' ''."""
    tok = re.sub(r"&apos;|'", "`" if probably_left else "'", tok)
    tok = re.sub(r"\"|&quot;", "``" if probably_left else "''", tok)
    for chars, latex in (("\x91\u2018\u201b\u2039", "`"), ("\x92\u2019\u203a", "'"),
                         ("\x93\u201c\xab", "``"), ("\x94\u201d\xbb", "''")):
        tok = re.sub(f"[{chars}]", latex, tok)
    return tok


def _acronym_before_sentence(tok):
    # "I. The" is the word "I" ending a sentence;
    # "U.S. The" keeps its period and repeats it as a sentence end
    return (tok[:-1], len(tok) - 1) if len(tok) == 2 else (tok, len(tok) - 1)


_FRACTIONS = str.maketrans({"\xbc": "1/4", "\xbd": "1/2", "\xbe": "3/4", "\u2153": "1/3",
                            "\u2154": "2/3"})
_CURRENCY = str.maketrans({"\xa2": "cents", "\xa3": "#", "\x80": "$", "\xa4": "$", "\u20a0": "$",
                           "\u20ac": "$"})
_PARENS = str.maketrans({"(": "-LRB-", ")": "-RRB-"})
_BRACKETS = {"{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-", "(": "-LRB-", ")": "-RRB-"}


def _same(tok):
    return tok


def _nbsp(tok):
    return tok.replace(" ", "\xa0")  # normalizeSpace: a token never contains a space


def _no_soft_hyphen(tok):
    return tok.replace("\u00ad", "") or "-"


def _amp(tok):
    return re.sub("(?i:&amp;)", "&", tok)


def _pushback(n):
    """Action of a rule that returns all but the last n characters and lexes those again
    ("cannot" -> "can")."""
    return lambda tok: (tok[:-n], len(tok) - n)


# whitespace, and characters the lexer cannot tokenise (deleted, as its default "firstDelete" does)
_SKIP = None
_LINE = "\n"  # a newline: with -preserveLines the end of a caption
# (rule, trailing context or None, action). An action maps the matched text to the token, or to
# (token, characters consumed) when it pushes text back.
_PTB_RULES = [
    (r"(?i:c\+\+|[cf]#)", None, _same),
    # split assimilations: can not, 't was, 't is, gon na, ...
    (r"(?i:cannot|'twas)", None, _pushback(3)),
    (r"(?i:'tis|gonna|gotta|lemme|gimme|wanna)", None, _pushback(2)),
    (_SGML, None, _nbsp),
    (r"&(?i:md|mdash|ndash);|[\x96\x97\u2013\u2014\u2015]", None, lambda tok: "--"),
    (_AMP, None, _amp),
    (r"&(?i:ht|tl|ur|lr|qc|ql|qr|odq|cdq|#[0-9]+);", None, _same),
    (_WORD, _REDAUX, _no_soft_hyphen),  # patient|'s
    (r"[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*", _SREDAUX, _no_soft_hyphen),  # do|n't  ca|n't (SWORD)
    (_WORD, None, _no_soft_hyphen),
    # APOWORD, split into rules so that its longest alternative wins as in JFlex
    # (Python's | takes the first match)
    (rf"{_APOS}(?i:n){_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin|somethin|ol){_APOS}|{_APOS}(?i:em)",
     None, _same),
    (rf"[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*", None, _same),
    (rf"{_APOS}[2-9]0(?i:s)|{_APOS}(?i:till?|cause)", None, _same),
    (rf"{_L}+[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*", None, _same),
    (r"(?i:cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"
     + rf"|(?i:o){_APOSETC}(?i:o)", None, _same),
    (rf"(?i:y){_APOS}", _L, _same),
    (r"(?i:https?)://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},-]", None, _same),  # FULLURL
    (r"(?:(?i:www)\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4}"
     r"|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?i:com|net|org|edu))"
     r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?", None, _same),  # LIKELYURL
    (r"(?:&(?i:lt);|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\xa0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\xa0]+\.)*"
     r"[^ \t\n\f\r\"<>|(){}.\xa0]+(?:&(?i:gt);|>)?", None, _same),  # EMAIL
    (rf"@[a-zA-Z_][a-zA-Z_0-9]*|#{_LETTER}+", None, _same),  # TWITTER
    (_REDAUX, r"[^A-Za-z]", _latex_quotes),
    (_SREDAUX, r"[^A-Za-z]", _latex_quotes),
    (r"\d{1,2}[\-/]\d{1,2}[\-/]\d{2,4}", None, _same),  # DATE 12/03/2019
    (rf"[\-+]?{_NUM}", None, _no_soft_hyphen),  # NUMBER
    (r"[\u207a\u207b\u208a\u208b]?(?:[\u2070\xb9\xb2\xb3\u2074-\u2079]+|[\u2080-\u2089]+)", None,
     _same),
    (_FRAC, None, _nbsp),
    (r"[\xbc\xbd\xbe\u2153-\u215e]", None, lambda tok: tok.translate(_FRACTIONS)),
    (rf"(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\.d\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)"
     rf"|(?i:cap){_APOS}(?i:n)|(?i:c){_APOS}(?i:est)", None, _amp),  # TBSPEC
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", None,
     _same),  # THING3 s/p
    (r"[A-Z]*\$|#", None, _same),  # DOLSIGN
    (r"[\xa2\xa3\xa4\xa5\x80\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", None,
     lambda tok: tok.translate(_CURRENCY)),
    (rf"{_ACRO}\.", rf"{_SPACENL}+(?:{_ACRONYM_BEFORE}|{_SGML}){_SPACENL}",
     _acronym_before_sentence),
    (_ABBREV3, rf"{_SPACENL}?\d", _same),
    (r"(?i:pt[ey]|co)\.", rf"{_SPACE}(?i:ltd|lim)", _same),
    (_ABBREV1, _SENTEND, lambda tok: (tok, len(tok) - 1)),
    (_ABBREV1, r"[\s\S]{2}", _same),
    (_ABBREV1, None, lambda tok: (tok, len(tok) - 1)),
    (rf"{_ABBREV4}\.", None, _same),  # ABBREV2: Dr.  e.g.  a.m.  x.
    (_ABBREV4, _SPACE, _same),
    (_ACRO, _SPACENL, _same),
    (rf"{_APOS}[0-9][0-9]", _SPACENL, _same),  # TBSPEC2 '99
    (rf"{_LD}+(?:[.]{_LD}+)*[.](?i:bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|"
     r"java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)",
     rf"(?:{_SPACENL}|[.?!,])", _same),  # FILENAME
    (rf"{_WORD}\.", _INSENTP, _no_soft_hyphen),  # cm.,
    (r"(?:\([0-9]{2,3}\)[ \xa0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \xa0])?[0-9]{2,4}[\- \xa0])"
     r"[0-9]{3,4}[\- \xa0]?[0-9]{3,5}"
     r"|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}", None,
     lambda tok: _nbsp(tok).translate(_PARENS)),  # PHONE
    (_DBLQUOT, r"[A-Za-z0-9$]", lambda tok: _latex_quotes(tok, probably_left=True)),
    (_DBLQUOT, None, _latex_quotes),
    (r"\x7f", None, _SKIP),
    (r"<|&(?i:lt);", None, lambda tok: "<"),
    (r">|&(?i:gt);", None, lambda tok: ">"),
    (r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]", r"[^A-Za-z0-9]",
     lambda tok: tok.translate(_PARENS)),  # SMILEY
    (r"[\^x=~<>]\.\[\^(?i:x)=~<>\]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)"
     r"|\([\^x=~<>']-[\^x=~<>'`]\)", None, lambda tok: tok.translate(_PARENS)),  # ASIANSMILEY
    (r"[{}\[\]()]", None, _BRACKETS.get),
    (r"-+", None, lambda tok: "--" if len(tok) in (3, 4) else tok),
    (_LDOTS, None, lambda tok: "..."),
    (r"@+|#+|_+", None, _same),
    (r"\*+|(?:\\\*){1,3}", None, _same),
    (_INSENTP, None, _same),
    (r"[?!]+", None, _same),
    (r"[.\xa1\xbf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None, _same),
    (r"=", None, _same),
    (r"/", None, _same),
    (rf"{_HTHING}\.", _INSENTP, _no_soft_hyphen),
    (_HTHING, None, _no_soft_hyphen),
    (rf"{_THING}\.", _INSENTP, _same),
    (_THING, None, _same),
    (rf"[A-Z]+(?:(?:{_AMP}|[+&])[A-Z]+)+\.", _INSENTP, _amp),  # THINGA AT&T
    (rf"[A-Z]+(?:(?:{_AMP}|[+&])[A-Z]+)+", None, _amp),
    # an opening quote, "often but not always right"
    (r"'", r"[A-Za-z][^ \t\n\r\xa0]", lambda tok: "`"),
    (_REDAUX, None, _latex_quotes),
    (_SREDAUX, None, _latex_quotes),
    (_QUOTES, None, _latex_quotes),
    (r"<<|>>", None, _same),
    (_MISCSYMBOL, None, _same),
    (r"\x00|[ \t\xa0\u2000-\u200a\u3000]+|[\u200b\u200e\u200f\ufeff]", None, _SKIP),
    (_NEWLINE, None, lambda tok: _LINE),
    (r"(?i:&nbsp;)", None, _SKIP),
    (r"[^\n]", None, _SKIP),
]
_PTB_RULES = [(re.compile(f"({rule})" + (f"(?:{context})" if context else "")), action)
              for rule, context, action in _PTB_RULES]
# pycocoevalcap's PUNCTUATIONS, compared AFTER lower-casing: "-lrb-" stays
_PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",",
                    ":", "-", "--", "...", ";"}


def _ptb_lines(text):
    """What the jar prints for `text` with -preserveLines -lowerCase: the list of tokens of every
    line."""
    lines, pos = [[]], 0
    while pos < len(text):
        best, action = None, None
        for rule, rule_action in _PTB_RULES:  # the longest match wins, the earlier rule on a tie
            m = rule.match(text, pos)
            if m and (best is None or m.end() > best.end()):
                best, action = m, rule_action
        tok = best.group(1)  # the trailing context, if any, is lexed again
        pos += len(tok)
        if action is _SKIP:
            continue
        tok = action(tok)
        if isinstance(tok, tuple):  # the rule pushed characters back
            tok, pos = tok[0], best.start() + tok[1]
        if tok == _LINE:
            lines.append([])
        else:
            # -lowerCase (Java's Locale.ENGLISH lower-casing, as str.lower)
            lines[-1].append(tok.lower())
    return lines


_LINE_BREAKS = re.compile(_NEWLINE)


def nlg_tokenize_captions(texts):
    """pycocoevalcap's PTBTokenizer on a list of captions, in one call: one tokenised string per
    caption.

    pycocoevalcap feeds all captions to the jar as one text, one a line, so a caption's last token
    can depend on the next caption's start ("... segment I." then "The heart ..." makes "i", before
    "no change" it makes "i."); this reproduces that. Line breaks inside a caption become spaces
    (pycocoevalcap replaces only "\\n", and a "\\r" left in a caption makes the jar print an extra
    line that shifts every later caption onto the wrong sample).
    """
    lines = _ptb_lines("\n".join(_LINE_BREAKS.sub(" ", t) for t in texts))
    return [" ".join(t for t in line if t not in _PTB_PUNCTUATION) for line in lines[:len(texts)]]


def nlg_tokenize(text):
    """One caption as pycocoevalcap's PTBTokenizer tokenises it: PTB tokens, lower-cased,
    punctuation tokens removed.

    The tokens are those of CoreNLP 3.4.1's PTBLexer, ported rule by rule above (SGML tags, words
    and clitics, numbers, dates and fractions, abbreviations and acronyms with their look-ahead,
    hyphenated and slashed words, PTB3 brackets, quotes, dashes and ellipses); tests/test_metrics.py
    checks it against the jar on thousands of lines.

    "1.Severe cardiomegaly (AP view). No effusion, e.g. none.<BR>"
    -> "1 severe cardiomegaly -lrb- ap view -rrb- no effusion e.g. none <br>".
    See nlg_tokenize_captions for a list, where the next caption is part of the context.
    """
    return nlg_tokenize_captions([text])[0]


# --------------------------------------------------------------------------------------------------
# Text generation: scorers (pycocoevalcap 1.2 semantics; inputs already tokenised)


def _check(refs, hyps):
    if set(refs) != set(hyps):
        raise ValueError("refs and hyps must have the same sample ids")
    for k in refs:
        if isinstance(refs[k], str) or len(refs[k]) == 0:
            raise ValueError(f"refs[{k!r}] must be a non-empty list of strings")
        if not isinstance(hyps[k], str):
            raise ValueError(f"hyps[{k!r}] must be a string")
    if not refs:
        raise ValueError("no samples")
    return list(refs)


def _ngrams(tokens, n):
    """Counter of all 1..n-grams of a token list."""
    return Counter(tuple(tokens[i:i + k])
                   for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def bleu(refs, hyps, n=4):
    """Corpus-level BLEU-1..n as pycocoevalcap's Bleu(4): a list of n floats.

    Clipped n-gram matches (each hypothesis n-gram counted at most as often as in the reference that
    has it most) and hypothesis n-gram counts are summed over the corpus; BLEU-k is the geometric
    mean of the k precisions times the brevity penalty exp(1 - r/c) when c < r, with c the total
    hypothesis length and r the sum over samples of the reference length closest to the hypothesis
    length (the shorter one on a tie). The constants 1e-15 and 1e-9 are pycocoevalcap's guards
    against 0/0; they shift nothing a reported digit can see.
    """
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for k in _check(refs, hyps):
        h = hyps[k].split()
        r = [ref.split() for ref in refs[k]]
        counts = _ngrams(h, n)
        max_ref = Counter()
        for ref in r:
            max_ref |= _ngrams(ref, n)  # | keeps the maximum count of each n-gram
        for g, c in counts.items():
            correct[len(g) - 1] += min(c, max_ref[g])
        for i in range(n):
            guess[i] += max(0, len(h) - i)
        hyp_len += len(h)
        ref_len += min((abs(len(x) - len(h)), len(x)) for x in r)[1]
    scores, product = [], 1.0
    for i in range(n):
        product *= (correct[i] + tiny) / (guess[i] + small)
        scores.append(product ** (1.0 / (i + 1)))
    ratio = (hyp_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a, b):
    """Length of the longest common subsequence of two token lists.

    Bit-parallel dynamic programming (Hyyro 2004, "Bit-parallel LCS-length computation revisited"):
    bit i of v is 0 where the LCS table's column steps up at row i of `a`; one integer add per token
    of `b` updates a whole column. Python integers are unbounded, so this works for any length, and
    is ~50x faster than the O(|a||b|) table in pure Python.
    """
    match = {}
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(refs, hyps, beta=1.2):
    """Mean over samples of pycocoevalcap's ROUGE-L.

    Per sample: P = max over references of LCS/len(hyp), R = max over references of LCS/len(ref) --
    the two maxima are taken separately and may come from different references -- then
    F = (1 + beta^2) P R / (R + beta^2 P), 0 if P or R is 0. Tokens are split on single spaces like
    pycocoevalcap (an empty hypothesis is one empty token). This is not `rouge_score`'s ROUGE-L
    (F1 with stemming) that summarisation papers often report.
    """
    scores = []
    for k in _check(refs, hyps):
        h = hyps[k].split(" ")
        p = r = 0.0
        for ref in refs[k]:
            t = ref.split(" ")
            lcs = _lcs(t, h)
            p, r = max(p, lcs / len(h)), max(r, lcs / len(t))
        scores.append((1 + beta ** 2) * p * r / (r + beta ** 2 * p) if p > 0 and r > 0 else 0.0)
    return float(np.mean(scores))


def cider_d(refs, hyps, n=4, sigma=6.0):
    """pycocoevalcap's "Cider", which is CIDEr-D (Vedantam et al. 2015, section 4): mean over
    samples.

    Each sentence becomes, for every n-gram size, a tf-idf vector:
    count x (log N_samples - log max(1, df)), where df is the number of samples whose references
    contain the n-gram -- document frequencies come from the references of the evaluated set itself,
    so the score of a sample depends on the rest of the set. For each reference, per size, the
    clipped cosine sum_g min(h_g, r_g) r_g / (|h| |r|) is multiplied by the Gaussian length penalty
    exp(-delta^2 / (2 sigma^2)), delta the difference in words; the sample score is 10 x the mean
    over sizes, averaged over references. No stemming. (pycocoevalcap's loop counts bigrams for the
    length, max(0, words - 1): the same delta unless a sentence is empty, and then the cosine is 0
    anyway, so the scores are identical.)
    """
    ids = _check(refs, hyps)
    hyp_tokens = {k: hyps[k].split() for k in ids}
    ref_tokens = {k: [r.split() for r in refs[k]] for k in ids}
    ref_counts = {k: [_ngrams(t, n) for t in ref_tokens[k]] for k in ids}
    df = Counter(g for k in ids for g in set().union(*ref_counts[k]))
    log_n = math.log(len(ids))

    def vectorize(counts):
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]

    scores = []
    for k in ids:
        vh, nh = vectorize(_ngrams(hyp_tokens[k], n))
        total = 0.0
        for tokens, rc in zip(ref_tokens[k], ref_counts[k]):
            vr, nr = vectorize(rc)
            penalty = math.exp(-((len(hyp_tokens[k]) - len(tokens)) ** 2) / (2 * sigma ** 2))
            for i in range(n):
                dot = sum(min(w, vr[i].get(g, 0.0)) * vr[i].get(g, 0.0) for g, w in vh[i].items())
                if nh[i] != 0 and nr[i] != 0:
                    dot /= nh[i] * nr[i]
                total += dot * penalty
        scores.append(10.0 * total / n / len(refs[k]))
    return float(np.mean(scores))


METEOR_INSTALL = ("METEOR runs pycocoevalcap's METEOR 1.5 jar, which needs "
                  "`pip install pycocoevalcap` and a Java runtime on PATH (e.g. "
                  "`apt-get install default-jre-headless`). Leave with_meteor off to skip it.")


def meteor(refs, hyps):
    """METEOR 1.5 (English, -norm) through pycocoevalcap's wrapper of the java program: the corpus
    score it reports.

    Raises RuntimeError with install instructions when pycocoevalcap or java is missing.
    """
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError as e:
        raise RuntimeError(f"pycocoevalcap is not installed. {METEOR_INSTALL}") from e
    if shutil.which("java") is None:
        raise RuntimeError(f"java was not found on PATH. {METEOR_INSTALL}")
    ids = _check(refs, hyps)
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score({k: list(refs[k]) for k in ids},
                                        {k: [hyps[k]] for k in ids})
    finally:
        del scorer  # its __del__ ends the java process
    return float(score)


def nlg_metrics(refs, hyps, with_meteor=False):
    """All report-generation metrics on raw text: tokenise with nlg_tokenize_captions, then score.

    refs: {id: [reference strings]} (or {id: str} for one reference), hyps: {id: str}. Returns
    {"BLEU_1", ..., "BLEU_4", "ROUGE_L", "CIDEr"} and "METEOR" when with_meteor (needs java, see
    METEOR_INSTALL), named as pycocoevalcap's COCOEvalCap names them; values are fractions as it
    reports them (CIDEr is on its x10 scale).
    """
    refs = {k: [v] if isinstance(v, str) else list(v) for k, v in refs.items()}
    ids = _check(refs, hyps)
    # as COCOEvalCap: the references go through the tokenizer in one call,
    # the hypotheses in another, in id order
    flat = iter(nlg_tokenize_captions([r for k in ids for r in refs[k]]))
    refs = {k: [next(flat) for _ in refs[k]] for k in ids}
    hyps = dict(zip(ids, nlg_tokenize_captions([hyps[k] for k in ids])))
    out = {f"BLEU_{i + 1}": s for i, s in enumerate(bleu(refs, hyps))}
    out["ROUGE_L"] = rouge_l(refs, hyps)
    out["CIDEr"] = cider_d(refs, hyps)
    if with_meteor:
        out["METEOR"] = meteor(refs, hyps)
    return out
