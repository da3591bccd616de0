"""DDP equivalence: 2 gloo processes with half the batch each end where 1 process with the whole batch ends.

Covers every objective set (find_unused_parameters=False: a dead parameter would make DDP raise), the ITC all-gather with
gradients, global ITM negatives and the MLM token count.
"""


import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from ptunifier_min import engine
from ptunifier_min.config import PRESETS, TrainConfig, build
from ptunifier_min.model import PTUnifier
from ptunifier_min.objectives import freeze_unused, pretraining_loss
from test_objectives import OBJECTIVE_SETS, SPECIAL, text_batch

STEPS, GLOBAL_B = 3, 8


def global_batch(step):
    ids, mask = text_batch(B=GLOBAL_B, T=24, V=100, seed=step)
    g = torch.Generator().manual_seed(100 + step)
    index = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6])  # one duplicated image: never a negative of itself
    return {"image": torch.randn(GLOBAL_B, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "index": index}


def train(objectives, rank=0, world=1, hard=False):
    cfg = build(TrainConfig, {**PRESETS["tiny"], "objectives": objectives, "vocab_size": 100,
                              "itm_hard_negatives": hard})
    torch.manual_seed(0)
    model = PTUnifier(cfg.model)
    freeze_unused(model, cfg.objective_set())
    # SGD, not AdamW: some gradients are zero in exact arithmetic (the key bias cannot change a softmax) and Adam
    # divides their float noise by its own size, turning 1e-9 differences into full-size steps.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    net = DDP(model) if world > 1 else model  # find_unused_parameters=False (the default)
    B = GLOBAL_B // world
    for step in range(STEPS):
        full = global_batch(step)
        local = {k: v[rank * B:(rank + 1) * B] for k, v in full.items()}
        T = int(local["attention_mask"].sum(1).max())  # each rank pads to its own longest text, as the collate does
        local["input_ids"], local["attention_mask"] = local["input_ids"][:, :T], local["attention_mask"][:, :T]
        loss, _ = pretraining_loss(net, local, cfg, engine.step_generator(0, step, 0), SPECIAL, raw_model=model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(rank, world, store, out, cases):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {f"{o}|{h}": train(o, rank, world, h) for o, h in cases}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


CASES = [(o, False) for o in OBJECTIVE_SETS] + [("mlm,itm,itc", True)]


def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "params")
    mp.spawn(worker, args=(2, str(tmp_path / "store"), out, CASES), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for objectives, hard in CASES:
        key = f"{objectives}|{hard}"
        single = train(objectives, hard=hard)
        for name, ref in single.items():
            torch.testing.assert_close(ranks[0][key][name], ranks[1][key][name], atol=0, rtol=0,
                                       msg=f"{key}: ranks differ in {name}")
            torch.testing.assert_close(ranks[0][key][name], ref, atol=1e-5, rtol=1e-4,
                                       msg=f"{key}: 2 processes differ from 1 in {name}")
