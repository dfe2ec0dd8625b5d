"""The JSON manifest of a folder tinytitan writes (quantized artifact, LoRA adapter): read and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_manifest(
    path: Path, name: str, fmt: str, max_version: int, what: str, error: type[Exception]
) -> dict[str, Any]:
    """path/name parsed, with its `format` equal to fmt and `version` at most max_version, else `error`."""
    try:
        manifest = json.loads((path / name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{path / name}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise error(f"{path} is not a tinytitan {what}")
    if int(manifest.get("version", 0)) > max_version:
        raise error(
            f"{path} has {what} version {manifest['version']}; this tinytitan reads up to "
            f"{max_version}: upgrade tinytitan"
        )
    return manifest
