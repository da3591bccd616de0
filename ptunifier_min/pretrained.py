"""Start from public pretrained encoders (the paper's recipe): a ViT / CLIP vision tower and BERT /
RoBERTa embeddings.

    # sets cfg's numerics; refuses the flags that contradict them
    imported = prepare(cfg.init_vision, cfg.init_text, tok, cfg.model, print, cfg.given)
    model = PTUnifier(cfg.model)
    load_into(model, imported, print)

Local files only, nothing is downloaded: safetensors, or a PyTorch .bin / .pt read with
torch.load(weights_only=True) (no unpickling of code). The vision format is detected from the tensor
names:
- timm ViT (`patch_embed.proj`, `blocks.N.attn.qkv`, `norm`; the CLIP variants add `norm_pre`) - our
  own names;
- Hugging Face ViTModel (`embeddings.patch_embeddings.projection`,
  `encoder.layer.N.attention.attention.query`, ...);
- Hugging Face CLIPVisionModel / CLIPModel (`[vision_model.]embeddings.class_embedding`,
  `pre_layrnorm`, ...);
- OpenAI CLIP / open_clip (`visual.conv1`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
  `visual.ln_post`).
The single tower's blocks, patch embedding, [IMG_CLS] and positions come from the vision file; the
text file gives the word and position embeddings (and its embedding LayerNorm), nothing of its
encoder: a single tower has one set of blocks, and ViLT's recipe takes them from the ViT. Our final
norm takes CLIP's `ln_post` / `post_layernorm`, which CLIP applies to the CLS token only (timm's
`norm` and HF ViT's `layernorm` apply to all tokens, as ours does).
Images: our films are grayscale replicated to 3 channels (ImageTransform), so the RGB filters
are used as they are, and each channel is normalised with the encoder's own mean and std
(pixel_stats, kept in the model config): the encoder reads a film as its own image processor would
hand it the film's RGB copy.
Numerics the tensors cannot tell come from the files beside them or the format (FORMATS); timm and
OpenAI files do not record the head count: it is width / 64 unless --heads says otherwise
(choose_heads).
"""

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from .fields import flag

# The pixel statistics (per-channel mean, std of pixels in [0, 1]) of each format's usual training:
# CLIP's (OpenAI's clip.py, which open_clip and timm's CLIP weights keep); HF ViTImageProcessor's
# default (IMAGENET_STANDARD, what google/vit-* use); timm's IMAGENET_DEFAULT (what a timm-named
# file without timm's config.json most often is: DeiT, DINO, MAE; timm's Google ViTs say 0.5 in
# theirs).
CLIP_PIXELS = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
HALF_PIXELS = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
IMAGENET_PIXELS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# Per-format numerics the tensors cannot tell: (activation, LayerNorm epsilon, pixel statistics);
# files beside the weights override them (pixel_stats; a Hugging Face config.json for the first
# two). OpenAI-named files are taken as OpenAI CLIP (QuickGELU): an open_clip model trained with
# plain GELU (the LAION ones) has the same names; convert it to the HF CLIP format with its
# config.json instead.
FORMATS = {"timm": ("gelu", 1e-6, IMAGENET_PIXELS), "timm_clip": ("quick_gelu", 1e-5, CLIP_PIXELS),
           "hf_vit": ("gelu", 1e-12, HALF_PIXELS), "hf_clip": ("quick_gelu", 1e-5, CLIP_PIXELS),
           "openai_clip": ("quick_gelu", 1e-5, CLIP_PIXELS)}
# Files beside the weights that record the pixel statistics, tried in order:
# (file, section, mean key, std key)
PIXEL_FILES = [("preprocessor_config.json", None, "image_mean", "image_std"),  # transformers
               ("config.json", "pretrained_cfg", "mean", "std"),  # timm
               ("open_clip_config.json", "preprocess_cfg", "mean", "std")]  # open_clip
# The head width of every ViT and CLIP up to L: OpenAI's CLIP derives its head count this way
# (width // 64); timm and OpenAI files do not record it.
HEAD_WIDTH = 64
# one block's prefix in any of the formats
B = r"(?:blocks|encoder\.layers?|transformer\.resblocks)\.(\d+)\."
# source name (prefix removed) -> our name; "qkv:q" etc. are concatenated into one fused qkv
# in q, k, v order
RULES = {
    "hf_vit": [(r"embeddings\.cls_token", "cls_token"),
               (r"embeddings\.position_embeddings", "pos_embed"),
               (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
               (B + r"layernorm_before\.", r"blocks.\1.norm1."),
               (B + r"layernorm_after\.", r"blocks.\1.norm2."),
               (B + r"attention\.attention\.query\.", r"blocks.\1.attn.qkv:q."),
               (B + r"attention\.attention\.key\.", r"blocks.\1.attn.qkv:k."),
               (B + r"attention\.attention\.value\.", r"blocks.\1.attn.qkv:v."),
               (B + r"attention\.output\.dense\.", r"blocks.\1.attn.proj."),
               (B + r"intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
               (B + r"output\.dense\.", r"blocks.\1.mlp.fc2."),
               (r"layernorm\.", "norm.")],
    "hf_clip": [(r"embeddings\.class_embedding", "cls_token"),
                (r"embeddings\.position_embedding\.weight", "pos_embed"),
                (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
                (r"pre_layrnorm\.", "norm_pre."),
                (B + r"layer_norm1\.", r"blocks.\1.norm1."),
                (B + r"layer_norm2\.", r"blocks.\1.norm2."),
                (B + r"self_attn\.([qkv])_proj\.", r"blocks.\1.attn.qkv:\2."),
                (B + r"self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
                (B + r"mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
                (r"post_layernorm\.", "norm.")],
    "openai_clip": [(r"class_embedding", "cls_token"), (r"positional_embedding", "pos_embed"),
                    (r"conv1\.", "patch_embed.proj."), (r"ln_pre\.", "norm_pre."),
                    (B + r"ln_1\.", r"blocks.\1.norm1."), (B + r"ln_2\.", r"blocks.\1.norm2."),
                    (B + r"attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
                    (B + r"attn\.out_proj\.", r"blocks.\1.attn.proj."),
                    (B + r"mlp\.c_fc\.", r"blocks.\1.mlp.fc1."),
                    (B + r"mlp\.c_proj\.", r"blocks.\1.mlp.fc2."), (r"ln_post\.", "norm.")],
    "timm": [(r"(patch_embed\.proj\.|cls_token$|pos_embed$|norm_pre\.|norm\.)", r"\1"),
             (B + r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.", r"blocks.\1.\2.")],
}
# (format, marker key, prefixes it may carry) in the order they are tried
MARKERS = [("openai_clip", "conv1.weight", ("visual.", "module.visual.")),
           ("hf_clip", "embeddings.class_embedding", ("", "vision_model.")),
           ("hf_vit", "embeddings.patch_embeddings.projection.weight", ("", "vit.")),
           ("timm", "patch_embed.proj.weight", ("", "module.", "visual.trunk."))]
TEXT_PREFIXES = ("", "bert.", "roberta.")


@dataclass
class Imported:
    """What prepare() read, ready to load into a model built from the updated config."""

    state: dict = field(default_factory=dict)  # our parameter name -> tensor
    sources: list = field(default_factory=list)  # (what, path, unused source names)


def read_state_dict(path):
    """A flat {name: tensor} from safetensors (no code can run) or a .bin / .pt through
    torch.load(weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path}")
    if path.endswith(".safetensors"):
        return load_file(path)
    if not path.endswith((".bin", ".pt", ".pth")):
        raise ValueError(f"{path}: expected .safetensors, or .bin / .pt / .pth "
                         "(read with weights_only=True)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # weights_only refuses pickled code: say so instead of a long unpickler trace
    except Exception as e:
        raise ValueError(f"{path}: not a plain tensor file torch.load(weights_only=True) can read "
                         f"({e}); convert it to safetensors") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _summary(names):
    """Names with block numbers collapsed ('blocks.N.attn.qkv.weight x12'), for short printed
    lists."""
    counts = {}
    for n in names:
        k = re.sub(r"\.\d+\.", ".N.", n)
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(k + (f" x{c}" if c > 1 else "") for k, c in counts.items()) or "none"


def _beside(path, name):
    """The JSON file `name` in the weights file's folder, or {} when there is none."""
    file = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def _hf_config(path):
    """The Hugging Face config.json beside the weights (its vision part for a CLIPModel), or {}."""
    cfg = _beside(path, "config.json")
    return cfg.get("vision_config", cfg)


def pixel_stats(fmt, path):
    """(mean, std, file) of the pixels the vision encoder in `path` was trained on: from the first
    file beside it that records them (PIXEL_FILES), else the format's usual ones (file None)."""
    for name, section, mean_key, std_key in PIXEL_FILES:
        found = _beside(path, name)
        found = found.get(section, {}) if section else found
        if mean_key not in found:
            continue
        if std_key not in found:
            raise ValueError(f"{path}: its {name} has {mean_key} but no {std_key}")
        if name == "preprocessor_config.json":
            if not found.get("do_rescale", True) or found.get("rescale_factor", 1 / 255) != 1 / 255:
                raise ValueError(f"{path}: its {name} does not rescale pixels by 1/255 "
                                 "(do_rescale, rescale_factor), the only input range ours has")
            if not found.get("do_normalize", True):  # pixels in [0, 1] as they are
                return [0.0] * 3, [1.0] * 3, name
        # a single number is every channel's
        mean, std = ([float(x) for x in (v if isinstance(v, list) else [v] * 3)]
                     for v in (found[mean_key], found[std_key]))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"{path}: its {name} has {mean_key} {mean}, {std_key} {std}: "
                             "expected 3 channels, std > 0")
        return mean, std, name
    return *FORMATS[fmt][2], None


def convert_vision(src, path=""):
    """(format, our-named tensors, unused source names) of a vision state dict; the format comes
    from its names."""
    for fmt, marker, prefixes in MARKERS:
        prefix = next((p for p in prefixes if p + marker in src), None)
        if prefix is not None:
            break
    else:
        raise ValueError(f"{path}: not a ViT / CLIP vision checkpoint this version knows (timm, HF "
                         "ViTModel, HF CLIP, OpenAI CLIP / open_clip); first tensors: "
                         f"{', '.join(list(src)[:8])}")
    if fmt == "timm" and prefix + "norm_pre.weight" in src:
        fmt = "timm_clip"
    out, parts, unused = {}, {}, []
    for name, t in src.items():
        key = name[len(prefix):] if name.startswith(prefix) else None
        ours = None
        for pattern, repl in RULES["timm" if fmt == "timm_clip" else fmt]:
            if key is not None and re.fullmatch(pattern + r"(weight|bias)?", key):
                ours = re.sub(pattern, repl, key, count=1)
                break
        if ours is None:
            unused.append(name)
        elif ":" in ours:  # blocks.i.attn.qkv:q.weight -> concatenated below
            base, rest = ours.split(":")
            parts.setdefault(base + rest[1:], {})[rest[0]] = t
        else:
            out[ours] = t
    blocks = [n for n in unused if n.startswith(prefix) and re.match(B, n[len(prefix):])]
    # e.g. timm's LayerScale ls1.gamma: leaving it out would change what the blocks compute
    if blocks:
        raise ValueError(f"{path}: block tensors this version cannot map: {_summary(blocks)}")
    for name, qkv in parts.items():
        out[name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    D = out["cls_token"].numel()
    out["cls_token"] = out["cls_token"].reshape(1, 1, D)  # CLIP stores [D]
    out["pos_embed"] = out["pos_embed"].reshape(1, -1, D)  # CLIP stores [1 + N, D]
    return fmt, out, unused


def vision_settings(fmt, state, path):
    """The ModelConfig fields the file decides: shapes (checked against the config), numerics (set)
    and where the pixel statistics among them come from (pixel_stats)."""
    D, w = state["cls_token"].shape[-1], state["patch_embed.proj.weight"]
    depth = len({n.split(".")[1] for n in state if n.startswith("blocks.")})
    act, eps, _ = FORMATS[fmt]
    hf = _hf_config(path) if fmt.startswith("hf") else {}
    act, eps = hf.get("hidden_act", act), hf.get("layer_norm_eps", eps)
    shapes = {"dim": D, "depth": depth, "patch_size": w.shape[-1],
              "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / D}
    if "num_attention_heads" in hf:
        shapes["heads"] = hf["num_attention_heads"]
    if w.shape[1] != 3:
        raise ValueError(f"{path}: the patch projection takes {w.shape[1]} channels; our images "
                         "have 3 (grayscale replicated)")
    if act not in ("gelu", "quick_gelu"):
        raise ValueError(f"{path}: activation {act!r} (its config.json) is not one of gelu, "
                         "quick_gelu")
    mean, std, pixels_file = pixel_stats(fmt, path)
    numerics = {"norm_pre": "norm_pre.weight" in state, "act": act, "norm_eps": float(eps),
                "patch_bias": "patch_embed.proj.bias" in state, "pixel_mean": mean,
                "pixel_std": std}
    return shapes, numerics, pixels_file


def choose_heads(model_cfg, D, explicit, path, print0=print):
    """The head count of a vision file that does not record it (timm, OpenAI): width / 64 unless
    --heads was given (explicit), which is kept and, when it differs, warned about: the tensors load
    either way, and with the wrong count the imported blocks compute something else."""
    implied = D // HEAD_WIDTH if D % HEAD_WIDTH == 0 else None
    if explicit:
        if model_cfg.heads != implied:
            print0(f"init-vision: WARNING: {path} does not record its head count: --heads "
                   f"{model_cfg.heads} as given, not width {D} / {HEAD_WIDTH} = "
                   f"{D / HEAD_WIDTH:g}, the head count of ViT and CLIP up to L")
        return
    if implied is None:
        raise SystemExit(f"--init-vision {path} does not record its head count and its width {D} "
                         f"is not a multiple of {HEAD_WIDTH} (the head width of ViT and CLIP up "
                         "to L): pass --heads")
    model_cfg.heads = implied
    print0(f"init-vision: heads {implied} = width {D} / {HEAD_WIDTH} ({path} does not record it; "
           "ViT-H/14, g/14 and bigG/14 have 16: pass --heads for those)")


def prepare(init_vision, init_text, tok, model_cfg, print0=print, given=frozenset()):
    """Read the pretrained files and update model_cfg with what they need; returns the tensors for
    load_into.

    given: the model fields the command line set (parse_args' `given`). A flag that contradicts
    what the vision file or its format decides is refused, not overridden; except where the file
    says nothing and the format only suggests: the head count (choose_heads) and pixel statistics
    that no file beside the weights records (--pixel-mean / --pixel-std are then used)."""
    imported = Imported()
    if init_vision:
        fmt, state, unused = convert_vision(read_state_dict(init_vision), init_vision)
        shapes, numerics, pixels_file = vision_settings(fmt, state, init_vision)
        bad = [f"{k}: file {v:g} vs config {getattr(model_cfg, k):g} ({flag(k)})"
               for k, v in shapes.items() if v != getattr(model_cfg, k)]
        if bad:
            raise SystemExit(f"--init-vision {init_vision} has another architecture than the "
                             "config:\n  " + "\n  ".join(bad))
        if "heads" not in shapes:
            choose_heads(model_cfg, shapes["dim"], "heads" in given, init_vision, print0)
        pixels_from = pixels_file or f"the {fmt} format's usual statistics"
        # no file records them: the flags beat the format's usual ones
        user = sorted({"pixel_mean", "pixel_std"} & set(given)) if pixels_file is None else []
        for k in user:
            del numerics[k]
        if user:
            pixels_from = f"{' and '.join(map(flag, user))} as given, else {pixels_from}"
        refused = [f"{flag(k)} {getattr(model_cfg, k)!r} given, the file's {v!r}"
                   for k, v in numerics.items() if k in given and getattr(model_cfg, k) != v]
        if refused:
            raise SystemExit(f"--init-vision {init_vision} ({fmt}) computes with other numerics "
                             "than the flags say:\n  " + "\n  ".join(refused) +
                             "\ndrop these flags: the imported encoder needs its own")
        for k, v in numerics.items():
            setattr(model_cfg, k, v)
        grid = model_cfg.image_size // model_cfg.patch_size
        # the file's resolution differs from --image-size
        if state["pos_embed"].shape[1] != 1 + grid * grid:
            state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], grid)
        kept = {k: v for k, v in numerics.items() if not k.startswith("pixel")}
        print0(f"init-vision: {init_vision} is a {fmt} checkpoint ({kept}, heads "
               f"{model_cfg.heads}); pixels normalised with mean {model_cfg.pixel_mean}, std "
               f"{model_cfg.pixel_std} from {pixels_from}; positions for a {grid}x{grid} grid")
        imported.state.update(state)
        imported.sources.append(("vision", init_vision, unused))
    if init_text:
        state, unused, eps = convert_text(read_state_dict(init_text), tok, model_cfg, init_text)
        model_cfg.text_norm_eps = eps
        imported.state.update(state)
        imported.sources.append(("text", init_text, unused))
        print0(f"init-text: {init_text}: word and position embeddings and their LayerNorm (eps "
               f"{eps:g}); its encoder blocks are not used: the single tower's blocks come from "
               "the vision side")
    return imported


def convert_text(src, tok, model_cfg, path):
    """Our word / position embeddings and text_norm from a BERT or RoBERTa state dict (and the
    tokenizer's ids)."""
    prefix = next((p for p in TEXT_PREFIXES if p + "embeddings.word_embeddings.weight" in src),
                  None)
    if prefix is None:
        raise ValueError(f"{path}: no embeddings.word_embeddings.weight (BERT / RoBERTa); first "
                         f"tensors: {', '.join(list(src)[:8])}")
    e = {k[len(prefix) + len("embeddings."):]: v
         for k, v in src.items() if k.startswith(prefix + "embeddings.")}
    e = {k.replace("LayerNorm.gamma", "LayerNorm.weight")
          .replace("LayerNorm.beta", "LayerNorm.bias"): v
         for k, v in e.items()}  # the original TensorFlow BERT names
    words, pos = e["word_embeddings.weight"], e["position_embeddings.weight"]
    if words.shape[0] != tok.get_vocab_size():
        raise SystemExit(f"--init-text {path} has {words.shape[0]} word embeddings, the tokenizer "
                         f"(--tokenizer) {tok.get_vocab_size()} tokens: pass the model's own "
                         "vocabulary")
    if words.shape[1] != model_cfg.dim:
        raise SystemExit(f"--init-text {path} has width {words.shape[1]}, the model --dim "
                         f"{model_cfg.dim} (the vision encoder's): the widths must match")
    # RoBERTa numbers positions from padding_idx + 1 (its position ids skip the pad id); BERT from 0
    roberta = tok.token_to_id("<s>") is not None and tok.token_to_id("[CLS]") is None
    offset = tok.token_to_id("<pad>") + 1 if roberta else 0
    if offset + model_cfg.max_text_len > pos.shape[0]:
        raise SystemExit(f"--init-text {path} has {pos.shape[0] - offset} positions, "
                         f"--max-text-len is {model_cfg.max_text_len}")
    pos = pos[offset:offset + model_cfg.max_text_len]
    # every text of ours is segment 0: its embedding is a constant, fold it
    if "token_type_embeddings.weight" in e:
        pos = pos + e["token_type_embeddings.weight"][0]
    eps = _hf_config(path).get("layer_norm_eps", 1e-5 if roberta else 1e-12)
    state = {"word_embeddings.weight": words, "position_embeddings.weight": pos,
             "text_norm.weight": e["LayerNorm.weight"], "text_norm.bias": e["LayerNorm.bias"]}
    used = {prefix + "embeddings." + k
            for k in ("word_embeddings.weight", "position_embeddings.weight",
                      "token_type_embeddings.weight")}
    used |= {n for n in src if n.startswith(prefix + "embeddings.LayerNorm.")}
    return state, [n for n in src if n not in used], float(eps)


def single_file_tokenizer(tok, path, out, main=True):
    """RoBERTa's vocab.json + merges.txt -> <out>/tokenizer.json, so that every checkpoint carries
    its tokenizer as one file (checkpoints copy the tokenizer file in); other tokenizers are one
    file already."""
    if os.path.basename(path) != "vocab.json":
        return path
    new = os.path.join(out, "tokenizer.json")
    if main:
        os.makedirs(out, exist_ok=True)
        tok.save(new)
    return new


def load_into(model, imported, print0=print):
    """Copy the imported tensors into the model; print what was loaded, what stays new and what the
    files left."""
    if not imported.state:
        return
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in imported.state.items() if k in own and own[k].shape != v.shape]
    extra = [k for k in imported.state if k not in own]
    if bad or extra:
        raise SystemExit("pretrained tensors do not fit the model:\n  " + "\n  ".join(bad + extra))
    with torch.no_grad():
        for k, v in imported.state.items():
            own[k].copy_(v)
    for what, path, unused in imported.sources:
        print0(f"init-{what}: unused tensors of {os.path.basename(path)}: {_summary(unused)}")
    print0(f"pretrained: {len(imported.state)} tensors loaded; newly initialised: "
        f"{_summary(n for n in own if n not in imported.state)}")


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
