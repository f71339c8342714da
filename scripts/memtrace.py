"""Run ``app.py`` (or any script) with its memory recorded from inside the process: where RSS growth lives.

    python scripts/memtrace.py --out runs/soak/trace [--every 30] [--tracemalloc 8] -- app.py --port 7861 ...

Every ``--every`` seconds one JSON line goes to ``OUT/memory.jsonl``: resident memory, glibc's own accounting
(``mallinfo2``: bytes in use by ``malloc`` in its arenas, bytes free inside them, bytes in ``mmap``-ed blocks),
the number of threads, Python's traced heap (with ``--tracemalloc``), and the counts of the most common Python
object types. That separates the three kinds of growth: Python objects kept alive (the traced heap and object
counts grow), native memory kept alive (malloc's in-use bytes grow, the traced heap does not) and allocator
fragmentation (malloc's *free* bytes grow: memory freed by the program but not returned to the system).

With ``--tracemalloc N`` (N frames per traceback) a snapshot is also written at each ``--snapshot-at`` second
(``OUT/snap_<s>.pickle``); ``--diff A B`` prints where the traced heap grew between two snapshots.
``--arena-max``/``--trim-every`` try allocator settings without touching the program (experiments only; the
app's own setting is in ``app.py``). SIGUSR1 makes the process call ``malloc_trim(0)`` once and log what it freed; SIGUSR2 writes a
tracemalloc snapshot (``OUT/snap_sig<unix time>.pickle``).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import runpy
import signal
import sys
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def rss_mb(pid: int | str = "self") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def malloc_mb() -> dict:
    """glibc's view (MiB): ``in_use`` by the program in the arenas, ``free`` inside them (fragmentation or not yet
    returned), ``mmap`` for large blocks, ``arena`` = in_use + free. Note: mallinfo2 walks every arena (cheap)."""
    if LIBC is None:
        return {}
    m = LIBC.mallinfo2()
    mb = 1 / 2**20
    return {"arena": round(m.arena * mb, 1), "in_use": round(m.uordblks * mb, 1), "free": round(m.fordblks * mb, 1),
            "mmap": round(m.hblkhd * mb, 1), "mmap_blocks": m.hblks}


def trim() -> float:
    """``malloc_trim(0)``; returns MiB of RSS it gave back."""
    before = rss_mb()
    if LIBC is not None:
        LIBC.malloc_trim(0)
    return round(before - rss_mb(), 1)


def sample(t0: float, types: bool) -> dict:
    row = {"t": round(time.time() - t0, 1), "rss": round(rss_mb(), 1), "threads": threading.active_count(),
           "os_threads": len(os.listdir("/proc/self/task")), "malloc": malloc_mb()}
    if tracemalloc.is_tracing():
        cur, peak = tracemalloc.get_traced_memory()
        row["traced"] = round(cur / 2**20, 1)
    if types:
        counts = Counter(type(o).__name__ for o in gc.get_objects())
        row["gc_objects"] = sum(counts.values())
        row["types"] = dict(counts.most_common(25))
    return row


def recorder(out: Path, every: float, snapshot_at: list[float], trim_every: float) -> None:
    t0 = time.time()
    pending = sorted(snapshot_at)
    n = 0
    last_trim = t0
    with open(out / "memory.jsonl", "a") as f:
        while True:
            time.sleep(every)
            row = sample(t0, types=n % 2 == 0)
            if trim_every and time.time() - last_trim >= trim_every:
                row["trimmed_mb"] = trim()
                last_trim = time.time()
            f.write(json.dumps(row) + "\n")
            f.flush()
            n += 1
            while pending and row["t"] >= pending[0] and tracemalloc.is_tracing():
                s = pending.pop(0)
                tracemalloc.take_snapshot().dump(str(out / f"snap_{int(s)}.pickle"))


def diff(a: str, b: str, top: int = 30, key: str = "traceback") -> None:
    sa, sb = tracemalloc.Snapshot.load(a), tracemalloc.Snapshot.load(b)
    total = sum(s.size_diff for s in sb.compare_to(sa, "filename"))
    print(f"traced heap {sum(t.size for t in sa.traces) / 2**20:.1f} -> {sum(t.size for t in sb.traces) / 2**20:.1f} MiB "
          f"({total / 2**20:+.1f})")
    for stat in sb.compare_to(sa, key)[:top]:
        print(f"{stat.size_diff / 2**10:+10.0f} KiB {stat.count_diff:+7d} blocks  (now {stat.size / 2**10:.0f} KiB)")
        for line in stat.traceback.format()[-2 * min(len(stat.traceback), 6):]:
            print("      " + line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for memory.jsonl and snapshots")
    ap.add_argument("--every", type=float, default=30)
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES", help="trace the Python heap (0: off)")
    ap.add_argument("--snapshot-at", type=float, nargs="*", default=[], help="seconds after start")
    ap.add_argument("--arena-max", type=int, default=0, help="mallopt(M_ARENA_MAX) before anything runs")
    ap.add_argument("--mmap-threshold", type=int, default=0, help="mallopt(M_MMAP_THRESHOLD) in bytes (fixed)")
    ap.add_argument("--trim-threshold", type=int, default=0, help="mallopt(M_TRIM_THRESHOLD) in bytes")
    ap.add_argument("--trim-every", type=float, default=0, help="malloc_trim(0) this often (seconds)")
    ap.add_argument("--diff", nargs=2, metavar=("EARLY", "LATE"))
    ap.add_argument("--key", default="traceback", help="--diff grouping: traceback, lineno or filename")
    ap.add_argument("argv", nargs=argparse.REMAINDER, help="-- script.py args...")
    args = ap.parse_args()
    if args.diff:
        diff(*args.diff, key=args.key)
        return
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv or not args.out:
        ap.error("give --out and a script to run after --")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.arena_max and LIBC is not None:
        LIBC.mallopt(M_ARENA_MAX, args.arena_max)
    if args.mmap_threshold and LIBC is not None:
        LIBC.mallopt(M_MMAP_THRESHOLD, args.mmap_threshold)
    if args.trim_threshold and LIBC is not None:
        LIBC.mallopt(M_TRIM_THRESHOLD, args.trim_threshold)
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)

    def on_usr1(*_):
        with open(out / "memory.jsonl", "a") as f:
            f.write(json.dumps({"t_wall": time.time(), "manual_trim_mb": trim(), "rss_after": round(rss_mb(), 1)}) + "\n")

    def on_usr2(*_):
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(str(out / f"snap_sig{int(time.time())}.pickle"))

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    threading.Thread(target=recorder, args=(out, args.every, args.snapshot_at, args.trim_every), daemon=True,
                     name="memtrace").start()
    sys.argv = argv
    sys.path.insert(0, str(Path(argv[0]).resolve().parent))
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
