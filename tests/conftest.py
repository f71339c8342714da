"""Test set-up: offline Hub, no analytics, deterministic seeds; set before anything imports huggingface_hub."""
import os

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
