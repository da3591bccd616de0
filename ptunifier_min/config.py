"""One typed config for the whole project: the model, pre-training and fine-tuning, with named presets.

Every field carries its `help` text; `parse_args` turns the fields into type-checked command-line flags
(unknown flags are an error), applies the chosen preset and then the flags the user gave, in that order:

    cfg = parse_args(TrainConfig, PRESETS, argv, description=...)

Presets:
- `cpu` (default of `python train.py`): a small single tower that pre-trains on the synthetic world in ~10 min on 2 cores;
- `tiny`: the smallest thing that still exercises every code path, for tests;
- `paper`: the paper's scale (hidden 768, 12 layers, 12 heads, image 288, patch 16, pools of 1,024, k_v 49, k_l 32).
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass, field


def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """The single-tower PTUnifier backbone and its pre-training heads (method.md)."""

    image_size: int = _f(48, "input image side in pixels (resize + center crop)")
    patch_size: int = _f(8, "ViT patch side in pixels")
    vocab_size: int = _f(4096, "WordPiece vocabulary size (set from the tokenizer when one is loaded)")
    cls_id: int = _f(2, "[CLS] token id (set from the tokenizer)")
    sep_id: int = _f(3, "[SEP] token id (set from the tokenizer)")
    max_text_len: int = _f(32, "text length in tokens, [CLS] and [SEP] included")
    dim: int = _f(128, "hidden size D")
    depth: int = _f(4, "number of Transformer blocks")
    heads: int = _f(4, "attention heads (dim must divide by heads)")
    mlp_ratio: float = _f(4.0, "MLP hidden size / dim")
    dropout: float = _f(0.0, "dropout in attention output and MLP")
    prompt_mode: str = _f("pool", "prompts for a missing modality: none | static | pool (paper section 3.2)")
    pool_size: int = _f(64, "prompts per modality pool (prompt_mode=pool)")
    k_v: int = _f(8, "visual prompts used when the image is missing")
    k_l: int = _f(8, "textual prompts used when the text is missing")
    query_pooling: str = _f("mean", "how the present modality's embeddings become the pool query: mean | max")
    itc_dim: int = _f(128, "ITC projection size")
    itc_temperature: float = _f(0.07, "initial ITC temperature (logit scale = log(1/T), clamped at log 100)")
    learn_temperature: bool = _f(True, "learn the ITC temperature (CLIP style); false keeps it fixed")

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.prompt_mode not in ("none", "static", "pool"):
            raise ValueError(f"prompt_mode must be none, static or pool, got {self.prompt_mode!r}")
        if self.query_pooling not in ("mean", "max"):
            raise ValueError(f"query_pooling must be mean or max, got {self.query_pooling!r}")
        if self.prompt_mode == "pool" and max(self.k_v, self.k_l) > self.pool_size:
            raise ValueError(f"k_v={self.k_v} and k_l={self.k_l} cannot exceed pool_size={self.pool_size}")


@dataclass
class RunConfig:
    """What pre-training and fine-tuning share: data, optimisation, precision, logging and checkpoints."""

    data_root: str = _f("", "folder of prepared datasets (prepare.py output); empty = the synthetic world, made on demand")
    synth_root: str = _f("data/synthetic", "where the synthetic world and its prepared form live when data_root is empty")
    synth_scale: str = _f("default", "size of the synthetic world made on demand: tiny | small | default")
    tokenizer: str = _f("", "tokenizer.json or BERT vocab.txt; empty = <prepared root>/tokenizer.json (trained if missing)")
    out: str = _f("runs/pretrain", "output folder: config.json, log.jsonl, checkpoints")
    resume: str = _f("", "checkpoint folder to continue from (weights, optimizer, scheduler, step, RNG, data position)")
    seed: int = _f(0, "base seed; rank r uses seed + r for its own randomness")
    steps: int = _f(1000, "optimizer steps")
    batch_size: int = _f(64, "samples per device per micro-step")
    grad_accum: int = _f(1, "micro-steps per optimizer step")
    lr_backbone: float = _f(1e-3, "peak learning rate of the backbone (embeddings, blocks, final norm)")
    lr_head: float = _f(1e-3, "peak learning rate of everything else (prompt pools, heads, logit scale)")
    weight_decay: float = _f(0.01, "AdamW weight decay (never on norms, biases, embeddings, pools, logit scale)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    warmup_frac: float = _f(0.1, "fraction of steps of linear warm-up, then linear decay to 0")
    grad_clip: float = _f(1.0, "max global gradient norm (0 = off)")
    precision: str = _f("auto", "bf16 | fp32 | auto (bf16 autocast on CUDA, fp32 on CPUs without fast bf16)")
    compile: bool = _f(False, "torch.compile the model")
    num_workers: int = _f(2, "data-loader worker processes per rank")
    random_resized_crop: bool = _f(False, "random-resized-crop augmentation for training images")
    log_every: int = _f(20, "optimizer steps between log lines")
    save_every: int = _f(500, "optimizer steps between checkpoints (one is always written at the end)")
    max_skips: int = _f(5, "consecutive non-finite steps tolerated before training stops")


@dataclass
class TrainConfig(RunConfig):
    """Pre-training (train.py)."""

    preset: str = _f("cpu", "named preset, applied before the flags: cpu | tiny | paper")
    data: str = _f("roco,medicat,mimic_cxr", "comma-separated pre-training sets (prepared folder names)")
    objectives: str = _f("mlm,itm,itc", "comma-separated subset of mlm,itm,itc (the paper's Table 3 ablation)")
    w_mlm: float = _f(1.0, "weight of the MLM loss")
    w_itm: float = _f(1.0, "weight of the ITM loss")
    w_itc: float = _f(1.0, "weight of the ITC loss")
    mlm_prob: float = _f(0.15, "share of real text tokens masked for MLM (80% [MASK], 10% random, 10% kept)")
    whole_word: bool = _f(False, "mask whole words (a token and its ## continuations) together")
    itm_hard_negatives: bool = _f(False, "ITM negatives sampled from ITC similarities (ALBEF) instead of uniformly")
    eval_pairs: int = _f(2000, "ROCO test pairs for the closing zero-shot retrieval (0 = skip)")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})

    def __post_init__(self):
        self.objective_set()
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")

    def objective_set(self):
        names = [o for o in self.objectives.split(",") if o]
        bad = set(names) - {"mlm", "itm", "itc"}
        if bad or not names:
            raise ValueError(f"--objectives must be a non-empty subset of mlm,itm,itc, got {self.objectives!r}")
        return set(names)


# Presets override defaults; user flags override presets. Model keys and run keys share one flat namespace.
PRESETS = {
    "cpu": {},
    "tiny": dict(image_size=32, patch_size=8, max_text_len=24, dim=32, depth=2, heads=2, pool_size=8, k_v=4, k_l=3,
                 itc_dim=16, steps=30, batch_size=8, log_every=5, save_every=20, num_workers=0, synth_scale="tiny",
                 eval_pairs=64, lr_backbone=1e-3, lr_head=1e-3),
    # The paper's architecture and schedule. Its LRs (1e-5 / 5e-5) assume encoders initialised from CLIP and RoBERTa; we
    # cannot download those, so the backbone trains from scratch with larger rates.
    "paper": dict(image_size=288, patch_size=16, max_text_len=48, dim=768, depth=12, heads=12, pool_size=1024, k_v=49,
                  k_l=32, itc_dim=256, steps=100_000, batch_size=32, lr_backbone=1e-4, lr_head=5e-4, num_workers=8,
                  log_every=50, save_every=5000, vocab_size=30522),
}


def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _flat_fields(cls):
    """(name, field, owner) for every leaf field, model fields included, in declaration order."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or f.name == "model":
            for g in dataclasses.fields(ModelConfig):
                yield g.name, g, "model"
        else:
            yield f.name, f, None


def build(cls, overrides):
    """Make cls with the given flat {name: value} overrides; unknown names are an error."""
    known = {name: owner for name, _, owner in _flat_fields(cls)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    top = {k: v for k, v in overrides.items() if known[k] is None}
    model = {k: v for k, v in overrides.items() if known[k] == "model"}
    return cls(**top, model=ModelConfig(**model)) if "model" in {f.name for f in dataclasses.fields(cls)} \
        else cls(**top)


def parse_args(cls, presets, argv=None, description=""):
    """Type-checked flags for every field of cls; preset first, then the user's flags."""
    p = argparse.ArgumentParser(description=description)
    defaults = cls()
    for name, f, owner in _flat_fields(cls):
        default = getattr(defaults.model if owner else defaults, name)
        typ = _str2bool if f.type in (bool, "bool") else type(default)
        extra = {"choices": sorted(presets)} if name == "preset" else {}
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None, metavar=typ.__name__.upper()
                       if typ is not _str2bool else "BOOL", help=f"{f.metadata['help']} (default: {default})".replace("%", "%%"), **extra)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get("preset", getattr(defaults, "preset", None))
    overrides = dict(presets.get(preset, {})) if preset else {}
    overrides.update(args)
    try:
        return build(cls, overrides)
    except (ValueError, TypeError) as e:
        p.error(str(e))


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(cls, d):
    """Inverse of to_dict, refusing keys this version does not know."""
    d = dict(d)
    model = d.pop("model", None)
    flat = {**d, **(model or {})}
    return build(cls, flat)


def save_json(cfg, path):
    with open(path, "w") as f:
        json.dump(to_dict(cfg), f, indent=2)


@dataclass
class FinetuneConfig(RunConfig):
    """Fine-tuning on one downstream task of the paper's Table 2 (finetune.py; eval.py re-reads it from checkpoints).

    With --init, the architecture and the tokenizer are the checkpoint's; model flags given on the command line must
    agree with it (image_size excepted: the position embeddings are interpolated)."""

    preset: str = _f("cpu", "named preset, applied before the flags: cpu | tiny | paper")
    task: str = _f("", "downstream task: chexpert | rsna | radnli | mimic_sum | roco_retrieval | mimic_gen | vqa_rad | "
                       "slake | medvqa2019")
    init: str = _f("", "pre-training checkpoint (run or step folder); empty = runs/pretrain when it holds one, else "
                       "scratch; 'scratch' forces a randomly initialised backbone")
    out: str = _f("", "output folder (results.json, log.jsonl, best checkpoint); empty = "
                      "runs/finetune/<task>-<pretrained|scratch>[-<percent>pct]")
    data_frac: float = _f(1.0, "share of the training split used, a seeded subset (at least 8 samples): 0.01 | 0.1 | 1")
    eval_every: int = _f(100, "optimizer steps between validation runs; the best weights on val are kept")
    val_max: int = _f(128, "validation records used for selection, a seeded subset (0 = all); test is always whole")
    eval_batch_size: int = _f(64, "samples per batch at evaluation")
    max_gen_len: int = _f(64, "generated text length in tokens, [CLS] and [SEP] included (TS, ITG targets and decoding)")
    beam_size: int = _f(1, "beam size of the deterministic beam search (TS, ITG); 1 = greedy")
    length_penalty: float = _f(1.0, "beam hypotheses are compared by log-prob sum / length ** length_penalty")
    steps: int = _f(200, "optimizer steps")
    batch_size: int = _f(32, "samples per device per micro-step (lowered to the training set size for tiny subsets)")
    lr_backbone: float = _f(5e-4, "peak learning rate of the backbone (paper: 5e-6)")
    lr_head: float = _f(1e-3, "peak learning rate of the task head, prompt pools and decoder (paper: 2.5e-4)")
    log_every: int = _f(20, "optimizer steps between log lines")
    resume: str = _f("", "output folder of a killed fine-tuning run to continue exactly (its train_state, written at "
                         "every validation: weights, optimizer, schedule, step, RNG, data position, best so far)")
    save_every: int = _f(0, "unused by fine-tuning: the resumable state is written at every validation")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})


# Fine-tuning presets. Architecture keys only matter from scratch: with --init the checkpoint decides.
FINETUNE_PRESETS = {
    "cpu": {},
    "tiny": dict(image_size=32, patch_size=8, max_text_len=24, dim=32, depth=2, heads=2, pool_size=8, k_v=4, k_l=3,
                 itc_dim=16, steps=6, batch_size=4, eval_every=3, eval_batch_size=16, log_every=2, num_workers=0,
                 synth_scale="tiny", max_gen_len=12, beam_size=2),
    # The paper's architecture and fine-tuning rates (section 5.3: AdamW, 5e-6 backbone, 2.5e-4 task layers).
    "paper": dict(image_size=288, patch_size=16, max_text_len=48, dim=768, depth=12, heads=12, pool_size=1024, k_v=49,
                  k_l=32, itc_dim=256, vocab_size=30522, lr_backbone=5e-6, lr_head=2.5e-4, steps=5000,
                  batch_size=32, eval_every=500, val_max=0, log_every=50, num_workers=8, max_gen_len=128,
                  beam_size=3),
}
