"""A variant of a checkpoint with per-face contrast normalisation (``face_norm``), for the real-photo protocol.

    python benchmarks/face_norm_variant.py checkpoints /tmp/ckpt_fn --face-norm 129.5 53.7 [--bn-faces 6000]
    python -m fer_models.protocol /tmp/ckpt_fn --data ../shared/data --baseline checkpoints

Writes the same weights with ``face_norm`` in the config (the fusion's and every member's), so every consumer
(protocol, app, evaluation) standardises each face to those grey levels. With ``--bn-faces N`` the BatchNorm
running statistics are re-estimated (cumulative average, no gradient step) on N random FER2013 *Training* faces
under the new preprocessing — the cheapest way to let the members adapt to it without retraining. Nothing is
fitted on CK+48 or JAFFE. Findings: docs/real_photos.md.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fer_models  # noqa: E402
from fer_models.models.preprocess import center_crop, normalize  # noqa: E402
from fer_models.training.data import load_dataset  # noqa: E402


@torch.no_grad()
def reestimate_bn(model: torch.nn.Module, images: torch.Tensor, spec: dict, batch: int = 256) -> None:
    """BatchNorm running mean/var as the plain average over ``images`` (uint8 N x 1 x H x W), centre crop."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for i in range(0, len(images), batch):
        model(center_crop(normalize(images[i:i + batch], spec), spec["crop_size"]))
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--face-norm", type=float, nargs=2, default=[129.5, 53.7], metavar=("MEAN", "STD"))
    ap.add_argument("--bn-faces", type=int, default=0, help="re-estimate BatchNorm on this many Training faces")
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args()
    model = fer_models.load_model(args.src)
    norm = [float(v) for v in args.face_norm]
    model.cfg["face_norm"] = norm
    for member in getattr(model, "members", {}).values():  # the built members and their configs in the fusion's
        member.cfg["face_norm"] = norm
    for member_cfg in model.cfg.get("members", []):
        member_cfg["face_norm"] = norm
    if args.bn_faces:
        fer = load_dataset(args.data, kind="fer2013").get_split("Training")
        idx = torch.randperm(len(fer), generator=torch.Generator().manual_seed(0))[:args.bn_faces].numpy()
        reestimate_bn(model, torch.from_numpy(fer.images[idx]).unsqueeze(1), model.input_spec())
    dst = Path(args.dst)
    model.save_pretrained(dst, dtype=torch.float16)
    if (Path(args.src) / "results.json").is_file():
        shutil.copy(Path(args.src) / "results.json", dst / "results.json")
    print(f"wrote {dst}: face_norm {norm}, BatchNorm re-estimated on {args.bn_faces} Training faces")


if __name__ == "__main__":
    main()
