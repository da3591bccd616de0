"""pretrained.py: the four vision formats and the two text formats, imported from files that
`transformers` writes (randomly initialised small models, nothing downloaded), reproduce the
source's computations exactly; the pixel statistics, from uint8 films against transformers' own
image processors; head counts and numerics the files do not record; the refusals; the paper
preset's rates; train.py and finetune.py end to end from such files."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers

transformers = pytest.importorskip("transformers")

import finetune  # noqa: E402
import ptunifier_min  # noqa: E402
import train  # noqa: E402
# the shared tiny synthetic world fixture, every task prepared
from test_finetune import world  # noqa: E402, F401

from ptunifier_min.tokenizer import SPECIAL_TOKENS, encode_texts, load_tokenizer, special_ids
from ptunifier_min import checkpoint, pretrained  # noqa: E402
from ptunifier_min.config import (  # noqa: E402
    FINETUNE_PRESETS, PRESETS, FinetuneConfig, ModelConfig, TrainConfig, parse_args)
from ptunifier_min.model import PTUnifier, pixel_table  # noqa: E402
from ptunifier_min.pretrained import interpolate_pos_embed  # noqa: E402

TINY = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, max_text_len=24)
HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
          image_size=32, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
WORDS = ["pleural", "effusion", "no", "left", "small", "the", "heart", "is",
         "normal", "size", ".", "##s"]


def hf_vit(eps=1e-12):
    torch.manual_seed(0)
    return transformers.ViTModel(transformers.ViTConfig(**HF, layer_norm_eps=eps)).eval()


def hf_clip():
    torch.manual_seed(0)
    cfg = {k: v for k, v in HF.items() if "dropout" not in k}
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg)).eval()


def hub_state(model, folder):
    """The tensors as save_pretrained writes them: the names of the files on the Hugging Face hub
    (transformers 5 renames some modules in memory, never in the files)."""
    model.save_pretrained(folder)
    return load_file(os.path.join(folder, "model.safetensors"))


def randomise_norms(model):
    """transformers initialises LayerNorms to (1, 0) and some biases to 0: random
    values make the test see them."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))


def vit_to_timm(sd):
    """HF ViTModel names -> timm's (what a timm checkpoint holds), q/k/v fused in that order."""
    out = {"cls_token": sd["embeddings.cls_token"],
           "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
           "head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)}
    for i in range(2):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for w in ("weight", "bias"):
            qkv = [sd[h + f"attention.attention.{n}.{w}"] for n in ("query", "key", "value")]
            out[b + f"attn.qkv.{w}"] = torch.cat(qkv)
            for src, dst in (("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
                             ("attention.output.dense", "attn.proj"),
                             ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")):
                out[b + f"{dst}.{w}"] = sd[h + f"{src}.{w}"]
    return out


def clip_to(sd, names):
    """HF CLIP vision names (no prefix) -> timm's CLIP names or OpenAI's `visual.*` names."""
    timm = names == "timm"
    out = {("cls_token" if timm else "visual.class_embedding"): sd["embeddings.class_embedding"],
           ("pos_embed" if timm else "visual.positional_embedding"):
               sd["embeddings.position_embedding.weight"],
           ("patch_embed.proj.weight" if timm else "visual.conv1.weight"):
               sd["embeddings.patch_embedding.weight"]}
    for w in ("weight", "bias"):
        out[f"norm_pre.{w}" if timm else f"visual.ln_pre.{w}"] = sd[f"pre_layrnorm.{w}"]
        out[f"norm.{w}" if timm else f"visual.ln_post.{w}"] = sd[f"post_layernorm.{w}"]
    if not timm:
        # CLIP's projection to the joint space: listed as unused
        out["visual.proj"] = torch.zeros(32, 16)
    for i in range(2):
        h = f"encoder.layers.{i}."
        b = f"blocks.{i}." if timm else f"visual.transformer.resblocks.{i}."
        table = (("layer_norm1", "norm1", "ln_1"), ("layer_norm2", "norm2", "ln_2"),
                 ("self_attn.out_proj", "attn.proj", "attn.out_proj"),
                 ("mlp.fc1", "mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.fc2", "mlp.c_proj"))
        for w in ("weight", "bias"):
            qkv = torch.cat([sd[h + f"self_attn.{n}_proj.{w}"] for n in "qkv"])
            out[b + (f"attn.qkv.{w}" if timm else f"attn.in_proj_{w}")] = qkv
            for src, t, o in table:
                out[b + f"{t if timm else o}.{w}"] = sd[h + f"{src}.{w}"]
    return out


def imported_model(path, lines=None, given=("heads",), **over):
    """given: the flags the user gave; by default --heads, which a user of a timm or OpenAI file
    must give for the tiny sources' 16-wide heads (such files do not record the head count)."""
    cfg = ModelConfig(**{**TINY, **over})
    say = ((lambda *a: lines.append(" ".join(map(str, a)))) if lines is not None
           else (lambda *a: None))
    imported = pretrained.prepare(path, "", None, cfg, say, frozenset(given))
    model = PTUnifier(cfg).eval()
    pretrained.load_into(model, imported, say)
    return model


def image(B=3, size=32):
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1))


# ---- vision: every format exact on the image tokens ----------------------------------------------
def test_hf_vit_safetensors_and_prefixed_bin_are_exact(tmp_path):
    src = hf_vit()
    randomise_norms(src)
    src.save_pretrained(tmp_path / "vit")  # model.safetensors + config.json (eps 1e-12, gelu)
    with torch.no_grad():
        ref = src(pixel_values=image()).last_hidden_state
    lines = []
    model = imported_model(str(tmp_path / "vit" / "model.safetensors"), lines)
    assert ((model.cfg.norm_eps, model.cfg.act, model.cfg.norm_pre, model.cfg.patch_bias)
            == (1e-12, "gelu", False, True))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_vision(image()), ref, atol=1e-5, rtol=0)
    out = "\n".join(lines)
    assert "hf_vit" in out and "pooler.dense.weight" in out  # the pooler is listed as unused
    assert "itm_head" in out and "word_embeddings" in out  # ours, not in the file: listed as new
    # ViTForImageClassification-style `vit.` prefix in a .bin read with weights_only
    os.makedirs(tmp_path / "bin")
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "vit" / "config.json").read_text())
    hub = load_file(tmp_path / "vit" / "model.safetensors")
    torch.save({f"vit.{k}": v for k, v in hub.items()}, tmp_path / "bin" / "pytorch_model.bin")
    with torch.no_grad():
        torch.testing.assert_close(imported_model(str(tmp_path / "bin" / "pytorch_model.bin"))
                                   .forward_vision(image()), ref, atol=1e-5, rtol=0)


def test_timm_named_vit_is_exact(tmp_path):
    src = hf_vit(eps=1e-6)  # timm's ViT epsilon
    randomise_norms(src)
    save_file(vit_to_timm(hub_state(src, tmp_path / "hf")), str(tmp_path / "timm.safetensors"))
    lines = []
    model = imported_model(str(tmp_path / "timm.safetensors"), lines)
    assert ((model.cfg.norm_eps, model.cfg.act) == (1e-6, "gelu")
            and "head.weight" in "\n".join(lines))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_vision(image()),
                                   src(pixel_values=image()).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", ["hf_clip_vision", "hf_clip_model", "timm_clip", "openai_clip"])
def test_clip_formats_are_exact(fmt, tmp_path):
    src = hf_clip()
    randomise_norms(src)
    sd = {k.removeprefix("vision_model."): v for k, v in hub_state(src, tmp_path).items()}
    if fmt == "hf_clip_vision":
        path = tmp_path / "model.safetensors"
    else:
        path = tmp_path / "w.safetensors"
        # a CLIPModel holds the vision tower under vision_model. next to the text tower
        if fmt == "hf_clip_model":
            state = {**{f"vision_model.{k}": v for k, v in sd.items()},
                     "logit_scale": torch.tensor(2.6),
                     "text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(4, 4)}
        else:
            state = clip_to(sd, "timm" if fmt == "timm_clip" else "openai")
        save_file(state, str(path))
    lines = []
    model = imported_model(str(path), lines)
    cfg = model.cfg
    assert ((cfg.norm_pre, cfg.act, cfg.norm_eps, cfg.patch_bias)
            == (True, "quick_gelu", 1e-5, False))
    with torch.no_grad():
        out = src(pixel_values=image())
        # CLIP applies post_layernorm to the CLS token only (pooler_output); ours
        # is the final norm of every token
        ref = src.post_layernorm(out.last_hidden_state)
        torch.testing.assert_close(ref[:, 0], out.pooler_output)
        torch.testing.assert_close(model.forward_vision(image()), ref, atol=1e-5, rtol=0)
    if fmt == "openai_clip":
        assert "visual.proj" in "\n".join(lines)


# ---- pixels: each start normalises as its source was trained -------------------------------------
def films(B=3, size=32):
    """uint8 grayscale films [B, 1, S, S], what our loaders yield."""
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (B, 1, size, size), dtype=torch.uint8, generator=g)


def processed(processor, px):
    """The films through transformers' own image processor, as a user holds them (RGB images of
    the gray film)."""
    images = [Image.fromarray(p[0].numpy()).convert("RGB") for p in px]
    return processor(images=images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("fmt", ["hf_vit", "hf_clip", "openai_clip"])
def test_uint8_films_equal_the_source_fed_by_its_own_image_processor(fmt, tmp_path):
    if fmt == "hf_vit":  # an ImageNet-normalised ViT: its preprocessor_config.json says so
        src = hf_vit()
        processor = transformers.ViTImageProcessor(do_resize=False, image_mean=IMAGENET[0],
                                                   image_std=IMAGENET[1])
    else:  # CLIPImageProcessor's defaults: CLIP's mean and std
        src = hf_clip()
        processor = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False)
    randomise_norms(src)
    path = tmp_path / "model.safetensors"
    if fmt == "openai_clip":  # OpenAI's names and no file beside: the format's statistics
        sd = hub_state(src, tmp_path / "hf")
        save_file(clip_to({k.removeprefix("vision_model."): v for k, v in sd.items()}, "openai"),
                  str(path))
    else:  # as save_pretrained leaves them: weights, config.json, preprocessor_config.json
        src.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
    lines = []
    model = imported_model(str(path), lines)
    assert (model.cfg.pixel_mean, model.cfg.pixel_std) == (list(processor.image_mean),
                                                           list(processor.image_std))
    source = "openai_clip format's usual" if fmt == "openai_clip" else "preprocessor_config.json"
    assert source in "\n".join(lines)
    with torch.no_grad():
        out = src(pixel_values=processed(processor, films()))
        ref = out.last_hidden_state
        ref = ref if fmt == "hf_vit" else src.post_layernorm(ref)  # CLIP: our final norm
        torch.testing.assert_close(model.forward_vision(films()), ref, atol=1e-5, rtol=0)


def test_pixel_statistics_come_from_a_file_beside_the_weights_else_the_format(tmp_path):
    os.makedirs(tmp_path / "timm")
    path = str(tmp_path / "timm" / "model.safetensors")
    save_file(vit_to_timm(hub_state(hf_vit(eps=1e-6), tmp_path / "hf")), path)
    lines = []
    cfg = imported_model(path, lines).cfg
    assert [cfg.pixel_mean, cfg.pixel_std] == list(IMAGENET)  # a timm file without timm's config
    assert "timm format's usual statistics" in "\n".join(lines)
    # timm's config.json (pretrained_cfg), open_clip's open_clip_config.json (preprocess_cfg), e.g.
    # an open_clip model around a timm trunk
    half, clip = ([0.5] * 3, [0.5] * 3), ([0.48145466, 0.4578275, 0.40821073], [0.2, 0.3, 0.4])
    for name, section, stats in (("config.json", "pretrained_cfg", half),
                                 ("open_clip_config.json", "preprocess_cfg", clip)):
        file = tmp_path / "timm" / name
        file.write_text(json.dumps({section: {"mean": stats[0], "std": stats[1]}}))
        cfg = imported_model(path).cfg
        assert [cfg.pixel_mean, cfg.pixel_std] == list(stats)
        os.remove(file)
    # flags may say what no file does; against a file, they are refused
    lines = []
    cfg = imported_model(path, lines, given=("heads", "pixel_mean"), pixel_mean=[0.5] * 3).cfg
    assert [cfg.pixel_mean, cfg.pixel_std] == [[0.5] * 3, IMAGENET[1]]
    assert "from --pixel-mean as given, else the timm format's usual" in "\n".join(lines)
    pre = tmp_path / "timm" / "preprocessor_config.json"
    pre.write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.3] * 3}))
    with pytest.raises(SystemExit, match=r"--pixel-mean \[0.5, 0.5, 0.5\] given, the file's \[0.4"):
        imported_model(path, given=("heads", "pixel_mean"), pixel_mean=[0.5] * 3)
    pre.write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.3] * 3,
                               "do_normalize": False}))
    assert [imported_model(path).cfg.pixel_mean, imported_model(path).cfg.pixel_std] == \
        [[0.0] * 3, [1.0] * 3]  # pixels in [0, 1] as they are
    pre.write_text(json.dumps({"image_mean": [0.4] * 3, "image_std": [0.3] * 3,
                               "do_rescale": False}))
    with pytest.raises(ValueError, match="does not rescale pixels by 1/255"):
        imported_model(path)


# ---- heads and numerics: what the file says, or a flag that is refused or warned about ----------
def test_heads_a_file_does_not_record_are_width_over_64_and_another_flag_is_warned_about(tmp_path):
    torch.manual_seed(0)  # heads 64 wide (dim 128, 2 heads), as every ViT and CLIP up to L
    src = transformers.ViTModel(transformers.ViTConfig(
        **{**HF, "hidden_size": 128, "intermediate_size": 512}, layer_norm_eps=1e-6)).eval()
    randomise_norms(src)
    path = str(tmp_path / "timm.safetensors")  # timm's names: no head count in the file
    save_file(vit_to_timm(hub_state(src, tmp_path / "hf")), path)
    lines = []
    model = imported_model(path, lines, given=(), dim=128, heads=4)  # 4: the preset's, not given
    assert model.cfg.heads == 2 and "heads 2 = width 128 / 64" in "\n".join(lines)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_vision(image()),
                                   src(pixel_values=image()).last_hidden_state, atol=1e-5, rtol=0)
    lines = []
    model = imported_model(path, lines, given=("heads",), dim=128, heads=4)
    said = "\n".join(lines)
    assert model.cfg.heads == 4 and "WARNING" in said
    assert "--heads 4 as given, not width 128 / 64 = 2" in said
    # 16-wide heads (the tiny ViT): no rule applies, the user must say
    narrow = str(tmp_path / "narrow.safetensors")
    save_file(vit_to_timm(hub_state(hf_vit(), tmp_path / "hf32")), narrow)
    with pytest.raises(SystemExit, match="width 32 is not a multiple of 64.*pass --heads"):
        imported_model(narrow, given=())


@pytest.mark.parametrize("flag,value,said", [
    ("--act", "gelu", "--act 'gelu' given, the file's 'quick_gelu'"),
    ("--norm-eps", "1e-6", "--norm-eps 1e-06 given, the file's 1e-05")])
def test_a_flag_contradicting_the_files_numerics_is_refused_naming_both(flag, value, said,
                                                                         tmp_path):
    hf_clip().save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    argv = ["--preset", "tiny", "--init-vision", path]
    cfg = parse_args(TrainConfig, PRESETS, argv + [flag, value])
    with pytest.raises(SystemExit) as e:
        pretrained.prepare(cfg.init_vision, "", None, cfg.model, lambda *a: None, cfg.given)
    assert said in str(e.value)
    # the file's own value, given or not, is fine
    for extra in ([], [flag, {"--act": "quick_gelu", "--norm-eps": "1e-5"}[flag]]):
        cfg = parse_args(TrainConfig, PRESETS, argv + extra)
        pretrained.prepare(cfg.init_vision, "", None, cfg.model, lambda *a: None, cfg.given)
        assert (cfg.model.act, cfg.model.norm_eps) == ("quick_gelu", 1e-5)


def test_positions_interpolated_to_image_size(tmp_path):
    src = hf_vit()
    src.save_pretrained(tmp_path)
    model = imported_model(str(tmp_path / "model.safetensors"), image_size=48)
    expected = interpolate_pos_embed(src.embeddings.position_embeddings.detach(), 6)
    assert model.pos_embed.shape == (1, 37, 32)
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    model.forward_vision(image(size=48))


def test_refusals_name_the_problem(tmp_path):
    src = hf_vit()
    src.save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    with pytest.raises(SystemExit, match="dim: file 32 vs config 64"):
        imported_model(path, dim=64, heads=2)
    # a pickled module: refused, not executed
    torch.save({"w": torch.nn.Linear(2, 2)}, tmp_path / "pickled.bin")
    with pytest.raises(ValueError, match="weights_only"):
        pretrained.read_state_dict(str(tmp_path / "pickled.bin"))
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a ViT / CLIP vision checkpoint"):
        imported_model(str(tmp_path / "other.safetensors"))
    sd = vit_to_timm(load_file(path))
    # LayerScale: ignoring it would change the function, so refuse
    sd["blocks.0.ls1.gamma"] = torch.ones(32)
    save_file(sd, str(tmp_path / "ls.safetensors"))
    with pytest.raises(ValueError, match="ls1.gamma"):
        imported_model(str(tmp_path / "ls.safetensors"))


# ---- text: BERT (WordPiece) and RoBERTa (byte-level BPE) embeddings ------------------------------
def bert_files(tmp_path):
    os.makedirs(tmp_path, exist_ok=True)
    vocab = SPECIAL_TOKENS + WORDS
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    src = transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), hidden_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=64,
                                                         max_position_embeddings=40)).eval()
    randomise_norms(src)
    src.save_pretrained(tmp_path)
    return src


def roberta_files(tmp_path):
    os.makedirs(tmp_path, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = [("p", "l"), ("e", "u"), ("pl", "eu"), ("Ġ", "e"), ("Ġe", "f")]
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + alphabet + ["".join(m) for m in merges] + ["<mask>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n"
                                         + "\n".join(" ".join(m) for m in merges) + "\n")
    torch.manual_seed(0)
    src = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64,
        # roberta-base
        max_position_embeddings=40, pad_token_id=1, type_vocab_size=1, layer_norm_eps=1e-5)).eval()
    randomise_norms(src)
    src.save_pretrained(tmp_path)
    return src


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_text_embeddings_equal_the_source(kind, tmp_path):
    src = bert_files(tmp_path) if kind == "bert" else roberta_files(tmp_path)
    tok = load_tokenizer(str(tmp_path / ("vocab.txt" if kind == "bert" else "vocab.json")))
    ids, _ = encode_texts(tok, ["left pleural effusion"], 24)
    sp = special_ids(tok)
    if kind == "roberta":
        assert [sp[k] for k in ("cls", "sep", "pad", "mask")] == [0, 2, 1, len(tok.get_vocab()) - 1]
        ref_tok = transformers.RobertaTokenizer(str(tmp_path / "vocab.json"),
                                                str(tmp_path / "merges.txt"))
        assert ids[0].tolist() == ref_tok("left pleural effusion")["input_ids"]
    cfg = ModelConfig(**TINY, vocab_size=tok.get_vocab_size(), cls_id=sp["cls"], sep_id=sp["sep"])
    lines = []
    imported = pretrained.prepare("", str(tmp_path / "model.safetensors"), tok, cfg, lines.append)
    model = PTUnifier(cfg).eval()
    pretrained.load_into(model, imported, lines.append)
    assert cfg.text_norm_eps == (1e-12 if kind == "bert" else 1e-5)
    # the text encoder's blocks: unused
    assert "encoder.layer.N.attention.self.query.weight" in "\n".join(lines)
    with torch.no_grad():
        # RoBERTa's own position ids start at padding_idx + 1 = 2 for an
        # unpadded text: the import shifted ours
        torch.testing.assert_close(model.embed_text(ids),
                                   src.embeddings(input_ids=ids), atol=1e-6, rtol=0)
    bad = ModelConfig(**{**TINY, "dim": 64}, vocab_size=tok.get_vocab_size())
    with pytest.raises(SystemExit, match="widths must match"):
        pretrained.prepare("", str(tmp_path / "model.safetensors"), tok, bad, lines.append)


def test_default_model_is_unchanged_by_the_new_fields():
    """No norm_pre, no text norm, the patch bias: the parameter list of a
    default model is what it was."""
    names = set(PTUnifier(ModelConfig()).state_dict())
    assert (not any(n.startswith(("norm_pre", "text_norm")) for n in names)
            and "patch_embed.proj.bias" in names)


def test_paper_preset_takes_the_papers_rates_only_with_init_vision():
    base = ["--preset", "paper"]
    cfg = parse_args(TrainConfig, PRESETS, base)
    assert (cfg.lr_backbone, cfg.lr_head) == (1e-4, 5e-4)
    cfg = parse_args(TrainConfig, PRESETS, base + ["--init-vision", "clip.safetensors"])
    assert (cfg.lr_backbone, cfg.lr_head) == (1e-5, 5e-5)
    cfg = parse_args(TrainConfig, PRESETS,
                     base + ["--init-vision", "c.safetensors", "--lr-backbone", "2e-5"])
    assert (cfg.lr_backbone, cfg.lr_head) == (2e-5, 5e-5)


# ---- end to end ----------------------------------------------------------------------------------
def test_train_and_finetune_start_from_transformers_files(world, tmp_path, capsys):  # noqa: F811
    synth_root = world[0]  # the tiny world every task is prepared in (test_finetune.py)
    clip = hf_clip()
    clip.save_pretrained(tmp_path / "clip")
    roberta_files(tmp_path / "rob")
    bert_files(tmp_path / "bert")
    out = tmp_path / "pre"
    model = train.main(["--preset", "tiny", "--synth-root", synth_root, "--out", str(out),
                        "--eval-pairs", "0", "--steps", "2",
                        "--init-vision", str(tmp_path / "clip" / "model.safetensors"),
                        "--init-text", str(tmp_path / "rob" / "model.safetensors"),
                        "--tokenizer", str(tmp_path / "rob" / "vocab.json"),
                        "--whole-word", "true"])  # train.py's words for RoBERTa's BPE
    said = capsys.readouterr().out
    assert "hf_clip checkpoint" in said and "newly initialised" in said
    ckpt = checkpoint.resolve_checkpoint(str(out))
    saved = checkpoint.read_checkpoint_config(ckpt)["config"]["model"]
    assert saved["norm_pre"] and saved["act"] == "quick_gelu" and saved["text_norm_eps"] == 1e-5
    # CLIP's pixel statistics, kept by the checkpoint for the API and fine-tuning with --init
    clip_pixels = list(pretrained.CLIP_PIXELS)
    assert [saved["pixel_mean"], saved["pixel_std"]] == clip_pixels
    assert torch.equal(ptunifier_min.load(str(out)).backbone.pixel_values,
                       pixel_table(*clip_pixels))
    init = parse_args(FinetuneConfig, FINETUNE_PRESETS, ["--task", "chexpert", "--init", str(out)])
    finetune.resolve_init(init, print)
    assert [init.model.pixel_mean, init.model.pixel_std] == clip_pixels
    assert (load_tokenizer(checkpoint.checkpoint_tokenizer(ckpt)).get_vocab_size()
            == model.cfg.vocab_size)
    fin = tmp_path / "fin"
    finetune.main(["--preset", "tiny", "--synth-root", synth_root, "--task", "chexpert",
                   "--out", str(fin), "--steps", "2", "--eval-every", "2",
                   "--init-vision", str(tmp_path / "clip" / "model.safetensors"),
                   "--init-text", str(tmp_path / "bert" / "model.safetensors"),
                   "--tokenizer", str(tmp_path / "bert" / "vocab.txt")])
    result = json.loads((fin / "results.json").read_text())
    assert result["init"] == "scratch" and result["config"]["model"]["norm_pre"]
    assert result["config"]["model"]["pixel_mean"] == clip_pixels[0]
    assert "hf_clip checkpoint" in capsys.readouterr().out
