"""ptunifier-min: a minimal pure-PyTorch reference implementation of PTUnifier (medical vision-language pre-training)."""

from .api import load  # noqa: E402,F401  ptunifier_min.load(path): a trained checkpoint for inference
