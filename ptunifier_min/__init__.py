"""ptunifier-min: a minimal pure-PyTorch reference implementation of PTUnifier (medical vision-language pre-training)."""
