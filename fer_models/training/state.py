"""What a training run leaves on disk: the resumable state (safetensors + JSON, never pickle), the metrics log,
the exported model with its results and card, and the history of the runs behind a checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..models.base import FERModel


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


def log_metrics(run: Path, row: dict) -> None:
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def trim_metrics(run: Path, completed_epochs: int) -> None:
    """On resume, drop the rows of epochs that the saved state does not include (they will be run again)."""
    path = run / "metrics.jsonl"
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        keep = [r for r in rows if json.loads(r).get("epoch", 0) <= completed_epochs]
        if len(keep) != len(rows):
            path.write_text("".join(r + "\n" for r in keep))


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
                       "device": r.get("device"), "init_from": tc.get("init_from"), "train_config": tc,
                       "interpolation": {k: v for k, v in (r.get("interpolation") or {}).items() if k != "alphas"}})
        d = Path(tc["init_from"]) if tc.get("init_from") else None
    return stages[::-1]


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
