"""The single-tower PTUnifier: one vanilla pre-norm Transformer over [visual part; textual part].

    model = PTUnifier(ModelConfig())
    enc = model(image=img)  # image-only: text side = [CLS] + k_l textual prompts + [SEP]
    enc = model(input_ids=ids, attention_mask=mask)  # text-only: [IMG_CLS] + k_v visual prompts
    enc = model(image=img, input_ids=ids, attention_mask=mask)  # the pair
    enc.pooled  # [B, 2D] = final IMG_CLS state ++ final CLS state

The prompts (paper section 3.2) fill in the missing modality so that one backbone serves image-only,
text-only and paired input. Names follow timm's ViT on the image side (patch_embed.proj, cls_token,
pos_embed, blocks.N.attn.qkv, norm) and BERT on the text side (word_embeddings, position_embeddings,
token_type_embeddings), so both are recognisable.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .data import normalize, pixel_table


def attend(q, k, v, mask=None, dropout=0.0, manual=False):
    """softmax(q k^T / sqrt(Dh)) v over [B, H, T, Dh] queries and [B, H, S, Dh] keys/values; mask
    True = may attend.

    The fused SDPA kernel by default; `manual` is the textbook formula, kept so tests can check the
    kernel against it. bf16 on a CPU always takes the textbook formula: PyTorch's CPU SDPA kernels
    in bf16 (their backward above all) ran the cpu preset's backbone step 2.5x slower than it on an
    AVX512-BF16 CPU (issue 11; fp32 timed the same both ways).
    """
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

    def forward(self, x, key_mask=None, manual=False, causal=False, rows=None):
        # key_mask: [B, T] bool, True = may be attended to; None when nothing is padded (lets SDPA
        # take its fastest kernel)
        # causal: position t attends to positions <= t only (the generation decoder)
        # rows: a slice of the positions whose output is wanted (None = all); every position is
        # still a key and value
        B, T, D = x.shape
        if rows is None:
            # 3 x [B, H, T, Dh]
            q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        else:  # the fused projection's query third for the wanted rows only, its key and value
            # thirds for all
            (w_q, w_kv), (b_q, b_kv) = (self.qkv.weight.split([D, 2 * D]),
                                        self.qkv.bias.split([D, 2 * D]))
            q = F.linear(x[:, rows], w_q, b_q)
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
    # OpenAI CLIP's sigmoid approximation of GELU; its weights were trained with it, so importing
    # them needs it
    return x * torch.sigmoid(1.702 * x)


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

    def forward(self, x, key_mask=None, manual=False, rows=None):
        """rows: a slice of the positions to compute (None = all): the others are only read, as keys
        and values."""
        y = x if rows is None else x[:, rows]
        y = y + self.attn(self.norm1(x), key_mask, manual, rows=rows)
        return y + self.mlp(self.norm2(y))


def matmul_fp32(a, b):
    """a @ b in fp32, also inside a bf16 autocast region, which would otherwise run the product in
    bf16 whatever the inputs' dtype. For the few products whose rounding matters: contrastive
    logits, pool scores, similarities."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float()


class Prompts(nn.Module):
    """Stand-ins for a missing modality: none, k static prompts, or the top-k rows of a pool chosen
    by a query.

    Pool mode (paper eq. 4): scores = query . pool rows, the k best rows in score order become the
    prompts. The rows are gathered by indexing the pool parameter, so the selected rows receive
    gradients; the authors' code ran this under no_grad and its pools never learned. top-k itself
    has no gradient, which is fine: the rows learn to be good prompts, and since scores use the same
    rows, what they learn also moves which queries pick them.

    Two switches for the variants that the prompt-pool literature uses to keep a pool alive (issue
    13; the paper's form is the default): select="cosine" scores with L2-normalised query and keys,
    so that a row's norm cannot win every query; keys="separate" selects by a key per row and
    inserts the row (L2P's key-value pool, Wang et al. 2022): the keys then learn only through the
    pull term of `terms`.
    """

    def __init__(self, mode, pool_size, k, dim, select="dot", keys="shared"):
        super().__init__()
        self.mode, self.k, self.select = mode, k, select
        n = {"none": 0, "static": k, "pool": pool_size}[mode]
        # One parameter tensor per pool: every element is in the graph whenever the pool is used, so
        # DDP needs no unused-parameter search.
        self.weight = nn.Parameter(torch.zeros(n, dim)) if n else None
        self.key = (nn.Parameter(torch.zeros(n, dim)) if mode == "pool" and keys == "separate"
                    else None)

    def forward(self, query):
        """query: [B, D] -> prompts [B, k, D], the selected rows [B, k] (None unless pooled) and the
        pool's two auxiliary terms (None unless pooled), 0-dim tensors that pre-training adds to its
        loss when weighted:
        - pull = mean over the selections of 1 - cos(query, chosen key), the query detached: L2P's
          surrogate loss, which moves the chosen keys towards the queries that chose them;
        - balance = N * sum_i f_i * P_i with f_i the share of the selections that went to row i and
          P_i the mean softmax score of row i: the Switch Transformer's load-balancing loss (Fedus
          et al. 2022), 1 when every row is used alike, larger as the selections concentrate."""
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
        pull = 1 - F.cosine_similarity(query.detach().float()[:, None], keys[idx].float(),
                                       dim=-1).mean()
        ones = torch.ones(idx.numel(), device=idx.device)
        # no host read
        counts = torch.zeros(len(keys), device=idx.device).index_add_(0, idx.flatten(), ones)
        balance = len(keys) * (counts / idx.numel() * scores.softmax(-1).mean(0)).sum()
        return self.weight[idx], idx, {"pull": pull, "balance": balance}


@dataclass
class Encoding:
    # final-norm states of what the pass read: [B, Tv + Tl, D], or [B, 2, D], or [B, Tl, D]
    hidden: torch.Tensor
    pooled: torch.Tensor | None  # [B, 2D] IMG_CLS ++ CLS (None when the pass read only the text)
    n_visual: int  # Tv: where the textual part starts
    selected_visual: torch.Tensor | None  # [B, k_v] pool rows used for a missing image
    selected_textual: torch.Tensor | None  # [B, k_l] pool rows used for a missing text
    # what the pass read: "image", "text" or "pair" (the ITC head embeds the first two)
    modality: str
    # the pool's auxiliary terms (Prompts.forward) when a pool chose the prompts
    pool_terms: dict | None = None


class PTUnifier(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        # image side (ViT): patches -> linear projection, a learnable [IMG_CLS], learned 1-D
        # positions (paper eq. 11)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size,
                                          bias=cfg.patch_bias)
        # [3, 256] what uint8 pixels normalise to in each channel (data.normalize), kept here so
        # that images are normalised on the device; not persistent: the config holds the mean and
        # std, the checkpoint's weights need no copy of them
        self.register_buffer("pixel_values", pixel_table(cfg.pixel_mean, cfg.pixel_std),
                             persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, D))
        # text side (BERT): WordPiece embeddings + learned positions (paper eq. 12)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, D)
        self.position_embeddings = nn.Embedding(cfg.max_text_len, D)
        # BERT / RoBERTa normalise their embedding sum; only there when imported (--init-text), so
        # that it stays exact
        self.text_norm = (nn.LayerNorm(D, eps=cfg.text_norm_eps) if cfg.text_norm_eps
                          else nn.Identity())
        # modality type, added to every position of a part, prompts included: 0 = visual part, 1 =
        # textual part
        self.token_type_embeddings = nn.Embedding(2, D)
        self.visual_prompts = Prompts(cfg.prompt_mode, cfg.pool_size, cfg.k_v, D, cfg.pool_select,
                                      cfg.pool_keys)
        self.textual_prompts = Prompts(cfg.prompt_mode, cfg.pool_size, cfg.k_l, D, cfg.pool_select,
                                       cfg.pool_keys)
        # CLIP's ln_pre (timm: norm_pre) normalises the input sequence before the blocks; an
        # identity otherwise
        self.norm_pre = nn.LayerNorm(D, eps=cfg.norm_eps) if cfg.norm_pre else nn.Identity()
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.act,
                                          cfg.norm_eps)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        # pre-training heads. MLM: BERT's prediction head, decoder tied to word_embeddings (paper:
        # two-layer MLP heads)
        self.mlm_head = nn.Module()
        self.mlm_head.dense = nn.Linear(D, D)
        self.mlm_head.norm = nn.LayerNorm(D)
        self.mlm_head.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.itm_head = Mlp(2 * D, D, 2)
        # ITC: separate projections of the pooled image-only and text-only representations (CLIP
        # style)
        self.itc_image_proj = nn.Linear(2 * D, cfg.itc_dim)
        self.itc_text_proj = nn.Linear(2 * D, cfg.itc_dim)
        scale = torch.tensor(math.log(1 / cfg.itc_temperature))
        if cfg.learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        # The ids of "[CLS] [SEP]", a missing text's ends, kept on the model's device: a tensor made
        # from them in forward would be copied from the host, and that copy makes the host wait for
        # the device. Not saved.
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

    # ---- embeddings -----------------------------------------------------------------------------
    def embed_image(self, image):
        # the loaders' pixels [B, 1, H, W]: normalised here, bit-identical to the host
        if image.dtype == torch.uint8:
            image = normalize(image, self.pixel_values)
        x = self.patch_embed.proj(image).flatten(2).transpose(1, 2)  # [B, 3, H, W] -> [B, N, D]
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)  # [B, 1 + N, D]
        return x + self.pos_embed

    def embed_text(self, input_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        # [B, T, D]
        return self.text_norm(self.word_embeddings(input_ids) + self.position_embeddings(pos))

    def _query(self, x, mask, type_id):
        """The pool query of the present modality's embedded input x [B, T, D] (padding excluded
        through mask).

        The paper's (pool_query "input"): the mean (or max) of the input embeddings, the first token
        left out for the image (type_id 0: its [IMG_CLS] is a constant, the same for every image).
        pool_query "final": the final state of that first token after a pass of the modality alone
        through the tower, without gradient, as L2P queries with a frozen encoder's [CLS] (one more
        forward pass per prompted pass)."""
        if self.cfg.pool_query == "final":
            with torch.no_grad():
                h = self.norm_pre(x + self.token_type_embeddings.weight[type_id])
                # all-True costs SDPA its fastest kernel only
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
        (pre-training's collate does: batch["padded"]). None = read it from the mask, which makes
        the host wait for the device and breaks a torch.compile graph. Without padding no key mask
        is passed on: SDPA then takes its fastest kernel.

        read: the final states the caller uses, "all", "pooled" ([IMG_CLS] and [CLS]: the heads of
        ITC, ITM and the classification tasks) or "text" (the textual part: MLM). The last block
        then computes only those positions (all of them remain its keys and values): the same
        states, for 1/depth less of the work on the rest, e.g. 7% of a paired pass's FLOPs at the
        paper preset's 12 layers when only the pooled states are read."""
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
            # [CLS] and [SEP] embedded exactly as the empty text "[CLS] [SEP]" would be: with
            # prompt_mode none, a missing text is literally the empty text; prompts carry no
            # position embedding (they are an unordered set of queries)
            ends = self.embed_text(self.text_ends)  # [1, 2, D]
            ends = ends.expand(len(v), -1, -1)
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
        # the positions the last block computes: [IMG_CLS] and [CLS] are positions 0 and Tv, the
        # textual part Tv:
        rows = {"all": None, "pooled": slice(0, Tv + 1, Tv), "text": slice(Tv, None)}[read]
        for i, blk in enumerate(self.blocks):
            x = blk(x, key_mask, manual_attention, rows if i == len(self.blocks) - 1 else None)
        x = self.norm(x)
        first = {"all": Tv, "pooled": 1, "text": None}[read]  # where [CLS] is in x
        pooled = None if first is None else torch.cat([x[:, 0], x[:, first]], -1)  # [B, 2D]
        modality = ("pair" if image is not None and input_ids is not None
                    else "image" if image is not None else "text")
        return Encoding(x, pooled, Tv, sel_v, sel_l, modality, terms)

    def forward_vision(self, image, manual_attention=False):
        """The image tokens alone through the blocks, as in a plain ViT (no type embedding, no
        textual part): the states a pretrained vision encoder computes, so tests can check an
        imported one (pretrained.py) exactly."""
        x = self.norm_pre(self.embed_image(image))
        for blk in self.blocks:
            x = blk(x, None, manual_attention)
        return self.norm(x)  # [B, 1 + N, D]

    # ---- heads ----------------------------------------------------------------------------------
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
        retrieval and the API.

        It takes the pass's Encoding, not the inputs, so that pre-training can run the pass through
        its DDP wrapper (DDP reduces the gradients of passes made by its own forward only) and still
        read the pass's prompt choices."""
        if enc.modality == "pair":
            raise ValueError("ITC embeds an image-only or a text-only pass; an image-text pair is "
                             "ITM's input")
        proj = self.itc_image_proj if enc.modality == "image" else self.itc_text_proj
        return F.normalize(proj(enc.pooled).float(), dim=-1)

    def itc_scale(self):
        # No clamp here: a clamp in the forward pass has zero gradient past its bound, so a scale
        # pushed there would never come back. The parameter itself is clamped after every optimizer
        # step (clamp_logit_scale).
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self):
        """Keep the learned logit scale in [0, log 100], i.e. the scale in [1, 100], in place (CLIP,
        open_clip): at most 100 so that the logits cannot blow up, at least 1 so that the
        temperature stays below 1."""
        self.logit_scale.clamp_(0, math.log(100))

    # ---- parameter groups: the model is their one owner (the optimizer and the scripts ask it) --
    # Not the backbone: the prompt pools and the pre-training heads, trained at the head learning
    # rate.
    HEADS = ("visual_prompts", "textual_prompts", "mlm_head", "itm_head", "itc_", "logit_scale")
    # No weight decay (beyond norms and biases, which the optimizer recognises by their < 2 dims):
    # embeddings, position and type embeddings, prompt pools and the logit scale, as BERT, ViT and
    # CLIP train them.
    NO_DECAY = ("cls_token", "pos_embed", "word_embeddings", "position_embeddings",
                "token_type_embeddings", "visual_prompts", "textual_prompts", "logit_scale")

    def backbone_parameter_names(self):
        """The backbone = embeddings, blocks and norms; everything else (pools, heads, logit scale)
        is the 'rest'."""
        return {n for n, _ in self.named_parameters() if not n.startswith(self.HEADS)}

    def no_weight_decay(self):
        """Parameter names AdamW must not decay (timm's `no_weight_decay()` convention)."""
        return {n for n, _ in self.named_parameters() if n.startswith(self.NO_DECAY)}


def compile_model(model, backend="inductor"):
    """torch.compile of the model that train.py and finetune.py train (--compile), and that the
    bench times, with shapes dynamic from the first call.

    Texts are padded to the longest of each batch, so their length changes from batch to batch.
    By default dynamo compiles each kind of pass for the first batch's exact shapes, again with a
    dynamic length at the next length, and once more for the first batch without padding (`padded`
    is a Python bool): 10 graphs of PTUnifier.forward in pre-training, over dynamo's limit of 8 per
    function (torch._dynamo.config.recompile_limit). Past it, a pass that needs a new graph runs
    eagerly for the rest of the run, with one warning in the log. Dynamic from the start, pre-
    training makes 7 (tests/test_compile.py). backend: "eager" captures the same graphs without
    generating code (the test's)."""
    return torch.compile(model, dynamic=True, backend=backend)


# ---- resizing a trained backbone (fine-tuning at another image size or text length) -------------
def interpolate_pos_embed(pos_embed, grid):
    """[1, 1 + g*g, D] ViT position embeddings -> [1, 1 + grid*grid, D]: the [IMG_CLS] row kept, the
    patch grid resized as a 2-D image with bicubic interpolation (as timm and DeiT do when
    fine-tuning at another resolution)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    g = math.isqrt(patches.shape[1])
    if g * g != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch positions do not form a square grid")
    D = patches.shape[-1]
    x = patches.reshape(1, g, g, D).permute(0, 3, 1, 2).float()  # [1, D, g, g]
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos_embed.dtype)  # [1, grid*grid, D]
    return torch.cat([cls, x], 1)


def set_image_size(backbone, image_size):
    """Let a backbone read images of another size: interpolate its position embeddings, update its
    config."""
    patch = backbone.cfg.patch_size
    if image_size % patch:
        raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch}")
    with torch.no_grad():
        new = interpolate_pos_embed(backbone.pos_embed.data, image_size // patch)
    backbone.pos_embed = nn.Parameter(new)
    backbone.cfg.image_size = image_size


def resize_text_positions(weight, n):
    """[L, D] learned text position embeddings -> [n, D]. Shorter: the first n rows. Longer: the L
    learned rows, then rows 1..L-1 repeated in order (new row L + j = row 1 + j mod (L - 1)).

    Text positions are 1-D and learned, so there is no grid to interpolate as on the image side.
    Repeating the learned rows keeps every new position a vector the blocks have seen, and
    neighbours keep the offsets that attention learned over; Longformer extended RoBERTa's 512
    positions this way and found it far better than fresh rows (Beltagy et al. 2020, section 5).
    Copying only the last row would give every new position one vector (word order lost past L);
    extrapolating linearly would amplify the rows' noise with the distance. Row 0 is left out of the
    repeats: it only ever held [CLS], whose state is the pooled output.
    """
    L = weight.shape[0]
    if n < 2 or L < 2:
        raise ValueError(f"text position tables need at least 2 rows ([CLS], [SEP]): {L} -> {n}")
    if n <= L:
        return weight[:n].clone()
    body = weight[1:]  # [L - 1, D]
    return torch.cat([weight, body.repeat(math.ceil((n - L) / (L - 1)), 1)[:n - L]])  # [n, D]


def set_text_len(backbone, max_text_len):
    """Let a backbone read texts of another length: resize its text position embeddings, update its
    config."""
    with torch.no_grad():
        new = resize_text_positions(backbone.position_embeddings.weight.data, max_text_len)
    backbone.position_embeddings = nn.Embedding.from_pretrained(new, freeze=False)
    backbone.cfg.max_text_len = max_text_len


def flops_per_pass(cfg: ModelConfig, T, rows=None):
    """Training FLOPs (forward + backward) of one pass of the tower over a sequence of T positions:
    6*N*T for the weight matrices (N = 12*L*D^2 block weights, 2 FLOPs per multiply-add, x3 for
    forward + backward) plus 12*L*D*T^2 for attention scores and values (Kaplan et al. 2020;
    nanoGPT's estimate). rows: the positions the last block computes (PTUnifier.forward's `read`;
    None = all T): the other T - rows positions only get its keys and values."""
    L, D, rows = cfg.depth, cfg.dim, T if rows is None else rows
    per_token = 4 * D * D + 2 * int(D * cfg.mlp_ratio) * D  # one block's weights
    kv = 2 * D * D  # its key and value projections, computed at every position
    return (6 * ((L - 1) * per_token * T + kv * T + (per_token - kv) * rows)
            + 12 * D * T * ((L - 1) * T + rows))


def pretraining_passes(cfg: ModelConfig, objectives, text_len):
    """{pass: (positions, positions its last block computes)} of the passes a pre-training step runs
    per pair."""
    P = 1 + (cfg.image_size // cfg.patch_size) ** 2
    k_v, k_l = (0, 0) if cfg.prompt_mode == "none" else (cfg.k_v, cfg.k_l)
    passes = {}
    # image-only (patches + [CLS] k_l prompts [SEP]) and text-only passes, pooled states
    if "itc" in objectives:
        passes.update({"image-only": (P + k_l + 2, 2), "text-only": (1 + k_v + text_len, 2)})
    if "mlm" in objectives:  # the textual part's states
        passes["pair, MLM"] = (P + text_len, text_len)
    if "itm" in objectives:
        passes["pair, ITM"] = (P + text_len, 2)
    return passes


def flops_per_pair(cfg: ModelConfig, objectives, text_len):
    """Training FLOPs of one image-text pair in a pre-training step: the passes each objective runs
    (flops_per_pass), and MLM's head at the ~15% masked positions."""
    D = cfg.dim
    total = sum(flops_per_pass(cfg, T, rows)
                for T, rows in pretraining_passes(cfg, objectives, text_len).values())
    if "mlm" in objectives:
        total += 6 * (D * D + D * cfg.vocab_size) * 0.15 * text_len
    return total

