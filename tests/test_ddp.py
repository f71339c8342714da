"""Data-parallel training: ``torchrun --nproc_per_node 2 -m fer_models.train`` on CPU (gloo) at toy size, resumed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import fer_models as fm
from fer_models.training import train
from fer_models.training.distributed import Distributed, progress_for_world_size, shard
from test_train import _args, synthetic_csv  # noqa: F401  (the toy FER2013 CSV fixture and the tiny-run flags)

ROOT = Path(__file__).resolve().parents[1]


def test_shards_are_disjoint_equal_and_one_process_keeps_everything():
    order = torch.randperm(23)
    parts = [shard(order, Distributed(world_size=3, rank=r)) for r in range(3)]
    assert [len(p) for p in parts] == [7, 7, 7]  # equal step counts: no rank waits in a collective forever
    seen = torch.cat(parts)
    assert len(set(seen.tolist())) == 21 and set(seen.tolist()) <= set(order.tolist())
    assert torch.equal(shard(order, Distributed()), order)


def test_resume_on_another_number_of_processes_keeps_the_place_in_the_schedule():
    saved = {"epoch": 3, "step": 40, "step_in_epoch": 6, "elapsed_s": 9.0, "world_size": 2}
    assert progress_for_world_size(saved, 2) is None
    assert progress_for_world_size(saved, 4) == {**saved, "world_size": 4, "step": 20, "step_in_epoch": 3}
    assert progress_for_world_size({"epoch": 0, "step": 8, "step_in_epoch": 0}, 2)["step"] == 4  # single-process state


def _torchrun(*argv, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FER_CACHE_DIR": str(cache),
           "PYTHONPATH": str(ROOT)}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo on loopback, whatever the hostname resolves to
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "fer_models.train", *argv, "--num-threads", "1", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _rows(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _progress(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())["progress"]


def test_torchrun_two_gloo_processes_train_and_resume(synthetic_csv, tmp_path, monkeypatch):  # noqa: F811
    cache = tmp_path / "cache"
    monkeypatch.setenv("FER_CACHE_DIR", str(cache))
    single = tmp_path / "single"
    train.main(_args(synthetic_csv, single, "--epochs", "1", "--skip-final-eval"))

    run = tmp_path / "ddp"
    flags = ("--balance", "sampler")  # the class-balanced order is drawn once and sharded like a permutation
    proc = _torchrun(*_args(synthetic_csv, run, "--epochs", "1", "--skip-final-eval", *flags), cache=cache)
    assert "data-parallel training: 2 processes, backend gloo" in proc.stdout + proc.stderr
    assert [r["epoch"] for r in _rows(run)] == [1]
    # 256 faces, batch 32 per process: 4 steps per rank instead of the single process's 8 (the data is sharded)
    assert _progress(run)["step"] == 4 and _progress(single)["step"] == 8 and _progress(run)["world_size"] == 2
    results = json.loads((run / "model" / "results.json").read_text())
    assert results["world_size"] == 2 and results["device"].startswith("2 x CPU")
    assert (run / "model" / "README.md").is_file() and (run / "train_config.json").is_file()
    # rank 0 saved the unwrapped model: the same keys and shapes as a single-process run (no "module." prefix)
    ref = {k: v.shape for k, v in load_file(single / "best" / "model.safetensors").items()}
    got = {k: v.shape for k, v in load_file(run / "best" / "model.safetensors").items()}
    assert got == ref
    exported = fm.load_model(run / "model")
    assert {k: v.shape for k, v in exported.state_dict().items()} == ref

    # resume on 2 processes under a time budget: a stale row (logged after the last saved state) is dropped, more
    # epochs follow, and the budget stops every rank at the same step (a rank left behind would hang until timeout)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "stale": True}) + "\n")
    _torchrun(*_args(synthetic_csv, run, "--epochs", "1000", "--max-minutes", "0.1", "--resume", *flags),
              cache=cache)
    rows, progress = _rows(run), _progress(run)
    assert not any(r.get("stale") for r in rows)
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 2
    assert 2 <= progress["epoch"] < 1000 and progress["done"] and progress["elapsed_s"] >= 0.1 * 60
    assert all(r["finished_epoch"] for r in rows[:-1])
    assert progress["step"] == 4 * progress["epoch"] + progress["step_in_epoch"]
    results = json.loads((run / "model" / "results.json").read_text())
    assert results["epochs_completed"] == progress["epoch"] and results["PrivateTest/tencrop"]["n"] == 64
