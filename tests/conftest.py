"""Test set-up: import the package from the checkout, keep torch to the 2 cores we have; fixtures
several test files share."""

import os
import sys

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))
# --precision auto picks bf16 on CPUs with native bf16: resolve it to fp32 in every test and in the scripts tests start,
# so that no result depends on the machine (test_precision.py checks the decision itself, flags monkeypatched)
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
