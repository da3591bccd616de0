"""Test set-up: import the package from the checkout, keep torch to the 2 cores we have."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))
# --precision auto picks bf16 on CPUs with native bf16: resolve it to fp32 in every test and in the scripts tests start,
# so that no result depends on the machine (test_precision.py checks the decision itself, flags monkeypatched)
os.environ["PTUNIFIER_NO_CPU_BF16"] = "1"
