"""Face detectors and cropping (fer_models.pipeline.faces), on scikit-image's astronaut photo and generated images.

Real-photo detection rate runs on the JAFFE full frames when FER_DATA_DIR points at the shared data.
"""
from __future__ import annotations

import hashlib

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from fer_models.pipeline.faces import (
    ASSETS, BLAZEFACE_BOX, DEFAULT_DETECTOR, DETECTORS, BlazeFaceDetector, BlazeFacePlusDetector, FaceBox,
    MTCNNDetector, create_detector, crop_face, detect_faces, eye_angle, get_detector,
)
from conftest import REPO_ROOT
from media import astronaut_face, faces_image

# The astronaut's face in skimage.data.astronaut() (512 x 512), roughly.
FACE_REGION = (170, 50, 280, 190)


def _centre_in(box: FaceBox, region, scale: float = 1.0, offset=(0, 0)) -> bool:
    x0, y0, x1, y1 = (v * scale for v in region)
    cx, cy = box.center
    return x0 + offset[0] <= cx <= x1 + offset[0] and y0 + offset[1] <= cy <= y1 + offset[1]


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()


def test_facebox_geometry():
    a = FaceBox(0, 0, 10, 10, 0.9, ((2, 3), (8, 3), (5, 5), (3, 8), (7, 8)))
    b = FaceBox(5, 5, 15, 15)
    assert a.area == 100 and a.center == (5, 5)
    assert a.iou(b) == pytest.approx(25 / 175)
    assert a.iou(a) == 1.0
    s = a.scaled(2, 1, 1)
    assert (s.x0, s.y1) == (1, 21) and s.landmarks[0] == (5, 7)
    c = FaceBox(-5, -5, 20, 30).clipped(10, 12)
    assert (c.x0, c.y0, c.x1, c.y1) == (0, 0, 10, 12)
    d = a.to_dict()
    assert set(d) >= {"x0", "y0", "x1", "y1", "score", "landmarks"} and d["landmarks"]["nose"] == [5, 5]
    assert eye_angle(a) == 0.0


def test_unknown_detector():
    with pytest.raises(ValueError, match="unknown face detector"):
        create_detector("nope")


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detects_astronaut(name, astronaut):
    boxes = detect_faces(astronaut, name)
    assert len(boxes) == 1, boxes
    box = boxes[0]
    assert _centre_in(box, FACE_REGION)
    assert 0 <= box.x0 < box.x1 <= 512 and 0 <= box.y0 < box.y1 <= 512
    assert 0 < box.score <= 1
    if name in ("mtcnn", "blazeface", "blazeface+"):
        assert box.landmarks is not None and len(box.landmarks) == 5
        assert abs(eye_angle(box)) < 10
        (lx, ly), (rx, ry) = box.landmarks[:2]
        assert lx < rx and box.y0 < ly < box.center[1]  # image-left eye first, both in the upper half


def test_blazeface_asset_and_default():
    """The shipped model file is the one whose provenance assets/README.md records."""
    path = ASSETS / BlazeFaceDetector.model_file
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (
        "3bc182eb9f33925d9e58b5c8d59308a760f4adea8f282370e428c51212c26633")
    assert {"blazeface+", "blazeface", "mtcnn", "haar"} <= set(DETECTORS) and DEFAULT_DETECTOR in DETECTORS


def test_blazeface_box_calibrated_to_mtcnn(astronaut):
    """The calibrated box gives nearly MTCNN's crop: same centre (within 6% of the side) and side (within 12%)."""
    b, m = detect_faces(astronaut, "blazeface")[0], detect_faces(astronaut, "mtcnn")[0]
    raw = detect_faces(astronaut, create_detector("blazeface", box_scale=1, box_shift=0, box_aspect=1, box_dx=0))[0]
    side = max(m.width, m.height)
    assert abs(max(b.width, b.height) / side - 1) < 0.12
    assert np.hypot(b.center[0] - m.center[0], b.center[1] - m.center[1]) < 0.06 * side
    assert b.iou(m) > 0.75 and b.iou(m) > raw.iou(m) + 0.1  # the calibration matters
    assert b.height / b.width == pytest.approx(BLAZEFACE_BOX[2], rel=1e-3)


def test_blazeface_falls_back_to_mtcnn_on_small_faces():
    """BlazeFace short-range misses faces of 90 px in a 680 px grid; the MTCNN fallback finds them all."""
    grid = faces_image(12)
    assert detect_faces(grid, create_detector("blazeface", fallback=None)) == []
    assert len(detect_faces(grid, "blazeface")) == 12


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_no_face_in_plain_images(name):
    rng = np.random.default_rng(0)
    for img in (np.full((240, 320, 3), 128, np.uint8), rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)):
        assert detect_faces(img, name) == []
    assert detect_faces(np.zeros((5, 5, 3), np.uint8), name) == []


def test_large_image_is_downscaled_and_boxes_mapped_back(astronaut):
    big = cv2.resize(astronaut, (2048, 2048), interpolation=cv2.INTER_LINEAR)
    boxes = detect_faces(big, "mtcnn", max_side=512)
    assert len(boxes) == 1
    assert _centre_in(boxes[0], FACE_REGION, scale=4)
    ref = detect_faces(astronaut, "mtcnn")[0]
    assert boxes[0].iou(ref.scaled(4)) > 0.7


def test_tight_crop_found_by_padded_retry(astronaut):
    tight = np.ascontiguousarray(astronaut[60:180, 175:275])  # the face fills the frame
    det = get_detector("mtcnn")
    assert detect_faces(tight, det, pad_retry=0.3), "padded retry should find a face that fills the frame"
    for b in detect_faces(tight, det, pad_retry=0.3):
        assert 0 <= b.x0 <= b.x1 <= tight.shape[1] and 0 <= b.y0 <= b.y1 <= tight.shape[0]


@pytest.mark.parametrize("name", ["mtcnn", "blazeface", "blazeface+"])
def test_rotated_face_found_and_aligned(name, astronaut):
    m = cv2.getRotationMatrix2D((256, 256), 25, 1.0)
    rotated = cv2.warpAffine(astronaut, m, (512, 512), borderMode=cv2.BORDER_REPLICATE)
    det = create_detector(name, fallback=None) if name.startswith("blazeface") else name  # BlazeFace on its own
    upright = eye_angle(detect_faces(astronaut, det)[0])  # the astronaut's head is tilted a little already
    boxes = detect_faces(rotated, det)
    assert len(boxes) == 1 and abs(eye_angle(boxes[0]) - upright + 25) < 5  # eyes tilted by the rotation
    crop = crop_face(rotated, boxes[0], margin=0.3, size=160, align=True)
    assert crop.shape == (160, 160, 3) and crop.dtype == np.uint8
    again = detect_faces(crop, det)
    assert again and abs(eye_angle(again[0])) < 8  # the aligned crop has level eyes


def test_crop_face_square_and_edges(astronaut):
    box = FaceBox(-20, -10, 60, 100)  # partly outside the image
    crop = crop_face(astronaut, box, margin=0.2, size=96)
    assert crop.shape == (96, 96, 3)
    big = crop_face(astronaut, FaceBox(0, 0, 512, 512), margin=0.0, size=64)  # strong downscale path
    assert big.shape == (64, 64, 3)
    assert np.abs(big.astype(int).mean() - astronaut.mean()) < 10
    gray_face = crop_face(np.repeat(astronaut[..., :1], 3, axis=2), box, size=48)
    assert gray_face.shape == (48, 48, 3)


def test_detector_is_thread_safe(astronaut):
    from concurrent.futures import ThreadPoolExecutor

    det = get_detector("mtcnn")
    with ThreadPoolExecutor(3) as ex:
        results = list(ex.map(lambda _: detect_faces(astronaut, det), range(3)))
    assert all(len(r) == 1 for r in results)


@pytest.mark.parametrize("name, tilt, rate", [
    ("mtcnn", 0, 0.95), ("blazeface alone", 0, 0.99), ("blazeface alone", 20, 0.99), ("blazeface", 20, 0.99),
    ("blazeface+", 0, 0.995), ("blazeface+", 20, 0.99),
])
def test_jaffe_detection_rate(data_dir, name, tilt, rate):
    """The 68 JAFFE full-frame photos, upright and tilted by 20 degrees (measured: 100% for each)."""
    files = sorted((data_dir / "jaffe" / "fullframe").glob("*/*.jpg"))
    if not files:
        pytest.skip("no JAFFE full frames under FER_DATA_DIR")
    det = create_detector("blazeface", fallback=None) if name == "blazeface alone" else get_detector(name)
    found = 0
    for f in files:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        h, w = rgb.shape[:2]
        if tilt:
            m = cv2.getRotationMatrix2D((w / 2, h / 2), tilt, 1.0)
            rgb = cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
        boxes = detect_faces(rgb, det)
        found += any(_centre_in(b, (0.2 * w, 0.2 * h, 0.8 * w, 0.85 * h)) for b in boxes)
    assert found / len(files) >= rate, f"{found}/{len(files)}"


# --- blazeface+: the default, a second BlazeFace pass for small faces beside large ones -------------------------
# examples/three_faces.jpg (made by examples/make_examples.py): astronaut faces pasted at x = 30, 240 (tilted
# 15 degrees) and 430 (mirrored), 150, 120 and 170 px wide, in 640 x 360.
THREE_FACES_X = ((30, 180), (240, 360), (430, 600))


def test_default_is_blazeface_plus():
    assert DEFAULT_DETECTOR == "blazeface+" and isinstance(get_detector(), BlazeFacePlusDetector)


def test_blazeface_plus_finds_all_three_faces_of_the_example():
    rgb = np.asarray(Image.open(REPO_ROOT / "examples" / "three_faces.jpg").convert("RGB"))
    assert len(detect_faces(rgb, create_detector("blazeface", fallback=None))) < 3  # why the second pass exists
    boxes = detect_faces(rgb, create_detector("blazeface+", fallback=None))
    assert len(boxes) == 3, boxes
    for b, (x0, x1) in zip(boxes, THREE_FACES_X):  # sorted left to right
        assert x0 <= b.center[0] <= x1 and 60 <= b.center[1] <= 300
        assert len(b.landmarks) == 5 and b.landmarks[3] != b.landmarks[4]  # MTCNN's mouth corners (refined)


def _canvas(layout, size=(480, 640), seed=0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Astronaut faces (crop width, x, y, angle) on a smooth random background; returns the centres."""
    rng = np.random.default_rng(seed)
    bg = cv2.resize(rng.integers(40, 220, (3, 4, 3)).astype(np.float32), size[::-1], interpolation=cv2.INTER_CUBIC)
    canvas = np.clip(bg, 0, 255).astype(np.uint8)
    centres = []
    for width, x, y, angle in layout:
        face = astronaut_face(width)
        if angle:
            m = cv2.getRotationMatrix2D((face.shape[1] / 2, face.shape[0] / 2), angle, 1.0)
            face = cv2.warpAffine(face, m, face.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)
        canvas[y:y + face.shape[0], x:x + face.shape[1]] = face
        centres.append((x + face.shape[1] / 2, y + face.shape[0] / 2))
    return canvas, centres


@pytest.mark.parametrize("layout, size", [
    # one large face and small ones beside it (crop widths 260 -> face boxes of about 130 px; 100 -> 50 px)
    (((260, 20, 60, 0), (110, 330, 40, 0), (100, 470, 250, 10)), (480, 640)),
    (((300, 320, 80, -8), (120, 30, 30, 0), (105, 175, 300, 0), (130, 20, 300, 12)), (480, 640)),
    (((180, 40, 100, 0), (150, 300, 60, 0), (150, 500, 250, -10), (200, 720, 150, 0)), (540, 960)),
    (((240, 100, 330, 0), (110, 20, 60, 0), (110, 300, 120, 8)), (640, 480)),
])
def test_blazeface_plus_finds_small_faces_beside_large_ones(layout, size):
    canvas, centres = _canvas(layout, size)
    det = create_detector("blazeface+", fallback=None)
    boxes = detect_faces(canvas, det)
    assert len(boxes) == len(centres), (boxes, centres)
    for cx, cy in centres:
        assert any(abs(b.center[0] - cx) < b.width / 2 and abs(b.center[1] - cy) < b.height / 2 for b in boxes)
    unrefined = detect_faces(canvas, create_detector("blazeface+", fallback=None, refine=None))
    assert len(unrefined) == len(boxes)  # refinement moves boxes and drops no real face


def test_blazeface_plus_drops_unconfirmed_low_scores(astronaut):
    """The astronaut's face, mirrored, on a grey 640 x 480 frame (as a browser's fake camera shows it): BlazeFace's
    256 px pass scores a fold of the spacesuit 0.76; O-net does not confirm it, so only the face is found."""
    frame = np.full((480, 640, 3), 100, np.uint8)
    frame[60:409, 220:540] = np.asarray(Image.fromarray(astronaut[20:260, 120:340]).resize((320, 349)))
    frame = np.ascontiguousarray(frame[:, ::-1])
    assert len(detect_faces(frame, create_detector("blazeface+", confirm_below=0.0))) == 2  # the false positive
    boxes = detect_faces(frame, create_detector("blazeface+"))
    assert len(boxes) == 1 and boxes[0].score > 0.9 and 180 < boxes[0].center[0] < 360


def test_blazeface_plus_runs_the_fast_pass_first_and_no_mtcnn_search(astronaut, monkeypatch):
    """A photo with a face: the 128 px pass, then the 256 px pass, and never MTCNN's whole-image search."""
    def no_search(self, rgb):
        raise AssertionError("the MTCNN search ran")

    monkeypatch.setattr(MTCNNDetector, "_detect", no_search)
    det = create_detector("blazeface+")
    sides = []
    forward = det._forward
    monkeypatch.setattr(det, "_forward", lambda rgb, side, *a, **k: sides.append(side) or forward(rgb, side, *a, **k))
    assert len(detect_faces(astronaut, det)) == 1
    assert sides == [128, 256]


def test_blazeface_plus_refinement_modes(astronaut):
    with pytest.raises(ValueError, match="refine"):
        create_detector("blazeface+", refine="nope")
    plain = detect_faces(astronaut, create_detector("blazeface+", refine=None))[0]
    refined = detect_faces(astronaut, create_detector("blazeface+"))[0]
    mtcnn = detect_faces(astronaut, "mtcnn")[0]
    assert plain.landmarks[3] == plain.landmarks[4]  # BlazeFace's mouth centre twice
    assert refined.iou(mtcnn) > 0.85 and refined.landmarks[3] != refined.landmarks[4]


def test_blazeface_plus_anchor_grid_matches_the_128_px_one():
    from fer_models.pipeline.faces import _blazeface_anchors

    a = _blazeface_anchors(128)
    assert a.shape == (896, 2) and a[0].tolist() == [4.0, 4.0] and a[-1].tolist() == [120.0, 120.0]
    assert _blazeface_anchors(192, 256).shape == ((24 * 32) * 2 + (12 * 16) * 6, 2)
