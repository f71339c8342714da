"""Train a FER model on FER2013: ``python -m fer_models.train --arch vgg19 --data ../shared/data --output runs/vgg19``.

Shaped like torchvision's reference ``train.py`` (``get_args_parser``, ``train_one_epoch``, ``evaluate``,
``main``). The whole dataset sits on the compute device as uint8 and is augmented there in batches
(:func:`fer_models.transforms.augment_batch`), so no data loader can be the bottleneck; bf16 autocast and
channels_last on CPU (AMX) and CUDA.

Protocol: train on ``Training``, select the checkpoint on ``PublicTest`` only, report ``PrivateTest`` once at
the end (single crop and ten-crop). ``--max-minutes`` bounds wall time; with it, the learning-rate schedule
follows whichever is further along, steps or time, so a budget-limited run still ends fully annealed.
State (weights, optimizer, RNG, progress) is saved as safetensors + JSON, never pickle, and ``--resume``
continues from it, mid-epoch included.

``torchrun --nproc_per_node N -m fer_models.train ...`` trains one backbone with DistributedDataParallel on N
processes (NCCL on GPUs, gloo on CPU; :mod:`fer_models.training.distributed`): each rank takes a disjoint shard of
every epoch, ``--batch-size`` is per process, and rank 0 evaluates and writes every file.

``--arch fusion --members dirA,dirB,dirC`` trains the fusion head on cached member logits (minutes);
``--finetune-members`` trains the whole fusion end to end instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..models import create_model, load_model
from ..models.base import FERModel
from .data import FaceData, load_dataset
from .evaluate import evaluate_ckplus
from ..models.fusion import FUSION_MODES, FusionModel
from .metrics import score_logits
from ..models.predict import amp_enabled, autocast, predict_logits, resolve_device, softmax
from ..models.preprocess import standardize
from .augment import AugmentConfig, augment_batch, photometric_batch
from .distributed import Distributed, init_distributed, progress_for_world_size, shard, unwrap

log = logging.getLogger("fer_models.train")


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
    # posed expressions (CK+48, JAFFE): only the training subjects of the fixed split (docs/posed_split.md)
    posed: list = field(default_factory=list)  # e.g. ["ckplus48", "jaffe"]; [] = FER2013 only
    posed_share: float = 0.1         # share of every epoch's draws that are posed faces (oversampled)


# --- helpers ---------------------------------------------------------------------------------------------
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


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, hard_loss: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """Per face ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard_loss`` (Hinton et al., 2015),
    averaged over the batch; faces without a teacher (NaN rows: posed faces) take ``hard_loss`` alone.
    ``hard_loss`` is per face (``reduction="none"``)."""
    t = temperature
    has = torch.isfinite(teacher[:, 0])
    soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher.nan_to_num(0.0) / t, -1), log_target=True,
                    reduction="none").sum(-1)
    return torch.where(has, alpha * t * t * soft + (1 - alpha) * hard_loss, hard_loss).mean()


def teacher_logits(cfg: TrainConfig, part: FaceData, run: Path, device: torch.device, split: str) -> torch.Tensor:
    """The ``--distill-from`` teacher's centre-crop logits for ``part``, computed once into
    ``run/teacher_logits.safetensors`` (one entry per split) and reused on resume: three teachers per training step
    would cost the CPU more than the student itself."""
    from ..models.fold import prepare_for_inference

    path = run / "teacher_logits.safetensors"
    cached = load_file(str(path)) if path.is_file() else {}
    meta_path = run / "teacher_logits.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("teacher") != str(cfg.distill_from):
        cached, meta = {}, {"teacher": str(cfg.distill_from), "tta": "center"}
    if split in cached and len(cached[split]) == len(part):
        return cached[split].to(device)
    t0 = time.time()
    teacher = prepare_for_inference(load_model(cfg.distill_from, device=device))
    if list(teacher.class_names) != list(part.class_names):
        raise ValueError(f"teacher {cfg.distill_from} has classes {teacher.class_names}, the data {part.class_names}")
    logits, _ = predict_logits(teacher, part.images, tta="center", batch_size=cfg.eval_batch_size, device=device,
                               amp=cfg.amp, channels_last=cfg.channels_last)
    cached[split] = torch.from_numpy(logits).float()
    save_file({k: v.contiguous() for k, v in cached.items()}, str(path))
    meta_path.write_text(json.dumps(meta))
    log.info("teacher %s: %s logits of %d faces in %.1f s", cfg.distill_from, split, len(part), time.time() - t0)
    return cached[split].to(device)


def add_posed_faces(cfg: TrainConfig, train: FaceData, sample_weight: Optional[torch.Tensor],
                    soft_targets: Optional[torch.Tensor]):
    """FER2013 Training plus the posed sets' training subjects, drawn so that ``posed_share`` of every epoch's
    faces are posed (oversampled; FER2013 stays the bulk). Posed faces have no teacher logits (NaN rows)."""
    from .posed import posed_training_faces

    posed = posed_training_faces(cfg.data, train.class_names, cfg.posed, train.images.shape[-1])
    if not 0 < cfg.posed_share < 1:
        raise ValueError(f"--posed-share must be in (0, 1), got {cfg.posed_share}")
    n_fer, n_posed = len(train), len(posed)
    base = sample_weight if sample_weight is not None else torch.ones(n_fer)
    posed_base = torch.ones(n_posed)
    weight = torch.cat([base / base.sum() * (1 - cfg.posed_share), posed_base / posed_base.sum() * cfg.posed_share])
    merged = FaceData(np.concatenate([train.images, posed.images]), np.concatenate([train.labels, posed.labels]),
                      list(train.class_names), np.concatenate([train.split, posed.split]), name=f"{train.name}+{posed.name}")
    if soft_targets is not None:
        soft_targets = torch.cat([soft_targets, soft_targets.new_full((n_posed, soft_targets.shape[1]), float("nan"))])
    log.info("posed training faces: %d (%s), %.0f%% of each epoch's draws (each drawn about %.1f times per epoch)",
             n_posed, posed.name, 100 * cfg.posed_share, cfg.posed_share * (n_fer + n_posed) / n_posed)
    return merged, weight, soft_targets


def _to_device_uint8(data: FaceData, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data.images)).unsqueeze(1).to(device)


def evaluate(model: nn.Module, data: FaceData, *, tta: str, device: torch.device, cfg: TrainConfig) -> dict:
    logits, members = predict_logits(model, data.images, tta=tta, batch_size=cfg.eval_batch_size, device=device,
                                     amp=cfg.amp, channels_last=cfg.channels_last)
    res = score_logits(data.labels, logits, data.class_names)
    res["tta"] = tta
    if members:
        res["members"] = {
            k: score_logits(data.labels, v, data.class_names) for k, v in members.items()
        }
    return res


# --- resumable state (safetensors + JSON; never pickle) ---------------------------------------------------
def save_state(run: Path, model: nn.Module, opt: torch.optim.Optimizer, progress: dict) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    scalars: dict = {}
    for pid, st in osd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{name}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = val
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"progress": progress, "optim_scalars": scalars,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]}
    tmp = run / "state.tmp.safetensors"
    save_file(tensors, str(tmp))
    (run / "state.tmp.json").write_text(json.dumps(meta, indent=1))
    tmp.replace(run / "state.safetensors")
    (run / "state.tmp.json").replace(run / "state.json")


def load_state(run: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    tensors = load_file(str(run / "state.safetensors"))
    meta = json.loads((run / "state.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    osd = opt.state_dict()
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for k, v in meta["optim_scalars"].items():
        pid, name = k.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = [{**g, **saved, "params": g["params"]} for g, saved in zip(osd["param_groups"], meta["param_groups"])]
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return meta["progress"]


# --- training loop ---------------------------------------------------------------------------------------
def train_one_epoch(
    model: nn.Module, opt: torch.optim.Optimizer, x_train: torch.Tensor, y_train: torch.Tensor, *, cfg: TrainConfig,
    device: torch.device, epoch: int, progress: dict, total_steps: int, budget_s: Optional[float],
    loss_weight: Optional[torch.Tensor], sample_weight: Optional[torch.Tensor], on_checkpoint,
    world: Distributed = Distributed(), soft_targets: Optional[torch.Tensor] = None,
) -> dict:
    """One pass over the training set (resumable from ``progress['step_in_epoch']``). Returns epoch metrics.

    Under torchrun ``model`` is the DistributedDataParallel wrapper and this rank trains on its shard of the epoch;
    the returned loss, accuracy and images/s cover all ranks.
    """
    from tqdm import tqdm

    spec = unwrap(model).input_spec()
    aug = AugmentConfig.preset(cfg.augment, crop=cfg.crop, flip=cfg.flip, rotation=cfg.rotation, scale=cfg.scale)
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)  # the epoch's order is reproducible on resume
    n = len(y_train)
    if sample_weight is not None:
        order = torch.multinomial(sample_weight, n, replacement=True, generator=g)
    else:
        order = torch.randperm(n, generator=g)
    if world.enabled:  # the same order on every rank, a disjoint slice each; augmentation draws differ per rank
        order = shard(order, world)
        g = torch.Generator().manual_seed((cfg.seed * 100003 + epoch) * 1009 + 1 + world.rank)
    steps = len(order) // cfg.batch_size  # drop the last partial batch (BN on tiny batches is noisy)
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    t_epoch = time.time()
    start = progress.get("step_in_epoch", 0)
    bar = tqdm(range(start, steps), desc=f"epoch {epoch + 1}", leave=False, disable=not sys.stderr.isatty() or not world.is_main, mininterval=2.0)
    stopped = False
    for step in bar:
        t0 = time.time()
        if budget_s and world.enabled:  # rank 0's clock: the same learning rate and the same stop step everywhere
            progress["elapsed_s"] = world.main_float(progress["elapsed_s"], device)
        frac = max(progress["step"] / max(total_steps, 1), progress["elapsed_s"] / budget_s if budget_s else 0.0)
        if budget_s and progress["elapsed_s"] >= budget_s:
            stopped = True
            break
        lr = lr_at(cfg, frac)
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(device)
        # Geometry on [0, 1] pixels (bilinear + border padding commute with the affine normalisation), then
        # light/optics/occlusion, then normalise.
        x = augment_batch(x_train[idx].float() / 255.0, spec["crop_size"], aug, generator=g)
        x = standardize(photometric_batch(x, aug, generator=g), spec)  # face_norm as at inference, then mean/std
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y_train[idx]
        with autocast(device, amp_enabled(device, cfg.amp)):
            logits = model(x)
        if soft_targets is not None:  # the teacher saw the un-augmented centre crop of the same face
            hard = F.cross_entropy(logits.float(), y, weight=loss_weight, label_smoothing=cfg.label_smoothing,
                                   reduction="none")
            loss = distillation_loss(logits.float(), soft_targets[idx], hard, cfg.distill_alpha, cfg.distill_temperature)
        else:
            loss = F.cross_entropy(logits.float(), y, weight=loss_weight, label_smoothing=cfg.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        progress["step"] += 1
        progress["step_in_epoch"] = step + 1
        progress["elapsed_s"] += time.time() - t0
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.4f}")
        on_checkpoint()  # writes state only when --save-every-minutes have passed since the last write
    dt = time.time() - t_epoch
    loss_sum, correct, seen = world.sum([loss_sum, correct, seen], device)
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1), "lr": lr_at(cfg, frac if steps > start else 1.0),
            "images_per_s": seen / max(dt, 1e-6), "stopped_by_budget": stopped, "finished_epoch": not stopped}


def _log_metrics(run: Path, row: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _trim_metrics(run: Path, completed_epochs: int) -> None:
    """On resume, drop the rows of epochs that the saved state does not include (they will be run again)."""
    path = run / "metrics.jsonl"
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if json.loads(r).get("epoch", 0) <= completed_epochs]
        if len(keep) != len(rows):
            path.write_text("".join(r + "\n" for r in keep))


def selection_data(cfg: TrainConfig) -> Optional[FaceData]:
    """CK+48 for ``--select-on public+ckplus48`` (from ``<data>/ckplus48``), else None. Evaluation data only."""
    if cfg.select_on == "public":
        return None
    root = Path(cfg.data)
    path = root / "ckplus48" if (root / "ckplus48").is_dir() else root.parent / "ckplus48"
    if not path.is_dir():
        raise ValueError(f"--select-on {cfg.select_on} needs CK+48 at {root}/ckplus48 (or beside {root})")
    ck = load_dataset(path, kind="ckplus")
    if "ckplus48" in cfg.posed:  # trained on its training subjects: select on the held-out subjects only
        from .posed import subject_mask

        ck = ck.subset(subject_mask(ck.subjects, "ckplus48", "heldout"))
    return ck


def init_model(cfg: TrainConfig, class_names: list) -> FERModel:
    """The warm-start model of ``--init-from``: its architecture, width and classes must be the ones asked for."""
    model = load_model(cfg.init_from)
    problems = []
    if model.arch != cfg.arch:
        problems.append(f"arch {model.arch!r}, not {cfg.arch!r}")
    if list(model.cfg.get("class_names", class_names)) != list(class_names):
        problems.append(f"classes {model.cfg.get('class_names')}, not the data's {class_names}")
    for key in ("width", "dropout"):
        asked = getattr(cfg, key)
        if asked is not None and model.cfg.get(key) is not None and abs(float(model.cfg[key]) - asked) > 1e-9:
            problems.append(f"{key} {model.cfg[key]}, not {asked}")
    if problems:
        raise ValueError(f"--init-from {cfg.init_from} does not match this run: " + "; ".join(problems))
    if cfg.face_norm is not None:  # preprocessing travels in the config: the warm start adopts the new one
        model.cfg["face_norm"] = [float(v) for v in cfg.face_norm]
    log.info("warm start from %s", cfg.init_from)
    return model


def train_backbone(cfg: TrainConfig, data: FaceData, run: Path, device: torch.device,
                   world: Distributed = Distributed()) -> FERModel:
    """Train one backbone (on every rank of a torchrun job; rank 0 evaluates and writes) and return ``best/``."""
    train, public = data.get_split("Training"), data.get_split("PublicTest")
    if cfg.limit:
        train = train.subset(slice(0, cfg.limit))
        public = public.subset(slice(0, max(cfg.limit // 4, 8)))
    if cfg.arch.startswith("fusion") and cfg.members:
        members = [load_model(m) for m in cfg.members]
        model: FERModel = FusionModel.from_members(members, mode=cfg.fusion_mode)
    elif cfg.init_from:
        model = init_model(cfg, data.class_names)
    else:
        extra = {k: getattr(cfg, k) for k in ("dropout", "width", "face_norm") if getattr(cfg, k) is not None}
        model = create_model(cfg.arch, class_names=data.class_names, **extra)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model.parameters())
    counts = train.class_counts()
    loss_weight = class_weights(counts, cfg.balance_power).to(device) if cfg.balance == "loss" else None
    sample_weight = None
    if cfg.balance == "sampler":
        sample_weight = class_weights(counts, cfg.balance_power)[torch.from_numpy(train.labels)]
    soft_targets = None
    if cfg.distill_from:
        with world.main_first():  # rank 0 computes and caches the teacher's logits; the others read them
            soft_targets = teacher_logits(cfg, train, run, device, "Training")
    if cfg.posed:
        train, sample_weight, soft_targets = add_posed_faces(cfg, train, sample_weight, soft_targets)
    x_train = _to_device_uint8(train, device)
    y_train = torch.from_numpy(train.labels).to(device)
    steps_per_epoch = len(train) // world.world_size // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"only {len(train)} training faces: fewer than one batch of {cfg.batch_size} "
                         f"per process ({world.world_size} processes)")
    total_steps = steps_per_epoch * cfg.epochs
    budget_s = cfg.max_minutes * 60 if cfg.max_minutes else None

    ckplus = selection_data(cfg)
    progress = {"epoch": 0, "step": 0, "step_in_epoch": 0, "elapsed_s": 0.0, "best_acc": -1.0, "best_epoch": -1}
    if world.enabled:
        progress["world_size"] = world.world_size
    if cfg.resume and (run / "state.safetensors").is_file():
        progress = load_state(run, model, opt)  # every rank reads the same state
        rescaled = progress_for_world_size(progress, world.world_size)
        if rescaled:
            log.warning("state saved by %d processes, resumed on %d: step counters rescaled",
                        progress.get("world_size", 1), world.world_size)
            progress = rescaled
        if world.is_main:
            _trim_metrics(run, progress["epoch"])
        log.info("resumed from %s at epoch %d step %d (%.1f min trained)", run, progress["epoch"] + 1,
                 progress["step_in_epoch"], progress["elapsed_s"] / 60)
    if world.enabled:  # dropout masks differ per rank (the weights are rank 0's: DDP broadcasts them)
        torch.manual_seed(cfg.seed * 1009 + 1 + world.rank + progress["step"])
    net = world.wrap(model, device)  # forward/backward only; `model` is what is evaluated and saved

    last_save = time.time()

    def checkpoint(force: bool = False):
        """Write the resumable state if forced or --save-every-minutes have passed since the last write."""
        nonlocal last_save
        if world.is_main and (force or time.time() - last_save > cfg.save_every_minutes * 60):
            save_state(run, model, opt, progress)
            last_save = time.time()

    log.info("training %s: %d faces, %d steps/epoch, %d epochs planned, budget %s min, device %s", cfg.arch,
             len(train), steps_per_epoch, cfg.epochs, cfg.max_minutes, device)
    while progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        stats = train_one_epoch(net, opt, x_train, y_train, cfg=cfg, device=device, epoch=epoch, progress=progress,
                                total_steps=total_steps, budget_s=budget_s, loss_weight=loss_weight,
                                sample_weight=sample_weight, on_checkpoint=checkpoint, world=world,
                                soft_targets=soft_targets)
        improved = False
        if world.is_main:  # the other ranks wait in from_main below
            t0 = time.time()
            pub = evaluate(model, public, tta="center", device=device, cfg=cfg)
            row = {"epoch": epoch + 1, **{k: v for k, v in stats.items() if k != "stopped_by_budget"},
                   "public_acc": pub["accuracy"], "public_macro_f1": pub["macro_f1"]}
            score = pub["accuracy"]
            if ckplus is not None:
                row["ckplus48_acc"] = evaluate_ckplus(model, ckplus, "center", cfg.eval_batch_size, device)["accuracy"]
                score = (pub["accuracy"] + row["ckplus48_acc"]) / 2
            progress["elapsed_s"] += time.time() - t0
            row.update(selection_score=score, elapsed_min=progress["elapsed_s"] / 60)
            improved = score > progress["best_acc"]
            if improved:
                progress["best_acc"], progress["best_epoch"] = score, epoch + 1
                model.save_pretrained(run / "best")  # fp32; selected on PublicTest (+ CK+48) only, never PrivateTest
            row["best_selection_score"] = progress["best_acc"]
            _log_metrics(run, row)
            log.info("epoch %d  loss %.4f  train_acc %.4f  public_acc %.4f  macro_f1 %.4f  lr %.5f  %.0f img/s  "
                     "%.1f min", epoch + 1, stats["train_loss"], stats["train_acc"], pub["accuracy"], pub["macro_f1"],
                     stats["lr"], stats["images_per_s"], progress["elapsed_s"] / 60)
        progress.update(world.from_main(progress))  # rank 0's clock and selection: every rank takes the same branch
        if stats["finished_epoch"]:
            progress["epoch"] += 1
            progress["step_in_epoch"] = 0
        if stats["stopped_by_budget"] or (budget_s and progress["elapsed_s"] >= budget_s):
            log.info("time budget of %.1f min reached", cfg.max_minutes)
            break
        # Epoch-end state is written when best/ changed (so a resumed run never overwrites a better best/ from an
        # older best_acc) and otherwise at most every --save-every-minutes: seconds-long GPU epochs would spend as
        # long writing optimizer state as training. The final save below always happens.
        checkpoint(force=improved)
    progress["done"] = True
    checkpoint(force=True)
    world.check_in_sync(model, device)
    world.barrier()  # best/ and the final state are on disk before any rank reads them
    return load_model(run / "best", device=device)


# --- fusion head on cached member logits -----------------------------------------------------------------
def cache_member_logits(fusion: FusionModel, data: FaceData, run: Path, device: torch.device, cfg: TrainConfig) -> dict:
    """Member logits per split and view, computed once and kept in ``run/member_logits.npz``."""
    path = run / "member_logits.npz"
    cache: dict[str, np.ndarray] = dict(np.load(path)) if path.is_file() else {}
    # PublicTest selects (single crop); PrivateTest is reported single-crop and ten-crop.
    wanted = [("Training", "center"), ("PublicTest", "center"), ("PrivateTest", "center"), ("PrivateTest", "tencrop")]
    for split, tta in wanted:
        part = data.get_split(split)
        if cfg.limit:
            part = part.subset(slice(0, cfg.limit if split == "Training" else max(cfg.limit // 4, 8)))
        if split == "Training" and cfg.head_train_faces and cfg.head_train_faces < len(part):
            pick = np.sort(np.random.default_rng(cfg.seed).choice(len(part), cfg.head_train_faces, replace=False))
            part = part.subset(pick)
        for name, member in fusion.members.items():
            key = f"{split}/{tta}/{name}"
            if key in cache and len(cache[key]) == len(part):
                continue
            t0 = time.time()
            cache[key], _ = predict_logits(member, part.images, tta=tta, batch_size=cfg.eval_batch_size,
                                           device=device, amp=cfg.amp, channels_last=cfg.channels_last)
            log.info("cached %s logits (%d faces) in %.1f s", key, len(part), time.time() - t0)
            np.savez(path, **cache)
        cache[f"{split}/labels"] = part.labels
    return cache


def fit_fusion_head(fusion: FusionModel, cache: dict, cfg: TrainConfig, balance: str) -> dict:
    """Full-batch training of the linear head on Training logits; the step kept is the best on PublicTest."""
    names = fusion.member_names
    def feats(split, tta):
        return [torch.from_numpy(cache[f"{split}/{tta}/{n}"]).float() for n in names]
    xt, yt = feats("Training", "center"), torch.from_numpy(cache["Training/labels"])
    xp, yp = feats("PublicTest", "center"), torch.from_numpy(cache["PublicTest/labels"])
    head = fusion.head
    head.cpu()
    weight = class_weights(np.bincount(yt.numpy(), minlength=fusion.num_classes), cfg.balance_power) \
        if balance == "loss" else None
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    best = (-1.0, None, -1)
    for step in range(cfg.head_epochs):
        head.train()
        loss = F.cross_entropy(fusion.fuse(xt), yt, weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            acc = float((fusion.fuse(xp).argmax(1) == yp).float().mean())
        if acc > best[0]:
            best = (acc, {k: v.clone() for k, v in head.state_dict().items()}, step + 1)
    head.load_state_dict(best[1])
    with torch.no_grad():
        pub = score_logits(yp.numpy(), fusion.fuse(xp).numpy(), fusion.class_names)
    recall = {c: round(m["recall"], 4) for c, m in pub["per_class"].items()}
    return {"public_acc": best[0], "public_macro_f1": pub["macro_f1"], "public_recall": recall,
            "best_step": best[2], "balance": balance}


def training_history(checkpoint: Union[str, Path]) -> list[dict]:
    """The training runs behind a ``<run>/best`` checkpoint, oldest first, following ``--init-from`` warm starts.

    Each run's ``model/results.json`` (written at the end of its training) gives its minutes, epochs and device.
    """
    stages: list[dict] = []
    seen = set()
    d: Optional[Path] = Path(checkpoint)
    while d is not None and d.resolve() not in seen and len(stages) < 20:
        seen.add(d.resolve())
        rec = d.parent / "model" / "results.json"
        if not rec.is_file():
            break
        r = json.loads(rec.read_text())
        tc = r.get("train_config") or {}
        stages.append({"run": str(d.parent), "train_minutes": r.get("train_minutes"),
                       "epochs_completed": r.get("epochs_completed"), "best_epoch": r.get("best_epoch"),
                       "device": r.get("device"), "init_from": tc.get("init_from"), "train_config": tc})
        d = Path(tc["init_from"]) if tc.get("init_from") else None
    return stages[::-1]


def train_fusion_head(cfg: TrainConfig, data: FaceData, run: Path, device: torch.device) -> tuple[FusionModel, dict]:
    if not cfg.members:
        raise ValueError("--arch fusion needs --members dirA,dirB,... (trained member checkpoints)")
    members = [load_model(m, device=device) for m in cfg.members]
    fusion = FusionModel.from_members(members, mode=cfg.fusion_mode).to(device)
    cache = cache_member_logits(fusion, data, run, device, cfg)
    info: dict = {"member_dirs": [str(m) for m in cfg.members], "member_training": {}}
    for name, d in zip(fusion.member_names, cfg.members):
        history = training_history(d)
        if history:
            last = history[-1]
            info["member_training"][name] = {
                "train_minutes": round(sum(h["train_minutes"] or 0 for h in history), 2),
                "epochs_completed": sum(h["epochs_completed"] or 0 for h in history),
                "best_epoch": last["best_epoch"], "device": last["device"], "train_config": last["train_config"],
                "stages": [{k: v for k, v in h.items() if k != "train_config"} for h in history],
            }
    if cfg.fusion_mode == "concat_linear":
        # Imbalance handling measured on the head, where a comparison costs seconds: keep the better on PublicTest.
        trials = {}
        for balance in ("none", "loss"):
            with torch.no_grad():
                fusion.head.weight.copy_(torch.cat([torch.eye(fusion.num_classes)] * len(members), 1) / len(members))
                fusion.head.bias.zero_()
            trials[balance] = fit_fusion_head(fusion, cache, cfg, balance)
            trials[balance]["state"] = {k: v.clone() for k, v in fusion.head.state_dict().items()}
        pick = max(trials, key=lambda b: trials[b]["public_acc"])
        fusion.head.load_state_dict(trials[pick]["state"])
        info["head_trials"] = {b: {k: v for k, v in t.items() if k != "state"} for b, t in trials.items()}
        info["head_balance"] = pick
        _log_metrics(run, {"fusion_head": info["head_trials"], "picked": pick})
    info["temperatures"] = calibrate_fusion(fusion, cache)
    return fusion.to(device), info


def calibrate_fusion(fusion: FusionModel, cache: dict) -> dict:
    """Temperature scaling of the fused and each member's logits, fitted on cached PublicTest logits (centre crop)
    and stored in the fusion's config (``training.calibrate``): the probabilities shown become calibrated."""
    from .calibrate import fit_temperature, with_temperatures

    y = cache["PublicTest/labels"]
    member_logits = {n: torch.from_numpy(cache[f"PublicTest/center/{n}"]).float() for n in fusion.member_names}
    with torch.no_grad():
        fused = fusion.cpu().fuse(member_logits).numpy()
    temps = {"fused": fit_temperature(fused, y), **{n: fit_temperature(v.numpy(), y) for n, v in member_logits.items()}}
    fusion.cfg = with_temperatures(fusion.cfg, temps)
    for name, member in fusion.members.items():
        member.cfg["temperature"] = fusion.cfg["members"][fusion.member_names.index(name)]["temperature"]
    log.info("temperatures fitted on PublicTest: %s", {k: round(v, 3) for k, v in temps.items()})
    return temps


def cached_results(fusion: FusionModel, cache: dict, split: str, tta: str) -> dict:
    names = fusion.member_names
    labels = cache[f"{split}/labels"]
    member_logits = {n: torch.from_numpy(cache[f"{split}/{tta}/{n}"]).float() for n in names}
    with torch.no_grad():
        fused = fusion.cpu().fuse(member_logits).numpy()
    cls = fusion.class_names
    res = score_logits(labels, fused, cls)
    res["tta"] = tta
    res["members"] = {n: score_logits(labels, v.numpy(), cls) for n, v in member_logits.items()}
    avg = softmax(np.stack([v.numpy() for v in member_logits.values()])).mean(0)
    res["probability_average_baseline"] = score_logits(labels, avg, cls)
    return res


# --- CLI -------------------------------------------------------------------------------------------------
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
    p.add_argument("--posed", default="",
                   help="comma-separated posed sets to add (ckplus48,jaffe): only the training subjects of the fixed "
                        "subject-disjoint split in docs/posed_split.md, oversampled to --posed-share of each epoch")
    p.add_argument("--posed-share", type=float, default=d.posed_share)
    p.add_argument("--skip-final-eval", action="store_true", help="do not evaluate PrivateTest at the end")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields["members"] = [m for m in (args.members or "").split(",") if m]
    fields["posed"] = [m for m in (args.posed or "").split(",") if m]
    fields["output"] = args.output or f"runs/{args.arch}"
    fields["amp"] = {"auto": None, "on": True, "off": False}[args.amp]
    return TrainConfig(**fields)


def main(argv: Optional[list] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    cfg = config_from_args(args)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    world, device = init_distributed(resolve_device(cfg.device))  # one process unless launched by torchrun
    try:
        return train_and_export(cfg, device, world, final_eval=not args.skip_final_eval)
    finally:
        world.close()


def train_and_export(cfg: TrainConfig, device: torch.device, world: Distributed = Distributed(), *,
                     final_eval: bool = True) -> dict:
    """Train, then (rank 0) evaluate PublicTest/PrivateTest and export ``<output>/model``. Returns the results."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    run = Path(cfg.output)
    run.mkdir(parents=True, exist_ok=True)
    if world.is_main:
        if not cfg.resume and (run / "metrics.jsonl").exists():
            (run / "metrics.jsonl").unlink()
        (run / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    with world.main_first():  # rank 0 decodes and caches the dataset; the others read the cache
        data = load_dataset(cfg.data)
    t_start = time.time()
    fusion_head = cfg.arch.startswith("fusion") and not cfg.finetune_members
    if fusion_head and world.enabled:
        raise ValueError("the fusion head trains on cached logits in minutes on one process: run it without torchrun "
                         "(or with --finetune-members to train the whole fusion data-parallel)")
    if fusion_head:
        model, info = train_fusion_head(cfg, data, run, device)
    else:
        model, info = train_backbone(cfg, data, run, device, world), {}
    state = json.loads((run / "state.json").read_text())["progress"] if (run / "state.json").is_file() else {}
    results: dict = {
        "arch": model.arch, "train_config": asdict(cfg), "device": device_name(device, world.world_size),
        "train_minutes": round(state.get("elapsed_s", time.time() - t_start) / 60, 2),
        "epochs_completed": state.get("epoch"), "best_epoch": state.get("best_epoch"), **info,
    }
    if world.enabled:
        results["world_size"] = world.world_size
    if not world.is_main:  # evaluation and export are rank 0's
        return results
    if final_eval:
        if fusion_head:
            cache = cache_member_logits(model, data, run, device, cfg)
            for split, tta in (("PublicTest", "center"), ("PrivateTest", "center"), ("PrivateTest", "tencrop")):
                results[f"{split}/{tta}"] = cached_results(model, cache, split, tta)
        else:
            for split in ("PublicTest", "PrivateTest"):
                part = data.get_split(split)
                if cfg.limit:
                    part = part.subset(slice(0, max(cfg.limit // 4, 8)))
                for tta in ("center", "tencrop"):
                    results[f"{split}/{tta}"] = evaluate(model, part, tta=tta, device=device, cfg=cfg)
            if cfg.distill_from:
                results["distillation"] = teacher_agreement(model, data, cfg, run, device)
    export(model, run / "model", results, dtype=getattr(torch, cfg.save_dtype))
    for key in ("PublicTest/center", "PrivateTest/center", "PrivateTest/tencrop"):
        if key in results:
            log.info("%s: accuracy %.4f  macro-F1 %.4f", key, results[key]["accuracy"], results[key]["macro_f1"])
    log.info("model written to %s", run / "model")
    return results


def teacher_agreement(model: FERModel, data: FaceData, cfg: TrainConfig, run: Path, device: torch.device) -> dict:
    """How often the student's centre-crop prediction equals the teacher's, and the teacher's own accuracy."""
    out: dict = {"teacher": str(cfg.distill_from), "alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature}
    for split in ("PublicTest", "PrivateTest"):
        part = data.get_split(split)
        if cfg.limit:
            part = part.subset(slice(0, max(cfg.limit // 4, 8)))
        t = teacher_logits(cfg, part, run, device, split).cpu().numpy()
        s, _ = predict_logits(model, part.images, tta="center", batch_size=cfg.eval_batch_size, device=device,
                              amp=cfg.amp, channels_last=cfg.channels_last)
        out[split] = {"agreement": float((s.argmax(1) == t.argmax(1)).mean()),
                      "teacher_accuracy": float((t.argmax(1) == part.labels).mean())}
    return out


def device_name(device: torch.device, world_size: int = 1) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform

        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{world_size} x {name}" if world_size > 1 else name


def export(model: FERModel, out: Path, results: dict, dtype: torch.dtype = torch.float16) -> None:
    """``save_pretrained`` + ``results.json`` + confusion-matrix PNG + a model card carrying the results."""
    from .card import write_model_card

    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").unlink(missing_ok=True)
    model.save_pretrained(out, dtype=dtype)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_model_card(out, model.cfg, results)


if __name__ == "__main__":
    main()
