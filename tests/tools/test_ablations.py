"""tools/ablations.py: the paired-test verdicts and the claims built on them, the cell format, the
commands of the arms, and one tiny call end to end: its result.json and tables, a second call that
runs nothing, a deleted output that runs its step alone, and a failing step that is reported and
fails the call."""

import json
import math
import os

import pytest

from test_finetune import world  # noqa: F401  (the shared tiny synthetic world fixture)
from tools import ablations
from tools.ablations import combine, fmt, paired, t_crit


def test_paired_test_verdicts():
    # differences 1.0, 1.1, 0.9: sd 0.1, t = 17.3
    a, b = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.9, 2: 2.1}
    p = paired(a, b)
    assert p["verdict"] == "held" and p["n"] == 3
    assert (math.isclose(p["mean"], 1.0) and math.isclose(p["sd"], 0.1)
            and math.isclose(p["t"], 10 * math.sqrt(3)))
    assert paired(b, a)["verdict"] == "not held"
    # lower is better (a loss): a's are worse
    assert paired(a, b, higher=False)["verdict"] == "not held"
    assert paired(b, a, higher=False)["verdict"] == "held"
    # differences 1.0, -1.4, 0.9: the mean favours a, but t = 0.21 is far below 4.303
    assert paired({0: 1.0, 1: -0.5, 2: 3.0}, b)["verdict"] == "inconclusive"
    # only seeds present in both arms pair up: one here
    assert paired({0: 1.0, 1: 2.0}, {1: 0.0, 2: 5.0}) == {"n": 1, "mean": 2.0, "sd": None,
                                                          "t": None,
                                                          "verdict": "inconclusive (n<2)"}
    assert paired({}, {0: 1.0})["verdict"] == "inconclusive (n<2)"
    # the critical value is Student's for n - 1 degrees of freedom: t = 12
    # passes at n = 3 and fails at n = 2
    two = paired({0: 12.0 + 1, 1: 12.0 - 1}, {0: 0.0, 1: 0.0})  # mean 12, sd sqrt(2): t = 12
    assert math.isclose(two["t"], 12.0) and two["verdict"] == "inconclusive"
    assert (t_crit(1) == 12.706 and t_crit(2) == 4.303 and t_crit(30) == 2.042
            and t_crit(100) == 1.960)
    # the same difference on every seed (sd 0) is significant; no difference at all is not
    assert paired({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})["verdict"] == "held"
    assert paired({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})["verdict"] == "inconclusive"
    assert combine(["held", "held"]) == "held"
    assert combine(["held", "not held", "inconclusive"]) == "not held"
    assert combine(["held", "inconclusive (n<2)"]) == "inconclusive"
    assert combine(["inconclusive (n<2)"] * 2) == "inconclusive (n<2)"


def test_spearman_against_a_hand_count():
    assert ablations.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert ablations.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1)
    # ties share their mean rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2,
    # 3) -> rho = 4.5 / sqrt(4.5 * 5)
    assert ablations.spearman([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_cell_format():
    assert fmt({0: 88.71, 1: 89.29}, 1) == "89.0 ± 0.4"  # sample sd: 0.58 / sqrt(2)
    assert fmt({0: 1.05512}, 3) == "1.055"  # one seed: no spread to show
    assert fmt({}, 1) == "–"
    assert fmt([16384, 16384], 0) == "16,384 ± 0"


def fake_result(arm, seed, score, loss):
    """A result.json with every number the tables read: task metrics
    `score`, final losses `loss`."""
    metrics = {"auroc": score, "accuracy": score, "BLEU_4": score, "CIDEr": score, "open": score,
               "closed": score, "overall": score}
    return {"arm": arm, "seed": seed, "flags": ablations.ARMS[arm],
            "diagnostics": {"pairs": 8, "pools": {}},
            "pretrain": {"final": {"mlm_loss": loss, "itm_loss": 0.0, "itc_loss": 0.0, "loss": loss,
                                   "objectives": loss},
                         "prompt_mode": ablations.prompt_mode(arm),
                         "pool_size": int(arm[4:]) if arm.startswith("pool") else 64,
                         "pool_params": 1024, "total_params": 10 ** 6,
                         "rows_in_use": {"visual": 30, "textual": 20},
                         "entropy": {"visual": 3.0, "textual": 2.5},
                         "zero_shot": {"i2t_r1": score, "t2i_r1": score, "i2t_r10": score,
                                       "t2i_r10": score}, "history": [], "seconds": 1.0},
            "finetune": {name: {"metrics": metrics, "seconds": 1.0}
                         for name in ablations.FINETUNES}}


def test_claims_on_hand_made_results():
    noise = {0: 0.0, 1: 0.01, 2: -0.01}
    score = {"id1-mlm": 0.5, "id2-itm": 0.5, "id3-mlm-itm": 0.6, "id4-itc": 0.55, "id5-all": 0.7}
    results = {arm: {s: fake_result(arm, s, score.get(arm, 0.5) + e, 3.0 - e)
                     for s, e in noise.items()}
               for arm in ablations.ARMS}
    for s, e in noise.items():  # the pool sizes: 64 lowest, no prompts highest
        results["id5-all"][s]["pretrain"]["final"]["objectives"] = 2.0 + e
        results["none"][s]["pretrain"]["final"]["objectives"] = 3.5 + 2 * e
    verdicts = {(c["id"], c["claim"]): c["verdict"] for c in ablations.claims(results)}
    by_id = {cid: v for (cid, _), v in verdicts.items() if cid.startswith("6.")}
    assert by_id["6.2 (1)"] == "held" and by_id["6.2 (4)"] == "held" and by_id["6.3 (i)"] == "held"
    assert by_id["6.2 (2)"] == "not held"  # ID4 (0.55) is significantly below ID3 (0.6) on CheXpert
    # ID5 beats ID3 on RadNLI significantly: the absence is not there
    assert by_id["6.2 (3)"] == "not held"
    assert by_id["6.3 (ii)"] == "held" and by_id["6.3 (iii)"] == "held"
    # one ID significantly better than ID5 on one column is enough to
    # refute "ID5 is best on every task"
    for s, e in noise.items():
        results["id1-mlm"][s]["finetune"]["radnli"]["metrics"]["accuracy"] = 0.9 + e
    by_id = {c["id"]: c for c in ablations.claims(results)}
    assert (by_id["6.2 (4)"]["verdict"] == "not held"
            and "ID5 − ID1 RadNLI acc" in by_id["6.2 (4)"]["numbers"])
    attention = {"cls_to_prompts": 0.3, "uniform_cls_to_prompts": 0.2,
                 "prompts_to_present_modality": 0.5, "uniform_prompts_to_present_modality": 0.8}
    for s in noise:
        results["cosine"][s]["diagnostics"] = {"pools": {"textual": {"distinct_selections": 5 + s}},
                                               "attention": {"image_only": attention}}
    text, summary = ablations.report(results)
    cosine = summary["tables"]["diagnostics"]["cosine"]
    assert cosine["sets_t"]["mean"] == 6 and cosine["cls_img"]["mean"] == pytest.approx(1.5)
    assert cosine["read_img"]["mean"] == pytest.approx(0.625) and cosine["cls_txt"]["n"] == 0
    for row in ("| ID1 | ✓ |  |  | 3 |", "| ID5 | ✓ | ✓ | ✓ | 3 | 70.0 ± 1.0 |",
                "| no prompts | 3 | 3.000 ± 0.010", "| pool 64 (id5-all) | 3 |", "| pool 16 | 3 |",
                "| pool 64 (cosine) | 3 |", "## Pool diagnostics", "pool 16 − no prompts total: ",
                "- **6.2 (4)** all three objectives (ID5) are best on every "
                "task — **not held** — "):
        assert row in text, row
    assert summary["tables"]["table3"]["id5-all"]["chexpert_1"]["n"] == 3


def test_the_arms_commands():
    args = ablations.parse_args(["--preset", "tiny", "--steps", "7", "--out", "o"])
    run, steps = ablations.plan("id4-itc", 2, args)
    assert run == os.path.join("o", "id4-itc", "seed2")
    assert [s.name for s in steps] == ["pretrain", "diagnostics", *ablations.FINETUNES]
    train = steps[0].cmd
    assert (train[1].endswith("train.py")
            and train[-2:] == [os.path.join(run, "pretrain"), "--overwrite"])
    for flag, value in (("--steps", "7"), ("--save-every", "7"), ("--seed", "2"),
                        ("--objectives", "itc"), ("--preset", "tiny"), ("--eval-pairs", "1000"),
                        ("--num-workers", "1")):
        assert train[train.index(flag) + 1] == value, flag
    # the checkpoint's pool report: the script beside this tool, run by its path
    report = steps[1].cmd
    assert os.path.isfile(report[1]) and report[2:4] == [os.path.join(run, "pretrain"), "--out"]
    chexpert = steps[2].cmd
    # finetune's default
    assert chexpert[chexpert.index("--data-frac") + 1] == "0.01" and "--steps" not in chexpert
    assert chexpert[chexpert.index("--init") + 1] == os.path.join(run, "pretrain")
    # no prompts: no pool to diagnose; not a Table 3 arm: no fine-tunes
    assert [s.name for s in ablations.plan("none", 0, args)[1]] == ["pretrain"]
    args = ablations.parse_args(["--arms", "none,id5-all,none", "--finetunes", "radnli",
                                 "--no-diagnostics"])
    assert args.arms == ["id5-all", "none"]  # our order of work: Table 3 before Table 4
    assert [s.name for s in ablations.plan("id5-all", 0, args)[1]] == ["pretrain", "radnli"]


def test_unknown_arms_are_refused_with_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        ablations.parse_args(["--arms", "id5-all,id9"])
    err = capsys.readouterr().err
    assert "unknown --arms id9" in err and "id1-mlm, id2-itm" in err and "final-query" in err


def test_a_tiny_call_end_to_end_resumes_by_outputs(world, tmp_path, capsys,
                                                   monkeypatch):  # noqa: F811
    out = tmp_path / "abl"
    # two of the six fine-tunes: each is a subprocess of a few seconds, and the
    # others take the same code path
    argv = ["--preset", "tiny", "--steps", "6", "--seeds", "0", "--arms", "id4-itc,none",
            "--jobs", "2", "--no-diagnostics", "--finetune-steps", "2", "--eval-pairs", "16",
            "--finetunes", "chexpert-1pct,radnli", "--synth-root", world[0], "--out", str(out)]
    ablations.main(argv)
    first = capsys.readouterr().out
    assert "id4-itc seed0 pretrain: " in first and "id4-itc seed0 radnli: " in first

    r = json.loads((out / "id4-itc" / "seed0" / "result.json").read_text())
    assert r["arm"] == "id4-itc" and r["seed"] == 0 and r["flags"] == ["--objectives", "itc"]
    pre = r["pretrain"]
    # objectives this arm did not train
    assert pre["final"]["mlm_loss"] is None and pre["final"]["itm_loss"] is None
    finite = [pre["final"]["itc_loss"], pre["final"]["loss"], pre["final"]["objectives"],
              pre["seconds"], *pre["rows_in_use"].values(), *pre["entropy"].values(),
              *pre["zero_shot"].values()]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in finite), pre
    assert 0 < pre["pool_params"] < pre["total_params"] and pre["prompt_mode"] == "pool"
    assert (pre["history"]
            and {"step", "loss", "itc_loss", "selected_visual_rows"} <= set(pre["history"][-1]))
    assert set(r["finetune"]) == {"chexpert-1pct", "radnli"} and r["diagnostics"] is None
    assert 0 <= r["finetune"]["chexpert-1pct"]["metrics"]["auroc"] <= 1
    assert (0 <= r["finetune"]["radnli"]["metrics"]["accuracy"] <= 1
            and r["finetune"]["radnli"]["seconds"] > 0)
    none = json.loads((out / "none" / "seed0" / "result.json").read_text())
    assert (none["pretrain"]["pool_params"] == 0 and none["finetune"] == {}
            and none["pretrain"]["prompt_mode"] == "none")
    tables = (out / "tables.md").read_text()
    assert ("| ID4 |  |  | ✓ | 1 |" in tables and "| no prompts | 1 |" in tables
            and "**6.2 (1)**" in tables)
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0]

    # a second call finds every step done: no subprocess starts (their .out files stay as they were)
    outs = {p: p.stat().st_mtime_ns for p in out.rglob("*.out")}
    assert ({p.name for p in outs} == {"pretrain.out", "chexpert-1pct.out", "radnli.out"}
            and len(outs) == 4)
    ablations.main(argv)
    assert " seed0 " not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.out")} == outs

    # a missing output: that step alone runs again
    radnli = out / "id4-itc" / "seed0" / "radnli"
    (radnli / "results.json").unlink()
    ablations.main(argv)
    again = capsys.readouterr().out
    assert ("id4-itc seed0 radnli: " in again and "pretrain: " not in again
            and "chexpert-1pct: " not in again)
    assert [p for p in outs if p.stat().st_mtime_ns != outs[p]] == [radnli.with_suffix(".out")]
    # the old attempt moved aside
    assert (radnli / "results.json").is_file() and any(radnli.glob(".replaced-*"))

    # a step that fails: its command, exit code and console tail are printed, the call fails
    # naming the run, and the run's result.json (now out of date) is gone, so that no table
    # shows numbers of files that changed
    monkeypatch.setitem(ablations.FINETUNES, "radnli", ["--task", "radnli", "--no-such-flag"])
    (radnli / "results.json").unlink()
    with pytest.raises(SystemExit, match=r"1 run\(s\) failed: id4-itc seed0 \(radnli\)"):
        ablations.main(argv)
    said = capsys.readouterr().out
    assert "FAILED id4-itc seed0 radnli (exit code 2): " in said and "--no-such-flag" in said
    assert "unrecognized arguments: --no-such-flag" in said  # the last lines of radnli.out
    assert not (out / "id4-itc" / "seed0" / "result.json").exists()
    assert (out / "none" / "seed0" / "result.json").exists()
    monkeypatch.undo()

    # only the tables; and another recipe in the same folder is refused before anything runs
    ablations.main(argv + ["--table-only"])
    assert "## Table 3" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="another recipe"):
        ablations.main([a if a != "6" else "7" for a in argv])
