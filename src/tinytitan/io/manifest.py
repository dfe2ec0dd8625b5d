"""The JSON manifest of a folder tinytitan writes (quantized artifact, LoRA adapter): read and checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tinytitan.checks import of_type


def read_manifest(
    path: Path, name: str, fmt: str, max_version: int, what: str, error: type[Exception]
) -> dict[str, Any]:
    """path/name parsed, with its `format` equal to fmt and `version` at most max_version, else `error`."""
    try:
        manifest = json.loads((path / name).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path / name}: not valid UTF-8 (byte {e.start})") from None
    except RecursionError:
        raise error(f"{path / name}: JSON nested too deeply") from None
    except (OSError, ValueError) as e:  # ValueError: malformed JSON
        raise error(f"{path / name}: unreadable ({' '.join(str(e).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise error(f"{path} is not a tinytitan {what}")
    version = manifest.get("version", 0)
    if not of_type(version, int):
        raise error(f"{path / name}: version is {version!r}, not an integer")
    if version > max_version:
        raise error(
            f"{path} has {what} version {manifest['version']}; this tinytitan reads up to "
            f"{max_version}: upgrade tinytitan"
        )
    return manifest
