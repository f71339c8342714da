"""Moved to :mod:`fer_models.models.geometry` (the predictor maps attention with it too); re-exported here."""
from fer_models.models.geometry import IDENTITY, Geometry, probe_geometry, upsample  # noqa: F401

__all__ = ["IDENTITY", "Geometry", "probe_geometry", "upsample"]
