"""The app served in-process for the reliability tests (corpus, fuzzing, soak): a tiny fusion model saved and
loaded back like the real checkpoint, the real ``app.launch`` (queue and upload limits included), and measurements
of the process's peak memory."""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fer_models as fm
from conftest import free_port
from fer_models.pipeline import FacePredictor, load_model_with_fallback

# The catch-all message of app.user_errors: an exception nobody turned into a clear message (a bug).
UNEXPECTED = "could not be analysed ("


def tiny_checkpoint(folder: Path) -> Path:
    """A saved ``fusion_tiny`` with a results.json, as ``checkpoints/`` holds the real one."""
    folder.mkdir(parents=True, exist_ok=True)
    fm.create_model("fusion_tiny").save_pretrained(folder)
    (folder / "results.json").write_text(json.dumps({"PrivateTest": {"accuracy": 0.25}}))
    return folder


def tiny_predictor(folder: Path, **kwargs) -> FacePredictor:
    from explain import Explainer

    model, source = load_model_with_fallback(None, tiny_checkpoint(folder), device="cpu")
    kwargs.setdefault("max_explained", 4)
    return FacePredictor(model, explainer=Explainer(model), source=source, **kwargs)


@contextmanager
def serve(predictor, **launch_kwargs) -> Iterator[str]:
    """Build the app around ``predictor`` (a FacePredictor or an app.PredictorHolder), launch it as ``python
    app.py`` would, yield its URL, close it."""
    import app

    demo = app.build_demo(predictor)
    port = free_port()
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True,
               **launch_kwargs)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def call_image(client, path, detector="mtcnn", tta=False, method="gradcam", target="predicted class",
               whole=False):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), detector, tta, method, target, whole, api_name="/analyze_image")


def call_video(client, path, fps=2, detector="mtcnn", tta=False):
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)), fps, detector, tta, api_name="/analyze_video")


def _status_kb(pid: str, field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def rss_mb(pid: str = "self") -> float:
    """Resident memory of a process (Linux), in MiB."""
    return _status_kb(pid, "VmRSS") / 1024


class PeakMemory:
    """Peak resident memory of this process inside a ``with`` block, above its resident memory on entry (MiB).

    Linux resets the high-water mark when 5 is written to /proc/self/clear_refs; where that is not allowed,
    ``growth_mb`` is None and callers skip their memory assertion.
    """

    def __init__(self):
        self.growth_mb = None

    def __enter__(self) -> "PeakMemory":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._start = rss_mb()
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is not None:
            self.growth_mb = _status_kb("self", "VmHWM") / 1024 - self._start
