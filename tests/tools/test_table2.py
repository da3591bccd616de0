"""tools/table2.py: the tables and verdicts from hand-made results, the commands of a seed's runs,
and one tiny call end to end (pre-training, the zero-shot evaluations, a fine-tune from the
checkpoint and from scratch), which a second call does not run again."""

import argparse
import json
import os

import pytest

from test_finetune import world  # noqa: F401  (the shared tiny synthetic world fixture)
from tools import table2


def fake(arm, seed, score):
    """A result.json with every number the tables read, each `score` (fine-tunes and zero-shot)."""
    metrics = {"auroc": score, "accuracy": score, "ROUGE_L": score, "BLEU_4": score,
               "i2t_r1": score, "t2i_r1": score, "i2t_r10": score, "overall": score}
    results = {name: metrics for name in table2.FINETUNES}
    if arm == "pretrained":
        results |= {f"zeroshot-{n}": metrics for n in table2.ZERO_SHOT}
        results["zeroshot-ms_cxr"] = {"similarity": {"cnr": 1.0 + score, "miou": score},
                                      "gradcam": {"cnr": 0.5, "miou": 0.2},
                                      "box_prior": {"cnr": 0.8 + seed / 100, "miou": 0.3},
                                      "uniform": {"cnr": 0.0, "miou": 0.1}}
    return {"arm": arm, "seed": seed, "seconds": {"pretrain": 60.0}, "results": results}


def test_tables_and_verdicts_from_hand_made_results():
    # pre-trained 0.70, 0.72, 0.74 against scratch 0.60, 0.61, 0.65: differences 10, 11, 9 points
    pre, scratch = (0.70, 0.72, 0.74), (0.60, 0.61, 0.65)
    results = {"pretrained": {s: fake("pretrained", s, pre[s]) for s in range(3)},
               "scratch": {s: fake("scratch", s, scratch[s]) for s in range(3)}}
    text, summary = table2.report(results)
    assert "| pretrained | 3 | 72.0 ± 2.0 |" in text and "| scratch | 3 | 62.0 ± 2.6 |" in text
    verdicts = [line for line in text.splitlines() if line.startswith("| pre-training helps? |")]
    assert verdicts and verdicts[0].count("pre-trained better (+10.0)") == len(table2.COLUMNS)
    assert summary["table2"]["CheXpert 1% AUROC"]["paired"]["n"] == 3
    # the other way round: scratch better on every seed is "not better"
    swapped = {"pretrained": {s: fake("pretrained", s, scratch[s]) for s in range(3)},
               "scratch": {s: fake("scratch", s, pre[s]) for s in range(3)}}
    assert "not better (-10.0)" in table2.report(swapped)[0]
    # one seed: no verdict, and the cell shows no spread
    one = {arm: {0: r[0]} for arm, r in results.items()}
    text1 = table2.report(one)[0]
    assert "inconclusive (n<2)" in text1 and "| pretrained | 1 | 70.0 |" in text1
    # zero-shot and grounding rows: similarity's CNR 1.72 ± 0.02 beats the box prior's (0.81) on
    # every seed
    assert "| pre-trained | 3 | 72.0 ± 2.0 |" in text
    assert "| similarity | 3 | 1.720 ± 0.020 | 72.0 ± 2.0 |" in text
    assert summary["grounding"]["similarity vs box_prior (cnr)"]["verdict"] == "held"
    assert summary["grounding"]["gradcam vs box_prior (cnr)"]["verdict"] == "not held"


def test_a_seeds_commands(tmp_path):
    ns = argparse.Namespace(out=str(tmp_path), preset="tiny", steps=6, finetune_steps=2,
                            data_root="", synth_root="w", finetunes=["chexpert-1pct", "radnli"])
    run, steps = table2.plan("pretrained", 3, ns)
    assert run == os.path.join(str(tmp_path), "pretrained", "seed3")
    names = [s.name for s in steps]
    assert names == ["pretrain", *(f"zeroshot-{n}" for n in table2.ZERO_SHOT), "chexpert-1pct",
                     "radnli"]
    pretrain = " ".join(steps[0].cmd)
    assert "train.py --preset tiny --steps 6 --num-workers 1 --synth-root w --seed 3" in pretrain
    chex = " ".join(steps[-2].cmd)
    assert "--task chexpert --data-frac 0.01 --preset tiny --steps 2" in chex
    assert f"--init {os.path.join(run, 'pretrain')} --seed 3" in chex
    _, scratch = table2.plan("scratch", 3, ns)
    assert [s.name for s in scratch] == ["chexpert-1pct", "radnli"]
    assert all("--init scratch --seed 3" in " ".join(s.cmd) for s in scratch)


def test_unknown_finetunes_are_refused(capsys):
    with pytest.raises(SystemExit):
        table2.main(["--finetunes", "chexpert,nope"])
    assert "unknown --finetunes nope" in capsys.readouterr().err


def test_a_tiny_call_end_to_end(world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "t2"
    argv = ["--preset", "tiny", "--steps", "4", "--finetune-steps", "2", "--seeds", "0",
            "--jobs", "2", "--finetunes", "radnli", "--synth-root", world[0], "--out", str(out)]
    summary = table2.main(argv)
    said = capsys.readouterr().out
    assert "pretrained seed0 pretrain: " in said and "scratch seed0 radnli: " in said
    r = json.loads((out / "pretrained" / "seed0" / "result.json").read_text())
    assert set(r["results"]) == {"radnli", *(f"zeroshot-{n}" for n in table2.ZERO_SHOT)}
    assert 0 <= r["results"]["radnli"]["accuracy"] <= 1
    assert summary["table2"]["RadNLI Acc"]["scratch"].keys() == {0}
    grounding = r["results"]["zeroshot-ms_cxr"]
    assert {"similarity", "gradcam", "box_prior", "uniform"} <= set(grounding)
    assert any((out / "pretrained" / "seed0" / "zeroshot-ms_cxr" / "overlays").iterdir())
    assert "### Phrase grounding" in (out / "tables.md").read_text()
    # a second call runs nothing
    outs = {p: p.stat().st_mtime_ns for p in out.rglob("*.out")}
    table2.main(argv)
    assert " seed0 " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.out")} == outs
    with pytest.raises(SystemExit, match="another recipe"):
        table2.main([a if a != "4" else "5" for a in argv])
