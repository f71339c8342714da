"""Publishing through a mocked HfApi: the right files and a card with model-index results; fast, clear failures."""
import json
from unittest import mock

import pytest
import torch

import fer_models as fm
from fer_models.training import publish


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    fm.create_model("fusion_tiny").save_pretrained(d, dtype=torch.float16)
    results = {"arch": "fusion_tiny", "PrivateTest/center": {
        "accuracy": 0.71, "macro_f1": 0.65, "n": 10, "per_class": {}, "confusion_matrix": [[1]], "class_names": ["a"]}}
    (d / "results.json").write_text(json.dumps(results))
    return d


def test_upload_with_mocked_api(checkpoint, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    api = mock.MagicMock()
    api.create_repo.return_value = "https://huggingface.co/me/fer"
    api.upload_folder.return_value = mock.MagicMock(commit_url="https://huggingface.co/me/fer/commit/1")
    res = publish.publish(str(checkpoint), "me/fer", private=True, token="hf_x", api=api)
    api.create_repo.assert_called_once_with(repo_id="me/fer", private=True, exist_ok=True, repo_type="model")
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/fer" and kwargs["folder_path"] == str(checkpoint)
    assert {"model.safetensors", "config.json", "README.md", "results.json"} <= set(kwargs["allow_patterns"])
    card = (checkpoint / "README.md").read_text()
    assert "model-index" in card and "name: me/fer" in card and "value: 71.0" in card
    assert res["commit_url"].endswith("/commit/1")


def test_dry_run_needs_no_network_or_token(checkpoint):
    res = publish.publish(str(checkpoint), "me/fer", dry_run=True)
    assert "model.safetensors" in res["files"]
    assert res["card_metadata"]["model-index"][0]["name"] == "me/fer"


def test_offline_and_missing_token_fail_fast(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(publish.PublishError, match="HF_HUB_OFFLINE"):
        publish.publish(str(checkpoint), "me/fer")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(publish, "get_token", lambda: None)
    with pytest.raises(publish.PublishError, match="no Hugging Face token"):
        publish.publish(str(checkpoint), "me/fer")
    with pytest.raises(SystemExit):
        publish.main([str(checkpoint), "--repo-id", "me/fer"])


def test_upload_errors_become_one_clear_message(checkpoint, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    api = mock.MagicMock()
    api.create_repo.side_effect = ConnectionError("Hub unreachable")
    with pytest.raises(publish.PublishError, match="upload to me/fer failed: ConnectionError"):
        publish.publish(str(checkpoint), "me/fer", token="hf_x", api=api)


def test_refuses_folders_that_are_not_checkpoints(tmp_path):
    with pytest.raises(publish.PublishError, match="no model.safetensors"):
        publish.publish(str(tmp_path), "me/fer", dry_run=True)
