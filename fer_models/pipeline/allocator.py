"""Keep a long-running server's memory flat: glibc ``malloc`` settings for a multi-threaded process whose requests
allocate and free many large buffers (decoded images, tensors, video frames).

What the soak measured (docs/reliability.md): with glibc's defaults RSS kept rising under load although the bytes
the program had in use did not. glibc's own accounting (``mallinfo2``) showed the growth was memory *freed* by the
program but kept inside malloc's arenas (38 -> 255 MiB free in the arenas in 4 minutes, in-use flat near 430 MiB),
and no block over 128 KiB was being ``mmap``-ed any more: glibc raises its mmap threshold each time a large
``mmap``-ed block is freed (up to 32 MiB), after which every decoded photo, frame and tensor comes from the arenas,
where a freed block can only be reused, not returned, and each worker thread fragments its own arena.

:func:`tune` fixes the threshold (large blocks are ``mmap``-ed and go back to the system when freed), caps the
number of arenas at two, and :func:`start_trimmer` returns free arena pages every minute (``malloc_trim``).
A setting already given in the environment (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``) wins. Elsewhere than
glibc (macOS, musl) these are no-ops.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from typing import Optional

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, fixed: blocks this large and larger are mmap-ed, always
TRIM_THRESHOLD = 4 * 1024 * 1024  # free memory at the top of the main heap above this goes back at once
ARENA_MAX = 2  # one per core on the 2-core machines this runs on (glibc's default allows 8 per core)
TRIM_EVERY_S = 60.0

_state: dict = {}


def _libc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


def tune() -> dict:
    """Apply the settings once per process (call it before worker threads start); returns what was set."""
    if "settings" in _state:
        return _state["settings"]
    libc, settings = _libc(), {}
    if libc is not None:
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
                settings.update(mmap_threshold=MMAP_THRESHOLD, trim_threshold=TRIM_THRESHOLD)
        if "MALLOC_ARENA_MAX" not in os.environ and libc.mallopt(M_ARENA_MAX, ARENA_MAX):
            settings["arena_max"] = ARENA_MAX
    _state["settings"] = settings
    log.info("malloc settings: %s", settings or "unchanged (not glibc, or set in the environment)")
    return settings


def trim() -> bool:
    """Give free arena memory back to the system now (``malloc_trim(0)``); False where there is no glibc."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0) is not None)


def start_trimmer(every_s: float = TRIM_EVERY_S) -> Optional[threading.Thread]:
    """A daemon thread calling :func:`trim` every ``every_s`` seconds (once per process)."""
    if _libc() is None or every_s <= 0:
        return None
    if _state.get("trimmer") is None:
        def run() -> None:
            while not stop.wait(every_s):
                trim()

        stop = threading.Event()
        t = threading.Thread(target=run, name="malloc-trim", daemon=True)
        t.start()
        _state["trimmer"], _state["stop"] = t, stop
    return _state["trimmer"]
