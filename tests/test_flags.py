"""Every flag is validated at parse time: a value outside its range is a usage error (exit
2) that names the flag and what is allowed, before any data is read; never a traceback hours in, nor
a run that trains on it (a negative learning rate used to ascend the gradient and exit 0)."""

import dataclasses

import pytest

import eval as eval_script
import finetune
import train
from ptunifier_min.datasets import synth
from ptunifier_min.config import (FINETUNE_PRESETS, PRESETS, FinetuneConfig, TrainConfig,
                                  _flat_fields, build, parse_args)

# One value each numeric flag must refuse, with the allowed values the message must show. A
# new numeric field without an entry fails test_every_numeric_flag_has_a_bad_value below: give
# it a `valid=` and a line here.
BAD = {
    "image_size": ("0", ">= 1"), "patch_size": ("0", ">= 1"), "vocab_size": ("0", ">= 1"),
    "cls_id": ("-1", ">= 0"), "sep_id": ("-1", ">= 0"), "max_text_len": ("2", ">= 3"),
    "dim": ("0", ">= 1"), "depth": ("0", ">= 1"), "heads": ("0", ">= 1"), "mlp_ratio": ("0", "> 0"),
    "dropout": ("1", "[0, 1)"), "pool_size": ("0", ">= 1"), "k_v": ("-1", ">= 0"),
    "k_l": ("-1", ">= 0"), "itc_dim": ("0", ">= 1"), "itc_temperature": ("0", "> 0"),
    "norm_eps": ("0", "> 0"), "text_norm_eps": ("-1e-5", ">= 0"),
    "seed": ("-1", "[0, 2147483647]"), "steps": ("0", ">= 1"), "batch_size": ("0", ">= 1"),
    "grad_accum": ("1024", "[1, 1023]"), "lr_backbone": ("-1e-3", ">= 0"), "lr_head": ("0", "> 0"),
    "weight_decay": ("-0.01", ">= 0"), "beta1": ("1", "[0, 1)"), "beta2": ("1.5", "[0, 1)"),
    "warmup_frac": ("1", "[0, 1)"), "grad_clip": ("-1", ">= 0"), "num_workers": ("-1", ">= 0"),
    "log_every": ("0", ">= 1"), "save_every": ("-1", ">= "), "max_skips": ("0", ">= 1"),
    "w_mlm": ("-1", ">= 0"), "w_itm": ("-1", ">= 0"), "w_itc": ("-1", ">= 0"),
    "w_pool_pull": ("-0.5", ">= 0"), "w_pool_balance": ("-1", ">= 0"), "mlm_prob": ("1", "(0, 1)"),
    "eval_pairs": ("-1", ">= 0"),
    "data_frac": ("0", "(0, 1]"), "eval_every": ("0", ">= 1"), "val_max": ("-1", ">= 0"),
    "eval_batch_size": ("0", ">= 1"), "max_gen_len": ("2", "0 or >= 3"), "beam_size": ("-1", ">= "),
    "length_penalty": ("nan", "finite"), "rerank_top": ("-1", ">= 0"),
    "dist_timeout_min": ("0", "> 0"), "overlays": ("-1", ">= 0"),
}
CONFIGS = {"train": (TrainConfig, PRESETS), "finetune": (FinetuneConfig, FINETUNE_PRESETS),
           "eval": (eval_script.EvalConfig, {})}


def numeric_flags(cls):
    return [name for name, f, _ in _flat_fields(cls) if f.type in (int, float, "int", "float")]


def test_every_numeric_flag_has_a_bad_value():
    missing = sorted({n for cls, _ in CONFIGS.values() for n in numeric_flags(cls)} - set(BAD))
    assert not missing, f"numeric flags without a range test: {missing}"


@pytest.mark.parametrize("script,name",
                         [(s, n) for s, (cls, _) in CONFIGS.items() for n in numeric_flags(cls)])
def test_out_of_range_value_is_a_usage_error_naming_the_flag(script, name, capsys):
    cls, presets = CONFIGS[script]
    value, allowed = BAD[name]
    flag = "--" + name.replace("_", "-")
    with pytest.raises(SystemExit) as e:
        # "=": argparse takes "-1e-3" alone for an option
        parse_args(cls, presets, [f"{flag}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag} must be" in err and allowed in err and "Traceback" not in err, err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused(value, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(TrainConfig, PRESETS, [f"--lr-head={value}"])
    assert e.value.code == 2 and "--lr-head must be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--dim", "30", "--heads", "4"], "--dim 30 is not divisible by --heads 4"),
    (["--image-size", "30", "--patch-size", "8"],
     "--image-size 30 is not divisible by --patch-size 8"),
    (["--pool-size", "2", "--k-v", "4"], "cannot exceed --pool-size 2"),
    (["--k-v", "0", "--k-l", "0"], "--prompt-mode pool with --k-v 0 and --k-l 0 would use no row"),
    (["--prompt-mode", "static", "--k-l", "0"], "--prompt-mode static needs --k-v and --k-l of at"),
    (["--prompt-mode", "pools"], "--prompt-mode must be one of none | static | pool, got 'pools'"),
    (["--precision", "fp16"], "--precision must be one of auto | bf16 | fp32, got 'fp16'"),
    (["--synth-scale", "huge"], "--synth-scale must be one of tiny | small | default"),
    (["--overwrite", "--resume", "runs/x"],
     "--overwrite (start afresh) and --resume (continue) exclude each other"),
])
def test_cross_field_and_choice_errors_name_the_flags(argv, message, capsys):
    for cls, presets in (CONFIGS["train"], CONFIGS["finetune"]):
        with pytest.raises(SystemExit) as e:
            parse_args(cls, presets, argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_preset_and_default_is_valid():
    for cls, presets in CONFIGS.values():
        cls()
        for overrides in presets.values():
            build(cls, overrides)  # raises on an out-of-range preset value


def test_synth_scale_choices_are_the_generators_scales():
    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["synth_scale"]
    assert set(field.metadata["valid"]) == set(synth.SCALES)


@pytest.mark.parametrize("script,argv", [(train, ["--batch-size", "0"]),
                                         (train, ["--lr-head=-1e-3"]),
                                         (finetune, ["--task", "vqa_rad", "--beam-size", "0"])])
def test_scripts_stop_before_reading_any_data(script, argv, tmp_path, capsys):
    """The issue's examples: --batch-size 0 ended in a raw ZeroDivisionError, a negative learning
    rate trained and exited 0, --beam-size 0 failed at the first validation. Now: exit 2 before the
    synthetic world is even made."""
    with pytest.raises(SystemExit) as e:
        script.main(["--preset", "tiny", "--synth-root", str(tmp_path / "world"),
                     "--out", str(tmp_path / "out"), *argv])
    flag = [a for a in argv if a.startswith("--")][-1].split("=")[0]
    assert e.value.code == 2 and f"error: {flag} must be" in capsys.readouterr().err
    assert not (tmp_path / "world").exists() and not (tmp_path / "out").exists()
