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
    # keep=1: older checkpoints are removed after the new one is whole
    assert not (tmp_path / "step_0000005").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    other = PTUnifier(cfg.model)
    checkpoint.load_weights(str(tmp_path), other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 other.state_dict().values()))
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


def flip_middle_byte(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("name,load", [
    ("model.safetensors", lambda path, cfg: checkpoint.load_weights(path, PTUnifier(cfg.model))),
    ("trainer.pt", lambda path, cfg: checkpoint.load_trainer_state(path)),
    ("tokenizer.json", lambda path, cfg: checkpoint.checkpoint_tokenizer(path))])
def test_a_damaged_file_body_is_an_error_naming_the_file(tmp_path, name, load):
    """One byte flipped in the middle of a file, its header intact: safetensors and torch read it
    without complaint, and a model with one wrong weight would evaluate. The sha256 recorded at
    save time says it is damaged."""
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text(json.dumps({"model": {"vocab": {f"w{i}": i for i in range(200)}}}))
    cfg = build(TrainConfig, PRESETS["tiny"])
    model = PTUnifier(cfg.model)
    with torch.no_grad():  # every weight away from 0, so that a flipped byte changes a value
        for p in model.parameters():
            p.add_(0.5)
    state = {"step": 5, "optimizer": {"moments": torch.arange(4096.0)}}
    checkpoint.save_checkpoint(str(tmp_path / "run"), 5, model, cfg, state, files=[str(tokenizer)])
    file = tmp_path / "run" / "step_0000005" / name
    flip_middle_byte(file)
    with pytest.raises(checkpoint.CheckpointError, match=f"corrupt or truncated .*{file}"):
        load(str(tmp_path / "run"), cfg)


def test_a_checkpoint_written_before_the_hashes_still_loads(tmp_path):
    cfg, model = make(tmp_path)
    config = tmp_path / "step_0000005" / "config.json"
    record = json.loads(config.read_text())
    record.pop("sha256", None)
    config.write_text(json.dumps(record))
    other = PTUnifier(cfg.model)
    checkpoint.load_weights(str(tmp_path), other)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert checkpoint.load_trainer_state(str(tmp_path))["step"] == 5
