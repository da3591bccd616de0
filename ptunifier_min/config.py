"""One typed config for the whole project: the model, pre-training and fine-tuning,
with named presets.

Every field carries its `help` text; `parse_args` turns the fields into type-checked command-line
flags (unknown flags are an error), applies the chosen preset and then the flags the user gave, in
that order:

    cfg = parse_args(TrainConfig, PRESETS, argv, description=...)

Presets:
- `cpu` (default of `python train.py`): a small single tower that pre-trains on the synthetic world
  in ~10 min on 2 cores;
- `tiny`: the smallest thing that still exercises every code path, for tests;
- `paper`: the paper's scale (hidden 768, 12 layers, 12 heads, image 288, patch 16, pools of 1,024,
  k_v 49, k_l 32).
"""

import argparse
import dataclasses
from dataclasses import dataclass, field

from .fields import check_fields, flag, option
from .model import ModelConfig


# A bool flag that may also be left to the device: "auto" | "true" | "false"
# (a str field; `--flag` alone = true).
AUTO_BOOL = ("auto", "true", "false")


def dist_timeout_field():
    """--dist-timeout-min, of train.py, finetune.py and eval.py alike."""
    return option(30.0, "torchrun: minutes a rank waits in a collective for the others (the "
                  "slowest rank's evaluation share, rank 0's checkpoint write) before the job "
                  "fails; NCCL's own default is 10", valid="> 0", may_change=True)


@dataclass
class RunConfig:
    """What pre-training and fine-tuning share: data, optimisation, precision, logging and
    checkpoints."""

    data_root: str = option("", "folder of prepared datasets (prepare.py output); empty = the "
                            "synthetic world, made on demand")
    synth_root: str = option("data/synthetic", "where the synthetic world and its prepared form "
                             "live when data_root is empty")
    synth_scale: str = option("default", "size of the synthetic world made on demand: tiny | small "
                              "| default", valid=("tiny", "small", "default"))
    tokenizer: str = option("", "tokenizer.json or BERT vocab.txt; empty = <prepared "
                            "root>/tokenizer.json (trained if missing)")
    out: str = option("runs/pretrain", "output folder: config.json, log.jsonl, checkpoints",
                      may_change=True)
    init_vision: str = option("", "pretrained ViT / CLIP vision weights to start from (timm, HF "
                              "ViTModel, HF CLIP, OpenAI CLIP / open_clip; .safetensors, or .bin / "
                              ".pt read with weights_only); empty = scratch")
    init_text: str = option("", "BERT / PubMedBERT / RoBERTa weights whose embeddings start the "
                            "text side (with --tokenizer: its vocab.txt, tokenizer.json or "
                            "vocab.json); empty = scratch")
    resume: str = option("", "checkpoint folder to continue from (weights, optimizer, scheduler, "
                         "step, RNG, data position)", may_change=True)
    # below 2**31, so that distributed.step_generator's seeds,
    # (seed * 1_000_003 + step) * 1024 + stream, fit in 64 bits
    seed: int = option(0, "base seed; rank r uses seed + r for its own randomness",
                       valid="[0, 2147483647]")
    steps: int = option(1000, "optimizer steps", valid=">= 1", may_change=True)
    batch_size: int = option(64, "samples per device per micro-step", valid=">= 1")
    grad_accum: int = option(1, "micro-steps per optimizer step (each draws from its own of 1023 "
                             "generator streams)", valid="[1, 1023]")
    lr_backbone: float = option(1e-3, "peak learning rate of the backbone (embeddings, blocks, "
                                "final norm); 0 = frozen", valid=">= 0", may_change=True)
    lr_head: float = option(1e-3, "peak learning rate of everything else (prompt pools, heads, "
                            "logit scale)", valid="> 0", may_change=True)
    weight_decay: float = option(0.01, "AdamW weight decay (never on norms, biases, embeddings, "
                                 "pools, logit scale)", valid=">= 0", may_change=True)
    beta1: float = option(0.9, "AdamW beta1", valid="[0, 1)", may_change=True)
    beta2: float = option(0.98, "AdamW beta2", valid="[0, 1)", may_change=True)
    warmup_frac: float = option(0.1, "fraction of steps of linear warm-up, then linear decay to 0",
                                valid="[0, 1)", may_change=True)
    grad_clip: float = option(1.0, "max global gradient norm (0 = off)", valid=">= 0",
                              may_change=True)
    precision: str = option("auto", "bf16 | fp32 | auto (bf16 autocast on CUDA, fp32 on CPUs "
                            "without fast bf16)", valid=("auto", "bf16", "fp32"))
    compile: str = option("auto", "torch.compile the model: auto = on CUDA (its forward compiles "
                          "whole, no graph breaks), not on a CPU (compiling takes longer than a "
                          "short CPU run gains) | true | false", valid=AUTO_BOOL, may_change=True)
    num_workers: int = option(2, "data-loader worker processes per rank", valid=">= 0",
                              may_change=True)
    random_resized_crop: bool = option(False, "random-resized-crop augmentation for training "
                                       "images")
    log_every: int = option(20, "optimizer steps between log lines", valid=">= 1", may_change=True)
    report_to: str = option("none", "also show the logged scalars live: none | tensorboard "
                            "(<out>/tensorboard; pip install tensorboard) | wandb (offline unless "
                            "WANDB_MODE says otherwise; pip install wandb)",
                            valid=("none", "tensorboard", "wandb"), may_change=True)
    max_skips: int = option(5, "consecutive non-finite steps tolerated before training stops",
                            valid=">= 1", may_change=True)
    dist_timeout_min: float = dist_timeout_field()
    overwrite: bool = option(False, "start afresh in an --out that holds an earlier run: its files "
                             "are moved aside into <out>/.replaced-<time>/, never deleted",
                             may_change=True)

    def __post_init__(self):
        if isinstance(self.compile, bool):  # a config.json written when --compile was a plain bool
            self.compile = str(self.compile).lower()
        check_fields(self)
        if self.overwrite and self.resume:
            raise ValueError(
                "--overwrite (start afresh) and --resume (continue) exclude each other")


@dataclass
class TrainConfig(RunConfig):
    """Pre-training (train.py)."""

    preset: str = option("cpu", "named preset, applied before the flags: cpu | tiny | paper")
    data: str = option("roco,medicat,mimic_cxr", "comma-separated pre-training sets (prepared "
                       "folder names)")
    objectives: str = option("mlm,itm,itc", "comma-separated subset of mlm,itm,itc (the paper's "
                             "Table 3 ablation)")
    w_mlm: float = option(1.0, "weight of the MLM loss", valid=">= 0")
    w_itm: float = option(1.0, "weight of the ITM loss", valid=">= 0")
    w_itc: float = option(1.0, "weight of the ITC loss", valid=">= 0")
    mlm_prob: float = option(0.15, "share of real text tokens masked for MLM (80% [MASK], 10% "
                             "random, 10% kept)", valid="(0, 1)")
    whole_word: bool = option(False, "mask whole words together: a WordPiece token and its ## "
                              "pieces, a byte-level BPE (RoBERTa) word from its space-marked piece")
    itm_hard_negatives: bool = option(False, "ITM negatives sampled from ITC similarities (ALBEF) "
                                      "instead of uniformly")
    w_pool_pull: float = option(0.0, "weight of the pools' pull term, mean 1 - cos(query, chosen "
                                "key) with the query detached (L2P's surrogate loss; needs itc, "
                                "where the pools are used)", valid=">= 0")
    w_pool_balance: float = option(0.0, "weight of the pools' load-balancing term, N * sum_i "
                                   "usage_i * mean softmax score_i (Switch Transformer; 1 = "
                                   "uniform use; needs itc)", valid=">= 0")
    save_every: int = option(500, "optimizer steps between checkpoints (one is always written at "
                             "the end)", valid=">= 1", may_change=True)
    eval_pairs: int = option(2000, "ROCO test pairs for the closing zero-shot retrieval (0 = skip)",
                             valid=">= 0", may_change=True)
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})

    def __post_init__(self):
        super().__post_init__()
        self.data = ",".join(self.data_sets())  # stored as read: "roco, medicat" -> "roco,medicat"
        # objective_set validates the names
        if "itc" not in self.objective_set() and self.itm_hard_negatives:
            raise ValueError("--itm-hard-negatives samples ITM negatives from ITC similarities: "
                             f"add itc to --objectives (got {self.objectives!r})")
        pool_terms = [flag(k) for k in ("w_pool_pull", "w_pool_balance") if getattr(self, k)]
        if pool_terms and ("itc" not in self.objective_set() or self.model.prompt_mode != "pool"):
            raise ValueError(f"{' and '.join(pool_terms)} act on the prompt pools, which only "
                             f"ITC's single-modality passes use: they need itc in --objectives "
                             f"and --prompt-mode pool")
        if self.model.pool_keys == "separate" and not self.w_pool_pull:
            raise ValueError("--pool-keys separate: the keys learn only through the pull term; "
                             "set --w-pool-pull > 0")

    def data_sets(self):
        """The prepared folders --data names, in its order; spaces around the names are dropped."""
        names = [n.strip() for n in self.data.split(",") if n.strip()]
        if not names:
            raise ValueError(f"--data names no pre-training set (got {self.data!r}): give the "
                             "prepared folders to train on, e.g. --data roco,medicat,mimic_cxr")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"--data names {', '.join(twice)} twice (got {self.data!r}): a set "
                             "named twice would be trained on twice as often; name each once")
        return names

    def objective_set(self):
        names = [o for o in self.objectives.split(",") if o]
        bad = set(names) - {"mlm", "itm", "itc"}
        if bad or not names:
            raise ValueError(f"--objectives must be a non-empty subset of mlm,itm,itc, "
                             f"got {self.objectives!r}")
        return set(names)


# The presets' architectures, one table for pre-training and fine-tuning (with --init, fine-tuning
# takes the checkpoint's): `cpu` is ModelConfig's defaults; `tiny` the smallest model that still
# exercises every code path (tests); `paper` the paper's (ViT-B/16 at 288 px, pools of 1,024).
ARCHITECTURES = {
    "cpu": {},
    "tiny": dict(image_size=32, patch_size=8, max_text_len=24, dim=32, depth=2, heads=2,
                 pool_size=8, k_v=4, k_l=3, itc_dim=16),
    "paper": dict(image_size=288, patch_size=16, max_text_len=48, dim=768, depth=12, heads=12,
                  pool_size=1024, k_v=49, k_l=32, itc_dim=256, vocab_size=30522),
}
# Presets override defaults; user flags override presets. Model keys and run keys share one flat
# namespace.
PRESETS = {name: {**ARCHITECTURES[name], **run} for name, run in {
    "cpu": {},
    "tiny": dict(steps=30, batch_size=8, log_every=5, save_every=20, num_workers=0,
                 synth_scale="tiny", eval_pairs=64, lr_backbone=1e-3, lr_head=1e-3),
    # The paper's schedule. Its LRs (1e-5 / 5e-5) assume encoders initialised from CLIP and
    # RoBERTa: with --init-vision they apply (PRETRAINED_INIT_LRS); from scratch the backbone needs
    # the larger rates below.
    "paper": dict(steps=100_000, batch_size=32, lr_backbone=1e-4, lr_head=5e-4, num_workers=8,
                  log_every=50, save_every=5000),
}.items()}

# Pre-training rates of a preset when it starts from a pretrained vision encoder (--init-vision);
# flags still win.
PRETRAINED_INIT_LRS = {"paper": dict(lr_backbone=1e-5, lr_head=5e-5)}


def _str2bool(s):
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _auto_bool(s):
    return "auto" if s.lower() == "auto" else str(_str2bool(s)).lower()


def _floats(s):
    try:
        return [float(x) for x in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


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
    return (cls(**top, model=ModelConfig(**model))
            if "model" in {f.name for f in dataclasses.fields(cls)} else cls(**top))


def parse_args(cls, presets, argv=None, description=""):
    """Type-checked flags for every field of cls; preset first, then the user's flags.

    Flags must be spelled out (no argparse prefix abbreviations: `--lr` would otherwise mean
    whichever `--lr-*` is unique). The returned config's `given` attribute is the set of field names
    the command line set, for a script that must tell "the user asked for this" from "the preset's
    value" (finetune.py with --init)."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False)
    defaults = cls()
    for name, f, owner in _flat_fields(cls):
        default = getattr(defaults.model if owner else defaults, name)
        valid = f.metadata.get("valid")
        typ = (_str2bool if f.type in (bool, "bool") else _auto_bool if valid == AUTO_BOOL
               else _floats if isinstance(default, list) else type(default))
        extra = {"choices": sorted(presets)} if name == "preset" else {}
        if typ in (_str2bool, _auto_bool):  # `--overwrite` alone means `--overwrite true`
            extra.update(nargs="?", const=True if typ is _str2bool else "true")
        allowed = ("" if valid is None
                   else f"; {' | '.join(valid) if isinstance(valid, tuple) else valid}")
        metavar = {_str2bool: "BOOL", _auto_bool: "AUTO|BOOL",
                   _floats: "R,G,B"}.get(typ, typ.__name__.upper())
        p.add_argument(flag(name), dest=name, type=typ, default=None, metavar=metavar,
                       help=(f"{f.metadata['help']} (default: {default}{allowed})"
                             .replace("%", "%%")),
                       **extra)
    args = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    preset = args.get("preset", getattr(defaults, "preset", None))
    overrides = dict(presets.get(preset, {})) if preset else {}
    if args.get("init_vision") and presets is PRESETS:
        overrides.update(PRETRAINED_INIT_LRS.get(preset, {}))
    overrides.update(args)
    try:
        cfg = build(cls, overrides)
        # the configs here check themselves when built; a plain one (eval.py's) is checked here
        check_fields(cfg)
    except (ValueError, TypeError) as e:
        # every check of the config: a usage error (exit 2), not a traceback
        p.error(str(e))
    cfg.given = frozenset(args)
    return cfg


def to_dict(cfg):
    return dataclasses.asdict(cfg)


def from_dict(cls, d):
    """Inverse of to_dict, refusing keys this version does not know."""
    d = dict(d)
    model = d.pop("model", None)
    flat = {**d, **(model or {})}
    return build(cls, flat)


@dataclass
class FinetuneConfig(RunConfig):
    """Fine-tuning on one downstream task of the paper's Table 2
    (finetune.py; eval.py re-reads it from checkpoints).

    With --init, the architecture and the tokenizer are the checkpoint's; model flags given on the
    command line must agree with it (image_size and max_text_len excepted: the position embeddings
    are interpolated or extended)."""

    preset: str = option("cpu", "named preset, applied before the flags: cpu | tiny | paper")
    task: str = option("", "downstream task: chexpert | rsna | radnli | mimic_sum | roco_retrieval "
                       "| mimic_gen | vqa_rad | slake | medvqa2019")
    init: str = option("", "pre-training checkpoint (run or step folder); empty = runs/pretrain "
                       "when it holds one, else scratch; 'scratch' forces a randomly initialised "
                       "backbone")
    out: str = option("", "output folder (results.json, log.jsonl, best checkpoint); empty = "
                      "runs/finetune/<task>-<pretrained|scratch>[-<percent>pct]", may_change=True)
    data_frac: float = option(1.0, "share of the training split used, a seeded subset (at least 8 "
                              "samples): 0.01 | 0.1 | 1", valid="(0, 1]")
    eval_every: int = option(100, "optimizer steps between validation runs; the best weights on "
                             "val are kept", valid=">= 1", may_change=True)
    val_max: int = option(128, "validation records used for selection, a seeded subset (0 = all); "
                          "test is always whole", valid=">= 0")
    eval_batch_size: int = option(64, "samples per batch at evaluation", valid=">= 1",
                                  may_change=True)
    max_gen_len: int = option(0, "generation target length in tokens, [CLS] and [SEP] included "
                              "(TS, ITG): targets are cut to it, beam search stops after "
                              "max_gen_len - 1 tokens, the decoder has this many positions; "
                              "separate from the encoder input length --max-text-len. 0 = the 95th "
                              "percentile of the task's training targets, rounded up to a multiple "
                              "of 8", valid="0 or >= 3")
    beam_size: int = option(1, "beam size of the deterministic beam search (TS, ITG); 1 = greedy",
                            valid=">= 1")
    length_penalty: float = option(1.0, "beam hypotheses are compared by log-prob sum / length ** "
                                   "length_penalty")
    steps: int = option(200, "optimizer steps", valid=">= 1", may_change=True)
    batch_size: int = option(32, "samples per device per micro-step (lowered to the training set "
                             "size for tiny subsets)", valid=">= 1")
    lr_backbone: float = option(5e-4, "peak learning rate of the backbone (paper: 5e-6); 0 = "
                                "frozen (a linear probe)", valid=">= 0", may_change=True)
    lr_head: float = option(1e-3, "peak learning rate of the task head, prompt pools and decoder "
                            "(paper: 2.5e-4)", valid="> 0", may_change=True)
    log_every: int = option(20, "optimizer steps between log lines", valid=">= 1", may_change=True)
    resume: str = option("", "a fine-tuning run folder (its --out) to continue exactly from the "
                         "train_state it writes at every validation: weights, optimizer, schedule, "
                         "step, RNG, data position, best so far (not a pre-training checkpoint: "
                         "that is --init)", may_change=True)
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})


# Fine-tuning presets (the architecture matters from scratch only)
FINETUNE_PRESETS = {name: {**ARCHITECTURES[name], **run} for name, run in {
    "cpu": {},
    "tiny": dict(steps=6, batch_size=4, eval_every=3, eval_batch_size=16, log_every=2,
                 num_workers=0, synth_scale="tiny", beam_size=2),
    # the paper's fine-tuning rates (section 5.3: AdamW, 5e-6 backbone, 2.5e-4 task layers)
    "paper": dict(lr_backbone=5e-6, lr_head=2.5e-4, steps=5000, batch_size=32, eval_every=500,
                  val_max=0, log_every=50, num_workers=8, beam_size=3),
}.items()}
