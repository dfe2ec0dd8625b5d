"""Adapters on disk: a folder with adapter.json (config, base model, training provenance) and
adapter.safetensors (the LoRA matrices). Never pickle. Both are written to a temporary folder that takes
the adapter folder's place in one atomic publish (tinytitan.io.folders), so a crash leaves the old adapter
or the new one, never the weights of one with the manifest of the other."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tinytitan.finetune.lora import (
    ADAPTER_FORMAT,
    ADAPTER_VERSION,
    AdapterError,
    LoraConfig,
    adapter_state,
    attach,
    load_adapter_state,
)
from tinytitan.io.folders import carry_over, recover_folder, save_tensors, staged_folder
from tinytitan.io.manifest import read_manifest
from tinytitan.version import __version__

MANIFEST = "adapter.json"
WEIGHTS = "adapter.safetensors"


def base_info(model) -> dict[str, Any]:
    """What an adapter records about the model it was trained on."""
    quant = model.quant
    return {
        "name": model.source.name,
        "sha256": model.source.sha256,
        "arch": model.config.arch,
        "dim": model.config.dim,
        "n_layers": model.config.n_layers,
        "variant": quant.config.name if quant is not None else None,
    }


def write_folder(out: Path, files: dict[str, Any], keep_others: bool = False) -> Path:
    """Atomically (re)place folder `out` with `files`: {name: dict (JSON) | {str: Tensor} (safetensors)};
    with `keep_others`, `out`'s other files stay (hard links in the new folder)."""
    with staged_folder(out) as tmp:
        if keep_others and out.is_dir():
            carry_over(out, tmp, skip=files)
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_tensors({k: v.contiguous() for k, v in content.items()}, tmp / name)
            else:
                (tmp / name).write_text(json.dumps(content, indent=1, ensure_ascii=False))
    return out


def save_adapter(
    model, config: LoraConfig, out: str | os.PathLike[str], training: dict[str, Any] | None = None
) -> Path:
    """Save the adapter carried by `model.module` to folder `out` (its other files are kept: the new folder
    holds hard links to them, and replaces `out` whole)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterError(f"{out} exists and is not a folder")
    manifest = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "lora": config.to_dict(),
        "base": base_info(model),
        "training": training or {},
    }
    return write_folder(out, {WEIGHTS: adapter_state(model.module), MANIFEST: manifest}, keep_others=True)


def read_adapter(path: str | os.PathLike[str]) -> tuple[LoraConfig, dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    recover_folder(path)  # a save interrupted between the renames of the fallback replace
    if not (path / MANIFEST).is_file():
        raise AdapterError(f"{path} is not an adapter folder (no {MANIFEST}; made by `tinytitan finetune`)")
    manifest = read_manifest(path, MANIFEST, ADAPTER_FORMAT, ADAPTER_VERSION, "LoRA adapter", AdapterError)
    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{path / WEIGHTS} is unreadable: {e}") from None
    return LoraConfig.from_dict(manifest["lora"]), state, manifest


def apply_adapter(model, path: str | os.PathLike[str]):
    """Attach the adapter at `path` to `model` (in place) and return the model, ready for inference.

    The model's source identity becomes base + adapter, so results stored for it never mix with the base's.
    """
    config, state, manifest = read_adapter(path)
    base = manifest.get("base", {})
    c = model.config
    if base.get("arch") not in (None, c.arch) or base.get("dim") not in (None, c.dim):
        raise AdapterError(
            f"{path} was trained on a {base.get('arch')} model of width {base.get('dim')} "
            f"({base.get('name')}); this model is {c.arch} of width {c.dim}"
        )
    attach(model.module, config)
    load_adapter_state(model.module, state, str(path))
    model.module.eval()
    model.adapter = manifest
    digest = _digest(Path(path) / WEIGHTS)
    model.source = _adapted_source(model.source, f"{model.source.name}+{path}", f"lora:{digest}")
    return model.module_changed()


def _digest(path: Path) -> str:
    from tinytitan.zoo import sha256_file

    return sha256_file(path)[:16]


def _adapted_source(source, name: str, suffix: str):
    from dataclasses import replace

    return replace(source, name=name, _sha256=f"{source.sha256}+{suffix}")
