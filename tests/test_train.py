"""The training CLI end to end on synthetic data: one epoch, resumed once; fusion head on cached logits; evaluation."""
import json

import numpy as np
import pytest
import torch

import fer_models as fm
from fer_models.training import evaluate, train
from fer_models.training.card import write_model_card
from fer_models.training.config import TrainConfig, class_weights, lr_at
from fer_models.training.state import training_history


@pytest.fixture(scope="module")
def synthetic_csv(tmp_path_factory):
    """A learnable toy FER2013 CSV: the class decides where a bright square sits."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    rows = ["emotion,pixels,Usage"]
    for split, n in (("Training", 256), ("PublicTest", 64), ("PrivateTest", 64)):
        for i in range(n):
            label = i % 7
            img = rng.integers(0, 60, (48, 48))
            r, c = divmod(label, 3)
            img[6 + r * 12:16 + r * 12, 6 + c * 12:16 + c * 12] = 250
            rows.append(f"{label},\"{' '.join(map(str, img.ravel()))}\",{split}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _args(data, out, *extra):
    return ["--arch", "vgg_tiny", "--data", str(data), "--output", str(out), "--batch-size", "32", "--lr", "0.05",
            "--num-threads", "2", *extra]


def test_one_epoch_then_resume(synthetic_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    res = train.main(_args(synthetic_csv, run, "--epochs", "1"))
    assert (run / "state.safetensors").is_file() and (run / "best" / "model.safetensors").is_file()
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1
    assert {"train_loss", "train_acc", "public_acc", "lr", "images_per_s"} <= set(rows[0])
    assert 0 <= res["PrivateTest/tencrop"]["accuracy"] <= 1
    assert res["PrivateTest/center"]["n"] == 64

    # resume: continue the same run for a second epoch; the first epoch's row is kept, not redone, and a row logged
    # after the last saved state (as after a crash) is dropped rather than duplicated
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "stale": True}) + "\n")
    res2 = train.main(_args(synthetic_csv, run, "--epochs", "2", "--resume"))
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and not any(r.get("stale") for r in rows)
    assert json.loads((run / "state.json").read_text())["progress"]["epoch"] == 2
    assert res2["epochs_completed"] == 2

    model_dir = run / "model"
    model = fm.load_model(model_dir)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    card = (model_dir / "README.md").read_text()
    assert "model-index" in card and "PrivateTest" in card and (model_dir / "confusion_matrix.png").is_file()
    saved = json.loads((model_dir / "results.json").read_text())
    assert saved["PrivateTest/center"]["accuracy"] == res2["PrivateTest/center"]["accuracy"]


def test_training_learns_the_toy_task(synthetic_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    res = train.main(_args(synthetic_csv, tmp_path / "r", "--epochs", "6", "--rotation", "0", "--scale", "0",
                           "--no-crop", "--skip-final-eval"))
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["best_selection_score"] > 0.5  # chance is 1/7


def test_init_from_warm_starts_and_rejects_a_mismatch(synthetic_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    quick = ("--rotation", "0", "--scale", "0", "--no-crop", "--skip-final-eval")
    train.main(_args(synthetic_csv, tmp_path / "a", "--epochs", "6", *quick))
    first = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    cfg_a = tmp_path / "a" / "best" / "config.json"  # a calibration fitted to a's weights must not carry over
    cfg_a.write_text(json.dumps({**json.loads(cfg_a.read_text()), "temperature": 3.0,
                                 "confidence_map": {"x": [0.2, 0.9], "y": [0.3, 0.8]}}))
    # one epoch at a tiny LR from the trained weights starts where the first run ended, not from chance
    train.main(_args(synthetic_csv, tmp_path / "b", "--epochs", "1", "--lr", "1e-4",
                     "--init-from", str(tmp_path / "a" / "best"), *quick))
    second = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert first[-1]["best_selection_score"] > 0.5
    assert second[0]["public_acc"] >= first[-1]["best_selection_score"] - 0.1
    assert json.loads((tmp_path / "b" / "train_config.json").read_text())["init_from"].endswith("best")
    # the history behind the warm-started checkpoint follows --init-from back to the first run
    history = training_history(tmp_path / "b" / "best")
    assert [h["epochs_completed"] for h in history] == [6, 1] and history[1]["init_from"] == history[0]["run"] + "/best"
    cfg = fm.load_model(tmp_path / "b" / "best").cfg
    assert "temperature" not in cfg and "confidence_map" not in cfg
    card = write_model_card(tmp_path / "card", cfg, {"member_training": {"vgg_tiny": {
        "train_minutes": 1.5, "epochs_completed": 7, "best_epoch": 1, "device": "cpu", "stages": history}}})
    assert "in 2 runs (6 epochs" in card.text and "kept epoch 1 of the last run (best" in card.text
    card = write_model_card(tmp_path / "card2", cfg, {"member_training": {"vgg_tiny": {
        "train_minutes": 1.5, "epochs_completed": 7, "best_epoch": 2, "device": "cpu", "stages": history}}})
    assert "kept epoch 2 of the last run, the partial epoch its time budget cut short" in card.text
    with pytest.raises(ValueError, match="does not match"):
        train.main(_args(synthetic_csv, tmp_path / "c", "--epochs", "1", "--width", "2",
                         "--init-from", str(tmp_path / "a" / "best"), *quick))
    with pytest.raises(ValueError, match="arch 'vgg_tiny', not 'resnet_tiny'"):
        train.main(["--arch", "resnet_tiny", *_args(synthetic_csv, tmp_path / "d", "--epochs", "1",
                                                     "--init-from", str(tmp_path / "a" / "best"), *quick)[2:]])


def test_time_budget_stops_cleanly_with_a_usable_checkpoint(synthetic_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "b"
    train.main(_args(synthetic_csv, run, "--epochs", "1000", "--max-minutes", "0.02", "--skip-final-eval"))
    progress = json.loads((run / "state.json").read_text())["progress"]
    assert progress["epoch"] < 1000 and progress.get("done")
    fm.load_model(run / "model")


def test_fusion_head_on_cached_member_logits_and_evaluate_cli(synthetic_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    members = []
    for arch in ("vgg_tiny", "vgg_cbam_tiny"):
        train.main(["--arch", arch, "--data", str(synthetic_csv), "--output", str(tmp_path / arch), "--epochs", "1",
                    "--batch-size", "32", "--skip-final-eval"])
        members.append(str(tmp_path / arch / "best"))
    res = train.main(["--arch", "fusion", "--members", ",".join(members), "--data", str(synthetic_csv),
                      "--output", str(tmp_path / "fusion"), "--head-epochs", "30"])
    assert set(res["head_trials"]) == {"none", "loss"}
    assert set(res["PrivateTest/tencrop"]["members"]) == {"vgg_tiny", "vgg_cbam_tiny"}
    assert (tmp_path / "fusion" / "member_logits.npz").is_file()
    fusion = fm.load_model(tmp_path / "fusion" / "model")
    assert isinstance(fusion, fm.FusionModel) and fusion.member_names == ["vgg_tiny", "vgg_cbam_tiny"]

    # the evaluation CLI on the saved fusion reproduces the training run's PrivateTest number
    out = tmp_path / "eval.json"
    ev = evaluate.main([str(tmp_path / "fusion" / "model"), "--data", str(synthetic_csv), "--split", "PrivateTest",
                        "--out", str(out), "--png", str(tmp_path / "cm.png")])
    assert ev["accuracy"] == pytest.approx(res["PrivateTest/center"]["accuracy"], abs=2 / 64)
    assert json.loads(out.read_text())["members"].keys() == {"vgg_tiny", "vgg_cbam_tiny"}
    assert (tmp_path / "cm.png").is_file()


def test_class_weights_and_schedule():
    w = class_weights(np.array([436, 7215, 4000]), 0.5)
    assert w.mean().item() == pytest.approx(1.0) and w[0] > w[2] > w[1]
    cfg = TrainConfig(lr=0.1, warmup=0.1)
    assert lr_at(cfg, 0.0) == 0 and lr_at(cfg, 0.1) == pytest.approx(0.1) and lr_at(cfg, 1.0) == pytest.approx(0)


def test_gpu_lease_script_end_to_end_on_cpu(synthetic_csv, tmp_path):
    """scripts/gpu_lease.sh (train_all.sh PRESET=gpu: three members at once, fusion, CK+ and subset evaluation, then
    packing into parts under 16 MiB) at toy size on CPU: a broken script would waste a scarce GPU lease."""
    import os
    import shutil
    import subprocess
    import tarfile
    from pathlib import Path

    from PIL import Image

    data = tmp_path / "data"
    (data / "fer2013").mkdir(parents=True)
    shutil.copy(synthetic_csv, data / "fer2013" / "fer2013.csv")
    rng = np.random.default_rng(1)
    for cls in ("angry", "happy", "surprise"):
        (data / "ckplus48" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(
                data / "ckplus48" / cls / f"S01{i}_001_0000000{i}.png")
    pack, runs = tmp_path / "pack", tmp_path / "runs"
    env = {**os.environ, "ALLOW_CPU": "1", "DATA": str(data), "PACK": str(pack), "RUNS": str(runs),
           "FER_CACHE_DIR": str(tmp_path / "cache"), "WIDTH": "0.125", "EPOCHS": "1", "MINUTES": "1",
           "EXTRA": "--batch-size 32 --num-threads 1 --device cpu", "FUSION_EXTRA": "--device cpu"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "scripts" / "gpu_lease.sh")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = sorted(pack.glob("fusion_model.tar.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2 ** 20 for p in parts) and (pack / "logs.tgz").is_file()
    out = tmp_path / "unpacked"
    (tmp_path / "fusion.tar").write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(tmp_path / "fusion.tar") as tar:
        tar.extractall(out, filter="data")
    model = fm.load_model(out / "fusion" / "model")
    assert model.member_names == ["vgg19", "resnet18", "vgg19_cbam"]
    assert all(model.members[n].cfg["width"] == 0.125 for n in model.member_names)
    results = json.loads((out / "fusion" / "model" / "results.json").read_text())
    assert {"PrivateTest/tencrop", "ckplus48/center", "PrivateTest500/center"} <= set(results)
    with tarfile.open(pack / "logs.tgz") as tar:
        names = set(tar.getnames())
    assert {"vgg19/metrics.jsonl", "resnet18/metrics.jsonl", "vgg19_cbam/metrics.jsonl", "train_all.log"} <= names


def test_real_photo_recipe_trains_and_stores_face_norm(synthetic_csv, tmp_path, monkeypatch):
    """--augment real and --face-norm run end to end; the preprocessing lands in the saved config, and a warm
    start adopts it; --select-on public+ckplus48 refuses to run without CK+48 beside the data."""
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    quick = ("--epochs", "1", "--skip-final-eval", "--augment", "real", "--face-norm", "129.5", "53.7")
    train.main(_args(synthetic_csv, tmp_path / "a", *quick))
    model = fm.load_model(tmp_path / "a" / "best")
    assert model.input_spec()["face_norm"] == [129.5, 53.7]
    rows = [json.loads(r) for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["selection_score"] == rows[-1]["public_acc"]
    train.main(_args(synthetic_csv, tmp_path / "b", "--epochs", "1", "--skip-final-eval",
                     "--init-from", str(tmp_path / "a" / "best"), "--face-norm", "120", "50"))
    assert fm.load_model(tmp_path / "b" / "best").input_spec()["face_norm"] == [120.0, 50.0]
    with pytest.raises(ValueError, match="needs CK\\+48"):
        train.main(_args(synthetic_csv, tmp_path / "c", "--epochs", "1", "--select-on", "public+ckplus48"))


def test_mixup_still_learns_the_toy_task(synthetic_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    train.main(_args(synthetic_csv, tmp_path / "r", "--epochs", "6", "--rotation", "0", "--scale", "0", "--no-crop",
                     "--mixup", "0.2", "--skip-final-eval"))
    rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["best_selection_score"] > 0.5  # chance is 1/7
