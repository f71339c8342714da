"""Publish a checkpoint directory to the Hugging Face Hub:
``python -m fer_models.publish <dir> --repo-id <owner/name> [--private] [--dry-run]``.

Uploads ``model.safetensors``, ``config.json``, the model card (``README.md``, regenerated with the repo id and
the ``model-index`` results from ``results.json``), ``results.json`` and the confusion-matrix PNG in one commit.
Fails fast with a clear message when ``HF_HUB_OFFLINE`` is set, no token is available, or the Hub cannot be
reached, instead of waiting on retries.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi, get_token

from ..models.base import CONFIG_NAME, WEIGHTS_NAME

UPLOAD_FILES = (WEIGHTS_NAME, CONFIG_NAME, "README.md", "results.json", "confusion_matrix.png")


class PublishError(RuntimeError):
    pass


def check_checkpoint(folder: Path) -> list[str]:
    """The files to upload; raises if the folder is not a loadable fer-models checkpoint."""
    from ..models import load_model

    for required in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / required).is_file():
            raise PublishError(f"{folder} has no {required}: not a checkpoint directory")
    load_model(folder)  # strict load: never publish weights that do not match their config
    return [f for f in UPLOAD_FILES if (folder / f).is_file()]


def publish(folder: str, repo_id: str, *, private: bool = False, dry_run: bool = False, token: Optional[str] = None,
            commit_message: str = "Upload fer-models checkpoint", api: Optional[HfApi] = None) -> dict:
    folder_p = Path(folder)
    files = check_checkpoint(folder_p)
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise PublishError(f"--repo-id must look like owner/name, got {repo_id!r}")
    cfg = json.loads((folder_p / CONFIG_NAME).read_text())
    results = json.loads((folder_p / "results.json").read_text()) if (folder_p / "results.json").is_file() else {}
    from .card import write_model_card

    card = write_model_card(folder_p, cfg, results, repo_id=repo_id)  # the card names the repo it lives in
    plan = {"repo_id": repo_id, "private": private, "files": files, "card_metadata": card.data.to_dict()}
    if dry_run:
        return plan
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PublishError("HF_HUB_OFFLINE is set: cannot publish (unset it, or use --dry-run to check)")
    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: run `huggingface-cli login` or set HF_TOKEN")
    api = api or HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder_p), repo_id=repo_id, repo_type="model",
                                   allow_patterns=files, commit_message=commit_message)
    except Exception as e:  # network, auth and permission errors all end here with one clear line
        raise PublishError(f"upload to {repo_id} failed: {type(e).__name__}: {e}") from e
    plan.update(repo_url=str(url), commit_url=str(getattr(commit, "commit_url", commit)))
    return plan


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(description="Publish a fer-models checkpoint to the Hugging Face Hub.")
    p.add_argument("folder", help="checkpoint directory (model.safetensors + config.json)")
    p.add_argument("--repo-id", required=True, help="owner/name on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="check and list what would be uploaded; no network")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    args = p.parse_args(argv)
    try:
        res = publish(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run, token=args.token)
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps({k: v for k, v in res.items() if k != "card_metadata"}, indent=1))
    return res


if __name__ == "__main__":
    main()
