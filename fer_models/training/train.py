"""Train a FER model on FER2013: ``python -m fer_models.train --arch vgg19 --data ../shared/data --output runs/vgg19``.

Shaped like torchvision's reference ``train.py`` (``main``, ``train_one_epoch``, ``evaluate``, ``get_args_parser``),
one module per program:

- :mod:`.config`: :class:`TrainConfig`, ``get_args_parser``, the learning-rate schedule, the optimiser and the
  class weights;
- :mod:`.backbone`: one backbone's loop (``train_one_epoch``, ``evaluate``, distillation, posed faces,
  selection); the whole dataset sits on the compute device as uint8 and is augmented there in batches
  (:func:`fer_models.training.augment.augment_batch`), so no data loader can be the bottleneck; bf16 autocast and
  channels_last on CPU (AMX) and CUDA;
- :mod:`.fusion_head`: ``--arch fusion --members dirA,dirB,dirC`` trains the fusion head on cached member logits
  (minutes) and calibrates it; ``--finetune-members`` trains the whole fusion end to end instead (backbone loop);
- :mod:`.state`: the resumable state (weights, optimizer, RNG, progress as safetensors + JSON, never pickle), the
  metrics log and the export (weights, results, card);
- this module: ``main`` and ``train_and_export``.

Protocol: train on ``Training``, select the checkpoint on ``PublicTest`` only, report ``PrivateTest`` once at
the end (single crop and ten-crop). ``--max-minutes`` bounds wall time; with it, the learning-rate schedule
follows whichever is further along, steps or time, so a budget-limited run still ends fully annealed.
``--resume`` continues from the saved state, mid-epoch included.

``torchrun --nproc_per_node N -m fer_models.train ...`` trains one backbone with DistributedDataParallel on N
processes (NCCL on GPUs, gloo on CPU; :mod:`fer_models.training.distributed`): each rank takes a disjoint shard of
every epoch, ``--batch-size`` is per process, and rank 0 evaluates and writes every file.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..models.predict import resolve_device
from .backbone import evaluate, teacher_agreement, train_backbone
from .cli import setup_logging
from .config import TrainConfig, config_from_args, get_args_parser
from .data import load_dataset
from .distributed import Distributed, init_distributed
from .fusion_head import cache_member_logits, cached_results, train_fusion_head
from .state import device_name, export

log = logging.getLogger("fer_models.train")


def main(argv: Optional[list] = None) -> dict:
    args = get_args_parser().parse_args(argv)
    setup_logging(timestamps=True)
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
            served = replace(cfg, amp=False)  # the reported scores in fp32, the app's precision (training may be bf16)
            for split in ("PublicTest", "PrivateTest"):
                part = data.get_split(split)
                if cfg.limit:
                    part = part.subset(slice(0, max(cfg.limit // 4, 8)))
                for tta in ("center", "tencrop"):
                    results[f"{split}/{tta}"] = evaluate(model, part, tta=tta, device=device, cfg=served)
            if cfg.distill_from:
                results["distillation"] = teacher_agreement(model, data, cfg, run, device)
    export(model, run / "model", results, dtype=getattr(torch, cfg.save_dtype))
    for key in ("PublicTest/center", "PrivateTest/center", "PrivateTest/tencrop"):
        if key in results:
            log.info("%s: accuracy %.4f  macro-F1 %.4f", key, results[key]["accuracy"], results[key]["macro_f1"])
    log.info("model written to %s", run / "model")
    return results


if __name__ == "__main__":
    main()
