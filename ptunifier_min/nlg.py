"""Text generation metrics (TS, ITG): BLEU-1..4, ROUGE-L, CIDEr-D and METEOR, as pycocoevalcap 1.2
(the coco-caption code the report-generation literature uses) computes them; tests/test_metrics.py
compares every number and every token with it.

    nlg_metrics(refs, hyps)  # {sample id: [reference strings]}, {sample id: hypothesis string}

`bleu`, `rouge_l`, `cider_d` and `meteor` expect text that is already tokenised (space-separated
tokens, as pycocoevalcap's scorers do); `nlg_metrics` first tokenises both sides with
`nlg_tokenize_captions`, which gives what pycocoevalcap's java PTBTokenizer gives, without java
(ptb.py).
"""

import math
import shutil
from collections import Counter

import numpy as np

from . import ptb


nlg_tokenize_captions = ptb.tokenize_captions  # captions of one pycocoevalcap call -> token strings
nlg_tokenize = ptb.tokenize                    # one caption -> its token string


# ---- scorers (pycocoevalcap 1.2 semantics; inputs already tokenised) ----------------------------
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
