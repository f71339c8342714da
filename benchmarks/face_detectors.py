"""Compare the face detectors on the JAFFE full-frame photos: detection rate and time per image.

(Group photos, several faces at different scales: ``benchmarks/group_photos.py``.)

    FER_DATA_DIR=../shared/data python benchmarks/face_detectors.py [--threads 1] [--calibrate]

Each of the 68 photos (256x256, one face) is tried as is, rotated by 20 degrees, and pasted at 2.5x into a
640x480 canvas with a grey border (a webcam-like frame). "found" counts photos with at least one face box
whose centre lies inside the true face region (the central part of the photo, where every JAFFE face is);
"extra" counts additional boxes (false positives). Times are per call of ``detect_faces`` (downscale,
detect, and the padded retry when nothing was found), median over photos, single thread.

``--calibrate`` instead measures MTCNN's box relative to BlazeFace's raw square box on the original photos
(height ratio, centre offset in BlazeFace sides, MTCNN's height/width): the numbers behind
``faces.BLAZEFACE_BOX``, which makes the BlazeFace crop the one the MTCNN box gives.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fer_models.pipeline.faces import create_detector, detect_faces  # noqa: E402


def variants(rgb: np.ndarray) -> dict[str, tuple[np.ndarray, tuple[float, float, float, float]]]:
    """name -> (image, region the face centre must fall in: x0, y0, x1, y1)."""
    h, w = rgb.shape[:2]
    region = (0.2 * w, 0.2 * h, 0.8 * w, 0.85 * h)
    out = {"original": (rgb, region)}
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0)
    out["rotated20"] = (cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE), region)
    canvas = np.full((480, 640, 3), 128, np.uint8)
    big = cv2.resize(rgb, (int(w * 1.6), int(h * 1.6)), interpolation=cv2.INTER_LINEAR)
    bh, bw = big.shape[:2]
    oy, ox = (480 - bh) // 2, (640 - bw) // 2
    canvas[oy:oy + bh, ox:ox + bw] = big
    out["in640x480"] = (canvas, tuple(v * 1.6 + o for v, o in zip(region, (ox, oy, ox, oy))))
    return out


def calibrate(photos: list[np.ndarray]) -> None:
    raw = create_detector("blazeface", box_scale=1.0, box_shift=0.0, box_aspect=1.0, box_dx=0.0, fallback=None)
    mtcnn = create_detector("mtcnn")
    rows = []
    for rgb in photos:
        b, m = detect_faces(rgb, raw), detect_faces(rgb, mtcnn)
        if not b or not m:
            continue
        b, m = max(b, key=lambda f: f.area), max(m, key=lambda f: f.area)
        rows.append((m.height / b.height, (m.center[0] - b.center[0]) / b.height,
                     (m.center[1] - b.center[1]) / b.height, m.height / m.width))
    r = np.array(rows)
    names = ("MTCNN height / BlazeFace side", "centre dx / side", "centre dy / side", "MTCNN height / width")
    print(f"{len(r)}/{len(photos)} photos with both boxes")
    print("| quantity | mean | sd | median |")
    print("|---|---|---|---|")
    for name, col in zip(names, r.T):
        print(f"| {name} | {col.mean():.3f} | {col.std():.3f} | {np.median(col):.3f} |")
    print("faces.BLAZEFACE_BOX = (height ratio, dy, height / width, dx) = "
          f"({r[:, 0].mean():.3f}, {r[:, 2].mean():.3f}, {r[:, 3].mean():.3f}, {r[:, 1].mean():.3f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FER_DATA_DIR", "../shared/data"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N photos (quick check)")
    ap.add_argument("--calibrate", action="store_true", help="measure MTCNN's box against BlazeFace's raw box")
    args = ap.parse_args()
    cv2.setNumThreads(args.threads)
    files = sorted((Path(args.data) / "jaffe" / "fullframe").glob("*/*.jpg"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        sys.exit(f"no JAFFE full-frame photos under {args.data}/jaffe/fullframe")
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    if args.calibrate:
        return calibrate(photos)
    configs = {
        "blazeface+ (two passes + O-net refinement)": dict(detector=create_detector("blazeface+")),
        "blazeface+ without refinement": dict(detector=create_detector("blazeface+", refine=None)),
        "blazeface (+ pad retry + mtcnn fallback)": dict(detector=create_detector("blazeface")),
        "blazeface alone (no pad retry, no fallback)": dict(detector=create_detector("blazeface", fallback=None),
                                                            pad_retry=0.0),
        "mtcnn": dict(detector=create_detector("mtcnn")),
        "mtcnn, no pad retry": dict(detector=create_detector("mtcnn"), pad_retry=0.0),
        "haar mn5": dict(detector=create_detector("haar", min_neighbors=5)),
        "haar mn3": dict(detector=create_detector("haar", min_neighbors=3)),
    }
    print(f"{len(photos)} JAFFE full-frame photos; cv2 threads={args.threads}")
    print("| detector | variant | found | extra boxes | median ms | p90 ms |")
    print("|---|---|---|---|---|---|")
    for kw in configs.values():  # load each net and allocate its buffers before timing
        detect_faces(photos[0], **kw)
    for name, kw in configs.items():
        for vname in ("original", "rotated20", "in640x480"):
            found = extra = 0
            times = []
            for rgb in photos:
                img, (rx0, ry0, rx1, ry1) = variants(rgb)[vname]
                t = time.perf_counter()
                boxes = detect_faces(img, **kw)
                times.append((time.perf_counter() - t) * 1000)
                hit = [b for b in boxes if rx0 <= b.center[0] <= rx1 and ry0 <= b.center[1] <= ry1]
                found += bool(hit)
                extra += len(boxes) - min(len(hit), 1)
            times.sort()
            print(f"| {name} | {vname} | {found}/{len(photos)} ({100 * found / len(photos):.1f}%) | {extra} | "
                  f"{statistics.median(times):.1f} | {times[int(0.9 * (len(times) - 1))]:.1f} |")


if __name__ == "__main__":
    main()
