"""WiSE-FT weight interpolation of a fine-tuned backbone with its start, and its stated selection rule."""
import json

import pytest
import torch

import fer_models as fm
from fer_models.training import interpolate as wise


def _pair():
    torch.manual_seed(0)
    a, b = fm.create_model("resnet_tiny"), fm.create_model("resnet_tiny")
    for m in (a, b):  # make the BatchNorm counters differ too
        m.train()(torch.rand(4, 1, 48, 48))
    b.train()(torch.rand(4, 1, 48, 48))
    return a.eval(), b.eval()


def test_interpolation_ends_and_midpoint():
    a, b = _pair()
    sa, sb = a.state_dict(), b.state_dict()
    for alpha, want in ((0.0, sa), (1.0, sb)):
        got = wise.interpolate_state(sa, sb, alpha)
        assert all(torch.equal(got[k], want[k]) for k in sa if sa[k].is_floating_point())
    mid = wise.interpolate_state(sa, sb, 0.5)
    k = next(k for k in sa if k.endswith("weight") and sa[k].dim() == 4)
    assert torch.allclose(mid[k], (sa[k] + sb[k]) / 2)
    counters = [k for k in sa if not sa[k].is_floating_point()]
    assert counters and all(torch.equal(mid[k], sb[k]) for k in counters)  # integer buffers from the fine-tune
    m = wise.interpolated(a, b, 0.5)
    assert torch.allclose(m.state_dict()[k], mid[k]) and not torch.equal(m.state_dict()[k], sb[k])


def test_interpolation_refuses_other_architectures():
    a = fm.create_model("resnet_tiny").state_dict()
    b = fm.create_model("vgg_tiny").state_dict()
    with pytest.raises(ValueError, match="different parameters|shape"):
        wise.interpolate_state(a, b, 0.5)


def test_choice_keeps_public_within_the_bar_then_best_score():
    rows = [{"alpha": 0.0, "public_acc": 0.70, "score": 0.74}, {"alpha": 0.5, "public_acc": 0.697, "score": 0.78},
            {"alpha": 1.0, "public_acc": 0.688, "score": 0.80}]
    assert wise.choose(rows, 0.005)["alpha"] == 0.5  # alpha 1 scores best but loses 1.2 points of PublicTest
    assert wise.choose(rows, 0.02)["alpha"] == 1.0
    assert wise.choose(rows, 0.0)["alpha"] == 0.0


def test_cli_writes_the_kept_weights_and_every_alpha(data_dir, tmp_path):
    a, b = _pair()
    a.save_pretrained(tmp_path / "start")
    b.save_pretrained(tmp_path / "ft" / "best")
    rec = wise.main([str(tmp_path / "start"), str(tmp_path / "ft" / "best"), "--data", str(data_dir),
                     "--output", str(tmp_path / "out"), "--alphas", "0.5,1", "--max-public-drop", "1"])
    assert [r["alpha"] for r in rec["alphas"]] == [0.0, 0.5, 1.0]  # the start is always scored
    assert rec["alpha"] == max(rec["alphas"], key=lambda r: r["score"])["alpha"]
    kept = fm.load_model(tmp_path / "out" / "best")
    assert kept.arch == "resnet_tiny"
    saved = json.loads((tmp_path / "out" / "model" / "results.json").read_text())["interpolation"]
    assert saved["alpha"] == rec["alpha"] and saved["ckplus_subjects"] == "heldout"

    from fer_models.training.card import write_model_card
    from fer_models.training.state import training_history

    history = training_history(tmp_path / "out" / "best")
    assert history[-1]["interpolation"]["alpha"] == rec["alpha"]
    write_model_card(tmp_path / "card", kept.cfg, {"arch": "fusion", "member_training": {
        "resnet18": {"stages": history, "train_config": {}, "best_epoch": 1}}})
    assert f"interpolated with the starting checkpoint's at alpha {rec['alpha']:g}" in (
        tmp_path / "card" / "README.md").read_text()


def test_fusion_level_choice_keeps_fused_public_within_the_bar():
    from fer_models.training.interpolate_fusion import choose_combination

    def row(a, b, pub, score):
        return {"alphas": {"vgg19": a, "resnet18": b}, "public_acc": pub, "score": score}

    rows = [row(0, 0, 0.720, 0.74), row(1, 1, 0.700, 0.85), row(0.5, 1, 0.718, 0.80), row(1, 0.5, 0.718, 0.80),
            row(0.25, 0.25, 0.719, 0.76)]
    assert choose_combination(rows, 0.003)["alphas"] == {"vgg19": 0.5, "resnet18": 1}  # tie: first of equal sums
    assert choose_combination(rows, 0.05)["alphas"] == {"vgg19": 1, "resnet18": 1}
    assert choose_combination(rows, 0.0)["alphas"] == {"vgg19": 0, "resnet18": 0}
    rows.append(row(0.25, 0.5, 0.7185, 0.80))  # same score, smaller sum of alphas wins
    assert choose_combination(rows, 0.003)["alphas"] == {"vgg19": 0.25, "resnet18": 0.5}


def test_fusion_level_cli_scores_every_combination_and_saves_the_kept_members(data_dir, tmp_path):
    from fer_models.training import interpolate_fusion

    torch.manual_seed(0)
    dirs = {}
    for arch in ("resnet_tiny", "vgg_tiny"):
        a, b = fm.create_model(arch).eval(), fm.create_model(arch).eval()
        a.save_pretrained(tmp_path / "start" / arch)
        b.save_pretrained(tmp_path / "ft" / arch / "best")
        dirs[arch] = (str(tmp_path / "start" / arch), str(tmp_path / "ft" / arch / "best"))
    out = tmp_path / "out"
    rec = interpolate_fusion.main([
        "--start", ",".join(d[0] for d in dirs.values()), "--finetuned", ",".join(d[1] for d in dirs.values()),
        "--data", str(data_dir), "--output", str(out), "--alphas", "1", "--limit", "64", "--head-epochs", "5",
        "--max-public-drop", "1"])
    assert len(rec["combinations"]) == 4  # alphas {0, 1} for two members
    assert rec["kept"] == max(rec["combinations"], key=lambda r: (r["score"], -sum(r["alphas"].values())))
    assert all(0 <= r["ckplus48_acc"] <= 1 and 0 <= r["public_acc"] <= 1 for r in rec["combinations"])
    for name, alpha in rec["kept"]["alphas"].items():
        kept = fm.load_model(out / name / "best")
        saved = json.loads((out / name / "model" / "results.json").read_text())["interpolation"]
        assert saved["alpha"] == alpha and saved["chosen_by"] == "fusion" and len(saved["alphas"]) == 2
        from fer_models.training.card import write_model_card
        from fer_models.training.state import training_history

        write_model_card(tmp_path / "card", kept.cfg, {"arch": "fusion", "member_training": {
            name: {"stages": training_history(out / name / "best"), "train_config": {}, "best_epoch": 1}}})
        assert (f"alpha {alpha:g} (WiSE-FT; alpha chosen with the other members by the fused model on PublicTest"
                in (tmp_path / "card" / "README.md").read_text())
        want = fm.load_model(dirs[kept.arch][int(alpha)])  # alpha 0 = the start, 1 = the fine-tuned end
        k = next(k for k, v in want.state_dict().items() if v.is_floating_point() and v.dim() == 4)
        assert torch.allclose(kept.state_dict()[k].float(), want.state_dict()[k].float(), atol=1e-3)
    # a rerun reuses the cached logits
    before = (out / "logits.npz").stat().st_mtime
    interpolate_fusion.main([
        "--start", ",".join(d[0] for d in dirs.values()), "--finetuned", ",".join(d[1] for d in dirs.values()),
        "--data", str(data_dir), "--output", str(out), "--alphas", "1", "--limit", "64", "--head-epochs", "5"])
    assert (out / "logits.npz").stat().st_mtime == before
