"""A corpus of nasty input files for the app's decode paths, generated at test time (never stored in the repo).

    python tests/make_corpus.py OUT_DIR      # writes the files and prints one line per case

Every case is small on disk: the 20000 x 20000 and 30000 x 30000 images are header tricks (a few hundred bytes
that declare a huge picture), the two-hour video is a one-second clip whose duration fields are rewritten, the
10,000-frame GIF is written by hand (1 x 1 frames, 12 bytes each). Each :class:`Case` names the decode path it is
for and what a user must see: ``expect`` is a regular expression the error message must match, or ``None`` when
the file may be read (possibly with a note) or refused with any clear message.
"""
from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import av
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from media import astronaut_face, make_video  # noqa: E402

IMAGE_FORMATS = {"jpeg": "jpg", "png": "png", "webp": "webp", "gif": "gif", "tiff": "tif"}
NOT_AN_IMAGE = "not an image|cannot be read|truncated or corrupt|empty"
NOT_A_VIDEO = "not a video|no video stream|still image|empty|corrupt|no decodable"


@dataclass
class Case:
    name: str
    path: str
    kind: str  # "image" or "video": the decode path the file is meant for
    expect: Optional[str] = None  # regex the error must match; None: read it, or refuse it clearly
    note: Optional[str] = None  # regex a note must match when the file is read


def _face_image(size: int = 160) -> Image.Image:
    return Image.fromarray(astronaut_face(size)[:size, :size])


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    im = _face_image()
    im.save(buf, format=fmt.upper(), **({"quality": 90} if fmt in ("jpeg", "webp") else {}))
    return buf.getvalue()


def bit_flipped(data: bytes, n: int, seed: int, skip: int = 16) -> bytes:
    """``data`` with ``n`` random bits flipped after its first ``skip`` bytes (so the format is still sniffed)."""
    rng = np.random.default_rng(seed)
    b = bytearray(data)
    for pos in rng.integers(min(skip, len(b) - 1), len(b), n):
        b[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header(width: int, height: int, color_type: int = 2, rows: int = 0) -> bytes:
    """A PNG that declares ``width`` x ``height`` (8-bit, ``color_type`` 2 = RGB) but holds only ``rows`` rows of
    pixel data: a decompression-bomb or truncation header at the cost of a few bytes."""
    bands = {0: 1, 2: 3, 6: 4}[color_type]
    raw = b"".join(b"\0" + bytes(width * bands) for _ in range(rows))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))


def tiff_header(width: int, height: int) -> bytes:
    """An uncompressed RGB TIFF that declares ``width`` x ``height`` but whose one strip is 16 bytes long."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8 + 2 + 12 * 10 + 4), (277, 3, 1, 3), (278, 4, 1, height),
               (279, 4, 1, min(width * height * 3, 2**32 - 1)),
               (284, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, typ, count) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))
        for tag, typ, count, value in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + bytes(16)


def gif_header(width: int, height: int, frames: int = 1) -> bytes:
    """A GIF with a ``width`` x ``height`` logical screen and ``frames`` 1 x 1 frames (12 bytes each)."""
    out = bytearray(b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes([0, 0, 0, 255, 255, 255]))
    out += b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"  # loop forever
    frame = (b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: 0.1 s
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # a 1 x 1 image at the origin
             + b"\x02\x02\x44\x01\x00")  # LZW, min code size 2: clear, pixel 0, end
    for i in range(frames):
        out += frame if i % 2 == 0 else frame.replace(b"\x02\x02\x44\x01\x00", b"\x02\x02\x4c\x01\x00")  # pixel 1
    return bytes(out + b"\x3b")


def _mp4_boxes(data: bytes, start: int = 0, end: Optional[int] = None):
    """``(offset, size, type)`` of the boxes in ``data[start:end]``, descending into ``moov``."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if size < 8:
            break
        yield i, size, kind
        if kind in (b"moov", b"trak", b"mdia"):
            yield from _mp4_boxes(data, i + 8, i + size)
        i += size


def webm_with_duration(data: bytes, seconds: float) -> bytes:
    """A WebM whose Segment Info ``Duration`` element (EBML id 0x4489, an 8-byte float in timecode-scale units of
    1 ms) says ``seconds``. (FFmpeg derives an MP4's duration from its sample table, not its header fields.)"""
    i = data.find(b"\x44\x89\x88")
    if i < 0:
        raise ValueError("no 8-byte Duration element")
    return data[:i + 3] + struct.pack(">d", seconds * 1000.0) + data[i + 11:]


def mp4_broken_moov(data: bytes) -> bytes:
    """An MP4 whose ``moov`` box (the index of every sample) is overwritten with garbage of the same size."""
    b = bytearray(data)
    for off, size, kind in _mp4_boxes(data):
        if kind == b"moov":
            b[off + 8:off + size] = np.random.default_rng(3).integers(0, 256, size - 8, dtype=np.uint8).tobytes()
            return bytes(b)
    raise ValueError("no moov box")


def audio_only(path: Path, container: str, codec: str) -> str:
    with av.open(str(path), "w", format=container) as c:
        s = c.add_stream(codec, rate=16000)
        s.layout = "mono"
        fmt = s.codec_context.codec.audio_formats[0].name
        t = np.arange(16000) / 16000
        samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples[None].astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        if fmt != "s16":  # e.g. AAC wants float planar
            frame = av.AudioResampler(format=fmt, layout="mono", rate=16000).resample(frame)[0]
        for f in [frame] if not isinstance(frame, list) else frame:
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


# File names a browser or API client might send: traversal-looking, shell-looking, unicode, long, dotted.
PATH_LIKE_NAMES = ["..%2f..%2fetc%2fpasswd.png", "..png", "-rf.png", "name;rm -rf ~.png", "$(reboot).png",
                   "фото лица 😀.png", "CON.png", " leading and trailing .png", "x" * 200 + ".png",
                   "a'b\"c`d.png"]


def make_corpus(out: Path) -> list[Case]:
    """Write every case under ``out`` and return them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def write(name: str, data: bytes, kind: str, expect: Optional[str] = None, note: Optional[str] = None) -> None:
        (out / name).write_bytes(data)
        cases.append(Case(name, str(out / name), kind, expect, note))

    for fmt, ext in IMAGE_FORMATS.items():
        good = _encoded(fmt)
        write(f"ok.{ext}", good, "image")
        write(f"header_only.{ext}", good[:max(24, len(good) // 20)], "image", NOT_AN_IMAGE)
        write(f"truncated_half.{ext}", good[:len(good) // 2], "image")  # JPEG may decode partially
        for seed in range(3):
            write(f"bitflip{seed}.{ext}", bit_flipped(good, 24, seed), "image")
    write("zero_bytes.jpg", b"", "image", "empty")
    write("one_pixel.png", _encoded_image(Image.new("RGB", (1, 1), (200, 100, 50)), "PNG"), "image", None, "too small")
    write("text.jpg", b"hello, I am not an image\n" * 10, "image", NOT_AN_IMAGE)
    write("html.png", b"<!doctype html><script>alert(1)</script>", "image", NOT_AN_IMAGE)
    write("svg.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>', "image", NOT_AN_IMAGE)
    # Decompression bombs: declared sizes far beyond the limit, refused before any pixel is decoded.
    write("bomb_30000x30000.png", png_header(30000, 30000), "image", "too large")
    write("bomb_65535x65535.gif", gif_header(65535, 65535), "image", "too large")
    write("bomb_60000x60000.tif", tiff_header(60000, 60000), "image", "too large")
    # 20000 x 20000 (within the pixel limit) declared by a header whose pixel data is missing.
    write("header_20000x20000.png", png_header(20000, 20000, rows=2), "image", "truncated or corrupt")
    write("header_20000x20000.tif", tiff_header(20000, 20000), "image", "truncated or corrupt")
    write("header_20000x20000.gif", gif_header(20000, 20000), "image", "truncated or corrupt")  # 1 px on a huge screen
    write("real_bomb_16000x16000.png", _flat_png(16000, 16000), "image", None, "downscaled")  # 256 MP of zeros
    write("animated_10000_frames.gif", gif_header(64, 64, frames=10_000), "image", None, "Animated")
    # Wrong extensions and polyglots.
    write("png_named.jpg", _encoded("png"), "image")
    jpeg_zip = _encoded("jpeg") + _zip_bytes()
    write("jpeg_plus_zip.jpg", jpeg_zip, "image")
    write("gif_plus_html.gif", gif_header(16, 16) + b"<script>alert(1)</script>", "image")
    small = _encoded_image(Image.new("RGB", (40, 40), (90, 90, 90)), "PNG")  # the name is the test, not the pixels
    for name in PATH_LIKE_NAMES:
        write(name, small, "image")

    # Videos.
    clip = Path(make_video(out / "ok.mp4", seconds=1.0, fps=10, size=(240, 180)))
    cases.append(Case("ok.mp4", str(clip), "video"))
    data = clip.read_bytes()
    webm = make_video(out / "ok.webm", seconds=1.0, fps=10, size=(240, 180), codec="libvpx", container="webm")
    cases.append(Case("ok.webm", webm, "video"))
    write("two_hours.webm", webm_with_duration(Path(webm).read_bytes(), 7200.0), "video", None, "7200 s long")
    # A codec FFmpeg has no decoder for: the stream exists, its codec context does not (found by the fuzzer).
    write("unknown_codec.webm", Path(webm).read_bytes().replace(b"V_VP8", b"V_ZZZ"), "video", "corrupt")
    write("zero_bytes.mp4", b"", "video", "empty")
    write("broken_moov.mp4", mp4_broken_moov(data), "video", NOT_A_VIDEO)
    write("truncated_half.mp4", data[:len(data) // 2], "video")
    write("header_only.mp4", data[:64], "video", NOT_A_VIDEO)
    for seed in range(3):
        write(f"bitflip{seed}.mp4", bit_flipped(data, 24, seed, skip=64), "video")
    write("random_bytes.mp4", np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "video",
          NOT_A_VIDEO)
    write("png_named.mp4", _encoded("png"), "video", "still image")
    write("gif_named.mp4", gif_header(64, 64, frames=3), "video")  # FFmpeg reads an animated GIF as a clip
    write("text.mp4", b"not a video at all\n" * 20, "video", NOT_A_VIDEO)
    write("mp4_named.jpg", data, "image", NOT_AN_IMAGE)
    cases.append(Case("audio_only.wav", audio_only(out / "audio_only.wav", "wav", "pcm_s16le"), "video",
                      "no video stream"))
    cases.append(Case("audio_only.m4a", audio_only(out / "audio_only.m4a", "mp4", "aac"), "video", "no video stream"))
    cases.append(Case("audio_named.mp4", audio_only(out / "audio_named.mp4", "mp4", "aac"), "video",
                      "no video stream"))
    return cases


def _encoded_image(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _flat_png(width: int, height: int) -> bytes:
    """A real, complete grey PNG of ``width`` x ``height`` compressed row by row (a few hundred KB on disk)."""
    comp = zlib.compressobj(9)
    row = b"\0" + bytes(width)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _zip_bytes() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.sh", "#!/bin/sh\necho pwned\n")
    return buf.getvalue()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.splitlines()[2].strip())
    for c in make_corpus(Path(sys.argv[1])):
        print(f"{c.kind:5s}  {Path(c.path).stat().st_size:>9d} B  {c.name!r}  expect={c.expect or '-'}")
