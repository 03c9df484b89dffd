"""Where quant-tutor keeps things: progress data and caches.

``QUANT_TUTOR_HOME`` moves everything under one folder (tests, portable installs);
otherwise the platform's user data and cache dirs are used.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "quant-tutor"
HOME_ENV = "QUANT_TUTOR_HOME"


def _app_dir(kind: str) -> Path:
    home = os.environ.get(HOME_ENV)
    if home:
        path = Path(home).expanduser() / kind
    else:
        import platformdirs  # only here: the plain commands and tests under QUANT_TUTOR_HOME skip it

        path = Path(getattr(platformdirs, f"user_{kind}_dir")(APP_NAME, appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    """Progress and notes: ``$QUANT_TUTOR_HOME/data`` or the platform's user data dir."""
    return _app_dir("data")


def cache_dir() -> Path:
    """Converted checkpoints and indexes: ``$QUANT_TUTOR_HOME/cache`` or the user cache dir."""
    return _app_dir("cache")


def config_dir() -> Path:
    """Settings (``config.toml``): ``$QUANT_TUTOR_HOME/config`` or the platform's user config dir."""
    return _app_dir("config")
