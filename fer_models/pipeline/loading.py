"""Model loading with Hub fallback: a Hub repo when it can be had quickly, else the shipped local folder.

Never stalls: with ``HF_HUB_OFFLINE`` set or the endpoint not answering a TCP connect within a bound, only the
Hub cache is tried before falling back; :class:`ModelSource` says which weights are in use and why.

Hub faults fall back fast, because huggingface_hub's own retries (five, with back-off) are kept off the critical
path: a metadata check of ``config.json`` and ``model.safetensors`` without retries (a 5xx, a missing file or a
server that does not answer fails within ``HUB_REQUEST_TIMEOUT_S``), then the download itself runs against a
wall-clock budget (``HUB_BUDGET_S`` plus the weights' size at ``HUB_MIN_BYTES_PER_S``), so a stalled or cut-off
transfer cannot hold the app. A downloaded model must load with ``strict=True`` from safetensors (nothing is ever
unpickled) and carry the class list of the local checkpoint; anything else is refused with the reason in the note.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlparse

from .errors import ModelLoadError

log = logging.getLogger(__name__)

ENV_MODEL_REPO = "FER_MODEL_REPO"
DEFAULT_CHECKPOINT_DIR = "checkpoints"
HUB_REQUEST_TIMEOUT_S = 1.0  # one metadata request, no retries
HUB_BUDGET_S = 1.0  # wall clock for the download, on top of the weights' size at the rate below
HUB_MIN_BYTES_PER_S = 5e6  # slower than this, the local checkpoint serves (56 MB: 12 s)


@dataclass
class ModelSource:
    """Which weights are in use, and why (shown in the UI)."""

    kind: str  # "hub" or "local"
    location: str  # repo id or local path
    device: str
    arch: str = ""
    results: Optional[dict] = None  # the checkpoint's results.json, when it has one
    note: str = ""  # e.g. why the Hub was not used

    def accuracies(self) -> dict[str, float]:
        """``{split: accuracy}`` from results.json (any split-like entry with an ``accuracy``)."""
        out: dict[str, float] = {}
        for k, v in (self.results or {}).items():
            if isinstance(v, dict) and isinstance(v.get("accuracy"), (int, float)):
                out[k] = float(v["accuracy"])
        return out

    def describe(self) -> str:
        where = {"hub": f"Hub repo `{self.location}`", "local": f"local folder `{self.location}`"}.get(
            self.kind, f"in-memory model `{self.location}`")
        acc = self.accuracies()
        acc_txt = ", ".join(f"{k} accuracy {v:.1%}" if v <= 1 else f"{k} accuracy {v:.1f}%" for k, v in acc.items())
        s = f"Weights: {where} ({self.arch}, on {self.device})"
        s += f"; recorded {acc_txt}" if acc_txt else "; no recorded accuracy (results.json absent)"
        return s + (f". {self.note}" if self.note else ".")

    def to_dict(self) -> dict:
        return {"kind": self.kind, "location": self.location, "device": self.device, "arch": self.arch,
                "accuracy": self.accuracies(), "note": self.note}


def default_device() -> str:
    from ..models.predict import resolve_device

    return str(resolve_device("auto"))


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP connect to the Hub endpoint, bounded in time (DNS included); no HTTP retries."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _read_results(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return None


def _load_local(local_dir: Union[str, Path], device: str):
    from ..models.base import load_model

    d = Path(local_dir)
    if not d.is_dir() or not (d / "model.safetensors").is_file() or not (d / "config.json").is_file():
        raise ModelLoadError(
            f"No model weights in {d}/ (it needs config.json and model.safetensors). Train and save a model "
            f"there, or name a Hub repo with --model-repo or the {ENV_MODEL_REPO} environment variable."
        )
    try:
        model = load_model(d, device=device)
    except Exception as e:  # a corrupt or mismatched checkpoint: say which and why
        raise ModelLoadError(f"The checkpoint in {d}/ cannot be loaded: {e}") from e
    return model, _read_results(d)


def _hub_preflight(repo_id: str, revision: Optional[str], timeout: float) -> int:
    """Size of the repo's weights; raises at once (no retries) on an HTTP error, a missing file or a timeout."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    from ..models.base import WEIGHTS_NAME

    size = 0
    for name in ("config.json", WEIGHTS_NAME):
        meta = get_hf_file_metadata(hf_hub_url(repo_id, name, revision=revision), timeout=timeout)
        size = int(meta.size or 0)
    return size


def _within(seconds: float, fn, *args):
    """``fn(*args)`` in a daemon thread, given up on after ``seconds`` (TimeoutError). A download given up on
    may finish in the background; it only fills the Hub cache."""
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out.append((False, e))

    t = threading.Thread(target=run, daemon=True, name="hub-download")
    t.start()
    t.join(seconds)
    if not out:
        raise TimeoutError(f"no complete answer from the Hub within {seconds:.1f} s")
    ok, value = out[0]
    if not ok:
        raise value
    return value


def _expected_classes(local_dir: Union[str, Path]) -> Optional[list]:
    try:
        return list(json.loads((Path(local_dir) / "config.json").read_text())["class_names"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _load_hub(repo_id: str, device: str, revision: Optional[str], local_files_only: bool,
              expected_classes: Optional[list] = None):
    from huggingface_hub import hf_hub_download

    from ..models.base import load_model

    try:
        model = load_model(repo_id, device=device, revision=revision, local_files_only=local_files_only)
    except (TypeError, KeyError, AttributeError) as e:  # a config whose fields the named architecture cannot take
        raise ValueError(f"its config does not describe a model this code can build ({type(e).__name__}: {e})") from e
    if expected_classes is not None and list(model.class_names) != list(expected_classes):
        raise ValueError(f"its classes {list(model.class_names)} are not the app's {list(expected_classes)}")
    results = None
    try:
        results = json.loads(Path(hf_hub_download(repo_id, "results.json", revision=revision,
                                                  local_files_only=local_files_only)).read_text())
    except Exception:  # results.json is optional
        pass
    return model, results


def load_model_with_fallback(
    repo_id: Optional[str] = None, local_dir: Union[str, Path] = DEFAULT_CHECKPOINT_DIR, *,
    device: Optional[str] = None, revision: Optional[str] = None, probe_timeout: float = 1.0,
    expected_classes: Optional[list] = None,
):
    """``(model, ModelSource)``: the Hub repo ``repo_id`` (default ``$FER_MODEL_REPO``) if it can be had
    quickly (online, or already in the local Hub cache), else the local folder ``local_dir``.

    Never stalls: with ``HF_HUB_OFFLINE`` set or the endpoint not answering a TCP connect within
    ``probe_timeout`` seconds, only the Hub cache is tried before falling back; Hub errors, stalls and broken
    files fall back within about ``probe_timeout + HUB_REQUEST_TIMEOUT_S + HUB_BUDGET_S`` (see the module doc).
    A Hub model must have ``expected_classes`` (default: those of the checkpoint in ``local_dir``, if any).
    """
    device = device or default_device()
    repo_id = repo_id if repo_id is not None else (os.environ.get(ENV_MODEL_REPO) or None)
    if expected_classes is None:
        expected_classes = _expected_classes(local_dir)
    note = ""
    if repo_id:
        offline = hub_offline()
        online = not offline and hub_reachable(probe_timeout)
        attempts = [False, True] if online else [True]  # download, then the cache alone
        errors = []
        for cache_only in attempts:
            try:
                if cache_only:
                    model, results = _load_hub(repo_id, device, revision, True, expected_classes)
                else:
                    size = _hub_preflight(repo_id, revision, HUB_REQUEST_TIMEOUT_S)
                    model, results = _within(HUB_BUDGET_S + size / HUB_MIN_BYTES_PER_S, _load_hub, repo_id,
                                             device, revision, False, expected_classes)
                src_note = "" if online and not cache_only else "Loaded from the local Hub cache (offline)."
                return model, ModelSource("hub", repo_id, device, model.arch, results, src_note)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
        # The download attempt's error says what went wrong; the cache attempt's only that nothing was cached.
        why = "HF_HUB_OFFLINE is set" if offline else ("the Hub is unreachable" if not online else errors[0])
        note = f"Hub repo `{repo_id}` not used ({why}); fell back to the local checkpoint."
        log.warning(note)
    model, results = _load_local(local_dir, device)
    return model, ModelSource("local", str(local_dir), device, model.arch, results, note)
