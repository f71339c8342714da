"""Regenerate the app's example inputs from scikit-image's public-domain astronaut photo (no dataset images).

    python examples/make_examples.py
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent


def astronaut_face(size: int) -> np.ndarray:
    return cv2.resize(data.astronaut()[20:260, 120:340], (size, int(size * 240 / 220)), interpolation=cv2.INTER_AREA)


def group_photo() -> np.ndarray:
    """Three copies of the face at different sizes, one tilted and one mirrored, on a plain background."""
    canvas = np.full((360, 640, 3), (70, 90, 110), np.uint8)
    for x, size, angle, flip in ((30, 150, 0, False), (240, 120, 15, False), (430, 170, 0, True)):
        face = astronaut_face(size)
        if flip:
            face = face[:, ::-1]
        if angle:
            m = cv2.getRotationMatrix2D((face.shape[1] / 2, face.shape[0] / 2), angle, 1.0)
            face = cv2.warpAffine(face, m, face.shape[1::-1], borderMode=cv2.BORDER_REPLICATE)
        y = (360 - face.shape[0]) // 2
        canvas[y:y + face.shape[0], x:x + face.shape[1]] = face
    return canvas


def pan_video(path: Path, seconds: float = 4.0, fps: int = 15) -> None:
    """A face sliding across a 480x360 frame, as H.264 MP4."""
    import av

    face = astronaut_face(140)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = 480, 360, "yuv420p"
        s.options = {"crf": "30", "preset": "veryfast"}
        n = int(seconds * fps)
        for i in range(n):
            frame = np.full((360, 480, 3), (60, 80, 100), np.uint8)
            x = int(20 + (480 - 180) * i / max(n - 1, 1))
            frame[100:100 + face.shape[0], x:x + face.shape[1]] = face
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


if __name__ == "__main__":
    Image.fromarray(data.astronaut()).save(HERE / "astronaut.jpg", quality=88)
    Image.fromarray(group_photo()).save(HERE / "three_faces.jpg", quality=88)
    pan_video(HERE / "astronaut_pan.mp4")
    print("written:", *sorted(p.name for p in HERE.iterdir() if p.suffix in (".jpg", ".mp4")))
