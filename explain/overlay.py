"""Moved to :mod:`fer_models.pipeline.overlay` (batch analysis draws the same overlays); re-exported here."""
from fer_models.pipeline.overlay import (  # noqa: F401
    TICKS, colorbar, colorize, colormap_lut, overlay_on_face, paste_on_image,
)

__all__ = ["TICKS", "colorbar", "colorize", "colormap_lut", "overlay_on_face", "paste_on_image"]
