"""Write GGUF files that llama.cpp (and our own reader) load: metadata copied with its exact value types,
tensors quantized with tinytitan.quant.ggml_formats (or passed pre-quantized), written atomically.

    write_gguf(path, fields, [(gguf_name, array, "Q4_K", shape_in_gguf_order), ...])
    export_state(path, {our_name: ("Q4_K", float_weight), ...}, cfg, GGUFFile(source))

Traps handled here:
- llama.cpp checks metadata value types (a uint32 key written as int32 fails to load), so keys copied from
  a source file keep the types they had there; new keys get the types llama.cpp's converters use.
- GGUF lists a tensor's shape innermost first (ne0 = the row length = the "in" features of a matrix);
  arrays here are in numpy order, the reverse.
- Llama's Q/K rows are stored interleaved per rotary pair (permute_qk); Gemma's norms are stored as
  (1 + w), which is already what our state holds.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from tinytitan.errors import ModelLoadError, TinyTitanError
from tinytitan.io.folders import atomic_path
from tinytitan.io.gguf import NAME_MAPS, check_header, permute_qk
from tinytitan.quant.ggml_formats import FORMATS, QuantFormatError

if TYPE_CHECKING:
    from tinytitan.config import ModelConfig
    from tinytitan.io.gguf import GGUFFile

VT = gguf.GGUFValueType
FieldType = tuple[gguf.GGUFValueType, gguf.GGUFValueType | None]  # (type, element type of an array)
QUANTIZATION_VERSION = 2  # ggml's block-format revision (general.quantization_version)
# keys this module writes itself rather than copying
_OWN_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


class ExportError(TinyTitanError):
    """A GGUF file could not be written: the target exists, or the tensors or metadata are inconsistent."""


# ---------------------------------------------------------------------------------------------------
# metadata value types
# ---------------------------------------------------------------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def read_field_types(path: str | os.PathLike[str]) -> dict[str, FieldType]:
    """The value type of every metadata key of a GGUF file (the values themselves: GGUFFile.fields).

    A light walk over the header, skipping the values: ~0.2 s for a 262k-token vocabulary where
    gguf.GGUFReader takes ~15 s.
    """
    path = Path(path)
    check_header(path)
    buf = memoryview(np.memmap(path, dtype=np.uint8, mode="r"))  # type: ignore[arg-type]
    pos = 24
    n_kv = struct.unpack_from("<Q", buf, 16)[0]

    def u32() -> int:
        nonlocal pos
        pos += 4
        return int(struct.unpack_from("<I", buf, pos - 4)[0])

    def u64() -> int:
        nonlocal pos
        pos += 8
        return int(struct.unpack_from("<Q", buf, pos - 8)[0])

    def skip_string() -> str:
        nonlocal pos
        n = u64()
        pos += n
        if pos > len(buf):
            raise struct.error("string past the end")
        return bytes(buf[pos - n : pos]).decode("utf-8", errors="replace")

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype in _SCALAR_SIZES:
            pos += _SCALAR_SIZES[vtype]
        elif vtype == VT.STRING:
            skip_string()
        elif vtype == VT.ARRAY:
            itype, count = u32(), u64()
            if itype in _SCALAR_SIZES:
                pos += count * _SCALAR_SIZES[itype]
            else:
                for _ in range(count):
                    skip_value(itype)
        else:
            raise struct.error(f"unknown value type {vtype}")

    types: dict[str, FieldType] = {}
    try:
        for _ in range(n_kv):
            key = skip_string()
            vtype = u32()
            sub = None
            if vtype == VT.ARRAY:
                sub = VT(struct.unpack_from("<I", buf, pos)[0])
            skip_value(vtype)
            types[key] = (VT(vtype), sub)
    except (struct.error, ValueError) as e:
        raise ModelLoadError(f"{path}: corrupt metadata ({e})") from None
    return types


def infer_field_type(value: Any) -> FieldType:
    """The type llama.cpp's converters would give a new value: ints uint32 (int32 if negative, 64-bit
    when larger), floats float32, arrays of ints int32, of floats float32."""
    if isinstance(value, bool | np.bool_):
        return VT.BOOL, None
    if isinstance(value, int | np.integer):
        v = int(value)
        if 0 <= v < 1 << 32:
            return VT.UINT32, None
        if -(1 << 31) <= v < 0:
            return VT.INT32, None
        return (VT.UINT64 if v >= 0 else VT.INT64), None
    if isinstance(value, float | np.floating):
        return VT.FLOAT32, None
    if isinstance(value, str | bytes):
        return VT.STRING, None
    if isinstance(value, Sequence | np.ndarray):
        items = list(value)
        if not items:
            raise ExportError("cannot write an empty metadata array (GGUF writers refuse them)")
        if all(isinstance(i, str | bytes) for i in items):
            return VT.ARRAY, VT.STRING
        if all(isinstance(i, bool | np.bool_) for i in items):
            return VT.ARRAY, VT.BOOL
        if all(isinstance(i, int | np.integer) for i in items):
            big = max(abs(int(i)) for i in items) >= 1 << 31
            return VT.ARRAY, (VT.INT64 if big else VT.INT32)
        if all(isinstance(i, int | float | np.integer | np.floating) for i in items):
            return VT.ARRAY, VT.FLOAT32
    raise ExportError(f"cannot store a metadata value of type {type(value).__name__} in GGUF")


# llama.cpp's llama_ftype for a file whose block weights are mostly of one type. For the k-quants the
# "M" mixes are assumed (what our planners produce); pass file_type= to state it exactly.
_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
    "Q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
    "Q2_K": gguf.LlamaFileType.MOSTLY_Q2_K,
    "Q3_K": gguf.LlamaFileType.MOSTLY_Q3_K_M,
    "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    "Q5_K": gguf.LlamaFileType.MOSTLY_Q5_K_M,
    "Q6_K": gguf.LlamaFileType.MOSTLY_Q6_K,
}


def guess_file_type(tensor_types: Mapping[str, tuple[str, int]]) -> int:
    """general.file_type from {gguf name: (type, n_elements)}: the smallest type (bits per weight) among
    the block matrices (embedding and output head excluded, as llama.cpp's mixes treat them apart;
    ties go to the type holding more weights). A Q4_K_M mix (Q4_K + Q6_K + Q5_0 fallbacks) -> Q4_K_M."""
    blocks = {n: t for n, t in tensor_types.items() if n.startswith("blk.") and t[1] > 0}
    matrices = {n: t for n, t in blocks.items() if t[0] not in ("F32",)} or blocks or dict(tensor_types)
    counts: dict[str, int] = {}
    for type_name, n in matrices.values():
        counts[type_name] = counts.get(type_name, 0) + n
    if not counts:
        return int(gguf.LlamaFileType.ALL_F32)
    best = min(counts, key=lambda t: (FORMATS[t].bits_per_weight if t in FORMATS else 99, -counts[t]))
    return int(_FILE_TYPES.get(best, gguf.LlamaFileType.GUESSED))


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------

TensorSpec = tuple[str, Any, str, Sequence[int]]  # (gguf name, array, type name, shape in GGUF order)


def _to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        t = a.detach().cpu()
        if t.is_floating_point():
            t = t.float()
        return t.numpy()
    return np.asarray(a)


def _encode_tensor(
    name: str, array: Any, type_name: str, shape: Sequence[int], importance: Any
) -> np.ndarray:
    """The tensor's bytes as uint8 (*outer dims, bytes per row): quantized here, or checked if given raw."""
    fmt = FORMATS.get(type_name)
    if fmt is None:
        raise ExportError(f"{name}: unknown tensor type {type_name!r}; known: {', '.join(FORMATS)}")
    shape = tuple(int(d) for d in shape)
    if not shape or any(d <= 0 for d in shape):
        raise ExportError(f"{name}: bad shape {shape}")
    ne0, outer = shape[0], tuple(reversed(shape[1:]))  # numpy order: (..., ne1, ne0)
    if not fmt.row_ok(ne0):
        raise ExportError(
            f"{name}: rows of {ne0} values do not split into {type_name} blocks of {fmt.block_size}"
        )
    row_bytes = ne0 // fmt.block_size * fmt.type_size
    arr = _to_numpy(array)
    if arr.dtype == np.uint8:  # already encoded
        n_rows = int(np.prod(outer)) if outer else 1
        if arr.size != n_rows * row_bytes:
            raise ExportError(
                f"{name}: {arr.size} bytes given, {type_name} {shape} needs {n_rows * row_bytes}"
            )
        return np.ascontiguousarray(arr).reshape(*outer, row_bytes)
    if arr.size != int(np.prod(shape)):
        raise ExportError(f"{name}: {arr.size} values given for a tensor of GGUF shape {shape}")
    x = np.ascontiguousarray(arr, dtype=np.float32).reshape(*outer, ne0)
    w = None if importance is None else _to_numpy(importance).astype(np.float32)
    try:
        return fmt.quantize_blocks(x, w)
    except QuantFormatError as e:
        raise ExportError(f"{name}: {e}") from None


def write_gguf(
    path: str | os.PathLike[str],
    fields: Mapping[str, Any],
    tensors: Sequence[TensorSpec | tuple[str, Any, str, Sequence[int], Any]],
    *,
    field_types: Mapping[str, FieldType] | None = None,
    file_type: int | None = None,
    force: bool = False,
) -> Path:
    """Write a GGUF file atomically: a temporary file in the same folder, renamed into place at the end.

    fields: metadata (general.architecture required). Keys keep the types in `field_types` (e.g. from
        read_field_types on the source file), others get infer_field_type's. general.file_type is
        replaced by `file_type` (or guess_file_type's answer), general.quantization_version by 2.
    tensors: (gguf name, array, type name, shape in GGUF order [, importance]). A float array is
        quantized to the type (importance: weights for the scale search, see ggml_formats); a uint8 array
        is taken as that type's bytes, already encoded.
    force: replace an existing file (never touched if anything fails before the final rename).
    """
    path = Path(path)
    if path.is_dir():
        raise ExportError(f"{path} is a directory")
    if path.exists() and not force:
        raise ExportError(f"{path} exists; pass force=True (--force) to overwrite it")
    if not path.parent.is_dir():
        raise ExportError(f"no such folder: {path.parent}")
    arch = fields.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ExportError("metadata has no general.architecture")
    types = dict(field_types or {})

    encoded: list[tuple[str, np.ndarray, str, int]] = []
    seen: set[str] = set()
    for spec in tensors:
        name, array, type_name, shape = spec[:4]
        if name in seen:
            raise ExportError(f"tensor {name} is given twice")
        seen.add(name)
        raw = _encode_tensor(name, array, type_name, shape, spec[4] if len(spec) > 4 else None)
        encoded.append((name, raw, type_name, int(np.prod(shape))))
    if file_type is None:
        file_type = guess_file_type({n: (t, count) for n, _, t, count in encoded})

    with atomic_path(path) as tmp:  # fsynced, renamed in, its folder fsynced; removed on an error
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            alignment = fields.get("general.alignment")
            if alignment is not None and int(alignment) != gguf.GGUF_DEFAULT_ALIGNMENT:
                writer.add_custom_alignment(int(alignment))
            for key, value in fields.items():
                if key in _OWN_KEYS or key.startswith("split."):  # ours (below); one file: no shard keys
                    continue
                if isinstance(value, np.ndarray):
                    value = value.tolist()
                if isinstance(value, list | tuple) and not value:
                    continue  # empty arrays cannot be written; readers treat a missing key the same way
                vtype, sub = types.get(key) or infer_field_type(value)
                writer.add_key_value(key, value, vtype, sub)
            writer.add_uint32("general.quantization_version", QUANTIZATION_VERSION)
            writer.add_uint32("general.file_type", int(file_type))
            for name, raw, type_name, _ in encoded:
                writer.add_tensor(name, raw, raw_dtype=FORMATS[type_name].qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


# ---------------------------------------------------------------------------------------------------
# exporting a model's state
# ---------------------------------------------------------------------------------------------------


def gguf_name(ours: str, arch: str) -> str:
    """Our parameter name -> the GGUF tensor name (io.gguf.NAME_MAPS read backwards)."""
    inverse = {v: k for k, v in NAME_MAPS[arch].items()}
    if ours in inverse:
        return inverse[ours]
    parts = ours.split(".")
    if len(parts) >= 3 and parts[0] == "layers" and parts[1].isdigit():
        key = ".".join(["layers", "{}", *parts[2:]])
        if key in inverse:
            return inverse[key].format(parts[1])
    raise ExportError(f"no GGUF name for parameter {ours!r} of a {arch} model")


def expected_names(cfg: ModelConfig) -> list[str]:
    """The GGUF tensors a model of this config needs."""
    names = []
    for key in NAME_MAPS[cfg.arch]:
        if "{}" in key:
            names += [key.format(i) for i in range(cfg.n_layers)]
        elif not (key == "output.weight" and cfg.tie_embeddings):
            names.append(key)
    return names


def _qk_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that turns our half-split Q/K rows into GGUF's interleaved ones (permute_qk)."""
    import torch

    return permute_qk(torch.arange(n_rows, dtype=torch.float64)[:, None], n_heads)[:, 0].long().numpy()


def export_state(
    path: str | os.PathLike[str],
    state: Mapping[str, tuple[str, Any] | tuple[str, Any, Any]],
    cfg: ModelConfig,
    source: GGUFFile | Mapping[str, Any],
    *,
    file_type: int | None = None,
    force: bool = False,
) -> Path:
    """Write a whole model: {our param name: (type name, weight [, importance])} -> a GGUF llama.cpp loads.

    weight: float (torch layout, [out, in] for matrices; quantized here to the type) or the type's
    encoded uint8 bytes ([out, bytes per row]). source: the GGUFFile the model came from (its metadata is
    copied with its value types, its tensor order kept, and tensors our state lacks, such as
    rope_freqs.weight, copied as they are) or a plain metadata mapping.
    With tied embeddings a lm_head.weight entry is skipped (the file holds token_embd.weight only).
    """
    from tinytitan.io.gguf import GGUFFile

    if isinstance(source, GGUFFile):
        fields, types, order = dict(source.fields), read_field_types(source.path), list(source.tensors)
    else:
        fields, types, order = dict(source), None, []
    if fields.get("general.architecture") != cfg.arch:
        raise ExportError(
            f"metadata is for {fields.get('general.architecture')!r}, the model is {cfg.arch!r}"
        )
    specs: dict[str, tuple] = {}
    for ours, entry in state.items():
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        type_name, weight = entry[0], _to_numpy(entry[1])
        importance = entry[2] if len(entry) > 2 else None
        name = gguf_name(ours, cfg.arch)
        if weight.dtype == np.uint8:
            fmt = FORMATS.get(type_name)
            if fmt is None:
                raise ExportError(f"{ours}: unknown tensor type {type_name!r}")
            rows = weight.reshape(-1, weight.shape[-1])
            shape: tuple[int, ...] = (
                rows.shape[1] // fmt.type_size * fmt.block_size,
                *reversed(weight.shape[:-1]),
            )
        else:
            shape = tuple(reversed(weight.shape))
        if cfg.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.n_heads if name.endswith("attn_q.weight") else cfg.n_kv_heads
            order_rows = _qk_rows(weight.shape[0], heads)
            weight = weight[order_rows]  # rows quantize independently: raw bytes permute the same way
            if importance is not None and _to_numpy(importance).ndim == 2:  # per element: same rows
                importance = _to_numpy(importance)[order_rows]
        specs[name] = (name, weight, type_name, shape) + ((importance,) if importance is not None else ())
    if isinstance(source, GGUFFile):
        for name in order:
            if name not in specs and name not in NAME_MAPS[cfg.arch] and not name.startswith("blk."):
                info = source.tensors[name]  # e.g. rope_freqs.weight: not a parameter, copied verbatim
                specs[name] = (name, np.array(source.raw(name)), info.type_name, info.shape)
    missing = [n for n in expected_names(cfg) if n not in specs]
    if missing:
        raise ExportError(f"the state lacks {len(missing)} tensors the model needs: {', '.join(missing[:5])}")
    rank = {n: i for i, n in enumerate(order)}
    ordered = sorted(specs.values(), key=lambda s: (rank.get(s[0], len(rank)), _natural(s[0])))
    return write_gguf(path, fields, ordered, field_types=types, file_type=file_type, force=force)


def _natural(name: str) -> tuple[tuple[int, int, str], ...]:
    """blk.2 before blk.10."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
