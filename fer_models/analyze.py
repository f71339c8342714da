"""Batch analysis from the command line, and ``fer_models.analyze(...)`` from Python.

    python -m fer_models.analyze photos/ clip.mp4 "shots/**/*.png" --out results.csv [--cam-dir cams/]

Every face of every image and sampled video frame becomes one row of ``--out`` (``.csv``, ``.jsonl`` or
``.parquet``; columns in docs/analyze.md); a rerun skips what the output already holds. The library function is
:func:`fer_models.pipeline.analyze.analyze`; this module is callable and forwards to it, so ``fer_models.analyze``
is the same object whether or not this submodule has been imported. ``--cam-dir`` wires the ``explain`` package
into the predictor here, in the entry point, as ``app.py`` does: the library itself never imports it.
"""
from __future__ import annotations

import argparse
import inspect
import logging
import sys
import types
from typing import Optional

from .pipeline.analyze import DEFAULT_BATCH_SIZE, OUTPUT_FORMATS, analyze
from .pipeline.errors import InputError, ModelLoadError
from .pipeline.faces import DETECTORS
from .pipeline.loading import DEFAULT_CHECKPOINT_DIR, ENV_MODEL_REPO
from .pipeline.video import DEFAULT_SAMPLE_FPS

__all__ = ["analyze", "get_args_parser", "main"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fer_models.analyze",
                                description="Every face of images, folders, globs and videos into one table.")
    p.add_argument("inputs", nargs="+", help="image or video files, folders (recursive) and globs")
    p.add_argument("--out", required=True, help=f"results file: {' / '.join(OUTPUT_FORMATS)}")
    p.add_argument("--model-repo", default=None, help=f"Hub repo of the weights (default ${ENV_MODEL_REPO})")
    p.add_argument("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR, help="local weights (the fallback)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images (or video frames) whose faces share one forward pass")
    p.add_argument("--detector", choices=sorted(DETECTORS), default=None)
    p.add_argument("--tta", action="store_true", help="ten-crop test-time augmentation")
    p.add_argument("--whole-image", action="store_true", help="classify an image without a face as one face")
    p.add_argument("--sample-fps", type=float, default=DEFAULT_SAMPLE_FPS, help="video frames analysed per second")
    p.add_argument("--max-seconds", type=float, default=float("inf"), help="analyse only the start of each video")
    p.add_argument("--smooth", type=float, default=0.0, metavar="SECONDS",
                   help="also write each video track's probabilities smoothed over time with this time constant "
                        "(smooth_* columns beside the raw ones; 0.5 suits expressions; default 0: off)")
    p.add_argument("--cam-dir", default=None, help="write a Grad-CAM PNG per face to this folder")
    p.add_argument("--cam-method", default=None, help="gradcam (default), gradcam++, hirescam, layercam, eigencam")
    p.add_argument("--workers", type=int, default=1, help="threads reading images and finding faces ahead")
    p.add_argument("--no-resume", action="store_true", help="overwrite --out instead of skipping what it holds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None):
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    make_explainer = None
    if args.cam_dir:
        try:
            from explain import Explainer as make_explainer
        except ImportError:
            sys.exit("error: --cam-dir needs the explain package (run from the repository root)")
    try:
        df = analyze(
            args.inputs, out=args.out, repo_id=args.model_repo or None, checkpoint_dir=args.checkpoint_dir,
            device=args.device, batch_size=args.batch_size, detector=args.detector, tta=args.tta,
            whole_image=args.whole_image, sample_fps=args.sample_fps, max_seconds=args.max_seconds,
            cam_dir=args.cam_dir, cam_method=args.cam_method, make_explainer=make_explainer,
            resume=not args.no_resume, workers=args.workers, progress=not args.quiet, smooth_s=args.smooth,
        )
    except (InputError, ModelLoadError) as e:
        sys.exit(f"error: {e}")
    errors = int(df["error"].notna().sum())
    print(f"{args.out}: {df['file'].nunique()} files, {int(df['face'].notna().sum())} faces, {errors} errors")
    return df


class _CallableModule(types.ModuleType):
    """``fer_models.analyze(...)`` calls the function even once this submodule has replaced the package's lazy
    attribute of the same name (``import fer_models.analyze`` sets it)."""

    def __call__(self, *args, **kwargs):
        return analyze(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(analyze)

if __name__ == "__main__":
    main()
