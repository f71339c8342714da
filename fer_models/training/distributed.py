"""Data-parallel training under ``torchrun``: one process per device, DistributedDataParallel.

Follows torchvision's reference ``references/classification/utils.py`` (``init_distributed_mode`` from the
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` variables torchrun sets) and Hugging Face Accelerate's
``main_process_first``. Without those variables everything here is a no-op on one process, so single-process
training runs exactly the code it ran before.

What the training loop relies on: every rank draws the same seeded epoch order and keeps a disjoint, equally long
slice of it (:func:`shard`), so all ranks take the same number of steps and no collective waits forever; the
values that steer the schedule (elapsed time, the stop decision, the checkpoint-selection result) come from rank 0
(:meth:`Distributed.from_main`), so every rank applies the same learning rate and leaves the loop at the same step;
only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("fer_models.train")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job. ``world_size == 1`` means a plain single-process run."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. writes a cache), then the others run it (and read that cache)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def from_main(self, obj: Any) -> Any:
        """Rank 0's value of ``obj`` on every rank (any picklable object; returned unchanged on one process)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def main_float(self, value: float, device: torch.device) -> float:
        """Rank 0's ``value`` on every rank: one tensor broadcast, cheap enough to run every step."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum of ``values`` over all ranks."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` inside DistributedDataParallel (for forward/backward only), or ``model`` itself on one process."""
        if not self.enabled:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def check_in_sync(self, model: nn.Module, device: torch.device) -> None:
        """Raise if the ranks' weights differ (a rank that applied another learning rate or skipped a step).

        Parameters only: BatchNorm running statistics are rank 0's at the start of each forward (DDP broadcasts
        buffers) and each rank's own after it, so they legitimately differ after the last step.
        """
        if not self.enabled:
            return
        with torch.no_grad():
            s = sum(p.detach().double().sum() for p in model.parameters())
        lo = torch.tensor([float(s)], dtype=torch.float64, device=device)
        hi = lo.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if lo.item() != hi.item():
            raise RuntimeError(f"data-parallel ranks ended with different weights (checksums {lo.item()} .. {hi.item()})")

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (what is saved, evaluated and exported)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard(order: torch.Tensor, dist_: Distributed) -> torch.Tensor:
    """This rank's slice ``order[rank::world_size]``, cut to the same length on every rank."""
    if not dist_.enabled:
        return order
    per_rank = len(order) // dist_.world_size
    return order[dist_.rank::dist_.world_size][:per_rank]


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join the torchrun job if there is one: NCCL on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU.

    Returns the job description and the device this process trains on (``device`` unchanged on one process).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), device
    env = Distributed(world_size=world_size, rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        if device.index is not None and device.index != env.local_rank:
            log.warning("--device %s ignored under torchrun: rank %d uses cuda:%d", device, env.rank, env.local_rank)
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs: dict = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, **kwargs)
    if not env.is_main:  # one log, from rank 0
        logging.getLogger("fer_models").setLevel(logging.WARNING)
    log.info("data-parallel training: %d processes, backend %s", world_size, backend)
    return env, device


def progress_for_world_size(progress: dict, world_size: int) -> Optional[dict]:
    """Saved progress re-expressed for a job of ``world_size`` ranks (steps count per-rank batches).

    A run resumed on another number of processes keeps its place in the schedule: the optimizer-step counters are
    scaled by old/new world size. Returns None when nothing needs changing.
    """
    old = int(progress.get("world_size", 1))
    if old == world_size:
        return None
    ratio = old / world_size
    return {**progress, "world_size": world_size, "step": int(progress["step"] * ratio),
            "step_in_epoch": int(progress.get("step_in_epoch", 0) * ratio)}
