"""The training run's settings: :class:`TrainConfig`, the command line that fills it, and the schedule and
optimiser it implies (``python -m fer_models.train --help``)."""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ..models.fusion import FUSION_MODES
from .augment import AugmentConfig


@dataclass
class TrainConfig:
    arch: str = "resnet18"
    data: str = "../shared/data"
    output: str = "runs/resnet18"
    epochs: int = 30                 # planned epochs (the schedule's length unless --max-minutes ends it sooner)
    batch_size: int = 128            # per process: under torchrun the global batch is nproc x this
    opt: str = "sgd"                 # sgd (Nesterov momentum) or adamw
    lr: float = 0.05                 # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.05             # share of the schedule spent warming up linearly
    schedule: str = "cosine"         # cosine (after warm-up) or constant
    label_smoothing: float = 0.1
    balance: str = "loss"            # none | loss (class-weighted loss) | sampler (class-balanced sampling)
    balance_power: float = 0.5       # class weight = (mean count / count) ** power; 0.5 is sqrt-inverse-frequency
    rotation: float = 10.0           # augmentation: max rotation in degrees
    scale: float = 0.1               # augmentation: zoom jitter
    flip: bool = True
    crop: bool = True
    augment: str = "fer2013"         # preset: fer2013 (geometric only) or real (+ shift, photometric, blur, JPEG, erasing)
    select_on: str = "public"        # checkpoint selection: public, or public+ckplus48 = (PublicTest + CK+48) / 2
    dropout: Optional[float] = None  # override the architecture's default
    width: Optional[float] = None    # channel width multiplier (1.0 = the published architecture)
    face_norm: Optional[list] = None  # [mean, std] grey levels each face is standardised to (input spec; None = off)
    seed: int = 0
    device: str = "auto"
    amp: Optional[bool] = None       # bf16 autocast; None = auto (CUDA, or a CPU with AMX/AVX512-BF16)
    channels_last: bool = True
    max_minutes: Optional[float] = None
    save_every_minutes: float = 5.0  # resumable state written at least this often
    resume: bool = False
    init_from: Optional[str] = None  # warm start: weights of this checkpoint, fresh optimiser and schedule
    limit: Optional[int] = None      # use only the first N training faces (smoke tests)
    eval_batch_size: int = 512
    save_dtype: str = "float16"      # dtype of the exported weights
    # fusion
    members: list = field(default_factory=list)
    fusion_mode: str = "concat_linear"
    finetune_members: bool = False
    head_epochs: int = 300           # full-batch steps for the fusion head on cached logits
    head_train_faces: Optional[int] = None  # random Training subset for the head (None = all)
    num_threads: Optional[int] = None
    # distillation (Hinton et al., 2015): a teacher's logits on the Training faces, computed once and cached
    distill_from: Optional[str] = None  # teacher checkpoint (e.g. the shipped fusion); None = plain training
    distill_alpha: float = 0.9       # weight of the soft-target loss; 1 - alpha goes to the hard labels
    distill_temperature: float = 4.0  # softening temperature; the soft loss is scaled by T^2
    distill_tta: str = "center"      # the teacher's view of each face: center crop, or tencrop (mean logits, 10x cost)
    distill_views: int = 0           # > 0: a bank of this many augmented views per face, the teacher's logits on each
    distill_view_mix: float = 0.5    # share of the bank's views blended with a second face
    distill_view_photometric: float = 0.5  # share of the bank's views through the real-photo augmentation
    # posed expressions (CK+48, JAFFE): only the training subjects of the fixed split (docs/posed_split.md)
    posed: list = field(default_factory=list)  # e.g. ["ckplus48", "jaffe"]; [] = FER2013 only
    posed_share: float = 0.1         # share of every epoch's draws that are posed faces (oversampled)
    posed_balance: str = "none"      # none (every posed face equally likely) | set-class (each set x class equal)
    mixup: float = 0.0               # mixup (Zhang et al., 2018): Beta(a, a) mixing weight per batch; 0 = off


# --- schedule, optimiser, class weights ------------------------------------------------------------
def class_weights(counts: np.ndarray, power: float) -> torch.Tensor:
    counts = np.maximum(counts.astype(np.float64), 1)
    w = (counts.mean() / counts) ** power
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def lr_at(cfg: TrainConfig, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup > 0 and progress < cfg.warmup:
        return cfg.lr * progress / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    p = (progress - cfg.warmup) / max(1e-8, 1 - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    params = list(params)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # no weight decay on biases and BN
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.opt == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.opt == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.opt!r}")


# --- command line -----------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(description="Train a FER model (FER2013; select on PublicTest, report PrivateTest).")
    p.add_argument("--arch", default=d.arch, help="registered architecture, or 'fusion' with --members")
    p.add_argument("--data", default=d.data, help="FER2013 CSV/.csv.gz/.npz, image folder, or the shared data root")
    p.add_argument("--output", default=None, help="run directory (default runs/<arch>)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="faces per step per process: under torchrun the global batch is nproc x this (scale --lr)")
    p.add_argument("--opt", choices=["sgd", "adamw"], default=d.opt)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=float, default=d.warmup, help="share of the schedule used for linear warm-up")
    p.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--balance", choices=["none", "loss", "sampler"], default=d.balance,
                   help="class-imbalance handling: weighted loss or class-balanced sampler")
    p.add_argument("--balance-power", type=float, default=d.balance_power)
    p.add_argument("--rotation", type=float, default=d.rotation)
    p.add_argument("--scale", type=float, default=d.scale)
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--no-crop", dest="crop", action="store_false")
    p.add_argument("--augment", choices=sorted(AugmentConfig.PRESETS), default=d.augment,
                   help="augmentation preset: fer2013 (crop/flip/rotation/zoom) or real (adds shift, contrast, "
                        "brightness, gamma, blur, down-up sampling, JPEG, noise, random erasing)")
    p.add_argument("--select-on", choices=["public", "public+ckplus48"], default=d.select_on,
                   help="checkpoint selection score: PublicTest accuracy, or its mean with CK+48's (6 shared "
                        "classes; CK+48 is read from <data>/ckplus48 and never trained on)")
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--width", type=float, default=None, help="channel width multiplier (default 1.0)")
    p.add_argument("--face-norm", type=float, nargs=2, default=None, metavar=("MEAN", "STD"),
                   help="per-face contrast normalisation stored in the model's input spec: each face is standardised "
                        "to these grey levels (FER2013 Training's medians: 129.5 53.7); see docs/real_photos.md")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast (auto: on for CUDA and for CPUs with AMX/AVX512-BF16)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this much training time")
    p.add_argument("--save-every-minutes", type=float, default=d.save_every_minutes)
    p.add_argument("--resume", action="store_true", help="continue from <output>/state.safetensors")
    p.add_argument("--init-from", default=None,
                   help="warm start from this checkpoint's weights (new optimiser and LR schedule); same arch/width")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training faces (smoke tests)")
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="network inputs per evaluation forward (ten-crop: /10 faces)")
    p.add_argument("--save-dtype", choices=["float16", "float32", "bfloat16"], default=d.save_dtype)
    p.add_argument("--members", default="", help="comma-separated member checkpoint dirs (fusion)")
    p.add_argument("--fusion-mode", choices=FUSION_MODES, default=d.fusion_mode)
    p.add_argument("--finetune-members", action="store_true", help="train the whole fusion end to end")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs)
    p.add_argument("--head-train-faces", type=int, default=None,
                   help="fit the fusion head on a random Training subset of this size (caching is the slow part)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--distill-from", default=None,
                   help="teacher checkpoint (e.g. checkpoints/): its centre-crop logits on the Training faces, cached "
                        "once in the run directory, become soft targets")
    p.add_argument("--distill-alpha", type=float, default=d.distill_alpha, help="weight of the soft-target loss")
    p.add_argument("--distill-temperature", type=float, default=d.distill_temperature)
    p.add_argument("--distill-tta", choices=["center", "tencrop"], default=d.distill_tta,
                   help="the teacher's logits from the centre crop, or averaged over the ten crops (a better "
                        "teacher: the shipped fusion gains about a point; ten times the one-off caching cost)")
    p.add_argument("--distill-views", type=int, default=d.distill_views, metavar="K",
                   help="consistent distillation: K augmented views of every Training face (crop, flip, rotation, "
                        "zoom; some blended with a second face, some through the real-photo augmentation) are made "
                        "once with the teacher's logits on each, and the student trains on those views "
                        "(fer_models/training/view_bank.py; costs K teacher passes over the Training set once)")
    p.add_argument("--distill-view-mix", type=float, default=d.distill_view_mix,
                   help="share of the views blended with a second face (weight of the face uniform in [0.5, 1])")
    p.add_argument("--distill-view-photometric", type=float, default=d.distill_view_photometric,
                   help="share of the views through the real-photo light/optics/occlusion augmentation")
    p.add_argument("--posed", default="",
                   help="comma-separated posed sets to add (ckplus48,jaffe): only the training subjects of the fixed "
                        "subject-disjoint split in docs/posed_split.md, oversampled to --posed-share of each epoch")
    p.add_argument("--posed-share", type=float, default=d.posed_share)
    p.add_argument("--posed-balance", choices=["none", "set-class"], default=d.posed_balance,
                   help="how the posed share is drawn: every posed face equally often (none), or every (set, class) "
                        "pair equally often (set-class: JAFFE as often as CK+48, fear as often as surprise)")
    p.add_argument("--mixup", type=float, default=d.mixup, metavar="A",
                   help="mixup: each batch is blended with a shuffled copy of itself at a weight drawn from "
                        "Beta(A, A), and so are its labels and teacher probabilities (0: off; 0.2-0.4 is usual)")
    p.add_argument("--skip-final-eval", action="store_true", help="do not evaluate PrivateTest at the end")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields["members"] = [m for m in (args.members or "").split(",") if m]
    fields["posed"] = [m for m in (args.posed or "").split(",") if m]
    fields["output"] = args.output or f"runs/{args.arch}"
    fields["amp"] = {"auto": None, "on": True, "off": False}[args.amp]
    return TrainConfig(**fields)
