"""Evaluation under torchrun: 2 gloo processes, each evaluating its share, return the metrics of one
process to the bit, for every kind of task (retrieval with ITM re-ranking, classification, VQA,
generation, zero-shot CheXpert), also when a rank's share is empty; and the process group's
timeout is the flag's."""

import datetime
import types
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ptunifier_min.tokenizer import load_tokenizer, special_ids
from ptunifier_min import data, distributed, retrieval, tasks
import eval as eval_script
from ptunifier_min.config import (FINETUNE_PRESETS, PRESETS, FinetuneConfig, TrainConfig,
                                 build, parse_args)
from ptunifier_min.model import PTUnifier
from test_finetune import world  # noqa: F401  (the shared tiny synthetic world fixture)

# (task, records): several evaluation batches of 3 (the units of a share), then one batch only,
# which leaves rank 0 nothing to do
CASES = [("roco_retrieval", 8), ("chexpert", 9), ("radnli", 7), ("vqa_rad", 8), ("mimic_gen", 5),
         ("roco_retrieval", 2), ("vqa_rad", 1), ("mimic_gen", 1)]
BATCH = 3


def evaluate_all(prepared, proc):
    """{case: (metrics, samples this rank's backbone saw)} of tasks.evaluate (and zero-shot
    CheXpert) on tiny random models, with `proc`'s share of every evaluation; the same models on
    every rank."""
    retrieval.IMAGE_BATCH, retrieval.TEXT_BATCH = BATCH, BATCH + 1  # shares of a few records
    tok = load_tokenizer(os.path.join(prepared, "tokenizer.json"))
    special = special_ids(tok)
    cfg = build(FinetuneConfig, {**FINETUNE_PRESETS["tiny"], "vocab_size": tok.get_vocab_size(),
                                 "cls_id": special["cls"], "sep_id": special["sep"]})
    out = {}
    for name, n in CASES + [("zero-shot chexpert", 9)]:
        task = tasks.TASKS[name.split()[-1]]
        folder = os.path.join(prepared, task.folder)
        meta, records = data.read_meta(folder), data.read_split(folder, "test")[:n]
        assert len(records) == n, (name, len(records))
        torch.manual_seed(0)
        backbone = PTUnifier(cfg.model)
        seen = []
        backbone.register_forward_hook(
            lambda module, args, kw, output: seen.append(
                len(kw["image"] if kw.get("image") is not None else kw["input_ids"])),
            with_kwargs=True)
        common = dict(image_size=cfg.model.image_size, max_text_len=cfg.model.max_text_len,
                      device=torch.device("cpu"), proc=proc)
        if name.startswith("zero-shot"):
            m = retrieval.zero_shot_classification(backbone, records, meta["label_names"], tok,
                                               **common)
        else:
            model = tasks.TaskModel(backbone, task, tasks.num_outputs(task, meta), max_gen_len=8)
            m = tasks.evaluate(model, task, records, tok, **common, meta=meta, max_gen_len=8,
                               batch_size=BATCH, beam_size=2, rerank_top=4, progress=False,
                               print0=None)
        m.pop("seconds", None)
        out[f"{name} x{n}"] = m, sum(seen)
    return out


def _worker(rank, world_size, store, prepared, out):
    # a rank left out of a collective fails the test in a minute instead of hanging it
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(minutes=1))
    torch.set_num_threads(1)
    torch.save(evaluate_all(prepared, distributed.Dist(rank=rank, world=world_size)),
               f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_processes_evaluate_their_shares_to_the_one_process_metrics(
        world, tmp_path, monkeypatch):  # noqa: F811
    out = str(tmp_path / "metrics")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), world[1], out), nprocs=2, join=True)
    monkeypatch.setattr(retrieval, "IMAGE_BATCH", retrieval.IMAGE_BATCH)  # restored afterwards
    monkeypatch.setattr(retrieval, "TEXT_BATCH", retrieval.TEXT_BATCH)
    one = evaluate_all(world[1], distributed.Dist())
    assert 0 < one["chexpert x9"][0]["auroc"] < 1 and one["roco_retrieval x8"][0]["pairs"] == 8
    two = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    for case, (metrics, seen) in one.items():
        for rank in range(2):
            assert two[rank][case][0] == metrics, (rank, case)
        # the work was shared: every sample once, on one rank; with a single batch rank 0 has
        # nothing to do (but its share of the ITM re-ranking: one image of two)
        prompts = 10 if case.startswith("zero-shot") else 0  # CheXpert's 2 x 5: on every rank
        assert two[0][case][1] + two[1][case][1] - prompts == seen, case
        assert (two[0][case][1] > 0) == (case not in ("vqa_rad x1", "mimic_gen x1")), case
        assert two[1][case][1] > 0


def test_shares_are_whole_batches_in_order_and_may_be_empty():
    def shares(n, world, unit):
        return [distributed.shard(n, distributed.Dist(rank=r, world=world), unit)
                for r in range(world)]
    assert shares(10, 2, 3) == [(0, 6), (6, 10)]  # batches [0, 3) [3, 6) | [6, 9) [9, 10)
    assert shares(10, 3, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shares(2, 2, 3) == [(0, 0), (0, 2)]  # one batch: rank 0's share is empty
    assert shares(5, 1, 64) == [(0, 5)]
    for n, world_size, unit in ((0, 2, 4), (1, 4, 1), (17, 4, 5), (100, 8, 64)):
        got = shares(n, world_size, unit)
        assert [i for lo, hi in got for i in range(lo, hi)] == list(range(n))
        assert all(lo % unit == 0 for lo, hi in got if hi > lo)


def test_the_process_group_timeout_is_the_flag(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    store = types.SimpleNamespace(timeouts=[], set_timeout=lambda t: store.timeouts.append(t))
    monkeypatch.setattr(distributed, "_rendezvous", lambda proc: store)
    monkeypatch.setattr(distributed.dist, "PrefixStore", lambda prefix, s: (prefix, s))
    for k, v in dict(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=29500).items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    proc = distributed.setup_distributed(0, timeout_min=45)
    assert (proc.rank, proc.world) == (1, 2)
    # the collectives' timeout, and the store's once every rank has met
    assert [(b, kw["timeout"]) for b, kw in calls] == [("gloo", datetime.timedelta(minutes=45))]
    assert store.timeouts == [datetime.timedelta(minutes=45)]
    for cls, presets in ((TrainConfig, PRESETS), (FinetuneConfig, FINETUNE_PRESETS),
                         (eval_script.EvalConfig, {})):
        assert parse_args(cls, presets, ["--dist-timeout-min", "45"]).dist_timeout_min == 45
        assert parse_args(cls, presets, []).dist_timeout_min == 30
        with pytest.raises(SystemExit):
            parse_args(cls, presets, ["--dist-timeout-min", "0"])
