"""Test set-up: import the package from the checkout, keep torch to the 2 cores we have; fixtures
several test files share."""

import os
import signal
import sys
import types

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))
# --precision auto picks bf16 on CPUs with native bf16: resolve it to fp32 in every test and in the
# scripts tests start, so that no result depends on the machine (test_precision.py checks the
# decision itself, flags monkeypatched)
os.environ["PTUNIFIER_NO_CPU_BF16"] = "1"


# the byte_level_bpe tokenizer's texts: at 300 pieces, most of their words are several pieces
BPE_CORPUS = ["There is no focal consolidation, pleural effusion or pneumothorax.",
              "The cardiomediastinal silhouette is normal. No acute cardiopulmonary process.",
              "Axial CT of the abdomen shows a large hepatic mass of 2.5 cm.",
              "Moderate left pleural effusion with adjacent atelectasis on the x-ray."] * 5


@pytest.fixture(scope="session")
def byte_level_bpe(tmp_path_factory):
    """A folder with a small RoBERTa-style tokenizer, vocab.json + merges.txt (byte-level BPE, no
    prefix space, RoBERTa's special tokens), trained here: nothing is downloaded."""
    folder = tmp_path_factory.mktemp("byte_level_bpe")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(BPE_CORPUS, vocab_size=300, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    return folder


@pytest.fixture
def stop_lines(monkeypatch):
    """For a run stopped by a signal inside the test process: the last lines it would say at exit,
    collected here instead of registered with atexit; the SIGCHLD handler the stop replaces is put
    back afterwards."""
    from ptunifier_min import stopping
    lines = []
    collect = types.SimpleNamespace(register=lambda _, line, **kwargs: lines.append(line))
    monkeypatch.setattr(stopping, "atexit", collect)
    sigchld = signal.getsignal(signal.SIGCHLD)
    yield lines
    signal.signal(signal.SIGCHLD, sigchld)


def signals_at(n, real, *signums):
    """A stand-in for `real` (e.g. optim.optimizer_step) that sends this process `signums` at its
    n-th call, as a cluster or a user would, then does what `real` does."""
    calls = {"n": 0}

    def call(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            for signum in signums:
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    return call
