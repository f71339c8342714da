"""What every command-line entry point here shares."""
from __future__ import annotations

import logging
import sys


def setup_logging(timestamps: bool = False) -> None:
    """INFO messages to stdout, unless logging is already set up (by a test, the app, or a calling script)."""
    if not logging.getLogger().handlers:
        fmt = "%(asctime)s %(levelname)s %(message)s" if timestamps else "%(message)s"
        logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stdout)
