"""Hub faults, injected by a fake Hub on 127.0.0.1 (huggingface_hub's endpoint pointed at it): a server that never
answers, 5xx, a truncated, cut-off or corrupt model.safetensors, a config with an unknown or mismatched
architecture or another class list, a repo missing its weights (but offering a pickle) or its config.

Each must fall back to the local checkpoint within ``FALLBACK_S`` seconds with a note that says why, shown by the
app's ``/model_info``; nothing is ever unpickled; the same server serving a good repo is used (the control).
"""
from __future__ import annotations

import json
import os
import pickle
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import fer_models as fm
from fer_models.pipeline import load_model_with_fallback

from served import serve, tiny_checkpoint

FALLBACK_S = 2.0  # the bound for every fault
REPO = "someone/fer-fusion"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    """Serves ``files`` as ``/{repo}/resolve/{revision}/{name}`` (HEAD and GET, with the headers
    huggingface_hub reads), misbehaving as ``fault`` says."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.fault = ""
        self.requests: list[str] = []
        self.stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args):  # quiet
        pass

    def _answer(self, with_body: bool) -> None:
        hub = self.server
        hub.requests.append(f"{self.command} {self.path}")
        name = self.path.split("/resolve/", 1)[-1].split("/", 1)[-1]
        if hub.fault == "timeout":
            hub.stop.wait(30)  # accept the connection, never answer
            return
        if hub.fault == "5xx":
            self.send_error(503, "Service Unavailable")
            return
        body = hub.files.get(name)
        if body is None:
            self.send_error(404, "Entry not found")
            return
        declared = len(body)
        if name == "model.safetensors" and hub.fault == "cut_off":
            body = body[:len(body) // 3]  # Content-Length promises the whole file, the connection ends early
        self.send_response(200)
        self.send_header("Content-Length", str(declared))
        self.send_header("ETag", f'"{abs(hash(body))}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.end_headers()
        if with_body:
            self.wfile.write(body)
            self.wfile.flush()
            if len(body) < declared:
                self.close_connection = True

    def do_HEAD(self):
        self._answer(False)

    def do_GET(self):
        self._answer(True)


class Tripwire(Exception):
    pass


@pytest.fixture()
def no_unpickling(monkeypatch):
    """Any unpickling during a load is a failure: pickle.load(s) and torch.load raise and are recorded."""
    calls: list[str] = []

    def trip(name):
        def f(*a, **k):
            calls.append(name)
            raise Tripwire(f"{name} called")
        return f

    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, trip(f"{mod.__name__}.{name}"))
    return calls


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """The fake Hub, with huggingface_hub pointed at it, online, and a fresh cache."""
    from huggingface_hub import constants

    server = FakeHub()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    try:
        yield server
    finally:
        server.stop.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The local fallback (fusion_tiny, FER2013 classes) and the files of the repos the fake Hub serves."""
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(1)
    fm.create_model("vgg_tiny").save_pretrained(d / "hub_good")
    fm.create_model("vgg_tiny", class_names=["a", "b", "c", "d", "e"]).save_pretrained(d / "five_classes")
    return {"local": tiny_checkpoint(d / "local"), "good": d / "hub_good", "five": d / "five_classes"}


def _repo_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name in ("config.json", "model.safetensors")}


def _config(folder: Path, **changes) -> bytes:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _faults(ck: dict[str, Path], marker: Path) -> dict[str, tuple[str, dict[str, bytes], str]]:
    """fault name -> (server mode, files served, regex the note must match)."""
    good = _repo_files(ck["good"])
    weights = good["model.safetensors"]
    flipped = bytearray(weights)
    flipped[4:40] = b"\xff" * 36  # the safetensors JSON header
    return {
        "timeout": ("timeout", good, r"Timeout|timed out|within"),
        "5xx": ("5xx", good, r"503|Service Unavailable|Server Error"),
        "truncated weights": ("", {**good, "model.safetensors": weights[:len(weights) // 2]}, r"weights|safetensors"),
        "cut-off transfer": ("cut_off", good, r"within|Timeout|Consistency|Error"),
        "corrupt weights": ("", {**good, "model.safetensors": bytes(flipped)}, r"weights|safetensors"),
        "unknown architecture": ("", {**good, "config.json": _config(ck["good"], arch="no_such_net")},
                                 r"no_such_net|Unknown|unknown"),
        "architecture mismatch": ("", {**good, "config.json": _config(ck["good"], arch="resnet_tiny")},
                                  r"do not match|shape|missing|config does not describe"),
        "other class list": ("", {**good, "config.json": _config(
            ck["good"], class_names=list(reversed(json.loads((ck["good"] / "config.json").read_text())
                                                  ["class_names"])))}, r"classes"),
        "fewer classes": ("", _repo_files(ck["five"]), r"classes"),
        "weights missing, pickle offered": ("", {"config.json": good["config.json"],
                                                 "pytorch_model.bin": pickle.dumps(_Evil(str(marker)))},
                                            r"404|not found|Entry"),
        "config missing": ("", {"model.safetensors": weights}, r"404|not found|Entry|arch"),
    }


def test_good_repo_loads_from_the_fake_hub(hub, checkpoints, no_unpickling):
    hub.files = _repo_files(checkpoints["good"])
    model, source = load_model_with_fallback(REPO, checkpoints["local"], device="cpu")
    assert source.kind == "hub" and source.location == REPO and model.arch == "vgg_tiny" and not source.note
    assert any("model.safetensors" in r for r in hub.requests) and not no_unpickling


@pytest.mark.parametrize("fault", ["timeout", "5xx", "truncated weights", "cut-off transfer", "corrupt weights",
                                   "unknown architecture", "architecture mismatch", "other class list",
                                   "fewer classes", "weights missing, pickle offered", "config missing"])
def test_hub_fault_falls_back_fast(fault, hub, checkpoints, no_unpickling, tmp_path):
    marker = tmp_path / "pwned"
    mode, files, why = _faults(checkpoints, marker)[fault]
    hub.fault, hub.files = mode, files
    t = time.perf_counter()
    model, source = load_model_with_fallback(REPO, checkpoints["local"], device="cpu")
    seconds = time.perf_counter() - t
    print(f"{fault}: fell back in {seconds:.2f} s; {source.note}")
    assert source.kind == "local" and model.arch == "fusion_tiny"
    assert seconds < FALLBACK_S, f"{fault}: {seconds:.2f} s"
    assert REPO in source.note and "fell back to the local checkpoint" in source.note
    assert pytest.importorskip("re").search(why, source.note), source.note
    assert hub.requests, "the fake Hub was never asked"
    assert not no_unpickling and not marker.exists()


def test_fault_note_is_visible_in_the_app(hub, checkpoints):
    """The app started on a broken Hub repo serves the local weights and says why in /model_info."""
    gradio_client = pytest.importorskip("gradio_client")
    pytest.importorskip("explain", reason="explain/ is needed by the app")
    import app

    hub.fault, hub.files = "5xx", _repo_files(checkpoints["good"])
    holder = app.PredictorHolder(repo_id=REPO, checkpoint_dir=checkpoints["local"], device="cpu")
    with serve(holder) as url:
        info = gradio_client.Client(url, verbose=False).predict(api_name="/model_info")
    assert f"Hub repo `{REPO}` not used" in info and "503" in info and "local folder" in info
