"""synth.py: determinism, the official layouts, every drop-rule case, labels that agree with the
report text, no label leakage through ids / row order / file sizes, and the numpy floors (AUROC,
logistic regression, table)."""

import csv
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ptunifier_min.datasets import synth as S

FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
CHEXPERT_COLUMNS = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,"
                    "Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,"
                    "Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
                    "Support Devices").split(",")  # the release's order (datasets.md)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, S.generate(out, seed=0, scale="tiny", progress=False, workers=1)


def _tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def _csv(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def _frontal(root, split="train"):
    rows = _csv(root / "chexpert" / "CheXpert-v1.0-small" / f"{split}.csv")
    return [r for r in rows if r["Frontal/Lateral"] == "Frontal"]


def _area(path):
    with Image.open(path) as im:
        return im.size[0] * im.size[1]


def _header(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.readline().rstrip("\n").split(",")


# -------------------------------------------------------------------------------------- determinism

def test_same_seed_gives_identical_bytes_whatever_the_workers(tiny, tmp_path, monkeypatch):
    out, counts = tiny
    monkeypatch.setattr(S, "POOL_MIN_JOBS", 1)  # render even the tiny world on a 2-process pool
    again = S.generate(tmp_path / "again", seed=0, scale="tiny", progress=False, workers=2)
    assert again == counts
    assert _tree(out) == _tree(tmp_path / "again")
    S.generate(tmp_path / "other", seed=1, scale="tiny", progress=False, workers=1)
    other = _tree(tmp_path / "other")
    same = {k for k, v in _tree(out).items() if other.get(k) == v}
    assert len(same) < 0.05 * len(other)  # ids, pixels and texts all move with the seed


def test_existing_folder_is_not_overwritten_silently(tmp_path):
    S.generate(tmp_path, scale="tiny", progress=False, datasets=["radnli"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        S.generate(tmp_path, scale="tiny", progress=False, datasets=["radnli"])
    S.generate(tmp_path, scale="tiny", progress=False, datasets=["radnli"], overwrite=True)
    with pytest.raises(ValueError, match="unknown scale"):
        S.generate(tmp_path, scale="huge")


# ------------------------------------------------------------------------------------------- layout

def test_official_layouts_ids_and_fields(tiny):
    out, _ = tiny
    # ROCO: six text files per split and subset, one image per id
    for split in ("train", "validation", "test"):
        for sub in ("radiology", "non-radiology"):
            d = out / "roco" / "data" / split / sub
            for name in ("captions", "dlinks", "keywords", "semtypes", "cuis", "licences"):
                assert (d / f"{name}.txt").is_file()
            for line in (d / "captions.txt").read_text().splitlines():
                rid = line.split("\t")[0]
                assert re.fullmatch(r"ROCO_\d{5}", rid) and (d / "images" / f"{rid}.jpg").is_file()
    # MedICaT
    keys = {"pdf_hash", "fig_key", "fig_uri", "s2_caption", "s2orc_caption", "s2orc_references",
            "radiology", "scope", "predicted_type", "oa_info"}
    for line in _lines(out / "medicat"
                       / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"):
        r = json.loads(line)
        assert set(r) == keys and re.fullmatch(r"[0-9a-f]{40}", r["pdf_hash"])
        assert (out / "medicat" / "figures" / f"{r['pdf_hash']}_{r['fig_uri']}").is_file()
    # MIMIC-CXR: gzipped CSVs with the release's columns, images and reports where the ids say
    m = out / "mimic_cxr"
    assert _header(m / "mimic-cxr-2.0.0-split.csv.gz") == ["dicom_id", "study_id",
                                                           "subject_id", "split"]
    assert (_header(m / "mimic-cxr-2.0.0-metadata.csv.gz")[:7]
            == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns"])
    assert (_header(m / "mimic-cxr-2.0.0-chexpert.csv.gz")
            == ["subject_id", "study_id"] + sorted(S.MIMIC_LABELS))
    for r in _csv(m / "mimic-cxr-2.0.0-split.csv.gz"):
        assert re.fullmatch(r"1\d{7}", r["subject_id"]) and re.fullmatch(r"5\d{7}", r["study_id"])
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", r["dicom_id"])
        assert r["split"] in ("train", "validate", "test")
        folder = m / "files" / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}"
        assert (folder / f"s{r['study_id']}" / f"{r['dicom_id']}.jpg").is_file()
        assert (folder / f"s{r['study_id']}.txt").is_file()
    # CheXpert
    for split in ("train", "valid"):
        path = out / "chexpert" / "CheXpert-v1.0-small" / f"{split}.csv"
        assert _header(path) == CHEXPERT_COLUMNS
        for r in _csv(path):
            assert re.fullmatch(rf"CheXpert-v1.0-small/{split}/patient\d{{5}}/study\d+/"
                                r"view\d_(frontal|lateral).jpg", r["Path"])
            assert (out / "chexpert" / r["Path"]).is_file()
    # RSNA
    assert (_header(out / "rsna" / "stage_2_train_labels.csv")
            == ["patientId", "x", "y", "width", "height", "Target"])
    assert _header(out / "rsna" / "stage_2_detailed_class_info.csv") == ["patientId", "class"]
    for r in _csv(out / "rsna" / "stage_2_train_labels.csv"):
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                            r["patientId"])
        assert (out / "rsna" / "stage_2_train_images" / f"{r['patientId']}.png").is_file()
    # RadNLI
    for name in ("radnli_dev_v1", "radnli_test_v1", "mli_train_v1"):
        for line in (out / "radnli" / f"{name}.jsonl").read_text().splitlines():
            r = json.loads(line)
            assert set(r) == {"pair_id", "sentence1", "sentence2", "gold_label"}
            assert r["gold_label"] in ("entailment", "neutral", "contradiction")
    # VQA-RAD, SLAKE, VQA-Med 2019
    for r in json.loads((out / "vqa_rad" / "VQA_RAD Dataset Public.json").read_text()):
        assert {"qid", "image_name", "image_organ", "question", "answer", "answer_type",
                "question_type", "phrase_type"} <= set(r) and r["answer_type"] in ("CLOSED", "OPEN")
        assert re.fullmatch(r"synpic\d+\.jpg", r["image_name"])
        assert (out / "vqa_rad" / "VQA_RAD Image Folder" / r["image_name"]).is_file()
    for split in ("train", "validate", "test"):
        for r in json.loads((out / "slake" / f"{split}.json").read_text(encoding="utf-8")):
            assert set(r) == {"img_id", "img_name", "question", "answer", "q_lang", "location",
                              "modality", "answer_type", "base_type", "content_type", "qid"}
            assert r["img_name"] == f"xmlab{r['img_id']}/source.jpg"
            assert (out / "slake" / "imgs" / r["img_name"]).is_file()
    for split in ("train", "val"):
        for c, cat in enumerate(("Modality", "Plane", "Organ", "Abnormality"), 1):
            for line in _lines(out / "medvqa2019" / split / "QAPairsByCategory"
                               / f"C{c}_{cat}_{split}.txt"):
                image, _, answer = line.split("|")
                assert (answer == answer.lower()
                        and (out / "medvqa2019" / split / "images" / f"{image}.jpg").is_file())
    for line in (out / "medvqa2019" / "test"
                 / "VQAMed2019_Test_Questions_w_Ref_Answers.txt").read_text().splitlines():
        image, cat, _, answer = line.split("|")
        assert cat in ("modality", "plane", "organ", "abnormality") and answer == answer.lower()


# ---------------------------------------------------------------------------- drop rules and counts

def test_every_drop_rule_occurs_and_counts_match_the_files(tiny):
    out, counts = tiny
    assert set(counts) == {"roco", "roco_retrieval", "medicat", "mimic_cxr",
                           "mimic_gen", "mimic_sum", "chexpert", "rsna", "radnli",
                           "vqa_rad", "slake", "medvqa2019"}
    for name, c in counts.items():
        assert all(v > 0 for v in c["dropped"].values()), name
        assert (all(v > 0 for v in c["kept"].values())
                and (set(c["kept"]) in ({"total"}, {"train", "val", "test"})))
    assert set(counts["mimic_cxr"]["dropped"]) == {"lateral", "short_text", "no_text"}
    assert set(counts["mimic_sum"]["dropped"]) == {"no_findings", "no_impression"}
    assert set(counts["medicat"]["dropped"]) == {"non_radiology", "short_text", "no_text"}
    # recount a few rules straight from the files
    roco = out / "roco" / "data"
    caps = {s: [line.split("\t", 1)[1]
                for line in (roco / s / "radiology" / "captions.txt").read_text().splitlines()]
            for s in ("train", "validation", "test")}
    assert counts["roco"]["kept"] == {S.SPLIT[s]: sum(len(c.split()) >= 3 for c in v)
                                      for s, v in caps.items()}
    assert (counts["roco"]["dropped"]["short_caption"]
            == sum(len(c.split()) < 3 for v in caps.values() for c in v))
    assert counts["roco"]["dropped"]["non_radiology"] == sum(
        len((roco / s / "non-radiology" / "captions.txt").read_text().splitlines()) for s in caps)
    rows = [r for s in ("train", "valid")
            for r in _csv(out / "chexpert" / "CheXpert-v1.0-small" / f"{s}.csv")]
    assert (counts["chexpert"]["dropped"]["lateral"]
            == sum(r["Frontal/Lateral"] == "Lateral" for r in rows))
    slake = {s: json.loads((out / "slake" / f"{s}.json").read_text("utf-8"))
             for s in ("train", "validate", "test")}
    assert counts["slake"]["dropped"]["non_english"] == sum(r["q_lang"] == "zh"
                                                            for v in slake.values() for r in v)
    assert counts["slake"]["kept"] == {S.SPLIT[s]: sum(r["q_lang"] == "en" for r in v)
                                       for s, v in slake.items()}
    med = out / "medvqa2019"
    c4 = sum(len(_lines(med / s / "QAPairsByCategory" / f"C4_Abnormality_{s}.txt"))
             for s in ("train", "val"))
    test = (med / "test" / "VQAMed2019_Test_Questions_w_Ref_Answers.txt").read_text().splitlines()
    assert (counts["medvqa2019"]["dropped"]["abnormality"]
            == c4 + sum(t.split("|")[1] == "abnormality" for t in test))
    # RSNA: patients with several box rows and patients with one blank Target-0 row
    labels = _csv(out / "rsna" / "stage_2_train_labels.csv")
    per = {}
    for r in labels:
        per.setdefault(r["patientId"], []).append(r)
    assert counts["rsna"]["dropped"]["box_rows_merged"] == len(labels) - len(per)
    assert any(len(v) > 1 and all(r["Target"] == "1" for r in v) for v in per.values())
    assert any(len(v) == 1 and v[0]["Target"] == "0" and v[0]["x"] == "" for v in per.values())
    # MIMIC: laterals in the metadata, reports without a findings section
    views = {r["ViewPosition"] for r in _csv(out / "mimic_cxr" / "mimic-cxr-2.0.0-metadata.csv.gz")}
    assert {"PA", "AP"} & views and {"LATERAL", "LL"} & views
    reports = [p.read_text() for p in (out / "mimic_cxr" / "files").rglob("s*.txt")]
    assert (any("FINDINGS:" not in t for t in reports)
            and any("IMPRESSION:" not in t for t in reports))
    # MedICaT: non-radiology figures, null references
    fig = [json.loads(x)
           for x in (out / "medicat"
                     / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl")
           .read_text().splitlines()]
    assert any(not r["radiology"] for r in fig) and any(r["s2orc_references"] is None for r in fig)


# ---------------------------------------------------------------------------- labels vs report text

SYNONYMS = {"Atelectasis": r"atelectasis|volume loss",
            "Cardiomegaly": r"cardiomegaly|heart size|cardiac silhouette",
            "Consolidation": r"consolidation", "Edema": r"edema|vascular congestion",
            "Pleural Effusion": r"effusion"}
HEDGE, NEGATION = (r"\b(possible|may represent|cannot be excluded|cannot exclude)\b",
                   r"\b(no|normal)\b")
RANK = {0.0: 0, -1.0: 1, 1.0: 2}


def read_labels(text):
    """A tiny CheXpert-style labeler, written independently of synth.py: per sentence, a hedge cue
    makes a mention uncertain, a negation cue negative, else positive; positive > uncertain >
    negative; unmentioned = blank."""
    out = {}
    for sentence in re.split(r"(?<=\.)\s+", " ".join(text.split())):
        for label, pattern in SYNONYMS.items():
            if re.search(pattern, sentence, re.I):
                v = (-1.0 if re.search(HEDGE, sentence, re.I)
                     else 0.0 if re.search(NEGATION, sentence, re.I) else 1.0)
                out[label] = max(out.get(label, v), v, key=RANK.get)
    return out


def test_report_labels_agree_with_the_text():
    rng, seen = np.random.default_rng(0), []
    for i in range(600):
        case = S.MIMIC_CASES[i % len(S.MIMIC_CASES)]
        findings, impression, labels = S.write_report(S.sample_study(rng), rng, case)
        text = " ".join(t for t in (findings, impression) if t)
        assert read_labels(text) == {k: v for k, v in labels.items() if k in SYNONYMS}, text
        assert ((labels.get("No Finding") == 1.0)
                == (not any(v != 0.0 for k, v in labels.items() if k != "No Finding")))
        seen += list(labels.values())
    assert {1.0, 0.0, -1.0} <= set(seen)  # hedged, negated and positive mentions all occur


def test_mimic_csv_labels_agree_with_report_files(tiny):
    out, _ = tiny
    m, n_checked = out / "mimic_cxr", 0
    for r in _csv(m / "mimic-cxr-2.0.0-chexpert.csv.gz"):
        text = (m / "files" / f"p{r['subject_id'][:2]}" / f"p{r['subject_id']}"
                / f"s{r['study_id']}.txt").read_text()
        body = text.split("FINAL REPORT", 1)[1]
        assert {k: float(r[k]) for k in SYNONYMS if r[k] != ""} == read_labels(body), text
        n_checked += 1
    assert n_checked == sum(S.SCALES["tiny"]["mimic"])


def test_vqa_answers_follow_the_figure_state():
    rng = np.random.default_rng(0)
    for _ in range(200):
        fig = S.sample_figure(rng)
        for q, a, closed, qtype, _ in S.questions(fig, rng):
            assert (a in ("Yes", "No")) == closed
            if qtype == "MODALITY" and not closed:
                assert a == S.MOD_ANSWER[fig["modality"]]
            if qtype == "POS" and not closed:
                assert a.lower() == fig["side"]
            if q.startswith("How many"):
                assert a == str(fig["count"])


# ------------------------------------------------------------------------------------------ leakage

def test_no_label_in_ids_row_order_image_or_file_size(tmp_path):
    S.generate(tmp_path, seed=0, scale="small", progress=False, datasets=["chexpert"])
    rows = _frontal(tmp_path)
    paths = [tmp_path / "chexpert" / r["Path"] for r in rows]
    size = np.array([p.stat().st_size for p in paths], float)
    pixels = np.array([_area(p) for p in paths], float)
    # rank of the sorted patient id
    order = np.argsort(np.argsort([r["Path"] for r in rows])).astype(float)
    for label in FIVE:
        y = np.array([r[label] in ("1.0", "-1.0") for r in rows])
        assert 0.1 < y.mean() < 0.5, label
        # ~3 standard errors at this size; a real leak (JPEG quality 97 for studies
        # with findings) gives 0.63-0.69
        assert 0.4 <= S.auroc(y, size) <= 0.6, label
        assert 0.4 <= S.auroc(y, pixels + 1e-3 * size) <= 0.6, label
        assert abs(np.corrcoef(order, y)[0, 1]) < 0.1, label


# ------------------------------------------------------------------------------------------- floors

def test_auroc_matches_a_reference_and_handles_ties():
    assert S.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert S.auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert np.isnan(S.auroc([1, 1], [0.2, 0.3]))
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, s = rng.random(300) < 0.3, np.round(rng.random(300), 1)  # many ties
    assert S.auroc(y, s) == pytest.approx(metrics.roc_auc_score(y, s))


def test_floors_table_on_a_hand_written_prepared_folder(tiny, tmp_path):
    out, _ = tiny
    rows = _frontal(out)
    prep = tmp_path / "prepared"

    def write(name, split, records):
        (prep / name).mkdir(parents=True, exist_ok=True)
        (prep / name / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    recs = [dict(id=r["Path"], image=str(out / "chexpert" / r["Path"]),
                 labels=[float(r[k] == "1.0") for k in FIVE]) for r in rows]
    recs[0]["labels"], recs[1]["labels"] = [1.0] * 5, [0.0] * 5  # both classes in the test half
    write("chexpert", "train", recs[len(recs) // 2:])
    write("chexpert", "test", recs[:len(recs) // 2])
    for split, answers in (("train", ["yes", "yes", "no"]), ("test", ["yes", "no"])):
        write("vqa_rad", split, [dict(id=i, image="", question="q", answer=a,
                                      answer_type="closed", label=0)
                                 for i, a in enumerate(answers)])
    write("roco_retrieval", "test", [dict(id=i, image="", texts=["a b c"]) for i in range(4)])
    table = S.floors(prep)
    assert re.search(r"\| chexpert \| .* \| 0\.\d{3} \(", table)
    assert ("| vqa_rad | majority answer accuracy (one answer 'yes' / one per answer type) "
            "| 0.500 / 0.500 |") in table
    assert "| slake | majority answer accuracy | not prepared |" in table
    assert "| roco_retrieval | Recall@1 at chance (1/N, N = 4 test pairs) | 0.2500 |" in table


def test_logistic_regression_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 5))
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0], 1).astype(float)
    p = S.logistic_regression(x[:300], y[:300])(x[300:])
    assert S.auroc(y[300:, 0], p[:, 0]) > 0.98 and S.auroc(y[300:, 1], p[:, 1]) > 0.98


def test_command_line(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "ptunifier_min.datasets.synth", *args],
                              capture_output=True, text=True, cwd=repo)
    assert run().returncode == 2
    done = run("--out", str(tmp_path), "--scale", "tiny", "--datasets", "radnli", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "synth_counts.json").read_text()) == {
        "radnli": {"kept": {"train": 24, "val": 12, "test": 12}, "dropped": {}}}


# ---------------------------------------------------------------------------------------- real size

def test_real_size_renders_the_same_world_at_more_pixels(tiny, tmp_path):
    out, counts = tiny
    assert S.generate(tmp_path, seed=0, scale="tiny", progress=False, workers=1,
                      datasets=["vqa_rad"],
                      real_size=True) == {k: v for k, v in counts.items() if k == "vqa_rad"}
    small, real = _tree(out / "vqa_rad"), _tree(tmp_path / "vqa_rad")
    assert sorted(small) == sorted(real)
    images = [k for k in small if k.endswith(".jpg")]
    # questions, answers: the same
    assert images and all(small[k] == real[k] for k in small if k not in images)
    k = S.REAL_SIZE["figure"]
    for name in images:
        with Image.open(out / "vqa_rad" / name) as a, Image.open(tmp_path / "vqa_rad" / name) as b:
            assert (b.size == (a.size[0] * k, a.size[1] * k)
                    and 896 <= min(b.size) <= max(b.size) <= 1152)
    # one chest film (~3 s): 21x the default size, an RSNA box at the same place of the body
    st = S.sample_study(S._rng(0, 4, 0), view="PA")
    st.update(n_boxes=1)
    (h, w), (box,) = S._render_job(("cxr", st, (0, 4, 0), tmp_path / "small.png"))
    (H, W), (big,) = S._render_job(("cxr", st, (0, 4, 0), tmp_path / "real.png"), real_size=True)
    k = S.REAL_SIZE["cxr"]
    assert (H, W) == (h * k, w * k) and 2352 <= min(H, W) <= max(H, W) <= 3024
    # boxes are rounded to 0.1 px
    assert big == pytest.approx([v * k for v in box], abs=0.05 * k + 0.1)
