"""Is the prompt pool alive? Pool statistics during pre-training, read on logging steps.

train.py's `PoolWatch` adds to every log line:
- selected_{visual,textual}_rows / _entropy: distinct pool rows the window's selections used, and
  their entropy (nats);
- pool_grad_norm_{visual,textual}: RMS over the window's micro-steps of the gradient norm reaching
  each pool (this rank's, before DDP's averaging); a pool that is selected but gets no gradient
  cannot learn;
- probe_topk_changed_{visual,textual}: share of the k slots of a fixed probe batch whose pool row
  changed since the last logging step (0 = the selection is frozen, 1 = it changes completely).

A checkpoint's pools and what its prompts attend to: `python tools/poolreport.py RUN`.
"""

import math

import torch
import torch.distributed as dist

from .distributed import autocast


def pool_usage(hist):
    """Distinct pool rows used and the entropy (nats) of a selection histogram [pool_size]: a
    collapsed pool shows here. Reads the histogram on the host (the caller does it on logging steps
    only)."""
    total = hist.sum()
    if total == 0:
        return 0, 0.0
    p = hist[hist > 0].double() / total
    return int((hist > 0).sum()), float(-(p * p.log()).sum())


def prompt_pools(model):
    """{"visual": the model's visual prompts, "textual": its textual prompts}."""
    return {k: getattr(model, f"{k}_prompts") for k in ("visual", "textual")}


def _overlap(a, b, n):
    """Share of the k slots per row whose row set a [B, k] and b [B, k] have in common, on the
    device."""
    zeros = torch.zeros(len(a), n, device=a.device)
    # scatter is out of place
    return (zeros.scatter(1, a, 1) * zeros.scatter(1, b, 1)).sum() / a.numel()


class PoolWatch:
    """Pool statistics over a logging window; nothing is read on the host until `read`, on logging
    steps."""

    def __init__(self, model, probe, precision, device):
        pools = {k: p for k, p in prompt_pools(model).items() if p.mode == "pool"}
        self.hist = {k: torch.zeros(len(p.weight), dtype=torch.long, device=device)
                     for k, p in pools.items()}
        self.grad_sq = {k: torch.zeros((), device=device) for k in pools}
        self.micro_steps = 0
        for k, p in pools.items():
            # frozen when no objective reaches it (a pool without ITC)
            if p.weight.requires_grad:
                p.weight.register_hook(self._grad_hook(k))
        self.probe = {k: probe[k] for k in ("image", "input_ids", "attention_mask")}
        self.precision, self.device, self.last = precision, device, None

    def _grad_hook(self, k):
        def hook(grad):  # returns None: the gradient itself is left as it is
            self.grad_sq[k].add_(grad.detach().float().pow(2).sum())
        return hook

    def count(self, selected):
        """selected: {"visual" | "textual": [B, k] rows} of one micro-step (pretraining_loss's
        selections)."""
        self.micro_steps += 1
        # index_add_ rather than bincount, which would read max(rows) on the host
        for k, rows in selected.items():
            self.hist[k].index_add_(0, rows.flatten(), torch.ones_like(rows.flatten()))

    @torch.no_grad()
    def probe_selection(self, model):
        """The probe batch's selections: {"visual": [B, k_v], "textual": [B, k_l]}, in eval mode (no
        dropout, so the training's random stream is not touched)."""
        was_training = model.training
        model.eval()
        with autocast(self.precision, self.device):
            txt = model(input_ids=self.probe["input_ids"],
                        attention_mask=self.probe["attention_mask"])
            img = model(image=self.probe["image"])
        model.train(was_training)
        return {"visual": txt.selected_visual, "textual": img.selected_textual}

    def read(self, model, world=1):
        """The window's statistics as floats (the host waits for the device here), then a new
        window. With several ranks, a collective: every rank must call it on the same steps."""
        rec = {}
        selection = self.probe_selection(model) if self.hist else {}
        for k, h in self.hist.items():
            if world > 1:
                dist.all_reduce(h)
            if h.sum():
                rec[f"selected_{k}_rows"], rec[f"selected_{k}_entropy"] = pool_usage(h.cpu())
            if self.micro_steps and self.grad_sq[k]:
                rec[f"pool_grad_norm_{k}"] = math.sqrt(float(self.grad_sq[k]) / self.micro_steps)
            if self.last is not None:
                rec[f"probe_topk_changed_{k}"] = 1 - float(
                    _overlap(selection[k], self.last[k], len(h)))
            h.zero_()
            self.grad_sq[k].zero_()
        self.micro_steps, self.last = 0, selection
        return rec
