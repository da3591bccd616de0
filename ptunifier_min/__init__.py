"""ptunifier-min: a minimal pure-PyTorch reference implementation of PTUnifier
(medical vision-language pre-training)."""

# ptunifier_min.load(path): a trained checkpoint for inference
from .api import load  # noqa: E402,F401
