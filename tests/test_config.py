"""The typed config: presets, flag overrides, type checks, unknown keys, round trip."""

import pytest

from ptunifier_min.config import PRESETS, TrainConfig, from_dict, parse_args, to_dict
from ptunifier_min.model import pixel_table


def test_preset_then_flags():
    cfg = parse_args(TrainConfig, PRESETS,
                     ["--preset", "tiny", "--dim", "48", "--whole-word", "true"])
    assert (cfg.model.dim == 48 and cfg.model.depth == PRESETS["tiny"]["depth"]
            and cfg.whole_word is True)
    # cpu preset = defaults
    assert parse_args(TrainConfig, PRESETS, []).model.dim == TrainConfig().model.dim
    paper = parse_args(TrainConfig, PRESETS, ["--preset", "paper"])
    assert ((paper.model.dim, paper.model.depth, paper.model.pool_size, paper.model.k_v)
            == (768, 12, 1024, 49))


@pytest.mark.parametrize("argv", [["--bogus", "1"], ["--steps", "ten"], ["--preset", "huge"],
                                  ["--whole-word", "maybe"], ["--dim", "30", "--heads", "4"]])
def test_bad_flags_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, PRESETS, argv)
    assert "error" in capsys.readouterr().err


def test_round_trip_and_unknown_keys():
    cfg = parse_args(TrainConfig, PRESETS, ["--preset", "tiny"])
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown config keys: colour"):
        from_dict(TrainConfig, {**to_dict(cfg), "colour": "red"})


def test_objectives_are_validated():
    assert (parse_args(TrainConfig, PRESETS, ["--objectives", "itc,mlm"]).objective_set()
            == {"itc", "mlm"})
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, PRESETS, ["--objectives", "mim"])
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, PRESETS, ["--precision", "fp8"])


def test_resume_takes_a_field_newer_than_the_checkpoint_at_its_default():
    """A checkpoint written before a field existed (e.g. --pool-select) ran with
    its default: not a difference."""
    from ptunifier_min.checkpoint import resume_differences
    from ptunifier_min.config import PRESETS, TrainConfig, build, to_dict
    cfg = build(TrainConfig, dict(PRESETS["tiny"]))
    saved = to_dict(cfg)
    for name in ("pool_select", "pool_keys", "pool_query"):
        del saved["model"][name]
    del saved["w_pool_pull"]
    assert resume_differences(saved, cfg) == ([], [])
    cfg.model.pool_select = "cosine"  # but a changed value still is
    assert resume_differences(saved, cfg)[0] == ["--pool-select 'dot' -> 'cosine'"]


def test_a_config_saved_before_pixel_statistics_existed_normalises_as_it_did():
    """A checkpoint's config without pixel_mean / pixel_std was trained with 0.5 / 0.5: it loads
    so, and resumes."""
    import torch
    from ptunifier_min.checkpoint import resume_differences
    from ptunifier_min.config import build
    from ptunifier_min.model import PTUnifier
    cfg = build(TrainConfig, dict(PRESETS["tiny"]))
    saved = to_dict(cfg)
    del saved["model"]["pixel_mean"], saved["model"]["pixel_std"]
    old = from_dict(TrainConfig, saved)
    assert old.model.pixel_mean == old.model.pixel_std == [0.5] * 3
    assert torch.equal(PTUnifier(old.model).pixel_values, pixel_table())
    assert resume_differences(saved, cfg) == ([], [])


def test_pixel_statistics_are_flags_and_survive_the_checkpoints_json(capsys):
    import json
    cfg = parse_args(TrainConfig, PRESETS,
                     ["--pixel-mean", "0.485,0.456,0.406", "--pixel-std", "0.2,0.3,0.4"])
    assert (cfg.model.pixel_mean, cfg.model.pixel_std) == ([0.485, 0.456, 0.406], [0.2, 0.3, 0.4])
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    for argv in (["--pixel-std", "0.5,0,0.5"], ["--pixel-mean", "0.5,0.5"],
                 ["--pixel-mean", "a,b,c"]):
        with pytest.raises(SystemExit):
            parse_args(TrainConfig, PRESETS, argv)
        assert "--pixel-" in capsys.readouterr().err
