"""Evaluation metrics for the downstream tasks, in numpy, each checked against its reference
implementation.

    auroc(scores, labels)                    # IC: one class; macro_auroc(...): CheXpert 5 / RSNA 1
    accuracy(pred, target)                   # TC (RadNLI)
    vqa_accuracy(pred, target, answer_type)  # VQA: overall / open / closed; OOV answers are wrong
    cnr(heat, box_mask(boxes, W, H)); miou(heat, mask)  # phrase grounding (MS-CXR, BioViL's)

Array arguments may be numpy arrays, lists or torch tensors (any device or dtype);
tests/test_metrics.py compares each with scikit-learn or hand-made cases. Retrieval's Recall@K is
retrieval.embedding_recall; the text generation metrics are nlg.py's.
"""

import math

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
# Phrase grounding (MS-CXR), as BioViL (Boecking et al. 2022) scores a map against a phrase's boxes


def box_mask(boxes, width, height):
    """[height, width] bool: the union of boxes [x, y, w, h] (pixels of the film)."""
    mask = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
        mask[y0:max(y0, int(round(y + h))), x0:max(x0, int(round(x + w)))] = True
    return mask


def cnr(heat, mask):
    """Contrast-to-noise ratio of a map against a region: |mean inside - mean outside| /
    sqrt(var inside + var outside) (population variances). 0 for a map without contrast (a constant
    one, or a region that is empty or the whole film); inf for contrast without any noise (a map
    that is the boxes' mask itself)."""
    heat, mask = _numpy(heat).astype(np.float64), _numpy(mask).astype(bool)
    inside, outside = heat[mask], heat[~mask]
    if not inside.size or not outside.size:
        return 0.0
    contrast, noise = abs(inside.mean() - outside.mean()), math.sqrt(inside.var() + outside.var())
    return float(contrast / noise) if noise > 0 else (math.inf if contrast > 0 else 0.0)


GROUNDING_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)


def miou(heat, mask, thresholds=GROUNDING_THRESHOLDS):
    """Mean over thresholds of the IoU between the map's region above the threshold and the boxes'.
    The map is first scaled to [0, 1] by its own min and max, so that maps of any kind and scale
    (cosines, Grad-CAM, a prior) are thresholded alike; a constant map, which prefers no pixel,
    becomes all ones and selects the whole film."""
    heat, mask = _numpy(heat).astype(np.float64), _numpy(mask).astype(bool)
    lo, hi = heat.min(), heat.max()
    scaled = (heat - lo) / (hi - lo) if hi > lo else np.ones_like(heat)
    ious = []
    for t in thresholds:
        pred = scaled > t
        union = (pred | mask).sum()
        ious.append((pred & mask).sum() / union if union else 0.0)
    return float(np.mean(ious))
