"""Temporal smoothing of each tracked face's class probabilities, for live streams and videos.

An exponential moving average in continuous time (irregular sampling allowed: live frames arrive when the server
is free, video frames at the sampled rate): for a face seen at times t_1, t_2, ... with fused probabilities p_k,

    s_1 = p_1,    s_k = s_{k-1} + a_k (p_k - s_{k-1}),    a_k = 1 - exp(-(t_k - t_{k-1}) / tau)

so a step change in the expression reaches 63% of its size after ``tau`` seconds and 95% after ``3 tau``,
whatever the frame rate, and each ``s_k`` is still a probability vector. A face unseen for several ``tau`` starts
over (``a`` tends to 1). ``tau = 0`` turns smoothing off.

Why ``tau = 0.5 s`` by default: posed and spontaneous macro-expressions last about 0.5 to 4 s (Ekman; Yan et al.,
"How fast are the leaked facial expressions", J. Nonverbal Behav. 2013), so a 0.5 s time constant follows a new
expression within about a second and a half while averaging the frame-to-frame jitter of a per-frame classifier
over about 10 frames at 10 frames/s (an EMA with weight ``a`` has the variance of a mean of ``(2 - a) / a``
samples). Sub-0.5 s micro-expressions are damped: they are not what a FER2013 model recognises anyway.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import InputError

DEFAULT_TIME_CONSTANT_S = 0.5
MAX_TIME_CONSTANT_S = 60.0
SMOOTH_PREFIX = "smooth_"


def check_time_constant(time_constant_s: Optional[float]) -> float:
    """``None`` -> 0 (off); a number of seconds in [0, MAX_TIME_CONSTANT_S], else :class:`InputError`."""
    if time_constant_s is None:
        return 0.0
    try:
        tau = float(time_constant_s)
    except (TypeError, ValueError):
        raise InputError(f"The smoothing time constant must be a number of seconds, got {time_constant_s!r}.") \
            from None
    if not 0.0 <= tau <= MAX_TIME_CONSTANT_S:  # NaN fails too
        raise InputError(f"The smoothing time constant must be between 0 and {MAX_TIME_CONSTANT_S:g} seconds, "
                         f"got {time_constant_s!r}.")
    return tau


def ema_weight(dt: float, time_constant_s: float) -> float:
    """Weight of a new sample ``dt`` seconds after the previous one (1 = replace; 0 = keep the old value)."""
    if time_constant_s <= 0:
        return 1.0
    if not dt > 0:  # the same instant, or a clock that went back: keep the average
        return 0.0
    return 1.0 - math.exp(-dt / time_constant_s)


class TrackSmoother:
    """Per-track exponential moving average of probability vectors (the module doc gives the formula).

    ``update(track_id, t, probs)`` returns the track's smoothed vector at time ``t`` (seconds, any origin,
    non-decreasing per track). Tracks not updated for ``forget_after_s`` are dropped by :meth:`prune`, so memory
    stays bounded over a long stream."""

    def __init__(self, time_constant_s: float = DEFAULT_TIME_CONSTANT_S, forget_after_s: Optional[float] = None):
        self.time_constant_s = check_time_constant(time_constant_s)
        self.forget_after_s = forget_after_s
        self._state: dict[int, tuple[float, np.ndarray]] = {}  # track id -> (time of last update, smoothed)

    def __len__(self) -> int:
        return len(self._state)

    def reset(self) -> None:
        self._state.clear()

    def update(self, track_id: int, t: float, probs: Sequence[float]) -> np.ndarray:
        p = np.asarray(probs, dtype=np.float64)
        prev = self._state.get(track_id)
        if prev is None or prev[1].shape != p.shape:
            s = p.copy()
        else:
            s = prev[1] + ema_weight(t - prev[0], self.time_constant_s) * (p - prev[1])
        self._state[track_id] = (float(t), s)
        return s.copy()

    def update_frame(self, track_ids: Sequence[int], t: float, probs: np.ndarray) -> np.ndarray:
        """All faces of one frame: ``probs`` N x C in the order of ``track_ids``; returns N x C."""
        out = [self.update(int(tid), t, p) for tid, p in zip(track_ids, np.asarray(probs))]
        return np.array(out).reshape(len(out), *np.shape(probs)[1:])

    def seed(self, track_id: int, t: float, smoothed: Sequence[float]) -> None:
        """Continue from a known smoothed value (a resumed run)."""
        self._state[int(track_id)] = (float(t), np.asarray(smoothed, dtype=np.float64))

    def prune(self, now: float, keep: Iterable[int] = ()) -> None:
        """Drop the tracks last updated more than ``forget_after_s`` before ``now`` (all but ``keep``)."""
        if self.forget_after_s is None:
            return
        keep = set(keep)
        for tid in [k for k, (t, _) in self._state.items() if k not in keep and now - t > self.forget_after_s]:
            del self._state[tid]


def smooth_series(times: Sequence[float], probs: np.ndarray, time_constant_s: float = DEFAULT_TIME_CONSTANT_S
                  ) -> np.ndarray:
    """One track's T x C probabilities smoothed over its T times (what :class:`TrackSmoother` gives online)."""
    sm = TrackSmoother(time_constant_s)
    p = np.asarray(probs, dtype=np.float64)
    return np.array([sm.update(0, t, row) for t, row in zip(times, p)]).reshape(p.shape)


def smoothed_columns(class_names: Sequence[str]) -> list[str]:
    """Columns added to the batch analysis rows when smoothing is on: ``smooth_label``, ``smooth_confidence``,
    ``smooth_p_<class>`` (docs/analyze.md)."""
    return [f"{SMOOTH_PREFIX}label", f"{SMOOTH_PREFIX}confidence"] + [f"{SMOOTH_PREFIX}p_{c}" for c in class_names]


def smoothed_fields(class_names: Sequence[str], smoothed: Optional[Sequence[float]]) -> dict:
    """The :func:`smoothed_columns` values of one face (empty for a row without a face)."""
    if smoothed is None:
        return {}
    s = np.asarray(smoothed, dtype=np.float64)
    i = int(s.argmax())
    return {f"{SMOOTH_PREFIX}label": class_names[i], f"{SMOOTH_PREFIX}confidence": round(float(s[i]), 6),
            **{f"{SMOOTH_PREFIX}p_{c}": round(float(v), 6) for c, v in zip(class_names, s)}}
