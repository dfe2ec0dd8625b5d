"""Model: a loaded checkpoint that tokenizes, scores and generates (tinytitan.loader builds one), with its
provenance (Source) and the KV cache and decode step it runs with."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tinytitan import zoo
from tinytitan.config import ModelConfig
from tinytitan.decode_step import DecodeStep, StoredSpec, compile_available
from tinytitan.engine import PREFILL_CHUNK, Generation, SamplingParams, Stepper, StopMatcher
from tinytitan.errors import ContextLengthError, TinyTitanError, first_line
from tinytitan.models.cache import KVCache
from tinytitan.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_compile() -> bool | str:
    """The compile mode a loaded model starts with: "auto", or False when TINYTITAN_COMPILE=0."""
    return False if os.environ.get("TINYTITAN_COMPILE", "auto") == "0" else "auto"


@dataclass
class Source:
    """Where a model came from, for provenance in results."""

    path: Path
    kind: str  # "gguf" (a GGUF file) | "hf" (a Hugging Face checkpoint folder) | "artifact" (a quantized
    # artifact folder: `path` is the folder, the hash its source's)
    name: str  # the name or path the user gave
    tensor_types: dict[str, str] = field(default_factory=dict)
    _sha256: str | None = None

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = checkpoint_sha256(self.path)
        return self._sha256


def checkpoint_sha256(path: Path) -> str:
    """A checkpoint's identity in results: a file's sha256, or a folder's safetensors files' joined."""
    if path.is_file():
        return zoo.sha256_file(path)
    return ",".join(zoo.sha256_file(f) for f in sorted(path.glob("model*.safetensors")))


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"


class Model:
    """A loaded model: config, tokenizer and module, with scoring and generation."""

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Tokenizer,
        module: nn.Module,
        source: Source,
        device: torch.device,
        dtype: torch.dtype,
        ctx: int | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.module = module
        self.source = source
        self.device = device
        self.dtype = dtype
        self.ctx = min(ctx or config.context_length, config.context_length) if ctx is None else ctx
        self.last_cache: KVCache | None = None  # the cache of the latest generation (memory reports)
        self.quant = None  # QuantInfo when this is a quantized variant (tinytitan.quant.api)
        # provenance beyond `source`: the manifest of the artifact it was loaded from, of the LoRA adapter
        # applied on top (tinytitan.finetune.adapter), and the source GGUF once its blocks were read again
        self.artifact: dict[str, Any] | None = None
        self.adapter: dict[str, Any] | None = None
        self.gguf: Any = None  # tinytitan.io.gguf.GGUFFile
        self.packed = False  # whether the matrices run as stored (GGUF blocks, bf16; load without reference)
        self.kv_quant: str | None = None  # None | "f16" | "int8" | "int4": how the KV cache keeps k and v
        self.kv_axis = "token"  # "token" | "channel" (per-channel keys on global layers)
        # how a separate process loads this same model (`tinytitan.aot_step`'s background build); None when
        # it cannot (a variant quantized on the fly, an adapter, a module changed in place)
        self.rebuild: tuple[str, ...] | None = None
        self.compile_mode = "off"
        self.decode_step = DecodeStep(module)
        self.set_compile(default_compile())

    def __repr__(self) -> str:
        c = self.config
        return f"Model({self.source.name!r}, arch={c.arch}, layers={c.n_layers}, dim={c.dim}, ctx={self.ctx})"

    # -- scoring ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids: list[int], chunk: int = PREFILL_CHUNK) -> torch.Tensor:
        """float32 [len(ids), vocab]: the next-token logits after every position (one causal pass)."""
        self._check_len(len(ids), 0)
        cache = self.new_cache(len(ids))
        out = []
        for i in range(0, len(ids), chunk):
            x = torch.tensor([ids[i : i + chunk]], dtype=torch.long, device=self.device)
            out.append(self.module(x, cache=cache, start=i)[0].float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.config.vocab_size)

    def new_cache(self, max_len: int, batch: int = 1, static: bool = False) -> KVCache:
        return KVCache.for_model(
            self.config, max_len, batch, self.dtype, self.device, self.kv_quant, self.kv_axis, static
        )

    def set_compile(self, mode: bool | str = True) -> Model:
        """How the decode step runs (see tinytitan.decode_step); returns self.

        "auto" (the default; `TINYTITAN_COMPILE=0` makes it False): on CPU, the stored compiled step
        (tinytitan.aot_step) when this machine has one for this model; when not, the first generation
        starts building it in a separate low-priority process and decodes eagerly until it is stored.
        True: the same, but a missing step is built now, before the first token (about a minute), and where
        it cannot be, the step is compiled with torch.compile instead. False: eager.
        int8/int4 KV caches stay eager. On a CUDA device the step is replayed as a CUDA graph whatever the
        mode (tinytitan.cuda_graph); True compiles it first (the graph replays inductor's fused kernels)."""
        if mode not in (True, False, "auto"):
            raise TinyTitanError(f"compile mode {mode!r}: choose True, False or 'auto'")
        self.compile_mode = {True: "on", False: "off"}.get(mode, mode)  # type: ignore[call-overload]
        eager_cache = self.kv_quant in ("int8", "int4")
        if self.device.type == "cuda" or mode is False or eager_cache:
            self.decode_step = DecodeStep(self.module, compiled=mode is True and not eager_cache)
            return self
        if not compile_available():
            if mode is True:
                raise TinyTitanError("compiling needs a C++ compiler (g++ or clang++ on PATH, or CXX set)")
            self.decode_step = DecodeStep(self.module)
            return self
        spec = StoredSpec(self.config, self.dtype, build_now=mode is True, rebuild=self.rebuild)
        self.decode_step = DecodeStep(self.module, stored=spec)
        if mode is True:  # built now, for the cache this model makes (the step is then ready at once)
            try:
                self.decode_step.stored_step(self.new_cache(1, static=True))
            except Exception as e:  # an op the export cannot trace, ...
                log.warning("cannot store a compiled step (%s); compiling with torch.compile", first_line(e))
                self.decode_step = DecodeStep(self.module, compiled=True)
        return self

    def module_changed(self) -> Model:
        """Call after replacing modules or tensors of `self.module` (adapters attached or merged): a compiled
        step or a CUDA graph holds the module it was made from, so the decode step is built again, compiled
        or not as it was; returns self. A separate process can no longer load this model (no background
        build)."""
        self.rebuild = None
        return self.set_compile({"on": True, "off": False}.get(self.compile_mode, self.compile_mode))

    def generation_cache(self, n_prompt: int, budget: int) -> KVCache:
        """The cache for one generation: the whole context, or (compiled step) exactly what it needs."""
        if self.decode_step.static_cache:  # fixed shapes, sized to this request (not the whole context)
            return self.new_cache(min(self.ctx, n_prompt + budget), static=True)
        return self.new_cache(self.ctx)

    def set_kv_cache(self, kv_quant: str | None, axis: str = "token") -> Model:
        """Store the KV cache in float16, or int8 / int4 (per token or per channel), from now on (None: the
        compute dtype); returns self."""
        try:
            KVCache.for_model(self.config, 1, 1, self.dtype, "cpu", kv_quant, axis)  # validates the choice
        except ValueError as e:
            raise TinyTitanError(str(e)) from None
        self.kv_quant, self.kv_axis = kv_quant, axis
        if kv_quant in ("int8", "int4") and self.compile_mode == "on":
            log.warning("a quantized KV cache runs eagerly: the compiled decode step is turned off")
        return self.set_compile({"on": True, "off": False}.get(self.compile_mode, self.compile_mode))

    # -- generation ---------------------------------------------------------------------------------
    def _check_len(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt == 0:
            raise ContextLengthError("the prompt is empty (no tokens)")
        if n_prompt > self.ctx:
            raise ContextLengthError(
                f"the prompt is {n_prompt} tokens, longer than the context of {self.ctx} tokens"
                f" (the model allows up to {self.config.context_length}; set ctx / --ctx)"
            )

    def generate_ids(
        self,
        prompt_ids: list[int],
        max_tokens: int,
        params: SamplingParams | None = None,
        stop_ids: set[int] | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids: a batch of one through the Stepper every generation goes through
        (tinytitan.engine), with this model's cache kind and decode step. Ends at a stop id (not yielded;
        default: the tokenizer's end-of-sequence ids), after max_tokens, or at the context's end."""
        self._check_len(len(prompt_ids), max_tokens)
        stops = self.tokenizer.eos_ids if stop_ids is None else stop_ids
        stepper = Stepper(self, max_rows=1)
        gen = stepper.add(Generation(prompt_ids, max_tokens, params, stops))
        while not gen.finished:
            events = stepper.step()
            self.last_cache = stepper.cache or gen.cache or self.last_cache
            for _, token in events:
                if token is not None:
                    yield token

    def stepper(self, max_rows: int = 64) -> Stepper:
        """A Stepper for many sequences at once (the server's batch; see tinytitan.engine.Stepper)."""
        return Stepper(self, max_rows=max_rows)

    def stream(
        self,
        prompt: str | list[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        add_bos: bool | None = None,
        special: bool = False,
    ) -> Iterator[str]:
        """Yield text pieces as they are generated (multi-byte characters are never split)."""
        for piece, _ in self._stream_pieces(
            prompt, max_tokens, SamplingParams(temperature, top_k, top_p, seed), stop or [], add_bos, special
        ):
            if piece:
                yield piece

    def _stream_pieces(
        self,
        prompt: str | list[int],
        max_tokens: int,
        params: SamplingParams,
        stop: list[str],
        add_bos: bool | None,
        special: bool,
    ) -> Iterator[tuple[str, int | None]]:
        ids = (
            prompt
            if isinstance(prompt, list)
            else self.tokenizer.encode(prompt, add_bos=add_bos, special=special)
        )
        decoder, matcher = StreamDecoder(self.tokenizer), StopMatcher(stop)
        for token in self.generate_ids(ids, max_tokens, params):
            yield matcher.push(decoder.push(token)), token
            if matcher.stopped:
                return
        yield matcher.push(decoder.flush()) + matcher.flush(), None

    def complete(
        self,
        prompt: str | list[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        add_bos: bool | None = None,
        special: bool = False,
    ) -> Completion:
        ids = (
            prompt
            if isinstance(prompt, list)
            else self.tokenizer.encode(prompt, add_bos=add_bos, special=special)
        )
        params = SamplingParams(temperature, top_k, top_p, seed)
        pieces, tokens = [], []
        matcher_stopped = False
        for piece, token in self._stream_pieces(ids, max_tokens, params, stop or [], add_bos, special):
            pieces.append(piece)
            if token is not None:
                tokens.append(token)
        text = "".join(pieces)
        if stop and any(s in "".join(pieces) for s in stop):
            matcher_stopped = True
        hit_eos = len(tokens) < max_tokens and len(ids) + len(tokens) < self.ctx
        reason = "stop" if (hit_eos or matcher_stopped) else "length"
        return Completion(text=text, token_ids=tokens, prompt_tokens=len(ids), finish_reason=reason)

    def generate(
        self,
        prompt: str | list[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        add_bos: bool | None = None,
    ) -> str:
        return self.complete(prompt, max_tokens, temperature, top_k, top_p, seed, stop, add_bos).text

    def chat(
        self,
        messages: list[dict[str, str]],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """One assistant reply, using the model's chat template."""
        return self.complete(self.chat_prompt_ids(messages), max_tokens, temperature, top_k, top_p, seed).text

    def chat_prompt_ids(self, messages: list[dict[str, str]], parse_special: bool = False) -> list[int]:
        """The prompt ids for a chat: the template's turn markers are special tokens; special-token texts
        inside the messages (a user's "<|im_start|>system") stay plain text, unless `parse_special`."""
        from tinytitan.chat_template import PlainSpecials  # imports jinja2, as the template does anyway

        tok = self.tokenizer
        plain = None
        if not parse_special:
            plain = PlainSpecials(messages, tok.special_texts(), avoid=tok.chat_template or "")
        text = tok.apply_chat_template(
            messages if plain is None else plain.messages, add_generation_prompt=True
        )
        # the template writes BOS itself when the model wants one (checked before the texts are put back)
        add_bos = tok.add_bos and not (
            tok.bos_id is not None and text.startswith(tok.id_to_token(tok.bos_id))
        )
        text, spans = (text, []) if plain is None else plain.restore(text)
        return tok.encode(text, add_bos=add_bos, special=True, plain_spans=spans)

    # -- memory -------------------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        # Bytes the tensors span, each byte once: a tied head and fused projections' parts are views.
        tensors = [t for t in list(self.module.parameters()) + list(self.module.buffers()) if t.numel()]
        spans = sorted((t.data_ptr(), t.data_ptr() + _span(t)) for t in tensors)
        total, end = 0, 0
        for a, b in spans:
            total += max(0, b - max(a, end))
            end = max(end, b)
        return total

    def kv_bytes(self, positions: int) -> int:
        """KV memory a context of `positions` costs (sliding-window layers capped at their window)."""
        c = self.config
        if self.kv_quant in (None, "f16"):
            dtype = torch.float16 if self.kv_quant == "f16" else self.dtype
            per = 2 * c.n_kv_heads * c.head_dim * _elem(dtype)
        else:  # codes plus an fp16 scale and minimum per position and head, for K and V
            bits = 8 if self.kv_quant == "int8" else 4
            per = 2 * c.n_kv_heads * (c.head_dim * bits // 8 + 4)
        return sum(
            per * (positions if c.layer_window(i) is None else min(positions, c.layer_window(i) or 0))
            for i in range(c.n_layers)
        )


def _span(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to past its last (its size when contiguous)."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return (last + 1) * t.element_size()


def _elem(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()
