"""Quantized artifacts: a folder with tinytitan.json (configs, provenance), model.safetensors (codes
bit-packed at their width, f16 scales/zeros, raw GGML blocks, float norms) and the tokenizer.

Written to a temporary folder beside the target and renamed into place, so a crash never leaves a
half-written artifact; an existing target is refused unless force=True.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from tinytitan.checks import of_type
from tinytitan.config import ModelConfig
from tinytitan.errors import ModelLoadError, TinyTitanError
from tinytitan.io.folders import recover_folder, save_tensors, staged_folder
from tinytitan.quant.int_quant import IntWeight
from tinytitan.quant.modules import QuantEmbedding, QuantLinear, fuse_projections
from tinytitan.quant.schemes import FORMAT_VERSION, QuantConfig, QuantConfigError, TensorScheme
from tinytitan.quant.stored import QuantInfo, StoredTensor, runtime_matrix
from tinytitan.version import __version__

MANIFEST = "tinytitan.json"
ARTIFACT_FORMAT = "tinytitan-quantized"


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2^bits -> a little-endian bit stream (exactly bits per code, padded to a byte)."""
    c = codes.reshape(-1).numpy().astype(np.uint8)
    if bits == 8:
        return torch.from_numpy(c.copy())
    if bits == 4:
        c = np.concatenate([c, np.zeros(len(c) % 2, np.uint8)])
        return torch.from_numpy(c[0::2] | (c[1::2] << 4))
    planes = ((c[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if bits == 8:
        return packed[:count]  # a view: the caller converts it (the int8 kernel's signed codes) anyway
    if bits == 4:  # in torch: one pass, no numpy strided writes (0.5 s -> 0.1 s for Gemma's codes)
        return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)[:count]
    # 2/3-bit: in slices of codes (a multiple of 8 codes is a whole number of bytes), uint8 throughout;
    # one pass over all 168M codes at once would need 8 bytes per bit (4 GB for Gemma's embedding at 3 bits)
    out = torch.empty(count, dtype=torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8)
    step = 1 << 23
    for c0 in range(0, count, step):
        n = min(step, count - c0)
        chunk = packed[c0 * bits // 8 : (c0 * bits + n * bits + 7) // 8]
        planes = ((chunk[:, None] >> shifts) & 1).reshape(-1)[: n * bits].view(n, bits)
        q = planes[:, 0].clone()
        for j in range(1, bits):
            q |= planes[:, j] << j
        out[c0 : c0 + n] = q
    return out


def _tokenizer_payload(model) -> dict[str, Any]:
    src = model.source
    if src.kind == "artifact" and model.artifact:
        return model.artifact["tokenizer"]
    if src.kind == "gguf":
        from tinytitan.io.gguf import read_metadata

        fields = read_metadata(src.path)
        keep = {k: v for k, v in fields.items() if k.startswith("tokenizer.") or k == "general.architecture"}
        return {"kind": "gguf_fields", "fields": keep}
    return {"kind": "hf_dir"}


def save_artifact(model, out: str | os.PathLike[str], force: bool = False) -> Path:
    info: QuantInfo | None = model.quant
    if info is None:
        raise TinyTitanError("only quantized models are saved as artifacts (quantize it first)")
    out = Path(out)
    recover_folder(out)  # a save cut between the fallback's renames left only .out.old: it counts as `out`
    if out.exists() and not force:
        raise TinyTitanError(f"{out} exists; pass --force to replace it")
    with staged_folder(out) as tmp:
        tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        for name, st in info.tensors.items():
            entries[name] = _save_stored(name, st, tensors, model.module)
        for pname, p in model.module.named_parameters():
            if p.dim() == 1:
                tensors[pname] = p.detach().float().contiguous()
        save_tensors(tensors, tmp / "model.safetensors")
        manifest = {
            "format": ARTIFACT_FORMAT,
            "version": FORMAT_VERSION,
            "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quant_config": info.config.to_dict(),
            "model_config": model.config.to_dict(),
            "source": _source_payload(model),
            "size_bytes": info.file_bytes(),
            "bits_per_weight": info.bits_per_weight(),
            "n_params": info.n_params,
            "notes": info.notes,
            "tensors": entries,
            "tokenizer": _tokenizer_payload(model),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        if model.source.kind in ("hf", "artifact"):  # an artifact saved again: its own copies
            for f in ("tokenizer.json", "tokenizer_config.json"):
                if (model.source.path / f).exists():
                    shutil.copyfile(model.source.path / f, tmp / f)  # its mode: the umask's
    return out


def _source_payload(model) -> dict[str, Any]:
    """Provenance: the file the weights were quantized from (a loaded artifact passes its own on)."""
    if model.source.kind == "artifact" and model.artifact:
        return dict(model.artifact["source"])
    src = model.source
    return {"name": src.name, "path": str(src.path), "kind": src.kind, "sha256": src.sha256}


def _save_stored(name: str, st: StoredTensor, tensors: dict[str, torch.Tensor], module) -> dict[str, Any]:
    """Adds one stored weight's tensors under `name`; returns its manifest entry."""
    entry: dict[str, Any] = {"scheme": st.scheme.__dict__, "shape": list(st.shape), "note": st.note}
    if st.parts is not None:
        tensors[f"{name}.tier"] = st.row_tier.contiguous()  # type: ignore[union-attr]
        parts = [_save_stored(f"{name}.part{t}", p, tensors, module) for t, p in enumerate(st.parts)]
        entry.update(kind="rows", parts=parts)
    elif st.int_weight is not None:
        qw = st.int_weight
        tensors[f"{name}.q"] = pack_bits(qw.q, qw.bits)
        tensors[f"{name}.scale"] = qw.scale.contiguous()
        if not qw.symmetric:
            tensors[f"{name}.zero"] = qw.zero.contiguous()
        entry.update(kind="int", bits=qw.bits, group=qw.group, symmetric=qw.symmetric)
    elif st.ggml_raw is not None:
        tensors[f"{name}.blocks"] = torch.from_numpy(np.require(st.ggml_raw, requirements=["C", "W"]))
        entry.update(kind="ggml", ggml_type=st.scheme.ggml_type)
    else:
        w = float_weight(module, name)
        tensors[name] = w.to(torch.bfloat16).contiguous()
        entry.update(kind="float")
    return entry


# safetensors' dtype names; any other (ints wider than a byte, bool) reads as int64 here: not codes
_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "U8": torch.uint8,
}


class _TensorFile:
    """The tensors of a safetensors file, each read when asked for and mapped on its own.

    safetensors' tensors are views of the file's memory map, and a map's pages count in the process's RSS
    until every view of it is gone: with one map for the whole file (load_file), loading an artifact kept
    all of it resident to the end (Gemma w4g32: 164 MB above the weights). Here each tensor holds only
    its own map, which goes when the tensor does (the codes, once unpacked)."""

    def __init__(self, file: Path) -> None:
        self.file = file
        try:
            with safe_open(str(file), "pt") as f:
                keys = list(f.keys())
                self.shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
                self.dtypes = {k: _DTYPES.get(f.get_slice(k).get_dtype(), torch.int64) for k in keys}
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"{file} is unreadable: {e}") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.shapes:
            raise ModelLoadError(f"{self.file} lacks tensor {key!r}")
        try:
            with safe_open(str(self.file), "pt") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise ModelLoadError(f"{self.file} is unreadable at {key!r}: {e}") from None

    def get(self, key: str, default: torch.Tensor) -> torch.Tensor:
        return self[key] if key in self.shapes else default


_BITS = (2, 3, 4, 8)


def _entry_error(name: str, problem: str) -> ModelLoadError:
    return ModelLoadError(f"manifest entry {name!r}: {problem}")


def _need(e: dict[str, Any], key: str, kind: type | tuple[type, ...], name: str) -> Any:
    value = e.get(key)
    if not of_type(value, kind):
        raise _entry_error(name, f"{key} is {value!r}")
    return value


def _check_tensor(data: _TensorFile, key: str, shape: tuple[int, ...], floating: bool = False) -> None:
    """The file's tensor `key` exists with this shape and dtype (uint8 codes, or floating point), checked
    before a kernel trusts its size."""
    if key not in data.shapes:
        raise ModelLoadError(f"{data.file} lacks tensor {key!r}")
    got, dtype = data.shapes[key], data.dtypes[key]
    if got != shape:
        raise ModelLoadError(f"{data.file}: tensor {key!r} has shape {list(got)}, expected {list(shape)}")
    if dtype.is_floating_point != floating or (not floating and dtype != torch.uint8):
        raise ModelLoadError(f"{data.file}: tensor {key!r} has dtype {dtype}")


def _load_stored(
    name: str, e: dict[str, Any], data: _TensorFile, shape: tuple[int, int]
) -> tuple[StoredTensor, Any]:
    """One manifest entry back as (StoredTensor, float weight or None), every field and tensor shape
    checked against the weight's `shape` first (a kernel trusts the sizes it is given)."""
    if not isinstance(e, dict):
        raise _entry_error(name, "not an object")
    if _need(e, "shape", list, name) != list(shape):
        raise _entry_error(name, f"shape {e['shape']} does not match the model's {list(shape)}")
    try:
        scheme = TensorScheme(**_need(e, "scheme", dict, name))
    except (TypeError, ValueError) as err:
        raise _entry_error(name, f"bad scheme ({err})") from None
    note = e.get("note", "")
    n, k = shape
    kind = e.get("kind")
    if kind == "rows":
        parts_e = _need(e, "parts", list, name)
        _check_tensor(data, f"{name}.tier", (n,))
        tier = data[f"{name}.tier"].clone()  # a copy: the map of its bytes goes now
        if not parts_e or (n and int(tier.max()) >= len(parts_e)):
            raise _entry_error(name, f"row tiers do not index its {len(parts_e)} parts")
        counts = torch.bincount(tier.long(), minlength=len(parts_e)).tolist()
        parts = [_load_stored(f"{name}.part{t}", pe, data, (counts[t], k))[0] for t, pe in enumerate(parts_e)]
        return StoredTensor(scheme, shape, row_tier=tier, parts=parts, note=note), None
    if kind == "int":
        bits, group = _need(e, "bits", int, name), _need(e, "group", int, name)
        symmetric = _need(e, "symmetric", bool, name)
        if bits not in _BITS or group <= 0 or k % group:  # saved as k for one scale per row
            raise _entry_error(name, f"bits {bits} / group {group} do not fit {k} columns")
        groups = (n, k // group)
        _check_tensor(data, f"{name}.q", ((n * k * bits + 7) // 8,))
        _check_tensor(data, f"{name}.scale", groups, floating=True)
        if not symmetric:
            _check_tensor(data, f"{name}.zero", groups, floating=True)
        # the packed bytes (and their map) are freed as soon as they are unpacked (lower peak RSS at load)
        q = unpack_bits(data[f"{name}.q"], bits, n * k).view(n, k)
        scale = data[f"{name}.scale"]
        zero = data.get(f"{name}.zero", torch.zeros_like(scale))
        qw = IntWeight(q, scale, zero, bits, group, symmetric)
        return StoredTensor(scheme, shape, int_weight=qw, note=note), None
    if kind == "ggml":
        import gguf

        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[str(scheme.ggml_type)]]
        except KeyError:
            raise _entry_error(name, f"unknown GGML type {scheme.ggml_type!r}") from None
        if k % block:
            raise _entry_error(name, f"{k} columns are not whole {scheme.ggml_type} blocks")
        _check_tensor(data, f"{name}.blocks", (n, k // block * size))
        return StoredTensor(scheme, shape, ggml_raw=data[f"{name}.blocks"].numpy(), note=note), None
    if kind == "float":
        _check_tensor(data, name, shape, floating=True)
        return StoredTensor(scheme, shape), data[name].to(torch.float32, copy=True)  # not a view of the file
    raise _entry_error(name, f"unknown kind {kind!r}")


class FileCodes(IntWeight):
    """An IntWeight whose codes, scales and zeros are read back from the artifact's file when asked for.

    A loaded artifact runs on its runtime matrices (packed for the kernels); only exporting and saving
    again need the stored form, so it does not stay resident (Gemma 3 270M w4g32: ~270 MB of uint8 codes),
    and nothing keeps the file's mapping alive once loading is done: its pages counted in the process's
    RSS as long as one tensor was a view of it (Gemma w4g32: 164 MB).
    """

    def __init__(self, file: Path, name: str, qw: IntWeight) -> None:  # not the dataclass's: all is read
        self.file, self.name, self.shape = file, name, qw.codes_shape
        self.stamp = _stamp(file)
        self.bits, self.group, self.symmetric = qw.bits, qw.group, qw.symmetric

    def _read(self, suffix: str) -> torch.Tensor:
        if _stamp(self.file) != self.stamp:
            raise ModelLoadError(f"{self.file} changed or vanished since it was loaded; load it again")
        with safe_open(str(self.file), "pt") as f:
            return f.get_tensor(f"{self.name}.{suffix}")

    @property
    def q(self) -> torch.Tensor:  # type: ignore[override]
        n, k = self.shape
        return unpack_bits(self._read("q"), self.bits, n * k).view(n, k)

    @property
    def scale(self) -> torch.Tensor:  # type: ignore[override]
        return self._read("scale")

    @property
    def zero(self) -> torch.Tensor:  # type: ignore[override]
        # symmetric weights are saved without zeros
        return torch.zeros_like(self.scale) if self.symmetric else self._read("zero")

    @property
    def codes_shape(self) -> tuple[int, int]:
        return self.shape  # type: ignore[return-value]


def _stamp(file: Path) -> tuple[int, int] | None:
    try:
        st = file.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _release_codes(st: StoredTensor, file: Path, name: str) -> None:
    """Once the runtime matrix is built, keep only a way back to the codes in the file."""
    if st.parts is not None:
        for t, part in enumerate(st.parts):
            _release_codes(part, file, f"{name}.part{t}")
    elif st.int_weight is not None and not isinstance(st.int_weight, FileCodes):
        st.int_weight = FileCodes(file, name, st.int_weight)


def float_weight(module: torch.nn.Module, name: str) -> torch.Tensor:
    mod = module.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(mod, QuantLinear | QuantEmbedding):
        return mod.matrix.rows(torch.arange(mod.matrix.n))
    return mod.weight.detach()


def _check_manifest(m: dict[str, Any], where: str) -> tuple[QuantConfig, dict, dict, dict]:
    """The manifest's parts other than the model config, each of the type it must have (a hostile or
    hand-edited manifest is refused here, naming the field): quant config, tensors, tokenizer, source."""
    try:
        qcfg = QuantConfig.from_dict(m.get("quant_config"))  # type: ignore[arg-type]
    except QuantConfigError as e:
        raise ModelLoadError(f"{where}: {e}") from None
    tensors, tok, src = m.get("tensors"), m.get("tokenizer"), m.get("source")
    if not isinstance(tensors, dict) or not tensors:
        raise ModelLoadError(f"{where}: tensors must be a non-empty object")
    if not isinstance(tok, dict) or tok.get("kind") not in ("gguf_fields", "hf_dir"):
        raise ModelLoadError(f"{where}: tokenizer must be an object of kind gguf_fields or hf_dir")
    if tok["kind"] == "gguf_fields" and not isinstance(tok.get("fields"), dict):
        raise ModelLoadError(f"{where}: tokenizer.fields must be an object")
    if not isinstance(src, dict) or not isinstance(src.get("sha256"), str):
        raise ModelLoadError(f"{where}: source must be an object with a sha256 string")
    n = m.get("n_params")
    if not of_type(n, int) or n <= 0:
        raise ModelLoadError(f"{where}: n_params is {n!r}, not a positive integer")
    if not isinstance(m.get("notes", []), list):
        raise ModelLoadError(f"{where}: notes must be a list")
    return qcfg, tensors, tok, src


def load_artifact(
    path: str | os.PathLike[str], device: str | torch.device | None = None, ctx: int | None = None
):
    from tinytitan.io.manifest import read_manifest
    from tinytitan.models import build_model
    from tinytitan.runtime import Model, Source
    from tinytitan.tokenizer import Tokenizer

    path = Path(path)
    manifest = read_manifest(
        path, MANIFEST, ARTIFACT_FORMAT, FORMAT_VERSION, "quantized artifact", ModelLoadError
    )
    where = str(path / MANIFEST)
    cfg = ModelConfig.from_dict(manifest.get("model_config"), where)
    qcfg, tensors, tok, src = _check_manifest(manifest, where)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = _TensorFile(path / "model.safetensors")
    with torch.device("meta"):
        module = build_model(cfg)
    params = dict(module.named_parameters())  # once: building it per item was quadratic (0.8 s)
    norms = {k: data[k].clone() for k, shape in data.shapes.items() if k in params and len(shape) == 1}
    for k, w in norms.items():
        if w.shape != params[k].shape or not w.is_floating_point():
            raise ModelLoadError(
                f"{data.file}: tensor {k!r} is {w.dtype} {list(w.shape)}, expected {list(params[k].shape)}"
            )
    module.load_state_dict(norms, strict=False, assign=True)
    stored: dict[str, StoredTensor] = {}
    for name, e in tensors.items():
        if name not in params or params[name].dim() != 2:
            raise ModelLoadError(f"{where}: tensor {name!r} is not a matrix of this {cfg.arch} model")
        try:
            st, w = _load_stored(name, e, data, tuple(params[name].shape))  # type: ignore[arg-type]
        except ModelLoadError as err:  # a manifest entry's problem: the manifest named first
            if str(err).startswith(str(path)):
                raise
            raise ModelLoadError(f"{where}: {err}") from None
        scheme = st.scheme
        stored[name] = st
        matrix = runtime_matrix(st, w, dev)
        _release_codes(st, path / "model.safetensors", name)
        mod_name = name.rsplit(".", 1)[0]
        if mod_name == "embed_tokens":
            module.embed_tokens = QuantEmbedding(matrix, scheme.label())
            module.lm_head = QuantLinear(matrix, scheme.label())
        else:
            parent, attr = mod_name.rsplit(".", 1)
            setattr(module.get_submodule(parent), attr, QuantLinear(matrix, scheme.label()))
    # after the weights: the peak of building them and the tokenizer's own (Gemma's 262k-token BPE, ~140 MB)
    # do not add up (bench/load_memory.py measures the peak)
    tokenizer = (
        Tokenizer.from_gguf(tok["fields"], where)
        if tok["kind"] == "gguf_fields"
        else Tokenizer.from_hf_dir(path)
    )
    leftover = [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ModelLoadError(f"{path}: artifact lacks tensors {leftover[:4]}")
    module = module.to(dev).eval()
    fuse_projections(module)
    source = Source(path=path, kind="artifact", name=str(path), _sha256=src["sha256"])
    n_params = manifest["n_params"]
    float_bytes = sum(v.numel() * 4 for k, v in norms.items())
    model = Model(cfg, tokenizer, module, source, dev, torch.float32, ctx or cfg.context_length)
    model.quant = QuantInfo(qcfg, stored, float_bytes, n_params, manifest.get("notes", []))
    model.artifact = manifest
    if qcfg.kv_cache:
        model.set_kv_cache(qcfg.kv_cache, qcfg.kv_axis)
    return model
