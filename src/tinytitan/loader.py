"""`load()`: a Model from a zoo name, GGUF file, Hugging Face checkpoint or quantized artifact, with a
variant quantized on the fly, an adapter on top and the decode step's compile mode; each step once, in
order, no call back into itself."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from tinytitan import zoo
from tinytitan.config import ModelConfig
from tinytitan.errors import ContextLengthError, ModelLoadError
from tinytitan.models import build_model
from tinytitan.runtime import DTYPES, Model, Source
from tinytitan.tokenizer import Tokenizer


def load(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    ctx: int | None = None,
    progress: bool = False,
    variant: str | None = None,
    calib_text: str | None = None,
    kv_quant: str | None = None,
    kv_axis: str = "token",
    adapter: str | os.PathLike[str] | None = None,
    compile: bool | str | None = None,
    reference: bool = False,
) -> Model:
    """Load a model by zoo name, .gguf path, Hugging Face checkpoint directory or quantized artifact.

    A GGUF file runs as shipped: its matrices stay the file's blocks (a view of its memory map) and a C++
    kernel multiplies float32 inputs with them (tinytitan.quant.ggml_matrix), for every block type it has a
    kernel for; the rest, and every file when the kernel cannot be built, are dequantized to `dtype`. A
    Hugging Face checkpoint stored in bf16 keeps its matrices in bf16 (no float32 copy).
    reference: dequantize every tensor to `dtype` instead (float32: the exact reference the quality
    figures compare against, and what quantizing and fine-tuning start from).

    variant: quantize on the fly ("w4g32", "q4_k", "w4g64-e8-gptq", ... see `tinytitan quantize --list`).
    adapter: a LoRA adapter folder (`tinytitan finetune`) applied on top of the (possibly quantized) base.
    compile: how the decode step runs (`Model.set_compile`); None: "auto" (the stored compiled step where
    this machine has one, else eager while a background process builds it), or False with
    TINYTITAN_COMPILE=0.
    """
    path = zoo.resolve(name_or_path, progress=progress)
    if path.is_dir() and (path / "tinytitan.json").exists():
        if variant is not None:
            raise ModelLoadError(f"{path} is already a quantized variant; load it without variant=")
        model = _load_artifact(path, device, ctx, kv_quant, kv_axis)
    elif variant is not None:
        from tinytitan.quant.api import quantize
        from tinytitan.quant.schemes import parse_variant

        qcfg = parse_variant(variant)  # unknown names fail before the model is read
        base = load_checkpoint(path, str(name_or_path), dtype, device, ctx, reference=True)
        model = quantize(base, qcfg, calib_text=calib_text)
        if qcfg.kv_cache and kv_quant is None:
            kv_quant, kv_axis = qcfg.kv_cache, qcfg.kv_axis
        model = model.set_kv_cache(kv_quant, kv_axis)
    else:
        model = load_checkpoint(path, str(name_or_path), dtype, device, ctx, reference, kv_quant, kv_axis)
    if adapter is not None:
        from tinytitan.finetune.adapter import apply_adapter

        model = apply_adapter(model, adapter)
    if compile is not None:
        model = model.set_compile(compile)
    return model


def _load_artifact(
    path: Path, device: str | torch.device | None, ctx: int | None, kv_quant: str | None, kv_axis: str
) -> Model:
    """A quantized artifact, with the KV cache its variant names (-kv16, -kv8) unless one is asked for."""
    from tinytitan.quant.artifact import load_artifact

    art = load_artifact(path, device=device, ctx=ctx)
    art.rebuild = ("--path", str(path))
    if kv_quant is None:  # the cache its variant names (and the decode step made again, with rebuild)
        kv_quant, kv_axis = art.kv_quant, art.kv_axis
    return art.set_kv_cache(kv_quant, kv_axis)


def load_checkpoint(
    path: Path,
    name: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    ctx: int | None = None,
    reference: bool = False,
    kv_quant: str | None = None,
    kv_axis: str = "token",
) -> Model:
    """A GGUF file or Hugging Face checkpoint directory (`path`, resolved; `name` as the user gave it)."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    rebuild = ("--path", str(path), "--dtype", dtype_name) + (("--reference",) if reference else ())
    meta: nn.Module | None = None  # a GGUF's model, built on the meta device before its weights are read
    if path.is_dir():
        from tinytitan.io import hf

        cfg = hf.config_from_hf(hf.read_config(path), path)
        keep = not reference and torch_dtype == torch.float32 and dev.type == "cpu"
        state = hf.read_state_dict(path, cfg, torch_dtype, keep_half=keep)
        tokenizer = Tokenizer.from_hf_dir(path)
        source = Source(path=path, kind="hf", name=name)
        if any(w.dtype in HALF for w in state.values()):  # a bf16 / float16 checkpoint runs in its dtype
            module = assemble(cfg, state, dev, _run_half)
            model = Model(cfg, tokenizer, module, source, dev, torch_dtype, _ctx(ctx, cfg))
            model.packed, model.rebuild = True, rebuild
            return model.set_kv_cache(kv_quant, kv_axis)
    else:
        from tinytitan.io.gguf import GGUFFile

        f = GGUFFile(path)
        cfg = f.config()
        tokenizer = Tokenizer.from_gguf(dict(f.fields), where=str(path))
        packed: tuple[str, ...] = ()
        if not reference and torch_dtype == torch.float32 and dev.type == "cpu":
            from tinytitan.quant import ggml_matrix

            if ggml_matrix.available():
                packed = tuple(ggml_matrix.TYPES)
        with torch.device("meta"):  # once: the file's shapes are checked against it, then it adopts them
            meta = build_model(cfg)
        state = f.state_dict(cfg, torch_dtype, packed=packed, module=meta)
        source = Source(path=path, kind="gguf", name=name, tensor_types=f.tensor_types())
        if packed:
            module = assemble(cfg, state, dev, lambda m: _run_blocks(m, f, cfg), meta)
            model = Model(cfg, tokenizer, module, source, dev, torch_dtype, _ctx(ctx, cfg))
            model.packed, model.rebuild = True, rebuild
            return model.set_kv_cache(kv_quant, kv_axis)
    module = assemble(cfg, state, dev, module=meta)
    model = Model(cfg, tokenizer, module, source, dev, torch_dtype, _ctx(ctx, cfg))
    model.rebuild = rebuild
    return model.set_kv_cache(kv_quant, kv_axis)


def _ctx(ctx: int | None, cfg: ModelConfig) -> int:
    if ctx is not None and ctx > cfg.context_length:
        raise ContextLengthError(f"ctx {ctx} exceeds the model's context length {cfg.context_length}")
    return ctx or cfg.context_length


HALF = (torch.bfloat16, torch.float16)


def _run_half(module: nn.Module) -> None:
    """Swap every bf16 / float16 matrix for one that multiplies in its dtype (float32 activations around
    it)."""
    from tinytitan.quant.modules import Bf16Matrix, QuantEmbedding, QuantLinear

    label = {torch.bfloat16: "bf16", torch.float16: "f16"}
    emb = module.embed_tokens.weight  # type: ignore[union-attr]
    shared = module.lm_head.weight is emb  # type: ignore[union-attr]
    if emb.dtype in HALF:
        m = Bf16Matrix(emb.data)
        module.embed_tokens = QuantEmbedding(m, label[emb.dtype], torch.float32)
        if shared:
            module.lm_head = QuantLinear(m, label[emb.dtype])
    for name, sub in list(module.named_modules()):
        if isinstance(sub, nn.Linear) and sub.weight.dtype in HALF:
            parent, attr = name.rsplit(".", 1) if "." in name else ("", name)
            matrix = QuantLinear(Bf16Matrix(sub.weight.data), label[sub.weight.dtype])
            setattr(module.get_submodule(parent), attr, matrix)


def _run_blocks(module: nn.Module, f, cfg: ModelConfig) -> None:
    """Swap every matrix the state left on the meta device for one that runs the file's blocks (a tied
    head shares the embedding's)."""
    from tinytitan.io.gguf import gguf_name
    from tinytitan.quant.ggml_matrix import GgmlMatrix, as_blocks
    from tinytitan.quant.modules import QuantEmbedding, QuantLinear

    def matrix(param: str) -> GgmlMatrix:
        name = gguf_name(f.arch, param)
        t = f.tensors[name]
        return GgmlMatrix(t.type_name, as_blocks(f.blocks(name, cfg)), int(t.shape[0]))

    if module.embed_tokens.weight.is_meta:  # type: ignore[union-attr]
        emb = matrix("embed_tokens.weight")
        module.embed_tokens = QuantEmbedding(emb, emb.gtype, torch.float32)
        if cfg.tie_embeddings:
            module.lm_head = QuantLinear(emb, emb.gtype)
    for name, sub in list(module.named_modules()):
        if isinstance(sub, nn.Linear) and sub.weight.is_meta:
            m = matrix(f"{name}.weight")
            parent, attr = name.rsplit(".", 1) if "." in name else ("", name)
            setattr(module.get_submodule(parent), attr, QuantLinear(m, m.gtype))


def assemble(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    device: torch.device,
    swap: Callable[[nn.Module], None] | None = None,
    module: nn.Module | None = None,
) -> nn.Module:
    """The module on the meta device (`module`, or built from cfg) adopting the weights (no random init,
    no copies); `swap` replaces the modules whose weights the state left on the meta device."""
    if module is None:
        with torch.device("meta"):
            module = build_model(cfg)
    expected = set(module.state_dict().keys())
    if cfg.tie_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if missing or unexpected:
        raise ModelLoadError(
            f"checkpoint does not match the {cfg.arch} architecture: missing {sorted(missing)[:4]}, "
            f"unexpected {sorted(unexpected)[:4]}"
        )
    try:
        module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(
            f"checkpoint shapes do not match its config: {str(e).splitlines()[-1]}"
        ) from None
    if cfg.tie_embeddings:
        module.lm_head.weight = module.embed_tokens.weight  # type: ignore[union-attr]
    if swap is not None:
        swap(module)
    return module.to(device).eval()
