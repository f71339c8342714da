"""Generated test media shared by the pipeline and app tests: scikit-image's public-domain astronaut, no datasets."""
from __future__ import annotations

import av
import cv2
import numpy as np
from skimage import data


def astronaut_face(size: int) -> np.ndarray:
    return cv2.resize(data.astronaut()[20:260, 120:340], (size, int(size * 240 / 220)), interpolation=cv2.INTER_AREA)


def faces_image(n: int, face: int = 90, cols: int = 6) -> np.ndarray:
    """``n`` copies of the astronaut's face on a grid."""
    rows = (n + cols - 1) // cols
    fh = astronaut_face(face).shape[0]
    canvas = np.full((rows * (fh + 20) + 20, cols * (face + 20) + 20, 3), 100, np.uint8)
    f = astronaut_face(face)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = 20 + r * (fh + 20), 20 + c * (face + 20)
        canvas[y:y + fh, x:x + face] = f
    return canvas


def write_video(path, frames, fps: int = 10, codec: str = "libx264", container: str = None) -> str:
    """Encode RGB uint8 ``frames`` (all the same even size) with PyAV."""
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), "w", format=container) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = first.shape[1], first.shape[0], "yuv420p"
        for frame in (first, *frames):
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


def make_video(path, seconds: float = 2.0, fps: int = 10, size=(320, 240), face: bool = True,
               codec: str = "libx264", container: str = None) -> str:
    """A face sliding across a grey frame."""
    f = astronaut_face(100)
    n = int(seconds * fps)

    def frame(i: int) -> np.ndarray:
        out = np.full((size[1], size[0], 3), 90, np.uint8)
        if face:
            x = 10 + int((size[0] - 120) * i / max(n - 1, 1))
            out[60:60 + f.shape[0], x:x + f.shape[1]] = f
        return out

    return write_video(path, (frame(i) for i in range(n)), fps, codec, container)
