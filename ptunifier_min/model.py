"""The single-tower PTUnifier: one vanilla pre-norm Transformer over [visual part; textual part].

    model = PTUnifier(ModelConfig())
    enc = model(image=img)  # image-only: text side = [CLS] + k_l textual prompts + [SEP]
    enc = model(input_ids=ids, attention_mask=mask)  # text-only: [IMG_CLS] + k_v visual prompts
    enc = model(image=img, input_ids=ids, attention_mask=mask)  # the pair
    enc.pooled  # [B, 2D] = final IMG_CLS state ++ final CLS state

The prompts (paper section 3.2) fill in the missing modality, so one backbone serves image-only,
text-only and paired input. Names follow timm's ViT on the image side (patch_embed.proj, cls_token,
pos_embed, blocks.N.attn.qkv, norm) and BERT on the text side (word_embeddings, ...). It imports
torch and fields.py only: copy the two files to use the model elsewhere.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fields import check_fields, flag, option


@dataclass
class ModelConfig:
    """The single-tower backbone and its pre-training heads (method.md); every field is a flag."""

    image_size: int = option(48, "input image side in pixels (resize + center crop)", valid=">= 1")
    patch_size: int = option(8, "ViT patch side in pixels", valid=">= 1")
    vocab_size: int = option(4096, "vocabulary size (set from the tokenizer)", valid=">= 1")
    cls_id: int = option(2, "[CLS] token id (set from the tokenizer)", valid=">= 0")
    sep_id: int = option(3, "[SEP] token id (set from the tokenizer)", valid=">= 0")
    max_text_len: int = option(32, "text length in tokens, [CLS] and [SEP] included (finetune.py "
                                   "without this flag: the longer of the checkpoint's and the "
                                   "task's 95th percentile, rounded up to 8)", valid=">= 3")
    dim: int = option(128, "hidden size D", valid=">= 1")
    depth: int = option(4, "number of Transformer blocks", valid=">= 1")
    heads: int = option(4, "attention heads (dim must divide by heads)", valid=">= 1")
    mlp_ratio: float = option(4.0, "MLP hidden size / dim", valid="> 0")
    dropout: float = option(0.0, "dropout in attention output and MLP", valid="[0, 1)")
    prompt_mode: str = option("pool", "prompts for a missing modality: none | static | pool "
                                      "(paper section 3.2)", valid=("none", "static", "pool"))
    pool_size: int = option(64, "prompts per modality pool (prompt_mode=pool)", valid=">= 1")
    k_v: int = option(8, "visual prompts used when the image is missing", valid=">= 0")
    k_l: int = option(8, "textual prompts used when the text is missing", valid=">= 0")
    query_pooling: str = option("mean", "how the present modality's embeddings become the pool "
                                        "query: mean | max", valid=("mean", "max"))
    # pool variants of the prompt-pool literature; the defaults are the paper's form
    pool_select: str = option("dot", "pool scores: dot = query . row (the paper) | cosine = of "
                                     "L2-normalised query and keys", valid=("dot", "cosine"))
    pool_keys: str = option("shared", "shared = a pool row is its own selection key (the paper) | "
                                      "separate = a learned key per row (L2P's key-value pool; "
                                      "the keys learn only through --w-pool-pull)",
                            valid=("shared", "separate"))
    pool_query: str = option("input", "pool query: input = pooled input embeddings of the present "
                                      "modality (the paper) | final = its first token's final "
                                      "state after a no-grad pass of it alone (L2P)",
                             valid=("input", "final"))
    itc_dim: int = option(128, "ITC projection size", valid=">= 1")
    itc_temperature: float = option(0.07, "initial ITC temperature (logit scale = log(1/T), "
                                          "clamped at log 100)", valid="> 0")
    learn_temperature: bool = option(True, "learn the ITC temperature (CLIP); false: fixed")
    # what an imported encoder needs to compute what it computed (set by --init-vision/--init-text)
    norm_pre: bool = option(False, "LayerNorm on the input sequence before the blocks (CLIP's "
                                   "ln_pre, timm's norm_pre)")
    act: str = option("gelu", "MLP activation: gelu | quick_gelu (OpenAI CLIP's "
                              "x * sigmoid(1.702 x))", valid=("gelu", "quick_gelu"))
    norm_eps: float = option(1e-5, "LayerNorm epsilon of the blocks and final norm (timm 1e-6, "
                                   "HF ViT 1e-12, CLIP 1e-5)", valid="> 0")
    patch_bias: bool = option(True, "bias in the patch projection (CLIP has none)")
    text_norm_eps: float = option(0.0, "epsilon of a LayerNorm on word + position embeddings "
                                       "(BERT / RoBERTa's, added by --init-text); 0 = none",
                                  valid=">= 0")
    pixel_mean: list = option((0.5, 0.5, 0.5), "per-channel (R,G,B) mean subtracted from pixels "
                                               "in [0, 1] (--init-vision: its encoder's)")
    pixel_std: list = option((0.5, 0.5, 0.5), "per-channel (R,G,B) std the pixels are then "
                                              "divided by (--init-vision: its encoder's)")

    def __post_init__(self):
        check_fields(self)  # first: the checks below divide by heads and patch_size
        for name in ("pixel_mean", "pixel_std"):
            # a list, as it reads back from a checkpoint's JSON, so that both compare equal
            values = [float(v) for v in getattr(self, name)]
            if len(values) != 3 or not all(map(math.isfinite, values)):
                raise ValueError(f"{flag(name)} must be 3 finite numbers (R,G,B), got {values}")
            setattr(self, name, values)
        if min(self.pixel_std) <= 0:
            raise ValueError(f"--pixel-std must be > 0 in every channel, got {self.pixel_std}")
        if self.dim % self.heads:
            raise ValueError(f"--dim {self.dim} is not divisible by --heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"--image-size {self.image_size} is not divisible by "
                             f"--patch-size {self.patch_size}")
        if self.prompt_mode != "pool" and self.pool_variants():
            raise ValueError(f"{', '.join(self.pool_variants())} only apply to --prompt-mode pool, "
                             f"got {self.prompt_mode!r}")
        if self.prompt_mode == "pool" and self.k_v == self.k_l == 0:
            raise ValueError("--prompt-mode pool with --k-v 0 and --k-l 0 would use no row of its "
                             "pools: set --k-v / --k-l to at least 1, or --prompt-mode none")
        if self.prompt_mode == "static" and min(self.k_v, self.k_l) == 0:
            raise ValueError(f"--prompt-mode static needs --k-v and --k-l of at least 1, got "
                             f"{self.k_v} and {self.k_l}; --prompt-mode none uses no prompts")
        if self.prompt_mode == "pool" and max(self.k_v, self.k_l) > self.pool_size:
            raise ValueError(f"--k-v {self.k_v} and --k-l {self.k_l} cannot exceed "
                             f"--pool-size {self.pool_size}")

    def pool_variants(self):
        """The pool switches set away from the paper's form, as flags (empty for the paper's)."""
        paper = dict(pool_select="dot", pool_keys="shared", pool_query="input")
        return [f"{flag(k)} {getattr(self, k)}" for k, v in paper.items() if getattr(self, k) != v]


def pixel_table(mean=(0.5,) * 3, std=(0.5,) * 3):
    """[3, 256] float32: (pixel / 255 - mean) / std of each uint8 value in each channel, computed on
    the host. Normalising is then a look-up, the same floats on every device (a GPU computes
    `x / 255.0` as x * (1 / 255.0), which differs in the last bit for some pixels)."""
    # on the host even where the model is built under torch.device("meta")
    x = torch.arange(256, dtype=torch.float32, device="cpu") / 255.0  # [256]
    mean, std = (torch.tensor(v, dtype=torch.float32, device="cpu")[:, None] for v in (mean, std))
    return (x - mean) / std  # [3, 256]


def normalize(pixels, table):
    """uint8 pixels [..., 1, S, S] (a grayscale film) or [..., 3, S, S] -> the model's float input
    [..., 3, S, S], through a pixel_table on the pixels' device. A film is replicated to the 3
    channels of the patch embedding (summing its RGB filters would change the sums' rounding)."""
    channel = torch.arange(3, device=pixels.device)[:, None, None]  # [3, 1, 1]
    return table[channel, pixels.long()]  # broadcast over [..., 1 or 3, S, S] -> [..., 3, S, S]


def attend(q, k, v, mask=None, dropout=0.0, manual=False):
    """softmax(q k^T / sqrt(Dh)) v over [B, H, T, Dh] queries and [B, H, S, Dh] keys/values; mask
    True = may attend.

    The fused SDPA kernel by default; `manual` is the textbook formula, kept so tests can check the
    kernel against it, and taken by bf16 on a CPU: PyTorch's CPU SDPA kernels in bf16 (their
    backward above all) ran the cpu preset's backbone step 2.5x slower on an AVX512-BF16 CPU."""
    if not manual and not (q.device.type == "cpu" and q.dtype == torch.bfloat16):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return F.dropout(att.softmax(-1), dropout) @ v


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection."""

    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_mask=None, manual=False, causal=False, positions=None):
        # key_mask: [B, T] bool, True = may be attended to; None when nothing is padded (SDPA's
        # fastest kernel). causal: t attends to positions <= t (the generation decoder).
        # positions: a slice of the positions whose output is wanted (None = all); every position
        # is still a key and value
        B, T, D = x.shape
        if positions is None:
            # 3 x [B, H, T, Dh]
            q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        else:  # the fused projection's query third at those positions, its key and value thirds
            (w_q, w_kv), (b_q, b_kv) = (self.qkv.weight.split([D, 2 * D]),
                                        self.qkv.bias.split([D, 2 * D]))
            q = F.linear(x[:, positions], w_q, b_q)
            q = q.view(B, q.shape[1], self.heads, D // self.heads).transpose(1, 2)  # [B, H, Tq, Dh]
            k, v = (F.linear(x, w_kv, b_kv).view(B, T, 2, self.heads, D // self.heads)
                    .permute(2, 0, 3, 1, 4))
            T = q.shape[2]
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        if causal:
            tri = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = tri if mask is None else mask & tri
        p = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, p, manual).transpose(1, 2).reshape(B, T, D)  # [B, T, D]
        return F.dropout(self.proj(y), p, self.training)


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's GELU: its imported weights need it


class Mlp(nn.Module):
    def __init__(self, dim, hidden, out=None, dropout=0.0, act="gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)
        self.dropout, self.act = dropout, quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x):
        return F.dropout(self.fc2(self.act(self.fc1(x))), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm Transformer block (ViT / GPT-2 layout)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, dropout=0.0, act="gelu", eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout=dropout, act=act)

    def forward(self, x, key_mask=None, manual=False, positions=None):
        # positions: a slice of the positions to compute (None = all); the rest are keys and values
        y = x if positions is None else x[:, positions]
        y = y + self.attn(self.norm1(x), key_mask, manual, positions=positions)
        return y + self.mlp(self.norm2(y))


def matmul_fp32(a, b):
    """a @ b in fp32, also inside a bf16 autocast region, which would otherwise run the product in
    bf16 whatever the inputs' dtype. For the few products whose rounding matters: contrastive
    logits, pool scores, similarities."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float()


def cross_entropy_fp32(logits, target, **kwargs):
    """cross_entropy with its log-softmax in fp32, autocast off: no loss of ours is computed in
    bf16."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float(), target, **kwargs)


class Prompts(nn.Module):
    """Stand-ins for a missing modality: none, k static prompts, or the top-k rows of a pool.

    Pool mode (paper eq. 4): scores = query . pool rows, the k best rows in score order become the
    prompts. The rows are gathered from the pool parameter, so the selected rows receive gradients
    (the authors' code ran this under no_grad: its pools never learned). top-k has no gradient,
    which is fine: the rows learn to be good prompts, and since the scores use the same rows, that
    also moves which queries pick them. Two variants of the prompt-pool literature (the paper's form
    is the default): select="cosine" scores normalised query and keys, so that a row's norm cannot
    win every query; keys="separate" selects by a key per row and inserts the row (L2P's key-value
    pool, Wang et al. 2022): the keys learn only through the pull term.
    """

    def __init__(self, mode, pool_size, k, dim, select="dot", keys="shared"):
        super().__init__()
        self.mode, self.k, self.select = mode, k, select
        n = {"none": 0, "static": k, "pool": pool_size}[mode]
        # one tensor per pool: all of it is in the graph when it is used (no DDP unused search)
        self.weight = nn.Parameter(torch.zeros(n, dim)) if n else None
        self.key = (nn.Parameter(torch.zeros(n, dim)) if mode == "pool" and keys == "separate"
                    else None)

    def forward(self, query):
        """query: [B, D] -> prompts [B, k, D], the selected rows [B, k] and the pool's auxiliary
        terms (None unless pooled), 0-dim tensors pre-training adds to its loss when weighted:
        - pull = mean of 1 - cos(query, chosen key), the query detached (L2P's surrogate loss);
        - balance = N * sum_i f_i * P_i, f_i the share of the selections that went to row i, P_i
          its mean softmax score: the Switch Transformer's load-balancing loss (Fedus et al. 2022),
          1 when every row is used alike."""
        B, D = query.shape
        if self.mode == "none":
            return query.new_zeros(B, 0, D), None, None
        if self.mode == "static":
            return self.weight.unsqueeze(0).expand(B, -1, -1), None, None
        keys = self.weight if self.key is None else self.key
        q, kk = query.float(), keys.float()
        if self.select == "cosine":
            q, kk = F.normalize(q, dim=-1), F.normalize(kk, dim=-1)
        scores = matmul_fp32(q, kk.t())  # [B, N]; fp32 so bf16 rounding never flips a selection
        idx = scores.topk(self.k, dim=-1).indices  # [B, k], best first
        # F.embedding, not indexing: its backward sums a row chosen several times in a fixed order
        pull = 1 - F.cosine_similarity(query.detach().float()[:, None],
                                       F.embedding(idx, keys).float(), dim=-1).mean()
        ones = torch.ones(idx.numel(), device=idx.device)  # counted on the device: no host read
        counts = torch.zeros(len(keys), device=idx.device).index_add_(0, idx.flatten(), ones)
        balance = len(keys) * (counts / idx.numel() * scores.softmax(-1).mean(0)).sum()
        return F.embedding(idx, self.weight), idx, {"pull": pull, "balance": balance}


@dataclass
class Encoding:
    # final-norm states of what the pass read: [B, Tv + Tl, D], or [B, 2, D], or [B, Tl, D]
    hidden: torch.Tensor
    pooled: torch.Tensor | None  # [B, 2D] IMG_CLS ++ CLS (None when the pass read only the text)
    n_visual: int  # Tv: where the textual part starts
    selected_visual: torch.Tensor | None  # [B, k_v] pool rows used for a missing image
    selected_textual: torch.Tensor | None  # [B, k_l] pool rows used for a missing text
    modality: str  # what the pass read: "image", "text" or "pair" (ITC embeds the first two)
    pool_terms: dict | None = None  # the pool's auxiliary terms (Prompts.forward), if pooled


class PTUnifier(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        # image side (ViT, paper eq. 11): patch projection, a learned [IMG_CLS], learned positions
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size,
                                          bias=cfg.patch_bias)
        # [3, 256] what uint8 pixels normalise to (normalize), kept here so that images are
        # normalised on the device; not saved: the config holds the mean and std
        self.register_buffer("pixel_values", pixel_table(cfg.pixel_mean, cfg.pixel_std),
                             persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, D))
        # text side (BERT): WordPiece embeddings + learned positions (paper eq. 12)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, D)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, D)
        # BERT / RoBERTa normalise their embedding sum: only when imported (--init-text)
        self.text_norm = nn.LayerNorm(D, cfg.text_norm_eps) if cfg.text_norm_eps else nn.Identity()
        # modality type, added to every position of a part, prompts included: 0 visual, 1 textual
        self.token_type_embeddings = nn.Embedding(2, D)
        self.visual_prompts, self.textual_prompts = (
            Prompts(cfg.prompt_mode, cfg.pool_size, k, D, cfg.pool_select, cfg.pool_keys)
            for k in (cfg.k_v, cfg.k_l))
        # CLIP's ln_pre (timm: norm_pre) normalises the input sequence before the blocks
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.norm_pre else nn.Identity()
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.act,
                                          cfg.norm_eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        # pre-training heads. MLM: BERT's prediction head, its decoder tied to word_embeddings
        self.mlm_head = nn.Module()
        self.mlm_head.dense = nn.Linear(D, D)
        self.mlm_head.norm = nn.LayerNorm(D)
        self.mlm_head.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.itm_head = Mlp(2 * D, D, 2)
        # ITC: separate projections of the pooled image-only and text-only states (CLIP)
        self.itc_image_proj = nn.Linear(2 * D, cfg.itc_dim)
        self.itc_text_proj = nn.Linear(2 * D, cfg.itc_dim)
        scale = torch.tensor(math.log(1 / cfg.itc_temperature))
        if cfg.learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:  # a constant
            self.register_buffer("logit_scale", scale)
        # The ids of "[CLS] [SEP]", a missing text's ends, on the model's device: a tensor made from
        # them in forward would be copied from the host, which makes the host wait. Not saved.
        self.register_buffer("text_ends", torch.tensor([[cfg.cls_id, cfg.sep_id]]),
                             persistent=False)
        self.init_weights()

    def init_weights(self):
        """Every tensor group by name: N(0, 0.02) weights (BERT/ViT), zero biases, unit norms,
        CLIP's logit scale."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.pos_embed, self.visual_prompts.weight,
                  self.textual_prompts.weight, self.visual_prompts.key, self.textual_prompts.key):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        nn.init.zeros_(self.mlm_head.bias)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / self.cfg.itc_temperature))
        self.clamp_logit_scale()

    def embed_image(self, image):
        if image.dtype == torch.uint8:  # the loaders' pixels [B, 1, H, W]: normalised here
            image = normalize(image, self.pixel_values)
        x = self.patch_embed.proj(image).flatten(2).transpose(1, 2)  # [B, 3, H, W] -> [B, N, D]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)  # [B, 1 + N, D]
        return x + self.pos_embed

    def embed_text(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.text_norm(self.word_embeddings(input_ids) + self.position_embeddings(pos))

    def _query(self, x, mask, type_id):
        """The pool query of the present modality's embedded input x [B, T, D] (padding excluded
        through mask). The paper's (pool_query "input"): the mean (or max) of the input embeddings,
        without the image's [IMG_CLS] (a constant). "final": the final state of the first token
        after a no-grad pass of the modality alone, as L2P queries with a frozen encoder's [CLS]."""
        if self.cfg.pool_query == "final":
            with torch.no_grad():
                h = self.norm_pre(x + self.token_type_embeddings.weight[type_id])
                key_mask = None if mask is None else mask.bool()
                for blk in self.blocks:
                    h = blk(h, key_mask)
                return self.norm(h)[:, 0]
        if type_id == 0:
            x = x[:, 1:]
        if mask is None:
            return x.mean(1) if self.cfg.query_pooling == "mean" else x.amax(1)
        m = mask.unsqueeze(-1)  # [B, T, 1]
        if self.cfg.query_pooling == "mean":
            return (x * m).sum(1) / m.sum(1).clamp(min=1)
        return x.masked_fill(~m, float("-inf")).amax(1)

    def forward(self, image=None, input_ids=None, attention_mask=None, manual_attention=False,
                padded=None, read="all"):
        """padded: whether attention_mask marks any padding, when the caller knows it from the host
        (the collates do). None = read it from the mask, which makes the host wait for the device
        and breaks a torch.compile graph. Without padding no key mask is passed (SDPA's fastest).

        read: the final states the caller uses, "all", "pooled" ([IMG_CLS] and [CLS]: the heads of
        ITC, ITM and classification) or "text" (the textual part: MLM). The last block then
        computes only those positions (all remain its keys and values): the same states, for
        1/depth less of the work on the rest."""
        if image is None and input_ids is None:
            raise ValueError("PTUnifier needs an image, a text or both")
        sel_v = sel_l = terms = None
        if input_ids is not None:
            t = self.embed_text(input_ids)
            if attention_mask is None:
                attention_mask, padded = torch.ones_like(input_ids, dtype=torch.bool), False
        if image is not None:
            v = self.embed_image(image)
        else:  # visual part = [IMG_CLS] + k_v visual prompts chosen by the text
            prompts, sel_v, terms = self.visual_prompts(self._query(t, attention_mask, 1))
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(t), -1, -1)
            v = torch.cat([cls, prompts.to(cls.dtype)], 1)  # [B, 1 + k_v, D]
        # textual part = [CLS] + k_l textual prompts + [SEP] chosen by the image
        if input_ids is None:
            prompts, sel_l, terms = self.textual_prompts(self._query(v, None, 0))
            # [CLS] and [SEP] embedded as the empty text "[CLS] [SEP]" is (with prompt_mode none
            # a missing text is the empty text); prompts have no position: an unordered set
            ends = self.embed_text(self.text_ends).expand(len(v), -1, -1)  # [B, 2, D]
            t = torch.cat([ends[:, :1], prompts.to(ends.dtype), ends[:, 1:]], 1)  # [B, k_l + 2, D]
            attention_mask = None
        v = v + self.token_type_embeddings.weight[0]
        t = t + self.token_type_embeddings.weight[1]
        x = self.norm_pre(torch.cat([v, t], 1))  # [B, Tv + Tl, D]
        key_mask = None
        if attention_mask is not None and padded is None:
            padded = not bool(attention_mask.all())  # the host waits for the device here
        if attention_mask is not None and padded:
            key_mask = torch.cat([attention_mask.new_ones(len(v), v.shape[1]), attention_mask], 1)
        Tv = v.shape[1]
        # what the last block computes: [IMG_CLS] and [CLS] are positions 0 and Tv, the text Tv:
        last = {"all": None, "pooled": slice(0, Tv + 1, Tv), "text": slice(Tv, None)}[read]
        for i, blk in enumerate(self.blocks):
            x = blk(x, key_mask, manual_attention, last if i == len(self.blocks) - 1 else None)
        x = self.norm(x)
        first = {"all": Tv, "pooled": 1, "text": None}[read]  # where [CLS] is in x
        pooled = None if first is None else torch.cat([x[:, 0], x[:, first]], -1)  # [B, 2D]
        modality = ("pair" if image is not None and input_ids is not None
                    else "image" if image is not None else "text")
        return Encoding(x, pooled, Tv, sel_v, sel_l, modality, terms)

    def forward_vision(self, image, manual_attention=False):
        """The image tokens alone through the blocks, as a plain ViT computes them (no type
        embedding, no text): what tests compare an imported encoder (pretrained.py) with."""
        x = self.norm_pre(self.embed_image(image))
        for blk in self.blocks:
            x = blk(x, None, manual_attention)
        return self.norm(x)  # [B, 1 + N, D]

    def mlm_logits(self, h):
        """[M, D] states at masked positions -> [M, V] vocabulary logits (decoder tied to
        word_embeddings)."""
        h = self.mlm_head.norm(F.gelu(self.mlm_head.dense(h)))
        return F.linear(h, self.word_embeddings.weight, self.mlm_head.bias)

    def itm_logits(self, pooled):
        return self.itm_head(pooled)  # [B, 2]: not matched / matched

    def itc_embed(self, enc):
        """[B, itc_dim] L2-normalised fp32 ITC embedding of an image-only or a text-only pass, e.g.
        model.itc_embed(model(image=x)): the one ITC embedding of pre-training, fine-tuning,
        retrieval and the API. It takes the pass's Encoding, not the inputs, so that pre-training
        can run the pass through its DDP wrapper (DDP reduces only its own forward's gradients)."""
        if enc.modality == "pair":
            raise ValueError("ITC embeds an image-only or a text-only pass; an image-text pair is "
                             "ITM's input")
        proj = self.itc_image_proj if enc.modality == "image" else self.itc_text_proj
        return F.normalize(proj(enc.pooled).float(), dim=-1)

    def itc_scale(self):
        # No clamp here: past its bound a clamp has no gradient, and a scale pushed there would
        # never come back; the parameter is clamped after every optimizer step instead.
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self):
        """Keep the learned logit scale in [0, log 100], i.e. the scale in [1, 100], in place (CLIP,
        open_clip): the logits cannot blow up, and the temperature stays below 1."""
        self.logit_scale.clamp_(0, math.log(100))

    # ---- parameter groups: the model is their one owner (the optimizer and the scripts ask it) --
    # Not the backbone: the prompt pools and the pre-training heads (the head learning rate).
    HEADS = ("visual_prompts", "textual_prompts", "mlm_head", "itm_head", "itc_", "logit_scale")
    # No weight decay (besides norms and biases, which have < 2 dims): embeddings, pools and the
    # logit scale, as BERT, ViT and CLIP train them.
    NO_DECAY = ("cls_token", "pos_embed", "word_embeddings", "position_embeddings",
                "token_type_embeddings", "visual_prompts", "textual_prompts", "logit_scale")

    def backbone_parameter_names(self):
        """Embeddings, blocks and norms; the rest are pools, heads and the logit scale."""
        return {n for n, _ in self.named_parameters() if not n.startswith(self.HEADS)}

    def no_weight_decay(self):
        """Parameter names AdamW must not decay (timm's `no_weight_decay()` convention)."""
        return {n for n, _ in self.named_parameters() if n.startswith(self.NO_DECAY)}
