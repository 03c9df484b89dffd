"""Which engine the tutor generates with: the command line, else the user's config file.

The config file is ``config.toml`` in ``$QUANT_TUTOR_HOME/config`` or the platform's user
config folder::

    [engine]
    url = "http://gpu-box:8000/v1"   # an OpenAI-compatible server; "local": the embedded model
    timeout_s = 120                  # how long a reply may go silent before it counts as cut

    [engine.variants]                # precision = "served model id" (default: the ids listed)
    bf16 = "qwen2.5-7b-instruct"
    nf4 = { model = "qwen2.5-7b-instruct-bnb-4bit", url = "http://gpu-box:8001/v1" }  # its own server

The server's API key is never read from the file (it would sit there in plain text): it comes
from ``QUANT_TUTOR_REMOTE_KEY``. ``--engine URL`` (or ``--engine local``) and ``--variants FILE``
override the file.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutor.engine.remote import (
    KEY_ENV,
    READ_TIMEOUT_S,
    RemoteEngine,
    RemoteError,
    Variants,
    check_variants,
    client,
    read_variants,
)
from tutor.paths import config_dir

LOCAL = "local"
KEY_NAMES = ("key", "api_key", "token")


@dataclass(frozen=True)
class EngineSettings:
    url: str | None = None  # None: the embedded model, in this machine's engine process
    variants: Variants | None = None  # None: the ids the server lists
    timeout_s: float = READ_TIMEOUT_S

    @property
    def api_key(self) -> str | None:
        return os.environ.get(KEY_ENV) if self.url else None

    def connect(self, precision: str | None = None) -> RemoteEngine:
        """The server ``url`` names, its variants these or the ones it lists (RemoteError if not)."""
        assert self.url is not None, "a local engine has no server to connect to"
        return RemoteEngine.connect(
            self.url,
            api_key=self.api_key,
            variants=self.variants,
            precision=precision,
            http=client(self.timeout_s),
        )

    def flags(self) -> list[str]:
        """These settings as ``quant-tutor serve`` flags (none for the local model), which
        ``from_flags`` reads back in the engine process."""
        if self.url is None:
            return []
        flags = ["--generate-with", self.url, "--timeout", str(self.timeout_s)]
        if self.variants:
            flags += ["--variants-json", json.dumps({p: v.as_dict() for p, v in self.variants.items()})]
        return flags

    @classmethod
    def from_flags(cls, url: str | None, variants_json: str | None, timeout_s: float) -> EngineSettings:
        variants = check_variants(json.loads(variants_json), "--variants-json") if variants_json else None
        return cls(url, variants, timeout_s)


def config_file() -> Path:
    return config_dir() / "config.toml"


def engine_settings(
    url: str | None = None, variants: Path | None = None, path: Path | None = None
) -> EngineSettings:
    """The engine the command line names, else the config file's; raises RemoteError naming the
    file and what is wrong in it."""
    path = path or config_file()
    found = _file_settings(path) if path.exists() else EngineSettings()
    if url is not None:
        found = EngineSettings(None if url == LOCAL else url.rstrip("/"), None, found.timeout_s)
    if variants is not None:
        if found.url is None:
            raise RemoteError("--variants names the variants of an --engine URL; give both")
        found = EngineSettings(found.url, read_variants(variants), found.timeout_s)
    return found


def _file_settings(path: Path) -> EngineSettings:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RemoteError(f"cannot read the config file {path}: {exc}") from None
    engine = data.get("engine", {})
    if not isinstance(engine, Mapping):
        raise RemoteError(f"{path}: [engine] must be a table")
    leaked = [name for name in KEY_NAMES if name in engine]
    if leaked:
        raise RemoteError(
            f"{path}: remove {leaked[0]!r} from [engine]: an API key does not belong in a file in plain "
            f"text; set {KEY_ENV} instead"
        )
    unknown = sorted(set(engine) - {"url", "variants", "timeout_s"})
    if unknown:
        raise RemoteError(f"{path}: [engine] has no setting {unknown[0]!r} (known: url, variants, timeout_s)")
    url = _text(engine.get("url"), "url", path)
    timeout = engine.get("timeout_s", READ_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise RemoteError(f"{path}: [engine] timeout_s must be a number of seconds above 0, not {timeout!r}")
    variants = engine.get("variants")
    if variants is not None:
        if url in (None, LOCAL):
            raise RemoteError(f"{path}: [engine.variants] names the variants of a url; set url too")
        variants = check_variants(variants, f"{path} [engine.variants]")
    return EngineSettings(None if url in (None, LOCAL) else url.rstrip("/"), variants, float(timeout))


def _text(value: Any, name: str, path: Path) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise RemoteError(f"{path}: [engine] {name} must be a non-empty string, not {value!r}")
