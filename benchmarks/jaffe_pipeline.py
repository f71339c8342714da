"""End-to-end check of the app's pipeline on real photos: JAFFE full frames -> detector -> crop -> model.

    FER_DATA_DIR=../shared/data python benchmarks/jaffe_pipeline.py [--checkpoint-dir checkpoints]
        [--margins 0.1 0.2 0.25 0.3] [--detector mtcnn] [--no-align] [--tta] [--baseline-dir OLD_CHECKPOINT]
    FER_DATA_DIR=../shared/data python benchmarks/jaffe_pipeline.py --detectors mtcnn haar blazeface blazeface+

Reports, for each crop margin, the accuracy of the fused label and of each backbone's vote on the 68 labelled
full-frame photos (JAFFE posed expressions: a different population and camera from FER2013, so expect much
lower numbers than on FER2013; the point is to compare crop settings, and to catch a broken pipeline, e.g.
colour or orientation mistakes, which drop it to chance). It never trains or tunes anything on JAFFE.
``--baseline-dir`` scores a second checkpoint on the same crops and adds a paired comparison of the two fused
labels (photos only one of them got right, exact McNemar p): with 68 photos, differences need that test.

``--detectors A B ...`` instead compares face detectors: every photo goes through the app's own path
(``FacePredictor.analyze_batch``: detection, eye-levelled crop at the detector's own margin, one forward; the
largest face is the photo's prediction, a photo without a face is an error, as in the protocol's full-frame
row), and each detector's fused labels are paired with the first detector's (exact McNemar p).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fer_models.pipeline.faces import crop_face, detect_faces, get_detector  # noqa: E402
from group_photos import detector_from_spec  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
from fer_models.pipeline import FacePredictor, load_model_with_fallback  # noqa: E402
from fer_models.training.metrics import mcnemar_exact  # noqa: E402


def compare_detectors(model, source, files: list[Path], names: list[str], tta: bool) -> None:
    pred = FacePredictor(model, source=source)
    print(source.describe())
    photos = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    y = np.array([pred.class_names.index(f.parent.name) if f.parent.name in pred.class_names else -1 for f in files])
    print(f"{len(photos)} JAFFE full frames; crop {pred.crop_px} px, tta={tta}")
    print(f"| detector | margin | faces found | fusion accuracy | only this right / only {names[0]} right | "
          "McNemar p |")
    print("|---|---|---|---|---|---|")
    ref = None
    for name in names:
        det = detector_from_spec(name)
        right = np.zeros(len(photos), bool)
        found = 0
        for i, analysis in enumerate(pred.analyze_batch(photos, detector=det, tta=tta)):
            if analysis.faces:
                found += 1
                face = max(analysis.faces, key=lambda f: f.box.area)
                right[i] = pred.class_names.index(face.label) == y[i]
        ref = right if ref is None else ref
        test = mcnemar_exact(right, ref)
        print(f"| {name} | {det.crop_margin:g} | {found}/{len(photos)} | {right.mean():.1%} ({right.sum()}) | "
              f"{test['only_a']} / {test['only_b']} | {test['p_value']:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("FER_DATA_DIR", "../shared/data"))
    ap.add_argument("--checkpoint-dir", default="checkpoints")
    ap.add_argument("--model-repo", default=None)
    ap.add_argument("--detector", default="mtcnn")
    ap.add_argument("--margins", type=float, nargs="+", default=[0.1, 0.15, 0.2, 0.25, 0.3])
    ap.add_argument("--no-align", action="store_true")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--baseline-dir", default=None, help="a second checkpoint to compare with, photo by photo")
    ap.add_argument("--detectors", nargs="+", default=None,
                    help="compare these detectors (the first is the reference) through the app's own path; "
                         "blazeface+:onet / blazeface+:none choose its refinement")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted((Path(args.data) / "jaffe" / "fullframe").glob("*/*.jpg"))
    if not files:
        sys.exit(f"no JAFFE full frames under {args.data}/jaffe/fullframe")
    model, source = load_model_with_fallback(args.model_repo, args.checkpoint_dir)
    if args.detectors:
        return compare_detectors(model, source, files, args.detectors, args.tta)
    pred = FacePredictor(model, detector=args.detector, source=source)
    det = get_detector(args.detector)
    print(source.describe())
    base = None
    if args.baseline_dir:
        base_model, base_source = load_model_with_fallback(None, args.baseline_dir)
        base = FacePredictor(base_model, detector=args.detector, source=base_source)
        if base.class_names != pred.class_names:
            sys.exit(f"baseline classes {base.class_names} differ from {pred.class_names}")
        print("baseline: " + base_source.describe())
    photos, labels, boxes = [], [], []
    for f in files:
        rgb = np.asarray(Image.open(f).convert("RGB"))
        found = detect_faces(rgb, det)
        if not found:
            print(f"no face in {f.name}; skipped")
            continue
        photos.append(rgb)
        labels.append(f.parent.name)
        boxes.append(max(found, key=lambda b: b.area))
    print(f"{len(photos)}/{len(files)} photos with a face; detector {args.detector} (default margin "
          f"{det.crop_margin:g}), align={not args.no_align}, "
          f"tta={args.tta}; class counts: " + ", ".join(f"{c} {labels.count(c)}" for c in sorted(set(labels))))
    unknown = sorted(set(labels) - set(pred.class_names))
    if unknown:
        print(f"warning: JAFFE classes {unknown} are not model classes; they count as errors")
    header = ["margin", "fusion"] + pred.backbones
    if base is not None:
        header += ["baseline fusion", "only new right", "only baseline right", "McNemar p"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for margin in args.margins:
        crops = [crop_face(p, b, margin=margin, size=pred.crop_px, align=not args.no_align)
                 for p, b in zip(photos, boxes)]
        raw = pred.predict_crops(crops, tta=args.tta)
        y = np.array([pred.class_names.index(c) if c in pred.class_names else -1 for c in labels])
        right = raw.probs.argmax(1) == y
        accs = [right.mean()] + [(raw.member_probs[n].argmax(1) == y).mean() for n in pred.backbones]
        row = [f"{a:.1%}" for a in accs]
        if base is not None:
            base_right = base.predict_crops(crops, tta=args.tta).probs.argmax(1) == y
            test = mcnemar_exact(right, base_right)
            row += [f"{base_right.mean():.1%}", str(test["only_a"]), str(test["only_b"]), f"{test['p_value']:.3f}"]
        print(f"| {margin:g} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
