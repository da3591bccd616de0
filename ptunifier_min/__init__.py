"""ptunifier-min: a minimal pure-PyTorch reference implementation of PTUnifier (medical
vision-language pre-training that unifies fusion and dual encoders with soft prompt pools).

    import ptunifier_min
    m = ptunifier_min.load("runs/pretrain")  # a trained checkpoint for inference (api.py)
"""

__version__ = "0.1.0"


def load(path, **kwargs):
    """ptunifier_min.api.load: imported on first use, so that `import ptunifier_min.model` loads
    the model alone."""
    from .api import load
    return load(path, **kwargs)
