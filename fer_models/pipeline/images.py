"""Reading user images robustly: file, bytes, array or PIL image -> upright RGB uint8, with notes for the user.

Handles EXIF orientation, 16-bit, CMYK, palettes, alpha, the first GIF frame, truncated files and decompression
bombs, and raises :class:`InputError` with a message meant for users.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# Images above this many pixels are refused before decoding (20000 x 20000 still passes). Pillow's own bomb
# check is raised to the same limit, so that this loader, not Pillow's default, decides (and says so clearly).
MAX_IMAGE_PIXELS = 420_000_000
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_IMAGE_PIXELS)
# Deflate never compresses better than 1032:1 and LZW (GIF, TIFF) or RLE (BMP) less well, so at 1 bit per pixel
# no PNG, GIF, TIFF or BMP file holds more than 8 * 1032 pixels per byte. A larger image declared by a smaller
# file is a header trick (truncated, or a bomb): refused before its canvas is allocated.
MAX_PIXELS_PER_BYTE = 8 * 1032
SIZE_CHECKED_FORMATS = ("PNG", "GIF", "TIFF", "BMP")
# Decoded images are downscaled to this longer side at once: crops come from it, detection from a smaller copy.
MAX_WORKING_SIDE = 4096

ImageSource = Union[str, Path, bytes, np.ndarray, Image.Image]


@dataclass
class LoadedImage:
    pixels: np.ndarray  # H x W x 3 uint8 RGB, upright, at most MAX_WORKING_SIDE on its longer side
    original_size: tuple[int, int]  # (width, height) of the file, after EXIF rotation
    format: str = ""
    notes: list[str] = field(default_factory=list)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8, by bit depth for integers and by range for floats."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        hi = int(a.max()) if a.size else 0
        if hi <= 255 and a.min() >= 0:
            return a.astype(np.uint8)
        # 16-bit images use the full 0..65535 range; wider integers are scaled by their own maximum.
        div = 257.0 if hi <= 65535 else hi / 255.0
        return np.clip(a / div, 0, 255).astype(np.uint8)
    # NaN and infinities become finite, bounded to float32's range, so the span taken below in float64 cannot
    # overflow (the fuzzer's extreme float arrays did, giving NaN pixels).
    big = float(np.finfo(np.float32).max)
    a = np.clip(np.nan_to_num(a.astype(np.float64), posinf=big, neginf=-big), -big, big)
    if a.size and (a.min() < 0 or a.max() > 1):
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.clip(a * 255 + 0.5, 0, 255).astype(np.uint8)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or min(a.shape[:2]) < 1:
        raise InputError(f"Expected an image array (H x W, H x W x 3 or H x W x 4), got shape {a.shape}.")
    a = _to_uint8(a)
    if a.ndim == 2:
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if a.shape[2] == 4:  # composite over white, so transparent areas do not turn black
        alpha = a[..., 3:4].astype(np.float32) / 255.0
        a = (a[..., :3] * alpha + 255.0 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "L"):
        return _array_to_rgb(np.asarray(im))
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _array_to_rgb(np.asarray(im))
    if mode in ("RGBA", "LA", "P", "PA", "RGBa", "La") or "transparency" in im.info:
        return _array_to_rgb(np.asarray(im.convert("RGBA")))
    return _array_to_rgb(np.asarray(im.convert("RGB")))  # CMYK, YCbCr, LAB, HSV, 1


def _open_pil(source: Union[str, Path, bytes]) -> tuple[Image.Image, int]:
    """``(lazily opened image, file size in bytes)``; nothing is decoded yet."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"File not found: {path.name}")
        nbytes = path.stat().st_size
        fp: Any = path
    else:
        nbytes = len(source)
        fp = io.BytesIO(source)
    if nbytes == 0:
        raise InputError("The file is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp), nbytes
    except Image.DecompressionBombError as e:
        raise InputError(
            f"The image is too large to process: the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP ({e})."
        ) from e
    except UnidentifiedImageError as e:
        raise InputError(
            "This file is not an image that can be read (supported: JPEG, PNG, WebP, BMP, GIF, TIFF)."
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow's format plugins raise OSError, ValueError, KeyError, struct.error
        raise InputError(f"The image file cannot be read (it is probably truncated or corrupt): {e}") from e


def _check_declared_size(im: Image.Image, nbytes: int) -> None:
    """Refuse an image whose declared size its file cannot hold (a header trick), before anything is allocated."""
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(
            f"The image is {w} x {h} pixels ({w * h / 1e6:.0f} MP); the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} MP."
        )
    if im.format in SIZE_CHECKED_FORMATS and nbytes and w * h > nbytes * MAX_PIXELS_PER_BYTE:
        raise InputError(
            f"The image file is truncated or corrupt: {nbytes} bytes cannot hold the {w} x {h} pixels it declares."
        )


def load_image(source: ImageSource, *, max_side: int = MAX_WORKING_SIDE) -> LoadedImage:
    """Read an image file, bytes, array or PIL image as upright RGB uint8, downscaled to ``max_side``."""
    notes: list[str] = []
    if isinstance(source, np.ndarray):
        rgb = _array_to_rgb(source)
        size, fmt = (rgb.shape[1], rgb.shape[0]), "array"
    else:
        im, nbytes = (source, 0) if isinstance(source, Image.Image) else _open_pil(source)
        fmt = im.format or ""
        w, h = im.size
        try:
            rotated = im.getexif().get(274, 1) in (5, 6, 7, 8)  # EXIF orientations that swap width and height
        except Exception:
            rotated = False
        _check_declared_size(im, nbytes)
        try:
            # is_animated only looks for a second frame; n_frames would walk all of them (a 10,000-frame GIF).
            if getattr(im, "is_animated", False):
                im.seek(0)
                notes.append("Animated image: the first frame was analysed.")
            if fmt == "JPEG" and max(w, h) > max_side:
                im.draft("RGB", (max_side, max_side))  # decode at 1/2, 1/4 or 1/8 scale: cheap for huge JPEGs
            im.load()
            if max(im.size) > 2 * max_side:
                # Shrink by an integer factor before any mode conversion: a 20000 x 20000 image is never copied
                # at full size. reduce() (a box filter) needs 8-bit bands; palette and 1-bit images are sampled
                # (resize() is nearest-neighbour for them), which keeps their palette and transparency.
                f = max(1, max(im.size) // max_side)
                if im.mode in ("1", "P", "PA"):
                    im = im.resize((max(1, im.width // f), max(1, im.height // f)))
                else:
                    if im.mode not in ("L", "RGB", "RGBA", "LA", "I", "F", "I;16", "CMYK", "YCbCr"):
                        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                    im = im.reduce(f)
            im = ImageOps.exif_transpose(im) or im
            rgb = _pil_to_rgb(im)
        except (InputError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - as in _open_pil: any decoder error on a malformed file
            raise InputError(f"The image file is truncated or corrupt ({e}).") from e
        size = (h, w) if rotated else (w, h)
    h, w = rgb.shape[:2]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        rgb = cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    if max(rgb.shape[:2]) < max(size):
        notes.append(f"Large image ({size[0]} x {size[1]}) downscaled to {rgb.shape[1]} x {rgb.shape[0]}.")
    if min(rgb.shape[:2]) < 32:
        notes.append(f"The image is only {rgb.shape[1]} x {rgb.shape[0]} pixels: too small to find a face in.")
    return LoadedImage(rgb, (int(size[0]), int(size[1])), fmt, notes)
