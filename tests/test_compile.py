"""PTUnifier's forward compiles whole (no graph break) for each kind of pass
pre-training makes, and --compile is on by default where it pays (CUDA), off on a CPU."""

import json

import pytest
import torch

from ptunifier_min.config import FINETUNE_PRESETS, PRESETS, FinetuneConfig, TrainConfig, build, \
    from_dict, parse_args
from ptunifier_min.distributed import compile_model, use_compile
from ptunifier_min.model import PTUnifier
from ptunifier_min.objectives import draw_step, pretraining_loss


def test_forward_compiles_without_graph_breaks():
    """The passes of pre-training (image-only, text-only, the pair with padded texts), as
    pretraining_loss makes them, and a pair read whole: the collate's `padded` tells the model about
    padding, so nothing is read from the device while tracing."""
    cfg = build(TrainConfig, {**PRESETS["tiny"], "vocab_size": 100})
    model = PTUnifier(cfg.model).train()
    B, T = 4, 12
    image = torch.randint(0, 256, (B, 1, 32, 32), dtype=torch.uint8)  # the loader's pixels
    ids = torch.randint(5, 100, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 8:] = False
    pair = dict(image=image, input_ids=ids, attention_mask=mask, padded=True)
    passes = {"image-only": dict(image=image, read="pooled"),
              "text-only": dict(input_ids=ids, attention_mask=mask, padded=True, read="pooled"),
              "pair (ITM)": dict(pair, read="pooled"), "pair (MLM)": dict(pair, read="text"),
              "pair (all)": pair}
    for kind, inputs in passes.items():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(**inputs)
        reasons = [str(b.reason).split("\n")[0] for b in explained.break_reasons]
        assert explained.graph_break_count == 0, (
            f"{kind} pass: {explained.graph_break_count} graph breaks: {reasons}")
        assert explained.graph_count == 1, kind
    torch._dynamo.reset()


def test_pretraining_stays_within_dynamos_recompile_limit(monkeypatch):
    """Texts change length from batch to batch, and some batches have no padding: the graphs that
    compile_model makes of a pre-training step's passes must stay within dynamo's recompile limit,
    past which a pass silently runs eagerly (here: raises). The eager backend captures the same
    graphs as inductor without generating code. torch.compile's default (static shapes first) would
    need 10 graphs for these steps and fails this test."""
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    cfg = build(TrainConfig, {**PRESETS["tiny"], "vocab_size": 100})
    model = PTUnifier(cfg.model).train()
    graphs = []

    def backend(graph, example_inputs):  # counts the graphs dynamo hands over
        graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = compile_model(model, backend=backend)
    special, B, g = ({"ids": [cfg.model.cls_id, cfg.model.sep_id, 0], "mask": 4}, 4,
                     torch.Generator())
    for step, (T, padded) in enumerate(((20, True), (23, True), (24, False), (18, True),
                                        (24, True), (21, False))):
        ids = torch.randint(5, 100, (B, T), generator=g.manual_seed(step))
        ids[:, 0], ids[:, -1] = cfg.model.cls_id, cfg.model.sep_id
        mask = torch.ones(B, T, dtype=torch.bool)
        if padded:
            mask[0, T - 3:], ids[0, T - 3:] = False, 0
        batch = {"image": torch.randint(0, 256, (B, 1, 32, 32), dtype=torch.uint8),
                 "input_ids": ids, "attention_mask": mask, "padded": padded,
                 "index": torch.arange(B), "image_id": torch.arange(B)}
        draws = draw_step([batch], cfg, step, special)
        pretraining_loss(compiled, batch, draws[0], cfg)[0].backward()
    torch._dynamo.reset()
    # image-only; text-only, MLM's and ITM's pass, each with and without padding
    assert len(graphs) == 7 <= torch._dynamo.config.recompile_limit


def test_the_padding_decision_is_the_masks():
    """`padded` only spares the model a read: given or read from the mask, the encodings are the
    same; and a mask without padding gives what no mask gives."""
    cfg = build(TrainConfig, {**PRESETS["tiny"], "vocab_size": 100})
    model = PTUnifier(cfg.model).eval()
    ids = torch.randint(5, 100, (3, 10))
    image = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 6:] = False
    for m, padded in ((mask, True), (torch.ones_like(mask), False)):
        read = model(image=image, input_ids=ids, attention_mask=m).hidden
        assert torch.equal(
            model(image=image, input_ids=ids, attention_mask=m, padded=padded).hidden, read)
    assert torch.equal(model(image=image, input_ids=ids).hidden,
                       model(image=image, input_ids=ids,
                             attention_mask=torch.ones_like(mask)).hidden)


def test_compile_is_on_for_cuda_by_default():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for cls, presets in ((TrainConfig, PRESETS), (FinetuneConfig, FINETUNE_PRESETS)):
        cfg = parse_args(cls, presets, [])
        assert cfg.compile == "auto"
        assert use_compile(cfg.compile, cuda) and not use_compile(cfg.compile, cpu)
        for argv, value in ((["--compile"], "true"), (["--compile", "false"], "false"),
                            (["--compile", "yes"], "true"), (["--compile", "AUTO"], "auto")):
            assert parse_args(cls, presets, argv).compile == value, argv
    assert use_compile("true", cpu) and not use_compile("false", cuda)
    with pytest.raises(SystemExit):  # a usage error naming the flag
        parse_args(TrainConfig, PRESETS, ["--compile", "maybe"])
    # a config.json written when --compile was a plain bool still loads
    # (eval.py, --resume, the Python API)
    saved = json.loads(json.dumps(dict(compile=False, model={})))
    assert from_dict(TrainConfig, saved).compile == "false"
    assert from_dict(TrainConfig, {**saved, "compile": True}).compile == "true"
