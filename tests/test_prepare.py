"""prepare.py: every rule on hand-written rows in the official layouts, the errors, the
splits, and the synthetic mirrors of synth.py end to end (the counts prepare reports must
equal the ones synth.py wrote)."""

import csv
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ptunifier_min.images import load_image
from ptunifier_min import data as D
from ptunifier_min.datasets import prepare as P
from ptunifier_min.datasets.source import SOURCE
from ptunifier_min.data import read_meta, read_split


def _img(path, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("L", (12, 10), 128).save(path, format=fmt)


def _csv(path, header, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))


def _json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _ids(folder, split):
    return [r["id"] for r in read_split(folder, split)]


def make_roco(root, val_name="validation"):
    """train: 2 kept (one image found through dlinks.txt), 1 two-word caption, 1
    non-radiology; val, test: 1 each."""
    data = os.path.join(root, "data")
    for split, rows in (("train", [("ROCO_00007", "CT of the chest shows a mass."),
                                   ("ROCO_00003", "Axial  MRI"),
                                   ("ROCO_00005", "Ultrasound of the liver, normal.")]),
                        (val_name, [("ROCO_00011", "Chest X-ray with effusion.")]),
                        ("test", [("ROCO_00021", "Abdominal CT with contrast.")])):
        rad = os.path.join(data, split, "radiology")
        _lines(os.path.join(rad, "captions.txt"), [f"{i}\t {c}" for i, c in rows])
        links = []
        for i, c in rows:
            if i == "ROCO_00005":  # image stored under the PMC file name of dlinks.txt
                links.append(f"{i}\twget https://x/PMC1.tar.gz\tPMC1-fig2.jpg")
                _img(os.path.join(rad, "images", "PMC1-fig2.jpg"))
            else:
                links.append(f"{i}\twget https://x/PMC2.tar.gz\tother.jpg")
                _img(os.path.join(rad, "images", i + ".jpg"))
        _lines(os.path.join(rad, "dlinks.txt"), links)
    _lines(os.path.join(data, "train", "non-radiology", "captions.txt"),
           ["ROCO_00099\tA photograph of a hand lesion."])
    return root


def make_mimic(root, gz=True, sectioned=None):
    """3 studies of 2 subjects: s50000001 (train; PA + LATERAL), s50000002 (validate; AP, no
    FINDINGS), s50000003 (test; PA, 2-word IMPRESSION)."""
    ext = ".csv.gz" if gz else ".csv"
    studies = [("10000001", "50000001", "train", [("d-1", "PA"), ("d-2", "LATERAL")],
                "FINAL REPORT\n EXAMINATION: CHEST (PA AND LAT)\n INDICATION: cough\n\n "
                "FINDINGS:\n\n There is no focal consolidation.  The heart\n size is normal.\n\n "
                "IMPRESSION: \n\n No acute cardiopulmonary process.\n"),
               ("10000001", "50000002", "validate", [("d-3", "AP")],
                "FINAL REPORT\n INDICATION: line placement\n\n IMPRESSION: Right IJ "
                "line ends in the SVC.\n"),
               ("12000002", "50000003", "test", [("d-4", "PA")],
                "FINDINGS: Small left pleural effusion is seen.\n\n IMPRESSION: Small effusion.\n")]
    split_rows, meta_rows = [], []
    for subject, study, split, images, report in studies:
        folder = os.path.join(root, "files", f"p{subject[:2]}", f"p{subject}")
        _lines(os.path.join(folder, f"s{study}.txt"), [report])
        for dicom, view in images:
            split_rows.append([dicom, study, subject, split])
            meta_rows.append([dicom, subject, study, "CHEST", view, 10, 12])
            _img(os.path.join(folder, f"s{study}", dicom + ".jpg"))
    _csv(os.path.join(root, "mimic-cxr-2.0.0-split" + ext),
         ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _csv(os.path.join(root, "mimic-cxr-2.0.0-metadata" + ext),
         ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
          "Rows", "Columns"], meta_rows)
    if sectioned:
        _csv(os.path.join(root, "mimic_cxr_sectioned.csv"),
             ["study", "impression", "findings", "last_paragraph", "comparison"], sectioned)
    return root


CHEX_COLS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
             "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
             "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
             "Pleural Other", "Fracture", "Support Devices"]


def make_chexpert(root, train_labels, valid_labels=({},), n_lateral=1):
    """train_labels: one dict {label name: value string} per frontal train row."""
    base = os.path.join(root, "CheXpert-v1.0-small")
    for name, label_rows in (("train", train_labels), ("valid", valid_labels)):
        rows = []
        for k, labels in enumerate(list(label_rows)
                                   + [None] * (n_lateral if name == "train" else 0)):
            view = "frontal" if labels is not None else "lateral"
            rel = f"CheXpert-v1.0-small/{name}/patient{k:05d}/study1/view1_{view}.jpg"
            _img(os.path.join(root, rel))
            row = {c: "" for c in CHEX_COLS}
            row.update({"Path": rel, "Sex": "Male", "Age": "60",
                        "Frontal/Lateral": view.capitalize(),
                        "AP/PA": "AP" if view == "frontal" else ""})
            row.update(labels or {})
            rows.append([row[c] for c in CHEX_COLS])
        _csv(os.path.join(base, name + ".csv"), CHEX_COLS, rows)
    return root


def make_rsna(root, n_patients=40):
    """Patient k has k % 3 boxes (a patient without a box appears once with Target 0)."""
    rows = []
    for k in range(n_patients):
        pid = f"pid-{k:03d}"
        _img(os.path.join(root, "stage_2_train_images", pid + ".png"), "PNG")
        boxes = [[10 * b, 20, 30, 40] for b in range(k % 3)]
        rows += [[pid, *b, 1] for b in boxes] or [[pid, "", "", "", "", 0]]
    _csv(os.path.join(root, "stage_2_train_labels.csv"),
         ["patientId", "x", "y", "width", "height", "Target"], rows)
    return root


def _vqa_rad_row(qid, image, answer, phrase, q="Is there a fracture?", t="CLOSED"):
    return {"qid": qid, "image_name": image, "image_organ": "CHEST", "question": q,
            "answer": answer, "answer_type": t, "question_type": "PRES", "phrase_type": phrase}


def make_vqa_rad(root, rows):
    for r in rows:
        _img(os.path.join(root, "VQA_RAD Image Folder", r["image_name"]))
    _json(os.path.join(root, "VQA_RAD Dataset Public.json"), rows)
    return root


def make_slake(root):
    def row(qid, lang, answer, img=1):
        return {"img_id": img, "img_name": f"xmlab{img}/source.jpg",
                "question": "Which organ is shown?", "answer": answer, "q_lang": lang,
                "location": "Lung", "modality": "CT", "answer_type": "OPEN", "base_type": "vqa",
                "content_type": "Organ", "qid": qid}
    _img(os.path.join(root, "imgs", "xmlab1", "source.jpg"))
    _json(os.path.join(root, "train.json"),
          [row(1, "en", "Lung"), row(2, "zh", "肺"), row(3, "en", "Heart")])
    _json(os.path.join(root, "validate.json"), [row(4, "en", "lung"), row(5, "zh", "心脏")])
    _json(os.path.join(root, "test.json"),
          [row(6, "en", "Liver"), row(7, "en", "heart"), row(8, "zh", "肝")])
    return root


def make_medvqa(root, clef_names=False):
    names = {1: "Modality", 2: "Plane", 3: "Organ", 4: "Abnormality"}
    folders = {"train": "ImageClef-2019-VQA-Med-Training" if clef_names else "train",
               "val": "ImageClef-2019-VQA-Med-Validation" if clef_names else "val"}
    for split, folder in folders.items():
        for img in ("synpic100", "synpic200"):
            _img(os.path.join(root, folder, "images", f"{img}_{split}.jpg"))
        for k in (1, 2, 3, 4):
            _lines(os.path.join(root, folder, "QAPairsByCategory", f"C{k}_{names[k]}_{split}.txt"),
                   [f"synpic100_{split}|what is shown in c{k}?|answer {k}",
                    f"synpic200_{split}|what is seen in c{k}?|answer {k}b"])
    _img(os.path.join(root, "test", "images", "synpic300.jpg"))
    _lines(os.path.join(root, "test", "VQAMed2019_Test_Questions_w_Ref_Answers.txt"),
           ["synpic300|modality|what modality?|answer 1",
            "synpic300|plane|which plane?|unseen plane", "synpic300|organ|which organ?|answer 3b",
            "synpic300|abnormality|what is abnormal?|a rare thing"])
    return root


def test_roco_rules_and_retrieval(tmp_path):
    raw = make_roco(str(tmp_path / "raw"), val_name="val")
    folders = P.prepare("roco", raw, str(tmp_path / "out"))
    assert [os.path.basename(f) for f in folders] == ["roco", "roco_retrieval"]
    meta = read_meta(folders[0])
    assert meta["dropped"] == {"non_radiology": 1, "short_caption": 1}
    assert meta["counts"] == {"train": 2, "val": 1, "test": 1}
    train = {r["id"]: r for r in read_split(folders[0], "train")}
    # ROCO_00003 has 2 words, ROCO_00099 is non-radiology
    assert sorted(train) == ["ROCO_00005", "ROCO_00007"]
    assert train["ROCO_00005"]["image"].endswith("PMC1-fig2.jpg")  # found through dlinks.txt
    assert train["ROCO_00007"]["texts"] == ["CT of the chest shows a mass."]  # stripped, case kept
    assert os.path.isabs(train["ROCO_00007"]["image"])
    assert read_meta(folders[1])["counts"] == {"train": 2, "val": 1, "test": 1}
    with open(os.path.join(folders[0], "train_ids.txt")) as f:
        assert f.read().split() == ["ROCO_00005", "ROCO_00007"]


def test_retrieval_keeps_at_most_2000(tmp_path):
    recs = [{"id": f"ROCO_{i:05d}"} for i in range(2500)]
    a, b = P._sample(recs, 2000, 0), P._sample(list(reversed(recs)), 2000, 0)
    assert len(a) == 2000 and a == b and a != P._sample(recs, 2000, 1)
    assert len(P._sample(recs[:10], 2000, 0)) == 10


def test_medicat_rules(tmp_path):
    raw = tmp_path / "raw"
    rows = [{"pdf_hash": "h1", "fig_uri": "1-Figure1-1.png", "s2_caption": "Axial CT shows a mass.",
             "s2orc_references": ["See above.", "The mass is shown in Figure 1."],
             "radiology": True},
            {"pdf_hash": "h2", "fig_uri": "2-Figure2-1.png", "s2_caption": "Bar chart of survival.",
             "s2orc_references": None, "radiology": False},
            {"pdf_hash": "h3", "fig_uri": "3-Figure1-1.png", "s2_caption": "MRI.",
             "s2orc_references": [], "radiology": True}]
    rows += [{"pdf_hash": f"k{i:02d}", "fig_uri": "1-Figure1-1.png",
              "s2_caption": f"Chest radiograph number {i}.", "s2orc_references": None,
              "radiology": True} for i in range(19)]
    for r in rows:
        _img(str(raw / "figures" / f"{r['pdf_hash']}_{r['fig_uri']}"), "PNG")
    _lines(str(raw / "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"),
           [json.dumps(r) for r in rows])
    (folder,) = P.prepare("medicat", str(raw), str(tmp_path / "out"))
    meta = read_meta(folder)
    # h2 non-radiology; "See above." and "MRI." are short texts; h3 is then left without text
    assert meta["dropped"] == {"non_radiology": 1, "short_text": 2, "no_text": 1}
    # 20 figures: min(1000, 10%) = 2 val, 2 test
    assert meta["counts"] == {"train": 16, "val": 2, "test": 2}
    h1 = [r for s in P.SPLITS for r in read_split(folder, s) if r["id"] == "h1_1-Figure1-1"]
    assert h1 and h1[0]["texts"] == ["Axial CT shows a mass.", "The mass is shown in Figure 1."]


def test_mimic_rules_gz_and_csv(tmp_path):
    results = []
    for gz in (True, False):
        raw = make_mimic(str(tmp_path / f"raw{gz}"), gz=gz)
        out = str(tmp_path / f"out{gz}")
        # 3 studies: some splits are empty
        folders = P.prepare("mimic_cxr", raw, out, allow_empty=True)
        assert [os.path.basename(f) for f in folders] == ["mimic_cxr", "mimic_gen", "mimic_sum"]
        results.append({os.path.basename(f): (read_meta(f)["counts"], read_meta(f)["dropped"],
                                              [read_split(f, s) for s in P.SPLITS])
                        for f in folders})
        pre, gen, summ = (results[-1]["mimic_cxr"], results[-1]["mimic_gen"],
                          results[-1]["mimic_sum"])
        assert pre[0] == {"train": 1, "val": 1, "test": 1}
        # d-2 lateral; "Small effusion." short
        assert pre[1] == {"lateral": 1, "short_text": 1, "no_text": 0}
        train = pre[2][0][0]
        assert train["id"] == "d-1" and train["texts"] == [
            "No acute cardiopulmonary process.",
            "There is no focal consolidation. The heart size is normal."]
        assert pre[2][2][0]["texts"] == ["Small left pleural effusion is seen."]
        # generation: d-3's study has no FINDINGS
        assert (gen[0] == {"train": 1, "val": 0, "test": 1}
                and gen[1] == {"lateral": 1, "no_findings": 1})
        assert (gen[2][0][0]["target"]
                == "There is no focal consolidation. The heart size is normal.")
        # summarization, per study: s50000002 has no FINDINGS, s50000003's IMPRESSION has 2 words
        assert summ[0] == {"train": 1, "val": 0, "test": 0}
        assert summ[1] == {"no_findings": 1, "no_impression": 1}
        assert summ[2][0][0] == {"id": "50000001", "text_a": train["texts"][1],
                                 "target": train["texts"][0]}
    # .csv.gz and .csv give the same folders (the image paths differ only by the raw folder)
    for name in results[0]:
        assert results[0][name][:2] == results[1][name][:2]
        ids = [[[r["id"] for r in split] for split in result[name][2]] for result in results]
        assert ids[0] == ids[1]


def test_mimic_sectioned_csv_is_used(tmp_path):
    raw = make_mimic(str(tmp_path / "raw"), sectioned=[["s50000002", "Line tip in the SVC.",
                                                        "Right IJ line is in place.", "", ""]])
    folders = P.prepare("mimic_cxr", raw, str(tmp_path / "out"), allow_empty=True)
    val = read_split(folders[1], "val")
    assert [r["target"] for r in val] == ["Right IJ line is in place."]
    assert "mimic_cxr_sectioned.csv" in read_meta(folders[0])["rules"]["texts"]


def test_extract_sections():
    report = ("                FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  "
              "___F with cough\n\n COMPARISON:  None.\n\n FINDINGS: \n\n There is no focal "
              "consolidation.  Bilateral\n nodular opacities.\n\n IMPRESSION: \n\n No acute "
              "cardiopulmonary process.\n")
    assert P.extract_sections(report) == {"findings": "There is no focal consolidation. "
                                                      "Bilateral nodular opacities.",
                                          "impression": "No acute cardiopulmonary process."}
    assert P.extract_sections("CONCLUSION: Stable.\n") == {"findings": "", "impression": "Stable."}


def test_chexpert_uncertainty_policy(tmp_path):
    labels = P.CHEXPERT_LABELS
    rows = ([{name: "-1.0"} for name in labels] + [{name: ""} for name in labels]
            + [{name: "1.0"} for name in labels])
    raw = make_chexpert(str(tmp_path / "raw"), rows,
                        valid_labels=[{"Edema": "1.0"}, {"Cardiomegaly": "0.0"}])
    (folder,) = P.prepare("chexpert", raw, str(tmp_path / "out"))
    meta = read_meta(folder)
    assert meta["label_names"] == labels and meta["dropped"] == {"lateral": 1}
    assert meta["counts"] == {"train": 14, "val": 1, "test": 2}  # 15 frontal train rows, 10% -> val
    by_id = {r["id"]: r["labels"] for s in P.SPLITS for r in read_split(folder, s)}
    for k, name in enumerate(labels):
        u = by_id[f"train/patient{k:05d}/study1/view1_frontal"]
        u_one = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0,
                 "Pleural Effusion": 1.0}
        assert u == [u_one[name] if j == k else 0.0 for j in range(5)], name
        assert by_id[f"train/patient{k + 5:05d}/study1/view1_frontal"] == [0.0] * 5  # blank -> 0
        assert (by_id[f"train/patient{k + 10:05d}/study1/view1_frontal"]
                == [float(j == k) for j in range(5)])
    assert by_id["valid/patient00000/study1/view1_frontal"] == [0, 0, 0, 1, 0]


def test_chexpert_bad_label_value(tmp_path):
    raw = make_chexpert(str(tmp_path / "raw"), [{}, {"Edema": "2.0"}])
    with pytest.raises(ValueError, match=r"train\.csv, line 3: Edema = '2\.0'"):
        P.prepare("chexpert", raw, str(tmp_path / "out"))


def test_rsna_boxes_grouped_per_patient(tmp_path):
    raw = make_rsna(str(tmp_path / "raw"))
    (folder,) = P.prepare("rsna", raw, str(tmp_path / "out"))
    meta = read_meta(folder)
    # 40 patients, k % 3 boxes: 13 patients with 1 box, 13 with 2, 14 with
    # none -> 14 + 13 + 26 = 53 rows
    assert meta["dropped"] == {"box_rows_merged": 53 - 40} and meta["label_names"] == ["Pneumonia"]
    assert meta["counts"] == {"train": 28, "val": 6, "test": 6}
    recs = {r["id"]: r for s in P.SPLITS for r in read_split(folder, s)}
    assert recs["pid-002"]["boxes"] == [[0.0, 20.0, 30.0, 40.0], [10.0, 20.0, 30.0, 40.0]]
    assert (recs["pid-002"]["labels"] == [1]
            and recs["pid-003"] == {**recs["pid-003"], "labels": [0], "boxes": []})


def test_seeded_splits_disjoint_and_reproducible(tmp_path):
    raw = make_rsna(str(tmp_path / "raw"))
    ids = {}
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        (folder,) = P.prepare("rsna", raw, str(tmp_path / run), seed=seed)
        ids[run] = {s: _ids(folder, s) for s in P.SPLITS}
        with open(os.path.join(folder, "val_ids.txt")) as f:
            assert f.read().split() == sorted(ids[run]["val"])
    for split_ids in ids.values():
        sets = [set(split_ids[s]) for s in P.SPLITS]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert sum(map(len, sets)) == 40
    assert ids["a"] == ids["b"] and ids["a"] != ids["c"]


def test_radnli(tmp_path):
    raw = tmp_path / "raw"
    _lines(str(raw / "mli_train_v1.jsonl"), [json.dumps({"pairID": "u1",
                                                         "sentence1": "No effusion.",
                                                         "sentence2": "Lungs are clear.",
                                                         "gold_label": "neutral"})])
    for name, label in (("radnli_dev_v1.jsonl", "entailment"),
                        ("radnli_test_v1.jsonl", "contradiction")):
        _lines(str(raw / name), [json.dumps({"pair_id": label[0],
                                             "sentence1": "Heart  size normal.",
                                             "sentence2": "No cardiomegaly.",
                                             "gold_label": label})])
    (folder,) = P.prepare("radnli", str(raw), str(tmp_path / "out"))
    assert read_split(folder, "train")[0] == {"id": "u1", "text_a": "No effusion.",
                                              "text_b": "Lungs are clear.", "label": 1}
    assert [read_split(folder, s)[0]["label"] for s in ("val", "test")] == [0, 2]
    assert read_split(folder, "val")[0]["text_a"] == "Heart size normal."


def test_slake_english_only_and_vocabulary(tmp_path):
    (folder,) = P.prepare("slake", make_slake(str(tmp_path / "raw")), str(tmp_path / "out"))
    meta = read_meta(folder)
    assert (meta["dropped"] == {"non_english": 3}
            and meta["counts"] == {"train": 2, "val": 1, "test": 2})
    # train + val only, lower-cased: "Lung" and "lung" are one answer
    assert meta["answers"] == ["heart", "lung"]
    test = {r["id"]: r for r in read_split(folder, "test")}
    assert test["6"]["label"] == -1 and test["7"]["label"] == 0  # "liver" occurs only in test
    assert meta["oov_test_share"] == 0.5
    assert (test["7"]["answer_type"] == "open"
            and test["7"]["image"].endswith("imgs/xmlab1/source.jpg"))


def test_vqa_rad_val_carved_and_oov(tmp_path):
    rows = [_vqa_rad_row(i, f"synpic{i % 3}.jpg", ["Yes", "No"][i % 2], "freeform")
            for i in range(20)]
    rows += [_vqa_rad_row(100, "synpic0.jpg", "yes", "test_freeform"),
             _vqa_rad_row(101, "synpic1.jpg", "left lung", "test_para",
                          q="Where is the mass?", t="OPEN"),
             _vqa_rad_row(102, "synpic2.jpg", "right lobe", "test_freeform", q="Where?", t="OPEN "),
             _vqa_rad_row(103, "synpic2.jpg", "No", "test_para")]
    (folder,) = P.prepare("vqa_rad", make_vqa_rad(str(tmp_path / "raw"), rows),
                          str(tmp_path / "out"))
    meta = read_meta(folder)
    assert meta["counts"] == {"train": 18, "val": 2, "test": 4}
    assert meta["answers"] == ["no", "yes"] and meta["oov_test_share"] == 0.5
    assert not set(meta["answers"]) - {r["answer"] for s in ("train", "val")
                                       for r in read_split(folder, s)}
    test = {r["id"]: r for r in read_split(folder, "test")}
    assert [test[i]["label"] for i in ("100", "101", "102", "103")] == [1, -1, -1, 0]
    assert test["102"]["answer_type"] == "open" and test["100"]["answer_type"] == "closed"


def test_medvqa2019_drops_abnormality(tmp_path):
    for clef in (False, True):
        raw = make_medvqa(str(tmp_path / f"raw{clef}"), clef_names=clef)
        (folder,) = P.prepare("medvqa2019", raw, str(tmp_path / f"out{clef}"))
        meta = read_meta(folder)
        assert meta["dropped"] == {"abnormality": 2 + 2 + 1}
        assert meta["counts"] == {"train": 6, "val": 6, "test": 3}
        test = {r["id"]: r for r in read_split(folder, "test")}
        assert sorted(test) == ["synpic300_C1", "synpic300_C2", "synpic300_C3"]
        assert [test[f"synpic300_C{k}"]["label"] == -1 for k in (1, 2, 3)] == [False, True, False]
        assert abs(meta["oov_test_share"] - 1 / 3) < 1e-9
        assert all(r["answer_type"] == "open" for s in P.SPLITS for r in read_split(folder, s))


def test_missing_image_names_file_and_row(tmp_path):
    raw = make_roco(str(tmp_path / "raw"))
    os.remove(os.path.join(raw, "data", "train", "radiology", "images", "ROCO_00007.jpg"))
    with pytest.raises(FileNotFoundError, match=r"captions\.txt, line 1 \(ROCO_00007\): image file "
                                                r"not found: .*ROCO_00007\.jpg"):
        P.prepare("roco", raw, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out" / "roco" / "meta.json")


def test_missing_column_names_columns_found(tmp_path):
    raw = make_rsna(str(tmp_path / "raw"), 3)
    _csv(os.path.join(raw, "stage_2_train_labels.csv"),
         ["patientId", "x", "y", "w", "h", "Target"], [])
    with pytest.raises(ValueError, match=r"stage_2_train_labels\.csv: missing column\(s\) "
                                         r"\['width', 'height'\]; columns found: \['patientId', "
                                         r"'x', 'y', 'w', 'h', 'Target'\]"):
        P.prepare("rsna", raw, str(tmp_path / "out"))


def test_malformed_json_line(tmp_path):
    raw = tmp_path / "raw"
    def good(pid):  # ids differ across the three files, as in the release
        return json.dumps({"pair_id": pid, "sentence1": "a b c", "sentence2": "d e f",
                           "gold_label": "neutral"})
    for name in ("mli_train_v1.jsonl", "radnli_dev_v1.jsonl", "radnli_test_v1.jsonl"):
        _lines(str(raw / name), [good(name)])
    _lines(str(raw / "radnli_dev_v1.jsonl"), [good("1"), '{"pair_id": "2", "sentence1": '])
    with pytest.raises(ValueError, match=r"radnli_dev_v1\.jsonl, line 2: malformed JSON"):
        P.prepare("radnli", str(raw), str(tmp_path / "out"))


def test_empty_text_where_no_rule_drops_it(tmp_path):
    rows = [_vqa_rad_row(1, "synpic1.jpg", "yes", "freeform"),
            _vqa_rad_row(2, "synpic1.jpg", "  ", "freeform")]
    raw = make_vqa_rad(str(tmp_path / "raw"), rows)
    with pytest.raises(ValueError, match=r"Dataset Public\.json, record 2 \(qid 2\): empty answer"):
        P.prepare("vqa_rad", raw, str(tmp_path / "out"))
    raw = tmp_path / "nli"
    for name in ("mli_train_v1.jsonl", "radnli_dev_v1.jsonl", "radnli_test_v1.jsonl"):
        _lines(str(raw / name), [json.dumps({"pair_id": "1", "sentence1": "", "sentence2": "x y z",
                                             "gold_label": "neutral"})])
    with pytest.raises(ValueError, match=r"mli_train_v1\.jsonl, line 1: empty sentence1"):
        P.prepare("radnli", str(raw), str(tmp_path / "out"))


def test_caption_line_without_text(tmp_path):
    raw = make_roco(str(tmp_path / "raw"))
    with open(os.path.join(raw, "data", "test", "radiology", "captions.txt"), "a") as f:
        f.write("ROCO_00030\n")
    with pytest.raises(ValueError,
                       match=r"test/radiology/captions\.txt, line 2: expected `ROCO_id<TAB>text`"):
        P.prepare("roco", raw, str(tmp_path / "out"))


def test_interrupted_prepare_is_detected(tmp_path):
    (folder,) = P.prepare("slake", make_slake(str(tmp_path / "raw")), str(tmp_path / "out"))
    assert read_split(folder, "train")
    os.remove(os.path.join(folder, "meta.json"))  # what a crash before the last write leaves
    with pytest.raises(FileNotFoundError, match="incomplete or missing preparation"):
        read_meta(folder)
    with pytest.raises(FileNotFoundError, match="incomplete or missing preparation"):
        read_split(folder, "train")


@pytest.fixture(scope="module")
def synth_tiny(tmp_path_factory):
    synth = pytest.importorskip("ptunifier_min.datasets.synth")
    raw = str(tmp_path_factory.mktemp("synth"))
    synth.generate(raw, seed=0, scale="tiny")
    with open(os.path.join(raw, "synth_counts.json")) as f:
        return raw, json.load(f)


def test_synthetic_mirrors_match_synth_counts(synth_tiny, tmp_path):
    raw, expected = synth_tiny
    out = str(tmp_path / "prepared")
    # the command line, as a user runs it
    subprocess.run([sys.executable, "-m", "ptunifier_min.datasets.prepare", "all", "--root", raw,
                    "--out", out], check=True,
                   capture_output=True, text=True,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    folders = sorted(d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d)))
    assert folders == sorted(expected)
    for name, want in expected.items():
        meta = read_meta(os.path.join(out, name))
        kept = want["kept"]
        if "total" in kept:  # a seeded split: only the total is fixed by the raw data
            assert sum(meta["counts"].values()) == kept["total"], name
        else:
            assert meta["counts"] == {s: kept.get(s, 0) for s in P.SPLITS}, name
        assert ({k: v for k, v in meta["dropped"].items() if v}
                == {k: v for k, v in want["dropped"].items() if v}), name
        for split in P.SPLITS:
            records = read_split(os.path.join(out, name), split)
            assert len(records) == meta["counts"][split]
            assert all(os.path.exists(r["image"]) for r in records if "image" in r)
            # the command line writes the image cache by default; the synthetic images
            # (<= 144 px) are kept as they are
            assert all(r["image_cache"].startswith(os.path.join(out, SOURCE.get(name, name),
                                                                "image_cache", ""))
                       and os.path.exists(r["image_cache"]) for r in records if "image" in r)


def test_rsna_dicom_needs_pydicom(tmp_path):
    try:
        import pydicom  # noqa: F401
        pytest.skip("pydicom is installed")
    except ImportError:
        pass
    raw = make_rsna(str(tmp_path / "raw"), 2)
    os.rename(os.path.join(raw, "stage_2_train_images", "pid-001.png"),
              os.path.join(raw, "stage_2_train_images", "pid-001.dcm"))
    with pytest.raises(ImportError, match=r"pid-001\.dcm is a DICOM file; .*pip install pydicom"):
        P.prepare("rsna", raw, str(tmp_path / "out"))


# ---- the image cache -----------------------------------------------------------------------------
def _noisy(path, size, seed=0, exif_orientation=None, **kw):
    """An RGB JPEG of random pixels (resampling errors show), optionally with an EXIF
    orientation a viewer applies."""
    x = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    Image.fromarray(x).save(path, exif=exif, **kw)


def _cached(folders):
    """{record id: record} of every split of the roco folder, which must carry the
    original and the cached copy."""
    return {r["id"]: r for s in P.SPLITS for r in read_split(folders[0], s)}


def test_image_cache_keeps_small_images_pixel_for_pixel_and_shrinks_large_ones(tmp_path):
    raw = make_roco(str(tmp_path / "raw"))  # 12 x 10 images
    big = os.path.join(raw, "data", "train", "radiology", "images", "ROCO_00007.jpg")
    _noisy(big, (200, 120), exif_orientation=6)  # 200 x 120 stored, 120 x 200 as a viewer shows it
    out = str(tmp_path / "out")
    folders = P.prepare("roco", raw, out, cache_short_side=64)
    recs = _cached(folders)
    for rid, r in recs.items():
        # the original stays in "image"
        assert os.path.isabs(r["image"]) and r["image"].startswith(raw)
        assert os.path.dirname(r["image_cache"]) == os.path.join(out, "roco", "image_cache")
        assert D.image_path(r) == r["image_cache"]
        cached, original = np.asarray(load_image(r["image_cache"])), load_image(r["image"])
        # shrunk to a short side of 64, bicubic as the transform, after the EXIF rotation
        if rid == "ROCO_00007":
            assert cached.shape == (107, 64)  # 200 * 64 / 120 = 106.7
            assert np.array_equal(cached,
                                  np.asarray(original.resize((64, 107), Image.Resampling.BICUBIC)))
        else:  # never enlarged: the very pixels the original decodes to
            assert cached.shape == (10, 12) and np.array_equal(cached, np.asarray(original))
    retrieval = {r["id"]: r for s in P.SPLITS for r in read_split(folders[1], s)}
    # one copy per image
    assert all(retrieval[i]["image_cache"] == recs[i]["image_cache"] for i in retrieval)
    assert len(os.listdir(os.path.join(out, "roco", "image_cache"))) == 4
    assert ("image_cache"
            not in read_split(P.prepare("roco", raw, str(tmp_path / "plain"))[0], "train")[0])


def test_image_cache_is_rebuilt_when_an_original_changes_and_stale_copies_go(tmp_path):
    raw, out = make_roco(str(tmp_path / "raw")), str(tmp_path / "out")
    path = os.path.join(raw, "data", "train", "radiology", "images", "ROCO_00007.jpg")
    # other pixels, same bytes: only the modification time tells
    stored = dict(format="PNG", compress_level=0)
    _noisy(path, (100, 80), seed=1, **stored)
    old = _cached(P.prepare("roco", raw, out, cache_short_side=64))
    size = os.path.getsize(path)
    _noisy(path, (100, 80), seed=2, **stored)
    st = os.stat(path)
    # a file system with coarse timestamps
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert os.path.getsize(path) == size
    new = _cached(P.prepare("roco", raw, out, cache_short_side=64))
    assert new["ROCO_00007"]["image_cache"] != old["ROCO_00007"]["image_cache"]
    assert not os.path.exists(old["ROCO_00007"]["image_cache"])  # the stale copy is removed
    expected = load_image(path).resize((80, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(load_image(new["ROCO_00007"]["image_cache"])),
                          np.asarray(expected))
    # kept
    assert all(new[i]["image_cache"] == old[i]["image_cache"] for i in new if i != "ROCO_00007")
    # another short side: other copies
    other = _cached(P.prepare("roco", raw, out, cache_short_side=32))
    assert all(os.path.exists(r["image_cache"]) and r["image_cache"] != new[i]["image_cache"]
               for i, r in other.items())


def test_image_cache_resumes_after_a_kill(tmp_path, monkeypatch):
    raw, out = make_roco(str(tmp_path / "raw")), str(tmp_path / "out")
    write, written = P.write_cached, []

    def killed_after_two(img, dest, short_side):
        if len(written) == 2:
            raise KeyboardInterrupt  # a kill: what was written stays, and no manifest is written
        written.append(dest)
        return write(img, dest, short_side)
    monkeypatch.setattr(P, "write_cached", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        P.prepare("roco", raw, out, cache_short_side=64, workers=1)
    cache = os.path.join(out, "roco", "image_cache")
    assert sorted(os.path.join(cache, f) for f in os.listdir(cache)) == sorted(written)
    assert not os.path.exists(os.path.join(out, "roco", "meta.json"))
    # a temporary file of a run killed mid-write
    open(os.path.join(cache, "x.pgm.tmp999"), "w").close()
    monkeypatch.setattr(P, "write_cached", write)
    decoded = []
    load = load_image
    monkeypatch.setattr(P, "load_image", lambda path: decoded.append(path) or load(path))
    recs = _cached(P.prepare("roco", raw, out, cache_short_side=64, workers=1))
    # the 2 missing copies; the 2 written before the kill are not decoded again
    assert len(decoded) == 2
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(r["image_cache"])
                                               for r in recs.values())


def test_image_cache_on_a_process_pool_is_the_same(tmp_path, monkeypatch):
    raw = make_roco(str(tmp_path / "raw"))
    _noisy(os.path.join(raw, "data", "train", "radiology", "images", "ROCO_00007.jpg"), (100, 80))
    one = _cached(P.prepare("roco", raw, str(tmp_path / "one"), cache_short_side=64, workers=1))
    monkeypatch.setattr(P, "POOL_MIN_IMAGES", 1)
    two = _cached(P.prepare("roco", raw, str(tmp_path / "two"), cache_short_side=64, workers=2))
    assert [os.path.basename(r["image_cache"]) for r in one.values()] == \
        [os.path.basename(r["image_cache"]) for r in two.values()]
    for i in one:
        with open(one[i]["image_cache"], "rb") as a, open(two[i]["image_cache"], "rb") as b:
            assert a.read() == b.read()


def test_a_stopped_prepare_leaves_no_cache_behind(tmp_path, capsys):
    raw = make_roco(str(tmp_path / "raw"))
    with open(os.path.join(raw, "data", "train", "radiology", "images", "ROCO_00007.jpg"),
              "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match=r"roco train, id ROCO_00007: cannot read image"):
        P.prepare("roco", raw, str(tmp_path / "out"), cache_short_side=64)
    # the 3 copies it made are removed with their folders
    assert not os.path.exists(tmp_path / "out")
    out = str(tmp_path / "skip")
    P.main(["roco", "--root", raw, "--out", out, "--on-bad-image", "skip",
            "--cache-short-side", "64"])
    assert "image cache" in capsys.readouterr().out  # reported: images, bytes, seconds
    assert len(os.listdir(os.path.join(out, "roco", "image_cache"))) == 3  # none for the bad image
    assert all(os.path.exists(r["image_cache"])
               for r in _cached([os.path.join(out, "roco")]).values())



def test_a_prepared_root_moved_elsewhere_keeps_working(tmp_path):
    """The cache paths are written relative to the root, so a root copied to another disk reads
    its own copies (before: absolute paths into the old place, gone with it); a manifest with
    absolute paths is read as it is."""
    raw, out = make_roco(str(tmp_path / "raw")), str(tmp_path / "out")
    P.prepare("roco", raw, out, cache_short_side=64)
    with open(os.path.join(out, "roco", "train.jsonl")) as f:
        written = [json.loads(line) for line in f]
    assert all(r["image_cache"].startswith(os.path.join("roco", "image_cache", ""))
               for r in written)
    moved = str(tmp_path / "elsewhere" / "prepared")
    os.renames(out, moved)
    for name in ("roco", "roco_retrieval"):
        for r in read_split(os.path.join(moved, name), "train"):
            assert r["image_cache"].startswith(os.path.join(moved, "roco", "image_cache", ""))
            # the original lies outside the root: its path stays absolute
            assert os.path.isfile(r["image_cache"]) and r["image"].startswith(raw)
    assert len(D.load_pretrain_records(moved, ["roco"], "train")) == len(written)
    # a manifest written before the paths were relative
    old = [{**r, "image_cache": os.path.join(moved, r["image_cache"])} for r in written]
    with open(os.path.join(moved, "roco", "train.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in old))
    assert [r["image_cache"] for r in read_split(os.path.join(moved, "roco"), "train")] == \
        [r["image_cache"] for r in old]
