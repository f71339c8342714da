"""Batch analysis (fer_models.analyze): folders with bad files, resuming, CSV/JSONL/Parquet, Grad-CAM PNGs,
videos with tracked faces, the Python API and the command line, on a tiny fusion model and generated media."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data

import fer_models as fm
from fer_models.pipeline import FacePredictor
from fer_models.pipeline.analyze import analyze, cam_filename, expand_inputs
from fer_models.pipeline.video import analyze_video

from conftest import REPO_ROOT
from media import astronaut_face, faces_image, write_video

CLASSES = list(fm.FER2013_CLASSES)
DETECTOR = "mtcnn"


@pytest.fixture(scope="module")
def model():
    return fm.create_model("fusion_tiny").eval()


@pytest.fixture(scope="module")
def predictor(model):
    # MTCNN pinned: these tests are about the batch pipeline (and check its landmark columns), not the detector.
    return FacePredictor(model, detector=DETECTOR)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A folder: one face, a non-image in the middle, three faces, a truncated JPEG in a subfolder, a blank."""
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(d / "a_one.jpg", quality=90)
    (d / "b_text.jpg").write_text("not an image")
    Image.fromarray(faces_image(3, face=100, cols=3)).save(d / "c_three.png")
    (d / "sub").mkdir()
    (d / "sub" / "d_trunc.jpg").write_bytes((d / "a_one.jpg").read_bytes()[:2000])
    Image.new("RGB", (200, 150), (90, 90, 90)).save(d / "sub" / "e_blank.png")
    (d / "notes.txt").write_text("ignored: not an image extension")
    return d


def two_face_video(path: Path, seconds: float = 2.0, fps: int = 10) -> str:
    """Two astronaut faces drifting slowly towards each other (never overlapping) on a grey 400x240 frame."""
    f = astronaut_face(90)

    def frame(i: int) -> np.ndarray:
        out = np.full((240, 400, 3), 90, np.uint8)
        for x in (20 + 3 * i, 290 - 3 * i):
            out[60:60 + f.shape[0], x:x + f.shape[1]] = f
        return out

    return write_video(path, (frame(i) for i in range(int(seconds * fps))), fps)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return two_face_video(tmp_path_factory.mktemp("clip") / "two.mp4")


def check_face_rows(df: pd.DataFrame, backbones: list[str]):
    faces = df[df["face"].notna()]
    assert len(faces)
    np.testing.assert_allclose(faces[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1, atol=1e-4)
    for b in backbones:
        np.testing.assert_allclose(faces[[f"{b}_p_{c}" for c in CLASSES]].sum(axis=1), 1, atol=1e-4)
        assert faces[f"{b}_label"].isin(CLASSES).all()
    assert (faces["x0"] < faces["x1"]).all() and (faces["y0"] < faces["y1"]).all()
    assert ((faces["det_score"] > 0) & (faces["det_score"] <= 1)).all()
    assert faces["lm_left_eye_x"].notna().all()  # MTCNN gives landmarks
    probs = faces[[f"p_{c}" for c in CLASSES]].to_numpy()
    label_p = probs[np.arange(len(faces)), [CLASSES.index(c) for c in faces["label"]]]
    np.testing.assert_allclose(label_p, probs.max(1), atol=1e-6)  # the label is the top class (ties aside)
    np.testing.assert_allclose(faces["confidence"], probs.max(1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
def test_expand_inputs(photos, tmp_path):
    files = expand_inputs(photos)
    names = [Path(f).name for f in files]
    assert names == ["a_one.jpg", "b_text.jpg", "c_three.png", "d_trunc.jpg", "e_blank.png"]  # recursive, sorted
    assert expand_inputs([photos / "sub", f"{photos}/**/*.png", photos / "sub" / "e_blank.png"]) == [
        (photos / "sub" / "d_trunc.jpg").as_posix(), (photos / "sub" / "e_blank.png").as_posix(),
        (photos / "c_three.png").as_posix()]
    assert expand_inputs(tmp_path / "missing.jpg") == [(tmp_path / "missing.jpg").as_posix()]
    assert cam_filename("photos/a b.jpg", None, 2) == "photos_a_b.jpg_face2.png"
    assert cam_filename("/x/clip.mp4", 12, 1) == "x_clip.mp4_f000012_face1.png"


def test_folder_with_corrupt_files_in_the_middle(predictor, photos, tmp_path):
    out = tmp_path / "r.csv"
    df = analyze(photos, out=out, predictor=predictor, batch_size=2, progress=False)
    names = [Path(f).name for f in df["file"]]
    assert names == ["a_one.jpg", "b_text.jpg", "c_three.png", "c_three.png", "c_three.png", "d_trunc.jpg",
                     "e_blank.png"]  # input order, bad files in place
    by = df.assign(name=names).groupby("name")
    assert by.get_group("b_text.jpg")["error"].iloc[0].startswith("This file is not an image")
    assert "truncated or corrupt" in by.get_group("d_trunc.jpg")["error"].iloc[0]
    assert list(by.get_group("c_three.png")["face"]) == [1, 2, 3] and (by.get_group("c_three.png")["n_faces"] == 3).all()
    blank = by.get_group("e_blank.png").iloc[0]
    assert blank["n_faces"] == 0 and pd.isna(blank["face"]) and pd.isna(blank["error"]) and pd.isna(blank["notes"])
    assert df["error"].notna().sum() == 2
    check_face_rows(df, predictor.backbones)
    # The file holds the same table, and batching changes nothing: the one-face photo analysed on its own
    # gives the same probabilities as inside a batch with the three-face one.
    pd.testing.assert_frame_equal(pd.read_csv(out).astype(df.dtypes.to_dict()), df, check_exact=False, atol=1e-6)
    single = predictor.analyze_image(photos / "a_one.jpg")[0].faces[0]
    row = df[df["file"].str.endswith("a_one.jpg")].iloc[0]
    assert row["label"] == single.label
    np.testing.assert_allclose([row[f"p_{c}"] for c in CLASSES], [single.probs[c] for c in CLASSES], atol=1e-5)


def test_resume_skips_what_the_output_holds(predictor, photos, tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    first = analyze(photos, out=out, predictor=predictor, batch_size=2, progress=False)
    # A new photo, and a run killed while writing its last line: the cut line is dropped, its file redone.
    extra = tmp_path / "more"
    extra.mkdir()
    Image.fromarray(data.astronaut()[:, ::-1]).save(extra / "f_mirrored.jpg")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]) + lines[-1][:40])
    seen = []
    real = predictor.find_faces
    monkeypatch.setattr(predictor, "find_faces", lambda rgb, **kw: seen.append(rgb.shape) or real(rgb, **kw))
    again = analyze([photos, extra], out=out, predictor=predictor, batch_size=2, progress=False)
    assert seen == [(150, 200, 3), (512, 512, 3)]  # only e_blank.png (cut off) and the new photo were read
    assert len(again) == len(first) + 1 and not again.duplicated(["file", "face"]).any()
    assert [json.loads(x)["file"] for x in out.read_text().splitlines()] == list(again["file"])
    seen.clear()
    assert len(analyze([photos, extra], out=out, predictor=predictor, progress=False)) == len(again) and not seen
    # resume=False starts over.
    assert len(analyze(photos / "a_one.jpg", out=out, predictor=predictor, resume=False, progress=False)) == 1


def test_video_two_faces_keep_track_ids(predictor, clip, tmp_path):
    df = analyze(clip, out=tmp_path / "v.csv", predictor=predictor, sample_fps=5, batch_size=4, progress=False)
    assert df["frame"].notna().all() and df["frame"].nunique() == 10
    assert (df["n_faces"] == 2).all() and len(df) == 20
    assert set(df["track_id"]) == {1, 2}
    # Each identity stays on its own side while the faces drift towards each other.
    cx = (df["x0"] + df["x1"]) / 2
    left, right = df[cx < 200], df[cx >= 200]
    assert left["track_id"].nunique() == 1 and right["track_id"].nunique() == 1
    assert left["track_id"].iloc[0] != right["track_id"].iloc[0]
    xs = left.sort_values("frame")["x0"].to_numpy()
    assert xs[-1] - xs[0] > 30  # it did move (3 px a frame, 18 frames)
    assert np.all(np.diff(df.groupby("frame")["time_s"].first()) > 0)
    check_face_rows(df, predictor.backbones)
    # One pipeline: the app's video path gives the same tracks and probabilities, and its CSV the same rows.
    va = analyze_video(predictor, clip, sample_fps=5)
    app_rows = pd.DataFrame(va.rows(file=clip))
    assert list(app_rows["track_id"]) == list(df["track_id"])
    np.testing.assert_allclose(app_rows["p_happy"], df["p_happy"], atol=1e-5)
    app_csv = pd.read_csv(va.to_csv(tmp_path / "app.csv"))
    assert list(app_csv.columns) == list(df.columns[1:]) and len(app_csv) == len(df)


def test_video_resume_carries_track_ids_on(predictor, clip, tmp_path):
    full = analyze(clip, predictor=predictor, sample_fps=5, progress=False)
    # A run killed after frame 8: the rerun analyses the rest and continues the same identities.
    out = tmp_path / "v.csv"
    full[full["frame"] <= 8].to_csv(out, index=False)
    resumed = analyze(clip, out=out, predictor=predictor, sample_fps=5, progress=False)
    assert len(resumed) == len(full) and list(resumed["frame"]) == list(full["frame"])
    assert list(resumed["track_id"]) == list(full["track_id"])


def test_bad_videos_are_rows_not_crashes(predictor, photos, clip, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.webm"
    empty.write_bytes(b"")
    df = analyze([junk, empty, clip, photos / "a_one.jpg", tmp_path / "missing.jpg"], predictor=predictor,
                 sample_fps=2, progress=False)
    err = dict(zip(df["file"].map(lambda f: Path(f).name), df["error"]))
    assert "not a video" in err["junk.mp4"] and "empty" in err["empty.webm"] and "not found" in err["missing.jpg"]
    assert pd.isna(err["a_one.jpg"]) and df[df["file"] == clip]["face"].notna().all()


def test_parquet_and_cam_pngs(model, photos, tmp_path):
    pytest.importorskip("pyarrow")
    explain = pytest.importorskip("explain")
    pred = FacePredictor(model, explainer=explain.Explainer(model), detector=DETECTOR)
    with pytest.raises(ValueError, match="explainer"):
        analyze(photos, predictor=FacePredictor(model, detector=DETECTOR), cam_dir=tmp_path / "no", progress=False)
    out = tmp_path / "r.parquet"
    df = analyze(photos / "c_three.png", out=out, predictor=pred, cam_dir=tmp_path / "cams", progress=False)
    assert len(df) == 3 and df["cam_png"].notna().all()
    for p in df["cam_png"]:
        im = Image.open(p)
        assert im.size == (pred.crop_px * (2 + len(pred.backbones)), pred.crop_px + 18)  # crop + fusion + members
    df2 = analyze([photos / "c_three.png", photos / "a_one.jpg"], out=out, predictor=pred, progress=False)
    assert len(df2) == 4 and list(df2["face"]) == [1, 2, 3, 1]
    pd.testing.assert_frame_equal(pd.read_parquet(out).astype(df2.dtypes.to_dict()), df2)
    assert df2["frame"].dtype == "Int64" and df2["whole_image"].dtype == "boolean"


def test_unknown_output_format(predictor, photos, tmp_path):
    with pytest.raises(fm.InputError, match="Unknown output format"):
        analyze(photos, out=tmp_path / "r.xlsx", predictor=predictor, progress=False)


def test_api_is_callable_before_and_after_importing_the_cli(predictor, photos):
    df = fm.analyze(photos / "a_one.jpg", predictor=predictor, progress=False)
    import fer_models.analyze as cli

    assert fm.analyze is cli and callable(fm.analyze)
    again = fm.analyze(photos / "a_one.jpg", predictor=predictor, progress=False)
    pd.testing.assert_frame_equal(df, again)
    assert "batch_size" in str(__import__("inspect").signature(fm.analyze))


def test_command_line(model, photos, clip, tmp_path):
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    out = tmp_path / "r.csv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "fer_models.analyze", str(photos), clip, "--out", str(out), "--checkpoint-dir",
           str(ckpt), "--batch-size", "3", "--sample-fps", "2", "--detector", DETECTOR, "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "6 files" in r.stdout and "2 errors" in r.stdout
    df = pd.read_csv(out)
    assert df["file"].nunique() == 6 and df["track_id"].notna().sum() == 2 * df["frame"].nunique() > 0
    bad = subprocess.run(cmd[:6] + [str(tmp_path / "r.txt")] + cmd[7:], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert bad.returncode != 0 and "Unknown output format" in bad.stderr
