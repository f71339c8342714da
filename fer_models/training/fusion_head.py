"""The fusion head trained on cached member logits (``--arch fusion --members A,B,C``): the members' logits are
computed once per split into ``run/member_logits.npz``, the linear head is fitted full-batch on Training (selected
on PublicTest, with and without class weights), then the fused and member outputs are calibrated on PublicTest."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..models import load_model
from ..models.fusion import FusionModel
from ..models.predict import predict_logits, softmax
from .config import TrainConfig, class_weights
from .data import FaceData
from .metrics import score_logits
from .state import log_metrics, training_history

log = logging.getLogger("fer_models.train")


def head_split(data: FaceData, split: str, cfg: TrainConfig) -> FaceData:
    """The faces of ``split`` the head sees: all (or ``--limit``'s share), and for Training a seeded random subset
    of ``--head-train-faces`` faces."""
    part = data.get_split(split)
    if cfg.limit:
        part = part.subset(slice(0, cfg.limit if split == "Training" else max(cfg.limit // 4, 8)))
    if split == "Training" and cfg.head_train_faces and cfg.head_train_faces < len(part):
        pick = np.sort(np.random.default_rng(cfg.seed).choice(len(part), cfg.head_train_faces, replace=False))
        part = part.subset(pick)
    return part


def cache_member_logits(fusion: FusionModel, data: FaceData, run: Path, device: torch.device, cfg: TrainConfig) -> dict:
    """Member logits per split and view, computed once and kept in ``run/member_logits.npz``."""
    path = run / "member_logits.npz"
    cache: dict[str, np.ndarray] = dict(np.load(path)) if path.is_file() else {}
    # PublicTest selects (single crop); PrivateTest is reported single-crop and ten-crop.
    wanted = [("Training", "center"), ("PublicTest", "center"), ("PrivateTest", "center"), ("PrivateTest", "tencrop")]
    for split, tta in wanted:
        part = head_split(data, split, cfg)
        for name, member in fusion.members.items():
            key = f"{split}/{tta}/{name}"
            if key in cache and len(cache[key]) == len(part):
                continue
            t0 = time.time()
            # fp32 whatever --amp says: the head is fitted, calibrated and scored on what the app feeds it
            cache[key], _ = predict_logits(member, part.images, tta=tta, batch_size=cfg.eval_batch_size,
                                           device=device, amp=False, channels_last=cfg.channels_last)
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


def fit_head_trials(fusion: FusionModel, cache: dict, cfg: TrainConfig) -> tuple[dict, str]:
    """Imbalance handling measured on the head, where a comparison costs seconds: the head is fitted from the
    members' average without and with class weights, and the better on PublicTest is kept (loaded into ``fusion``).
    Returns every trial's scores and the kept one's name."""
    trials = {}
    n = len(fusion.member_names)
    for balance in ("none", "loss"):
        with torch.no_grad():
            fusion.head.weight.copy_(torch.cat([torch.eye(fusion.num_classes)] * n, 1) / n)
            fusion.head.bias.zero_()
        trials[balance] = fit_fusion_head(fusion, cache, cfg, balance)
        trials[balance]["state"] = {k: v.clone() for k, v in fusion.head.state_dict().items()}
    pick = max(trials, key=lambda b: trials[b]["public_acc"])
    fusion.head.load_state_dict(trials[pick]["state"])
    return {b: {k: v for k, v in t.items() if k != "state"} for b, t in trials.items()}, pick


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
        info["head_trials"], info["head_balance"] = fit_head_trials(fusion, cache, cfg)
        log_metrics(run, {"fusion_head": info["head_trials"], "picked": info["head_balance"]})
    info["temperatures"] = calibrate_fusion(fusion, cache)
    return fusion.to(device), info


def calibrate_fusion(fusion: FusionModel, cache: dict) -> dict:
    """Temperature scaling and a confidence map (``training.calibrate``) of the fused and each member's logits,
    fitted on cached PublicTest logits (centre crop) and stored in the fusion's config: the probabilities shown
    become calibrated."""
    from .calibrate import fit_calibration, with_calibration

    y = cache["PublicTest/labels"]
    member_logits = {n: torch.from_numpy(cache[f"PublicTest/center/{n}"]).float() for n in fusion.member_names}
    with torch.no_grad():
        outputs = {"fused": fusion.cpu().fuse(member_logits).numpy(), **{n: v.numpy() for n, v in member_logits.items()}}
    temps, maps = fit_calibration(outputs, y)
    fusion.cfg = with_calibration(fusion.cfg, temps, maps)
    for name, member in fusion.members.items():
        member_cfg = fusion.cfg["members"][fusion.member_names.index(name)]
        member.cfg["temperature"], member.cfg["confidence_map"] = member_cfg["temperature"], member_cfg["confidence_map"]
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
