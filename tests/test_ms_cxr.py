"""MS-CXR: the synthetic release (boxes where the renderer drew each finding, on films of the
MIMIC-CXR world), and prepare ms_cxr on it and on hand-edited rows: the phrase records, the splits,
the box prior and every error."""

import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from ptunifier_min import grounding, manifests
from ptunifier_min.data import read_meta, read_split
from ptunifier_min.datasets import prepare as P
from ptunifier_min.datasets import synth

CSV = "MS_CXR_Local_Alignment_v1.1.0.csv"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    synth.generate(str(raw), seed=0, scale="tiny", datasets=["mimic_cxr", "ms_cxr"], progress=False)
    with open(raw / "ms_cxr" / CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    return raw, rows


def _prepare(raw, out, rows=None, name=CSV):
    """prepare ms_cxr on the synthetic release, or on `rows` written in its place."""
    root = out.parent / "ms_cxr_edit"
    if rows is not None:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        with open(root / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    P.prepare("ms_cxr", str(root if rows is not None else raw / "ms_cxr"), str(out),
              mimic_root=str(raw / "mimic_cxr"))
    return out / "ms_cxr"


def test_one_record_per_phrase_with_all_its_boxes_on_its_mimic_film(release, tmp_path):
    raw, rows = release
    folder = _prepare(raw, tmp_path / "prepared")
    meta = read_meta(str(folder))
    records = {s: read_split(str(folder), s) for s in P.SPLITS}
    by_phrase = {}
    for row in rows:
        by_phrase.setdefault((row["dicom_id"], row["label_text"]), []).append(row)
    assert sum(len(r) for r in records.values()) == len(by_phrase)
    assert (meta["dropped"] == {"box_rows_merged": len(rows) - len(by_phrase)}
            and len(rows) > len(by_phrase))
    for split, recs in records.items():
        assert recs, split
        for r in recs:
            got = by_phrase[(os.path.basename(r["image"])[:-4], r["text"])]
            assert r["boxes"] == [[float(x[k]) for k in "xywh"] for x in got]
            assert {x["split"] for x in got} == {split} and r["category"] == got[0]["category_name"]
            # the MIMIC-CXR-JPG file, at the size its row states
            with Image.open(r["image"]) as film:
                assert film.size == (r["width"], r["height"])
            assert r["image"].startswith(str(raw / "mimic_cxr" / "files"))
            assert manifests.check_record(r, meta,
                                          required=("id", "image", "text", "boxes")) is None
    # the official split is MIMIC's, by patient: no patient in two splits
    patients = {s: {r["image"].split(os.sep)[-3] for r in recs} for s, recs in records.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    want = grounding.box_prior([r["boxes"] for r in records["train"]],
                               [(r["width"], r["height"]) for r in records["train"]])
    np.testing.assert_allclose(meta["box_prior"], want)


def test_the_boxes_are_those_of_the_very_film_saved_in_the_mimic_tree(release):
    """MS-CXR's rows are computed by drawing a MIMIC-CXR film again from its own random keys: that
    film must be the one saved (up to JPEG), and the rows' boxes those render_cxr returned for it,
    one per box, finding by finding."""
    raw, rows = release
    jobs = synth._mimic_studies(raw / "mimic_cxr", 0, synth.SCALES["tiny"])[1]
    by_path = {str(path.relative_to(raw / "mimic_cxr")): (state, keys)
               for _, state, keys, path in jobs}
    films = {}
    for r in rows:
        films.setdefault(r["path"], []).append(r)
    assert len(films) >= 6
    for path, film_rows in films.items():
        state, keys = by_path[path]
        rng = np.random.default_rng(keys)
        h, w = state.get("size") or synth._size(rng)
        img, _, found = synth.render_cxr(state, rng, h, w)
        saved = np.asarray(Image.open(raw / "mimic_cxr" / path), dtype=np.float32)
        # JPEG's loss only (~3)
        assert saved.shape == img.shape and np.abs(saved - img).mean() < 4.0
        want = sorted([synth.MS_CXR_CATEGORY[f], [round(v, 1) for v in b]]
                      for f, bs in found.items() for b in bs
                      if f in synth.MS_CXR_CATEGORY and state["status"].get(f) == "pos")
        got = sorted([r["category_name"], [float(r[k]) for k in "xywh"]] for r in film_rows)
        assert got == want
        for r in film_rows:  # every box lies on the film
            x, y, bw, bh = (float(r[k]) for k in "xywh")
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(x="-3"), "leaves the image"),
    (lambda r: r.update(w=str(float(r["image_width"]) + 1)), "leaves the image"),
    (lambda r: r.update(h="0"), "w and h > 0"),
    (lambda r: r.update(y="nan"), "expected finite numbers"),
    (lambda r: r.update(x="a"), "is not numeric"),
    (lambda r: r.update(category_name="Fracture"), "category_name 'Fracture' is not one of"),
    (lambda r: r.update(image_width="12.5"),
     "image_width = '12.5'; expected a positive whole number"),
    (lambda r: r.update(split="dev"), "split 'dev' is not one of"),
    (lambda r: r.update(label_text=" "), "no value for label_text"),
    (lambda r: r.update(path=r["path"].replace(r["dicom_id"], "other")),
     "the MIMIC-CXR-JPG file of its dicom_id"),
    (lambda r: r.update(path="files/p10/p10000000/s50000000/" + r["dicom_id"] + ".jpg"),
     "not found"),
])
def test_a_bad_row_is_named_and_nothing_is_written(release, tmp_path, edit, message):
    raw, rows = release
    rows = [dict(r) for r in rows]
    edit(rows[2])
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        _prepare(raw, tmp_path / "prepared", rows)
    # named: the file and the row (line 4: the header, then rows 0, 1, 2)
    assert "line 4" in str(e.value) or "id " in str(e.value)
    assert not (tmp_path / "prepared" / "ms_cxr" / "meta.json").exists()


def test_a_stated_size_that_is_not_the_films_is_refused(release, tmp_path):
    raw, rows = release
    rows = [dict(r) for r in rows]
    dicom = rows[2]["dicom_id"]
    for r in rows:
        if r["dicom_id"] == dicom:
            r["image_width"] = str(int(r["image_width"]) * 2)
    with pytest.raises(ValueError,
                       match=r"its row gives image_width x image_height .* but the image file"):
        _prepare(raw, tmp_path / "prepared", rows)
    assert not (tmp_path / "prepared" / "ms_cxr" / "meta.json").exists()


def test_one_dicom_with_two_sizes_or_splits_is_refused(release, tmp_path):
    raw, rows = release
    rows = [dict(r) for r in rows]
    twin = next(i for i in range(1, len(rows)) if rows[i]["dicom_id"] == rows[i - 1]["dicom_id"])
    rows[twin]["split"] = {"train": "val", "val": "test", "test": "train"}[rows[twin]["split"]]
    with pytest.raises(ValueError, match=f"line {twin + 2}: dicom_id {rows[twin]['dicom_id']} has"):
        _prepare(raw, tmp_path / "prepared", rows)


def test_v1_0_0_without_a_split_column_is_split_by_patient(release, tmp_path):
    raw, rows = release
    old = [{k: v for k, v in r.items() if k != "split"} for r in rows]
    folder = _prepare(raw, tmp_path / "prepared", old, name="MS_CXR_Local_Alignment_v1.0.0.csv")
    meta = read_meta(str(folder))
    assert meta["rules"]["split"].startswith("no split column (v1.0.0)")
    patients = {s: {r["image"].split(os.sep)[-3] for r in read_split(str(folder), s)}
                for s in P.SPLITS}
    assert all(patients.values())
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    again = _prepare(raw, tmp_path / "again", old, name="MS_CXR_Local_Alignment_v1.0.0.csv")
    assert read_split(str(again), "test") == read_split(str(folder), "test")  # seeded


def test_mimic_root_is_asked_for_where_needed_only(release, tmp_path):
    raw, _ = release
    with pytest.raises(ValueError, match="pass --mimic-root"):
        P.prepare("ms_cxr", str(raw / "ms_cxr"), str(tmp_path))
    with pytest.raises(ValueError, match="read by ms_cxr only"):
        P.prepare("chexpert", str(raw / "chexpert"), str(tmp_path),
                  mimic_root=str(raw / "mimic_cxr"))
    with pytest.raises(FileNotFoundError, match="--mimic-root .*nowhere: folder not found"):
        P.prepare("ms_cxr", str(raw / "ms_cxr"), str(tmp_path), mimic_root=str(raw / "nowhere"))


def test_a_phrase_record_needs_a_box():
    record = {"id": "a", "text": "Small left effusion.", "boxes": []}
    assert "needs at least one box" in manifests.check_record(record, {})
    assert "w and h > 0" in manifests.check_record({**record, "boxes": [[1, 2, 0, 4]]}, {})
