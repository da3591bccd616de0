"""retrieval.embedding_recall: the recalls of the dense similarity matrix (the reference below is
the dense code it replaced), ranked in blocks that never hold the whole matrix, with ties, twin
groups and ITM re-ranking as before; the brute-force check of the tie rule."""

import numpy as np
import pytest
import torch

from ptunifier_min import retrieval


# ---- the dense reference: the whole [N_img, N_txt] matrix in float64 and N x N masks ------------
def dense_first_hit_rank(sim, positive):
    best = np.where(positive, sim, -np.inf).max(axis=1, keepdims=True)
    return ((sim >= best) & ~positive).sum(axis=1)


def dense_recall(sim, txt_image, ks=(1, 5, 10), img_group=None):
    sim = np.asarray(sim, dtype=np.float64)
    txt_image = np.asarray(txt_image)
    n_img = sim.shape[0]
    group = (np.arange(n_img) if img_group is None
             else np.unique(np.asarray(img_group), return_inverse=True)[1])
    positive = group[:, None] == group[txt_image][None, :]
    i2t = dense_first_hit_rank(sim, positive)
    t2i = dense_first_hit_rank(sim.T, positive.T)
    out = {f"i2t_r{k}": float((i2t < k).mean()) for k in ks}
    out.update({f"t2i_r{k}": float((t2i < k).mean()) for k in ks})
    return out


def dense_rerank(sim, top, margins):
    """The re-ranking as it was: each row's top ITC candidates re-scored row max + top, ..., row
    max + 1 in margin order, the rest of the row unchanged."""
    out = sim.clone().float()
    for i in range(sim.shape[0]):
        cand = sim[i].topk(min(top, sim.shape[1])).indices
        order = margins(i, cand).argsort(descending=True, stable=True)
        out[i, cand[order]] = out[i].max() + torch.arange(len(cand), 0, -1, dtype=out.dtype)
    return out


def tied_world(seed, n_img=23, d=6):
    """Integer-valued embeddings (every product exact in fp32, whatever the summation order, and
    many exact ties), 1-3 texts per image in shuffled order, two images with identical embeddings,
    and twin groups over them."""
    g = torch.Generator().manual_seed(seed)
    zi = torch.randint(-2, 3, (n_img, d), generator=g).float()
    zi[9] = zi[4]  # the same film twice
    txt_image = torch.cat([torch.full((int(torch.randint(1, 4, (1,), generator=g)),), i)
                           for i in range(n_img)])
    txt_image = txt_image[torch.randperm(len(txt_image), generator=g)]
    zt = zi[txt_image] + torch.randint(-2, 3, (len(txt_image), d), generator=g).float()
    group = np.arange(n_img)
    group[[4, 9]] = 4  # the duplicate is labelled as one image
    group[[12, 13, 14]] = 12
    return zi, zt, txt_image, group


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_embedding_recall_equals_the_dense_matrix_recall_with_ties_twins_and_any_block(seed):
    zi, zt, txt_image, group = tied_world(seed)
    sim = zi @ zt.t()
    assert len(sim.unique()) < sim.numel() / 4  # ties everywhere
    for img_group in (None, group):
        expected = dense_recall(sim, txt_image, img_group=img_group)
        for block in (1, 2, 5, 7, 22, 23, 64, None):  # none of 1 < b < 23 divides 23 or 40+
            got = retrieval.embedding_recall(zi, zt, txt_image, img_group=img_group, block=block)
            assert got == expected, (img_group is not None, block)


def test_embedding_recall_equals_the_dense_matrix_recall_on_random_unit_embeddings():
    g = torch.Generator().manual_seed(3)
    zi = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    zt = torch.nn.functional.normalize(zi + 0.7 * torch.randn(50, 16, generator=g), dim=-1)
    txt_image = torch.arange(50)
    expected = dense_recall(zi @ zt.t(), txt_image, ks=(1, 2, 5, 10))
    assert 0 < expected["i2t_r1"] < 1 and 0 < expected["t2i_r5"] < 1
    for block in (3, 17, None):
        got = retrieval.embedding_recall(zi, zt, txt_image, ks=(1, 2, 5, 10), block=block)
        assert got == expected


def test_ranking_never_forms_more_than_a_block_of_the_matrix(monkeypatch):
    zi, zt, txt_image, _ = tied_world(0)
    shapes, real = [], retrieval.matmul_fp32
    monkeypatch.setattr(retrieval, "matmul_fp32",
                        lambda a, b: shapes.append((len(a), b.shape[1])) or real(a, b))
    retrieval.embedding_recall(zi, zt, txt_image, block=5)
    n_img, n_txt = len(zi), len(zt)
    assert shapes == ([(5, n_txt)] * 4 + [(3, n_txt)] +
                      [(min(5, n_txt - a), n_img) for a in range(0, n_txt, 5)])
    monkeypatch.setattr(retrieval, "BLOCK_ENTRIES", 100)  # the default block: ~100 similarities
    shapes.clear()
    retrieval.embedding_recall(zi, zt, txt_image)
    assert max(rows * cols for rows, cols in shapes) <= 100


def test_embedding_recall_ranks_in_fp32_under_a_callers_bf16_autocast():
    """Two texts 1.5e-4 apart near a cosine of 1: bf16 (8 bits of mantissa) makes them a tie,
    which counts against the query."""
    zi = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    angle = torch.tensor([0.010, 0.020, 1.2])  # text 0 is image 0's, text 1 the wrong one
    zt = torch.stack([angle.cos(), angle.sin()], 1)
    txt_image = torch.tensor([0, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = torch.matmul(zi, zt.t())
        got = retrieval.embedding_recall(zi, zt, txt_image, ks=(1,))
    assert bf16[0, 0] == bf16[0, 1]  # what a bf16 product would rank: a tie, a miss
    assert got["i2t_r1"] == 1.0


@pytest.mark.parametrize("top", [1, 3, 8, 100])
def test_itm_reranking_from_the_embeddings_equals_the_dense_reranking(top):
    zi, zt, txt_image, group = tied_world(4)
    table = torch.randint(-3, 4, (len(zi), len(zt)), generator=torch.Generator().manual_seed(5))

    def margins(i, cand):  # integer margins: ties, which keep the ITC order
        return table[i, cand].float()

    sim = zi @ zt.t()
    for img_group in (None, group):
        reranked = dense_rerank(sim, top, margins)
        expected = {**dense_recall(reranked, txt_image, img_group=img_group),
                    **{k: v for k, v in dense_recall(sim, txt_image, img_group=img_group).items()
                       if k.startswith("t2i")}}
        for block in (4, None):
            got = retrieval.embedding_recall(zi, zt, txt_image, img_group=img_group, block=block,
                                             rerank_top=top, itm_margins=margins)
            assert got == expected, (img_group is not None, block)


def _recall_by_sorting(sim, txt_image, group, k):
    """Independent reference: sort every query's candidates, ties broken against the query, and
    look at the top k."""
    n_img, n_txt = sim.shape
    i2t = t2i = 0
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda j: (-sim[i, j], group[txt_image[j]] == group[i]))
        i2t += any(group[txt_image[j]] == group[i] for j in order[:k])
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-sim[i, j], group[i] == group[txt_image[j]]))
        t2i += any(group[i] == group[txt_image[j]] for i in order[:k])
    return i2t / n_img, t2i / n_txt


@pytest.mark.parametrize("decimals", [None, 1])  # continuous scores, then scores with many ties
def test_retrieval_recall_matches_brute_force(decimals):
    """A similarity matrix S is ranked as the embeddings (S, identity): every product is exact."""
    rng = np.random.default_rng(0)
    n_img = 40
    txt_image = np.concatenate([[i] * rng.integers(1, 4) for i in range(n_img)])  # 1-3 per image
    txt_image = rng.permutation(txt_image)
    sim = rng.normal(size=(n_img, len(txt_image)))
    sim[txt_image, np.arange(len(txt_image))] += 1.5  # a model better than chance
    if decimals is not None:
        sim = np.round(sim, decimals)
    sim = sim.astype(np.float32)  # the ranking's precision
    group = np.arange(n_img)
    group[7] = group[3] = 3  # two images with the same id: either one answers the other's texts
    group[20] = group[21] = group[22] = 20
    for img_group in (None, group):
        g = np.arange(n_img) if img_group is None else img_group
        out = retrieval.embedding_recall(torch.tensor(sim), torch.eye(len(txt_image)),
                                         torch.tensor(txt_image), img_group=img_group, block=7)
        for k in (1, 5, 10):
            i2t, t2i = _recall_by_sorting(sim, txt_image, g, k)
            assert out[f"i2t_r{k}"] == pytest.approx(i2t, abs=1e-12)
            assert out[f"t2i_r{k}"] == pytest.approx(t2i, abs=1e-12)
    # a model that scores every pair the same retrieves nothing
    flat = retrieval.embedding_recall(torch.zeros(20, 20), torch.eye(20), np.arange(20))
    assert flat["i2t_r10"] == 0.0 and flat["t2i_r10"] == 0.0


def test_retrieval_recall_rejects_an_image_without_text_and_bad_embeddings():
    with pytest.raises(ValueError, match="no text"):
        retrieval.embedding_recall(torch.zeros(3, 2), torch.eye(2), [0, 1])
    # a twin that has the text answers for it
    retrieval.embedding_recall(torch.zeros(3, 2), torch.eye(2), [0, 1], img_group=[0, 1, 1])
    with pytest.raises(ValueError, match="text_emb row 1 holds NaN or inf"):
        retrieval.embedding_recall(torch.zeros(2, 2), torch.tensor([[0, 1], [float("nan"), 0]]),
                                   [0, 1])
    with pytest.raises(ValueError, match="same d"):
        retrieval.embedding_recall(torch.zeros(2, 2), torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="must index the 2 images"):
        retrieval.embedding_recall(torch.zeros(2, 2), torch.zeros(2, 2), [0, 2])
