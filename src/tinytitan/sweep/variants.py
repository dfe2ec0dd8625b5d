"""Build a sweep's variants once: each is saved as an artifact beside the results store and reloaded later.

A rerun (or a Ray worker, or the fresh process that measures speed) loads the saved artifact instead of
quantizing again. A KV-cache variant of weights that are already saved ("w4g32-imatrix-kv8" beside
"w4g32-imatrix") copies that artifact and changes only its KV-cache setting.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from tinytitan.io.folders import carry_over, recover_folder, staged_folder
from tinytitan.quant.artifact import MANIFEST, load_artifact, save_artifact
from tinytitan.quant.schemes import QuantConfig, parse_variant
from tinytitan.sweep.plan import VariantSpec

KV_PARTS = ("kv16", "kv8", "kv4", "kv8c", "kv4c")


def variants_folder(store_folder: Path, model_name: str, model_sha256: str) -> Path:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model_name).name)
    return store_folder / "variants" / f"{stem}-{model_sha256[:12]}"


def artifact_path(folder: Path, spec: VariantSpec) -> Path:
    return folder / spec.slug


def is_built(path: Path) -> bool:
    recover_folder(path)  # a save interrupted between the renames of the fallback replace
    return (path / MANIFEST).exists()


def weights_name(name: str) -> str:
    return "-".join(p for p in name.split("-") if p not in KV_PARTS)


def _copy_with_kv(src: Path, dst: Path, config: QuantConfig) -> None:
    """dst = src with the KV-cache part of its quantization config replaced (written atomically)."""
    with staged_folder(dst) as tmp:
        carry_over(src, tmp, skip=(MANIFEST,))  # same weights: hard links cost no space
        manifest = json.loads((src / MANIFEST).read_text())
        qc = QuantConfig.from_dict(manifest["quant_config"])
        qc = replace(qc, name=config.name, kv_cache=config.kv_cache, kv_axis=config.kv_axis)
        manifest["quant_config"] = qc.to_dict()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))


def materialize(
    spec: VariantSpec,
    folder: Path,
    base: Callable[[], object],
    calib_text: str | None = None,
    note: Callable[[str], None] = lambda _m: None,
    stats_cache: dict | None = None,
):
    """The variant as a loaded Model: the base itself, a saved artifact, or built now and saved.

    base: returns the loaded base model (called only when something has to be built).
    stats_cache: calibration statistics shared by the variants of one sweep (collected once per kind).
    """
    if spec.kind == "base":
        return base()
    path = artifact_path(folder, spec)
    if is_built(path):
        return load_artifact(path)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.kind == "scheme":
        config = parse_variant(spec.name)
        weights = VariantSpec(weights_name(spec.name), "scheme")
        wpath = artifact_path(folder, weights)
        if config.kv_cache and weights.name != spec.name and is_built(wpath):
            note(f"{spec.name}: weights of {weights.name} with a {config.kv_cache} KV cache")
            _copy_with_kv(wpath, path, config)
            return load_artifact(path)
        from tinytitan.quant.api import gather_stats, quantize

        note(f"{spec.name}: quantizing")
        stats = None
        if config.calibrated and stats_cache is not None:
            # the held base model (alive for the whole sweep), the text, and whether Hessians are needed
            key = (
                id(base()),
                hash(calib_text),
                config.method == "gptq",
                config.calib_tokens,
                config.row_tiered,
            )
            if key not in stats_cache:
                stats_cache[key] = gather_stats(base(), config, calib_text)
            stats = stats_cache[key]
        q = quantize(base(), config, calib_text=calib_text, stats=stats, progress=_recovery_notes(spec, note))
    else:
        from tinytitan.quant.mixed import plan_to_budget

        note(f"{spec.name}: planning mixed precision")
        q = plan_to_budget(
            base(),
            budget_bytes=spec.target_bytes,
            target_bpw=spec.target_bpw,
            calib_text=calib_text,
            recover_steps=spec.recover_steps,
            progress=_recovery_notes(spec, note),
        )
        q.quant.config = replace(q.quant.config, name=spec.name)
    save_artifact(q, path, force=True)
    return load_artifact(path)  # exactly what a rerun or a worker will load


def _recovery_notes(spec: VariantSpec, note: Callable[[str], None]) -> Callable[[str, int, int], None]:
    """Progress of a recovery (tens of minutes) as a line every 10%, with its loss and held-out KL."""

    def report(msg: str, i: int, n: int) -> None:
        if msg.startswith("recovery") and n and (i * 10 // n > (i - 1) * 10 // n or i == n):
            note(f"{spec.name}: {msg} (step {i}/{n})")

    return report
