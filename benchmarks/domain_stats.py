"""Why real photos score lower than FER2013: the same measurements on what the model is fed in each domain.

    FER_DATA_DIR=../shared/data python benchmarks/domain_stats.py [--n 1500] [--margins 0.05 0.15 0.25]

Every image is first brought to what the model sees (a 48 x 48 grey face: FER2013 and CK+48 as they are; JAFFE
crops resized; JAFFE full frames through the app's detector and ``crop_face`` at each margin), then measured the
same way:

* **geometry** — MTCNN run on the 48 px face upscaled to 144 px and padded by 30% (it cannot see a face that
  fills the frame otherwise): face-box side, inter-ocular distance, eye-line and mouth height, all as fractions
  of the face image's side. A crop margin is right when these match FER2013's.
* **grey levels** — mean, standard deviation (global contrast), the 5-95% range, and sharpness (variance of the
  Laplacian) at 48 px.

Prints one markdown table (medians, with the interquartile range for the geometry) per measurement.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fer_models.models.preprocess import faces_to_uint8  # noqa: E402
from fer_models.pipeline.faces import crop_face, create_detector, detect_faces  # noqa: E402
from fer_models.training.data import load_dataset  # noqa: E402
from fer_models.training.evaluate import fixed_subset  # noqa: E402
from fer_models.training.protocol import read_jaffe  # noqa: E402

UP, PAD = 144, 0.3


def geometry(det, face48: np.ndarray) -> dict | None:
    """Box side, inter-ocular distance, eye and mouth height as fractions of the face image's side."""
    g = cv2.resize(face48, (UP, UP), interpolation=cv2.INTER_CUBIC)
    p = int(PAD * UP)
    rgb = cv2.cvtColor(cv2.copyMakeBorder(g, p, p, p, p, cv2.BORDER_REPLICATE), cv2.COLOR_GRAY2RGB)
    boxes = det.detect(rgb)
    if not boxes:
        return None
    b = max(boxes, key=lambda b: b.area)
    (lx, ly), (rx, ry), _, (mlx, mly), (mrx, mry) = b.landmarks
    s = float(UP)
    return {"box": max(b.width, b.height) / s, "iod": float(np.hypot(rx - lx, ry - ly)) / s,
            "eye_y": ((ly + ry) / 2 - p) / s, "mouth_y": ((mly + mry) / 2 - p) / s,
            "centre_x": ((b.x0 + b.x1) / 2 - p) / s}


def grey(face48: np.ndarray) -> dict:
    f = face48.astype(np.float32)
    lo, hi = np.percentile(f, [5, 95])
    return {"mean": float(f.mean()), "std": float(f.std()), "range_5_95": float(hi - lo),
            "sharpness": float(cv2.Laplacian(f, cv2.CV_32F).var())}


def to48(img: np.ndarray) -> np.ndarray:
    """The 48 px grey face the model is given (the app's own resize, ``faces_to_uint8``)."""
    return faces_to_uint8([img], 48, 1)[0, 0].numpy()


def summarise(name: str, faces: list[np.ndarray], det) -> tuple[dict, dict, int]:
    geo = [r for r in (geometry(det, f) for f in faces) if r is not None]
    gr = [grey(f) for f in faces]
    q = lambda rows, k: np.percentile([r[k] for r in rows], [25, 50, 75])  # noqa: E731
    return ({k: q(geo, k) for k in geo[0]} if geo else {}), {k: q(gr, k)[1] for k in gr[0]}, len(geo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FER_DATA_DIR", "../shared/data"))
    ap.add_argument("--n", type=int, default=1500, help="FER2013 Training faces measured (a fixed subset)")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.05, 0.15, 0.25])
    args = ap.parse_args()
    root = Path(args.data)
    det = create_detector("mtcnn", min_score=0.8)
    fer = load_dataset(root, kind="fer2013").get_split("Training")
    ck = load_dataset(root / "ckplus48", kind="ckplus")
    names = list(fer.class_names)
    sets = {
        "FER2013 Training": list(fer.images[fixed_subset(len(fer), args.n)]),
        "CK+48": list(ck.images[fixed_subset(len(ck), 500)]),
        "JAFFE crops": [to48(im) for im in read_jaffe(root, "crops", names).images],
    }
    full = read_jaffe(root, "fullframe", names)
    app_det = create_detector("mtcnn")
    boxes = [max(detect_faces(im, app_det), key=lambda b: b.area, default=None) for im in full.images]
    for m in args.margins:
        sets[f"JAFFE full frames, app crop margin {m:g}"] = [
            to48(crop_face(im, b, margin=m, size=144)) for im, b in zip(full.images, boxes) if b is not None]
    geo_rows, grey_rows = [], []
    for name, faces in sets.items():
        geo, gr, found = summarise(name, faces, det)
        geo_rows.append((name, len(faces), found, geo))
        grey_rows.append((name, len(faces), gr))
    keys = ["box", "iod", "eye_y", "mouth_y", "centre_x"]
    print("geometry (fractions of the face image's side; median [IQR])")
    print("| set | n | found | " + " | ".join(keys) + " |")
    print("|" + "---|" * (len(keys) + 3))
    for name, n, found, geo in geo_rows:
        cells = [f"{geo[k][1]:.3f} [{geo[k][0]:.3f}-{geo[k][2]:.3f}]" if geo else "—" for k in keys]
        print(f"| {name} | {n} | {found} | " + " | ".join(cells) + " |")
    gkeys = ["mean", "std", "range_5_95", "sharpness"]
    print("\ngrey levels at 48 px (medians)")
    print("| set | n | " + " | ".join(gkeys) + " |")
    print("|" + "---|" * (len(gkeys) + 2))
    for name, n, gr in grey_rows:
        print(f"| {name} | {n} | " + " | ".join(f"{gr[k]:.1f}" for k in gkeys) + " |")


if __name__ == "__main__":
    main()
