"""One backbone's training loop: the data on the device as uint8, augmented there in batches, class-weighted or
distilled loss, selection on PublicTest (+ held-out CK+48 subjects), resumable mid-epoch, data-parallel under
torchrun (:mod:`fer_models.training.distributed`)."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..models import create_model, load_model
from ..models.base import FERModel
from ..models.fusion import FusionModel
from ..models.predict import amp_enabled, autocast, predict_logits
from ..models.preprocess import standardize
from .augment import AugmentConfig, augment_batch, photometric_batch
from .config import TrainConfig, build_optimizer, class_weights, lr_at
from .data import FaceData, load_dataset
from .distributed import Distributed, progress_for_world_size, shard, unwrap
from .evaluate import evaluate_ckplus
from .metrics import score_logits
from .state import load_state, log_metrics, save_state, trim_metrics
from .view_bank import ViewBank, build_view_bank, draw_views

log = logging.getLogger("fer_models.train")


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
    """The ``--distill-from`` teacher's logits for ``part`` (centre crop, or the ten crops' mean with
    ``--distill-tta tencrop``), computed once into ``run/teacher_logits.safetensors`` (one entry per split) and
    reused on resume: three teachers per training step would cost the CPU more than the student itself."""
    from ..models.fold import prepare_for_inference

    path = run / "teacher_logits.safetensors"
    cached = load_file(str(path)) if path.is_file() else {}
    meta_path = run / "teacher_logits.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("teacher") != str(cfg.distill_from) or meta.get("tta", "center") != cfg.distill_tta:
        cached, meta = {}, {"teacher": str(cfg.distill_from), "tta": cfg.distill_tta}
    if split in cached and len(cached[split]) == len(part):
        return cached[split].to(device)
    t0 = time.time()
    teacher = prepare_for_inference(load_model(cfg.distill_from, device=device))
    if list(teacher.class_names) != list(part.class_names):
        raise ValueError(f"teacher {cfg.distill_from} has classes {teacher.class_names}, the data {part.class_names}")
    # In chunks, each saved as it completes: a run stopped mid-way (ten-crop on 28,709 faces is most of an hour on
    # two CPU cores) resumes from the last chunk instead of starting over.
    run.mkdir(parents=True, exist_ok=True)
    partial = run / "teacher_logits.partial.safetensors"
    tag = {**meta, "split": split, "faces": str(len(part))}
    done = []
    if partial.is_file():
        with safe_open(str(partial), "pt") as f:
            if f.metadata() == tag:
                done = [f.get_tensor("logits")]
    start = len(done[0]) if done else 0
    if start:
        log.info("teacher %s: resuming %s %s logits at face %d of %d", cfg.distill_from, split, cfg.distill_tta,
                 start, len(part))
    for lo in range(start, len(part), TEACHER_CHUNK):
        logits, _ = predict_logits(teacher, part.images[lo:lo + TEACHER_CHUNK], tta=cfg.distill_tta,
                                   batch_size=cfg.eval_batch_size, device=device, amp=cfg.amp,
                                   channels_last=cfg.channels_last)
        done.append(torch.from_numpy(logits).float())
        save_file({"logits": torch.cat(done).contiguous()}, str(partial), metadata=tag)
        log.info("teacher %s: %s %s logits %d / %d faces (%.0f s)", cfg.distill_from, split, cfg.distill_tta,
                 min(lo + TEACHER_CHUNK, len(part)), len(part), time.time() - t0)
    cached[split] = torch.cat(done) if done else torch.zeros(0, len(part.class_names))
    save_file({k: v.contiguous() for k, v in cached.items()}, str(path))
    meta_path.write_text(json.dumps(meta))
    partial.unlink(missing_ok=True)
    log.info("teacher %s: %s %s logits of %d faces in %.1f s", cfg.distill_from, split, cfg.distill_tta, len(part),
             time.time() - t0)
    return cached[split].to(device)


TEACHER_CHUNK = 2048  # faces per saved chunk of the teacher's logits


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
    posed_base = posed_draw_weights(posed, cfg.posed_balance)
    weight = torch.cat([base / base.sum() * (1 - cfg.posed_share), posed_base / posed_base.sum() * cfg.posed_share])
    merged = FaceData(np.concatenate([train.images, posed.images]), np.concatenate([train.labels, posed.labels]),
                      list(train.class_names), np.concatenate([train.split, posed.split]), name=f"{train.name}+{posed.name}")
    if soft_targets is not None:
        soft_targets = torch.cat([soft_targets, soft_targets.new_full((n_posed, soft_targets.shape[1]), float("nan"))])
    log.info("posed training faces: %d (%s), %.0f%% of each epoch's draws (each drawn about %.1f times per epoch "
             "on average; balance %s)", n_posed, posed.name, 100 * cfg.posed_share,
             cfg.posed_share * (n_fer + n_posed) / n_posed, cfg.posed_balance)
    return merged, weight, soft_targets


def posed_draw_weights(posed: FaceData, balance: str) -> torch.Tensor:
    """Relative draw weights of the posed faces: equal (``none``), or ``set-class``: every (set, class) pair
    present gets the same total weight, so a small set (JAFFE's 6 training women) and a rare class (fear) are
    drawn as often as CK+48's surprise."""
    if balance == "none":
        return torch.ones(len(posed))
    if balance != "set-class":
        raise ValueError(f"unknown posed balance {balance!r}; choose none or set-class")
    keys = [f"{str(src).split('/', 1)[0]}:{int(y)}" for src, y in zip(posed.sources, posed.labels)]
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    return torch.from_numpy(1.0 / counts[inverse]).float()


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


# --- training loop ---------------------------------------------------------------------------------------
@dataclass
class TrainSet:
    """The training faces on the compute device (uint8, N x 1 x H x W) with their labels, and how they are drawn
    and weighted: class weights of the loss, per-face sampling weights, the teacher's logits (NaN rows: none)."""
    x: torch.Tensor
    y: torch.Tensor
    loss_weight: Optional[torch.Tensor] = None
    sample_weight: Optional[torch.Tensor] = None
    soft_targets: Optional[torch.Tensor] = None
    bank: Optional[ViewBank] = None  # --distill-views: the faces are drawn from these views, not augmented afresh


@dataclass
class Plan:
    """How long the run is: the schedule's length in steps and the wall-time budget (None: no budget)."""
    total_steps: int
    budget_s: Optional[float] = None


def epoch_order(data: TrainSet, cfg: TrainConfig, epoch: int, world: Distributed) -> tuple[torch.Tensor, torch.Generator]:
    """This rank's face order for ``epoch`` (reproducible on resume) and the generator of its augmentation draws."""
    g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
    n = len(data.y)
    if data.sample_weight is not None:
        order = torch.multinomial(data.sample_weight, n, replacement=True, generator=g)
    else:
        order = torch.randperm(n, generator=g)
    if world.enabled:  # the same order on every rank, a disjoint slice each; augmentation draws differ per rank
        order = shard(order, world)
        g = torch.Generator().manual_seed((cfg.seed * 100003 + epoch) * 1009 + 1 + world.rank)
    return order, g


def step_loss(model: nn.Module, data: TrainSet, idx: torch.Tensor, cfg: TrainConfig, aug: AugmentConfig,
              g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and logits of one batch: augment, normalise, forward, then the class-weighted (or distilled) loss."""
    spec = unwrap(model).input_spec()
    device = data.x.device
    if data.bank is not None:
        return bank_step_loss(model, data, idx, cfg, spec, flip=aug.flip, g=g)
    # Geometry on [0, 1] pixels (bilinear + border padding commute with the affine normalisation), then
    # light/optics/occlusion, then normalise.
    x = augment_batch(data.x[idx].float() / 255.0, spec["crop_size"], aug, generator=g)
    x = standardize(photometric_batch(x, aug, generator=g), spec)  # face_norm as at inference, then mean/std
    y = data.y[idx]
    teacher = data.soft_targets[idx] if data.soft_targets is not None else None
    lam, perm = mixup_draw(cfg.mixup, len(idx), g, device)
    if perm is not None:
        x = lam * x + (1 - lam) * x[perm]
        if teacher is not None:
            teacher = mix_teacher(teacher, perm, lam, cfg.distill_temperature)
    logits = train_forward(model, x, cfg)
    if teacher is None:  # mixup's loss is the same mixture of the two labels' losses
        loss = class_loss(logits, y, data, cfg, "mean")
        if perm is not None:
            loss = lam * loss + (1 - lam) * class_loss(logits, y[perm], data, cfg, "mean")
        return loss, logits
    hard = class_loss(logits, y, data, cfg)
    if perm is not None:
        hard = lam * hard + (1 - lam) * class_loss(logits, y[perm], data, cfg)
    # the teacher saw the un-augmented face (its centre crop, or the ten crops' mean)
    return distillation_loss(logits, teacher, hard, cfg.distill_alpha, cfg.distill_temperature), logits


def bank_step_loss(model: nn.Module, data: TrainSet, idx: torch.Tensor, cfg: TrainConfig, spec: dict, *, flip: bool,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`step_loss` on the view bank: one stored view per face, the teacher's logits on that very view, and
    the hard labels mixed as the view's pixels are."""
    x, teacher, partner, lam = draw_views(data.bank, idx, g, flip)
    logits = train_forward(model, standardize(x, spec), cfg)
    own, blended = class_loss(logits, data.y[idx], data, cfg), class_loss(logits, data.y[partner], data, cfg)
    hard = lam * own + (1 - lam) * blended
    return distillation_loss(logits, teacher, hard, cfg.distill_alpha, cfg.distill_temperature), logits


def train_forward(model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """fp32 logits of standardised faces, channels-last and under bf16 autocast as the run is configured."""
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(x.device, amp_enabled(x.device, cfg.amp)):
        return model(x).logits.float()


def class_loss(logits: torch.Tensor, labels: torch.Tensor, data: TrainSet, cfg: TrainConfig,
               reduction: str = "none") -> torch.Tensor:
    """The hard-label loss: class-weighted cross-entropy with the run's label smoothing."""
    return F.cross_entropy(logits, labels, weight=data.loss_weight, label_smoothing=cfg.label_smoothing,
                           reduction=reduction)


def mixup_draw(alpha: float, n: int, g: torch.Generator, device: torch.device):
    """Mixup's weight (one Beta(alpha, alpha) draw per batch, folded to >= 0.5 so the first face leads) and the
    partner order; ``(1.0, None)`` when mixup is off."""
    if alpha <= 0:
        return 1.0, None
    seed = int(torch.randint(2 ** 31, (1,), generator=g))  # torch's Beta takes no generator: draw from g's seed
    u = float(np.random.default_rng(seed).beta(alpha, alpha))
    lam = min(max(u, 1 - u), 1 - 1e-6)  # log(1 - lam) below stays finite
    return lam, torch.randperm(n, generator=g).to(device)


def mix_teacher(teacher: torch.Tensor, perm: torch.Tensor, lam: float, temperature: float) -> torch.Tensor:
    """Teacher logits whose temperature-``T`` softmax is the ``lam`` mixture of the two faces' softened
    probabilities (``T * log p_mix``: :func:`distillation_loss` divides by ``T`` again). A face without a teacher
    (NaN row) on either side leaves a NaN row: that pair falls back to the mixed hard labels."""
    t = temperature
    logp = torch.stack([F.log_softmax(teacher / t, -1) + math.log(lam),
                        F.log_softmax(teacher[perm] / t, -1) + math.log(1 - lam)])
    return t * torch.logsumexp(logp, 0)


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: TrainSet, cfg: TrainConfig, *, epoch: int,
                    progress: dict, plan: Plan, on_checkpoint, world: Distributed = Distributed()) -> dict:
    """One pass over the training set (resumable from ``progress['step_in_epoch']``). Returns epoch metrics.

    Under torchrun ``model`` is the DistributedDataParallel wrapper and this rank trains on its shard of the epoch;
    the returned loss, accuracy and images/s cover all ranks.
    """
    from tqdm import tqdm

    aug = AugmentConfig.preset(cfg.augment, crop=cfg.crop, flip=cfg.flip, rotation=cfg.rotation, scale=cfg.scale)
    order, g = epoch_order(data, cfg, epoch, world)
    device, budget_s = data.x.device, plan.budget_s
    steps = len(order) // cfg.batch_size  # drop the last partial batch (BN on tiny batches is noisy)
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    t_epoch = time.time()
    start = progress.get("step_in_epoch", 0)
    bar = tqdm(range(start, steps), desc=f"epoch {epoch + 1}", leave=False, mininterval=2.0,
               disable=not sys.stderr.isatty() or not world.is_main)
    stopped = False
    for step in bar:
        t0 = time.time()
        if budget_s and world.enabled:  # rank 0's clock: the same learning rate and the same stop step everywhere
            progress["elapsed_s"] = world.main_float(progress["elapsed_s"], device)
        frac = max(progress["step"] / max(plan.total_steps, 1), progress["elapsed_s"] / budget_s if budget_s else 0.0)
        if budget_s and progress["elapsed_s"] >= budget_s:
            stopped = True
            break
        lr = lr_at(cfg, frac)
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size].to(device)
        loss, logits = step_loss(model, data, idx, cfg, aug, g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1} step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == data.y[idx]).sum())
        seen += len(idx)
        progress.update(step=progress["step"] + 1, step_in_epoch=step + 1, elapsed_s=progress["elapsed_s"] + time.time() - t0)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.4f}")
        on_checkpoint()  # writes state only when --save-every-minutes have passed since the last write
    dt = time.time() - t_epoch
    loss_sum, correct, seen = world.sum([loss_sum, correct, seen], device)
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "lr": lr_at(cfg, frac if steps > start else 1.0), "images_per_s": seen / max(dt, 1e-6),
            "stopped_by_budget": stopped, "finished_epoch": not stopped}


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
    for key in ("temperature", "confidence_map"):  # fitted to the old weights: the new ones must be calibrated anew
        model.cfg.pop(key, None)
    log.info("warm start from %s", cfg.init_from)
    return model


def build_backbone(cfg: TrainConfig, class_names: list, device: torch.device) -> FERModel:
    """The model to train: a fusion of ``--members`` (``--finetune-members``), a warm start, or a new backbone."""
    if cfg.arch.startswith("fusion") and cfg.members:
        model: FERModel = FusionModel.from_members([load_model(m) for m in cfg.members], mode=cfg.fusion_mode)
    elif cfg.init_from:
        model = init_model(cfg, class_names)
    else:
        extra = {k: getattr(cfg, k) for k in ("dropout", "width", "face_norm") if getattr(cfg, k) is not None}
        model = create_model(cfg.arch, class_names=class_names, **extra)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def training_set(cfg: TrainConfig, train: FaceData, run: Path, device: torch.device, world: Distributed,
                 crop_size: int) -> TrainSet:
    """Training faces on the device with the imbalance handling, the teacher's logits (or the view bank) and the
    posed faces."""
    if cfg.distill_views < 0:
        raise ValueError(f"--distill-views must be 0 (off) or a number of views, not {cfg.distill_views}")
    if cfg.distill_views and not cfg.distill_from:
        raise ValueError("--distill-views needs a teacher: --distill-from")
    if cfg.distill_views and (cfg.posed or cfg.mixup > 0):
        raise ValueError("--distill-views makes its own blended views of the FER2013 faces: run it without --posed "
                         "and --mixup")
    counts = train.class_counts()
    loss_weight = class_weights(counts, cfg.balance_power).to(device) if cfg.balance == "loss" else None
    sample_weight = None
    if cfg.balance == "sampler":
        sample_weight = class_weights(counts, cfg.balance_power)[torch.from_numpy(train.labels)]
    soft_targets, bank = None, None
    if cfg.distill_views:
        with world.main_first():  # rank 0 computes and caches the views; the others read them
            bank = build_view_bank(cfg, train, run, device, crop_size)
    elif cfg.distill_from:
        with world.main_first():  # rank 0 computes and caches the teacher's logits; the others read them
            soft_targets = teacher_logits(cfg, train, run, device, "Training")
    if cfg.posed:
        train, sample_weight, soft_targets = add_posed_faces(cfg, train, sample_weight, soft_targets)
    return TrainSet(_to_device_uint8(train, device), torch.from_numpy(train.labels).to(device), loss_weight,
                    sample_weight, soft_targets, bank)


def resume_progress(cfg: TrainConfig, run: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    world: Distributed) -> dict:
    """A new run's progress counters, or the saved state's (``--resume``), rescaled to this many processes."""
    progress = {"epoch": 0, "step": 0, "step_in_epoch": 0, "elapsed_s": 0.0, "best_acc": -1.0, "best_epoch": -1}
    if world.enabled:
        progress["world_size"] = world.world_size
    if not (cfg.resume and (run / "state.safetensors").is_file()):
        return progress
    progress = load_state(run, model, opt)  # every rank reads the same state
    rescaled = progress_for_world_size(progress, world.world_size)
    if rescaled:
        log.warning("state saved by %d processes, resumed on %d: step counters rescaled",
                    progress.get("world_size", 1), world.world_size)
        progress = rescaled
    if world.is_main:
        trim_metrics(run, progress["epoch"])
    log.info("resumed from %s at epoch %d step %d (%.1f min trained)", run, progress["epoch"] + 1,
             progress["step_in_epoch"], progress["elapsed_s"] / 60)
    return progress


def select_epoch(model: FERModel, public: FaceData, ckplus: Optional[FaceData], stats: dict, *, cfg: TrainConfig,
                 run: Path, epoch: int, progress: dict) -> bool:
    """Rank 0 at an epoch's end: score PublicTest (+ CK+48), keep ``best/`` if it improved, log the row."""
    device = next(model.parameters()).device
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
    log_metrics(run, row)
    log.info("epoch %d  loss %.4f  train_acc %.4f  public_acc %.4f  macro_f1 %.4f  lr %.5f  %.0f img/s  %.1f min",
             epoch + 1, stats["train_loss"], stats["train_acc"], pub["accuracy"], pub["macro_f1"], stats["lr"],
             stats["images_per_s"], progress["elapsed_s"] / 60)
    return improved


def train_backbone(cfg: TrainConfig, data: FaceData, run: Path, device: torch.device,
                   world: Distributed = Distributed()) -> FERModel:
    """Train one backbone (on every rank of a torchrun job; rank 0 evaluates and writes) and return ``best/``."""
    train, public = data.get_split("Training"), data.get_split("PublicTest")
    if cfg.limit:
        train = train.subset(slice(0, cfg.limit))
        public = public.subset(slice(0, max(cfg.limit // 4, 8)))
    model = build_backbone(cfg, data.class_names, device)
    opt = build_optimizer(cfg, model.parameters())
    trainset = training_set(cfg, train, run, device, world, model.input_spec()["crop_size"])
    steps_per_epoch = len(trainset.y) // world.world_size // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"only {len(trainset.y)} training faces: fewer than one batch of {cfg.batch_size} "
                         f"per process ({world.world_size} processes)")
    plan = Plan(steps_per_epoch * cfg.epochs, cfg.max_minutes * 60 if cfg.max_minutes else None)
    ckplus = selection_data(cfg)
    progress = resume_progress(cfg, run, model, opt, world)
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
             len(trainset.y), steps_per_epoch, cfg.epochs, cfg.max_minutes, device)
    while progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        stats = train_one_epoch(net, opt, trainset, cfg, epoch=epoch, progress=progress, plan=plan,
                                on_checkpoint=checkpoint, world=world)
        improved = world.is_main and select_epoch(model, public, ckplus, stats, cfg=cfg, run=run, epoch=epoch,
                                                  progress=progress)  # the other ranks wait in from_main below
        progress.update(world.from_main(progress))  # rank 0's clock and selection: every rank takes the same branch
        if stats["finished_epoch"]:
            progress["epoch"] += 1
            progress["step_in_epoch"] = 0
        if stats["stopped_by_budget"] or (plan.budget_s and progress["elapsed_s"] >= plan.budget_s):
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


def teacher_agreement(model: FERModel, data: FaceData, cfg: TrainConfig, run: Path, device: torch.device) -> dict:
    """How often the student's centre-crop prediction equals the teacher's (seen as it was distilled: centre crop or
    ten crops), and the teacher's own accuracy."""
    out: dict = {"teacher": str(cfg.distill_from), "alpha": cfg.distill_alpha, "temperature": cfg.distill_temperature,
                 "teacher_tta": cfg.distill_tta}
    if cfg.distill_views:
        out.update(views=cfg.distill_views, view_mix=cfg.distill_view_mix,
                   view_photometric=cfg.distill_view_photometric)
    for split in ("PublicTest", "PrivateTest"):
        part = data.get_split(split)
        if cfg.limit:
            part = part.subset(slice(0, max(cfg.limit // 4, 8)))
        t = teacher_logits(cfg, part, run, device, split).cpu().numpy()
        s, _ = predict_logits(model, part.images, tta="center", batch_size=cfg.eval_batch_size, device=device,
                              channels_last=cfg.channels_last)
        out[split] = {"agreement": float((s.argmax(1) == t.argmax(1)).mean()),
                      "teacher_accuracy": float((t.argmax(1) == part.labels).mean())}
    return out
