"""Test set-up: offline Hub, no analytics, deterministic seeds; set before anything imports huggingface_hub.

Shared helpers, each defined once: the ``fusion_tiny`` fixture (one tiny untrained fusion for the session) and
:func:`free_port` (``from conftest import free_port``; ``served.serve`` uses it).
"""
import os
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """``$FER_DATA_DIR`` (the shared data folder); tests needing real data skip without it."""
    d = os.environ.get("FER_DATA_DIR")
    if not d or not Path(d).is_dir():
        pytest.skip("real data not available: set FER_DATA_DIR to the shared data folder (e.g. ../shared/data)")
    return Path(d)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers launched by tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fusion_tiny():
    """``fusion_tiny`` (vgg_tiny + resnet_tiny + resnet_cbam_tiny, untrained, eval mode), built once per session
    from seed 0. Shared: tests must not train it or change its weights or config (copy it for that)."""
    import fer_models as fm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return fm.create_model("fusion_tiny").eval()
