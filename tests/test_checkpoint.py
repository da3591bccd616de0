"""Checkpoints: atomic writes, corrupt and mismatched files refused with clear errors."""

import json
import os

import pytest
import torch

from ptunifier_min import checkpoint
from ptunifier_min.config import PRESETS, TrainConfig, build, to_dict
from ptunifier_min.model import PTUnifier


def make(tmp_path, **kw):
    cfg = build(TrainConfig, {**PRESETS["tiny"], **kw})
    model = PTUnifier(cfg.model)
    checkpoint.save_checkpoint(str(tmp_path), 5, model, cfg, {"step": 5})
    return cfg, model


def test_round_trip_and_latest(tmp_path):
    cfg, model = make(tmp_path)
    checkpoint.save_checkpoint(str(tmp_path), 10, model, cfg, {"step": 10})
    assert (tmp_path / "latest").read_text().strip() == "step_0000010"
    assert not (tmp_path / "step_0000005").exists()  # keep=1: older checkpoints are removed after the new one is whole
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    other = PTUnifier(cfg.model)
    checkpoint.load_weights(str(tmp_path), other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert checkpoint.load_trainer_state(str(tmp_path))["step"] == 10


def test_truncated_weights_are_reported(tmp_path):
    cfg, _ = make(tmp_path)
    f = tmp_path / "step_0000005" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        checkpoint.load_weights(str(tmp_path), PTUnifier(cfg.model))


def test_truncated_trainer_state_is_reported(tmp_path):
    make(tmp_path)
    f = tmp_path / "step_0000005" / "trainer.pt"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated trainer state"):
        checkpoint.load_trainer_state(str(tmp_path))


def test_mismatched_model_is_refused_with_the_differences(tmp_path):
    cfg, _ = make(tmp_path)
    other = build(TrainConfig, {**PRESETS["tiny"], "dim": 48})
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
        checkpoint.load_weights(str(tmp_path), PTUnifier(other.model))
    saved = json.loads((tmp_path / "step_0000005" / "config.json").read_text())["config"]
    diffs = checkpoint.config_differences(saved, to_dict(other))
    assert diffs == ["model.dim: checkpoint 32 vs requested 48"]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        checkpoint.resolve_checkpoint(str(tmp_path))
