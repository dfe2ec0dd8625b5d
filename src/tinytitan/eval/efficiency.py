"""Efficiency: size, bits per weight, load time, peak memory, time to first token, prefill and decode speed
at given context lengths, and energy per 1,000 generated tokens.

Size and bits per weight are of the weights as stored: the model file (llama.cpp's BPW: file bytes x 8 /
parameters), or for a quantized variant its own packed storage; the memory the weights take once loaded
(float32 for a GGUF base) is kept beside them in the row.

Measured in a fresh process (`python -m tinytitan.eval.efficiency`), so that load time and peak RSS are of
the model alone and not of whatever the calling process already holds. At each context length L: a prompt
of L tokens (filler text) is prefilled from an empty cache and `decode_tokens` tokens are generated greedily
with no stop token. TTFT = prompt submitted -> first token sampled; prefill tok/s = L / TTFT; decode
tok/s = (decode_tokens - 1) / (time from the first to the last token).

Energy: the CPU package counters of Linux powercap (RAPL, /sys/class/powercap/intel-rapl:N/energy_uj,
wrap-around handled) are read around the decode phase when they are readable (`measured`); otherwise the
energy is estimated as the process's CPU-seconds during decode x a per-core power figure (`estimated`,
--core-watts, default from the task spec). RAPL counts the whole package, other processes included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinytitan.errors import ContextLengthError
from tinytitan.eval.run_state import dtype_name
from tinytitan.store import Metric, machine_id

if TYPE_CHECKING:
    from tinytitan.eval.run_state import Run

POWERCAP = Path("/sys/class/powercap")


class RaplMeter:
    """Sum of the package-level RAPL energy counters (joules), wrap-around aware."""

    def __init__(self, root: Path = POWERCAP) -> None:
        self.domains: list[tuple[Path, int]] = []
        if not root.is_dir():
            return
        for d in sorted(root.iterdir()):
            if not re.fullmatch(r"intel-rapl:\d+", d.name):  # packages only, not their sub-zones
                continue
            energy, rng = d / "energy_uj", d / "max_energy_range_uj"
            try:
                int(energy.read_text())
                max_range = int(rng.read_text()) if rng.exists() else 2**32
            except (OSError, ValueError):
                continue  # present but unreadable (often root-only): not usable
            self.domains.append((energy, max_range))

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read(self) -> list[int]:
        return [int(p.read_text()) for p, _ in self.domains]

    def joules(self, start: list[int], end: list[int]) -> float:
        total = 0
        for (_, max_range), a, b in zip(self.domains, start, end, strict=True):
            total += b - a if b >= a else b + max_range - a
        return total / 1e6


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class ContextSpeed:
    context: int
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    decode_tokens: int
    energy_j_per_1k_tokens: float
    energy_method: str  # "measured (RAPL, N package(s))" | "estimated (CPU-seconds x W/core)"
    kv_cache: str = ""  # how the generation's cache kept k and v: "float32", "float16", "int8/token", ...
    kv_bytes: int = 0  # what the generation's cache held at its end (its cached positions)
    decode_step: str = ""  # what ran the decode steps: "stored", "compiled", "graph" or "eager"


def _cache_kind(model) -> str:
    if model.kv_quant in ("int8", "int4"):
        return f"{model.kv_quant}/{model.kv_axis}"
    return "float16" if model.kv_quant == "f16" else str(model.dtype).removeprefix("torch.")


@dataclass
class Efficiency:
    file_bytes: int
    n_params: int
    weight_bytes: int
    bits_per_weight: float  # as stored: a variant's own figure, else file size x 8 / parameters (llama.cpp)
    bits_per_weight_memory: float  # weight memory as loaded x 8 / parameters (float32 base: 32)
    load_s: float | None  # None when the model was handed over already loaded
    rss_before_load_bytes: int
    peak_rss_bytes: int
    contexts: list[ContextSpeed]


def count_params(cfg) -> int:
    """Parameters of the architecture (from the config, on the meta device: independent of packing)."""
    import torch

    from tinytitan.models import build_model

    with torch.device("meta"):
        m = build_model(cfg)
    seen, n = set(), 0
    for p in m.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which belongs to the address space and so starts
    afresh at exec; getrusage's ru_maxrss does not (a child forked from a 2 GB parent reports >= 2 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB


def filler_ids(tokenizer, n: int) -> list[int]:
    from tinytitan.eval.longcontext import FILLER

    ids = tokenizer.encode(" ".join(FILLER * 8))
    out = list(ids)
    body = tokenizer.encode(" " + " ".join(FILLER), add_bos=False)
    while len(out) < n:
        out.extend(body)
    return out[:n]


def measure(
    model_name: str,
    variant: object = None,
    contexts: list[int] = (512,),  # type: ignore[assignment]
    decode_tokens: int = 32,
    core_watts: float = 10.0,
    dtype: str = "float32",
    device: str | None = None,
    ctx: int | None = None,
    model: object = None,
) -> Efficiency:
    """Load the model (or take `model` as it is: then load time is not measured) and time it."""
    import psutil
    import torch

    from tinytitan.engine import SamplingParams
    from tinytitan.eval.loading import load_model

    rss0 = psutil.Process().memory_info().rss
    load_s: float | None = None
    if model is None:
        t0 = time.perf_counter()
        model = load_model(model_name, variant, dtype=dtype, device=device, ctx=ctx)
        load_s = time.perf_counter() - t0
    path = model.source.path
    file_bytes = (
        path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))
    )
    n_params = count_params(model.config)
    weight_bytes = model.weight_bytes()
    if model.quant is not None:  # a quantized variant reports its own storage
        file_bytes, bpw = int(model.quant.file_bytes()), float(model.quant.bits_per_weight())
    else:
        bpw = file_bytes * 8 / n_params
    meter = RaplMeter()
    # warm-up (kernels, allocator): not measured
    list(model.generate_ids(filler_ids(model.tokenizer, 32), 2, SamplingParams(), set()))
    speeds = []
    for L in contexts:
        if L + decode_tokens > model.ctx:
            from tinytitan.errors import ContextLengthError

            raise ContextLengthError(
                f"speed: context {L} + {decode_tokens} generated tokens is beyond the model's context of "
                f"{model.ctx} tokens"
            )
        ids = filler_ids(model.tokenizer, L)
        stamps = []
        t_start = time.perf_counter()
        # the model's own generation: its cache kind (a -kv8 variant's int8 cache) and decode step
        gen = model.generate_ids(ids, decode_tokens, SamplingParams(), set())
        first = next(gen)
        t_first = time.perf_counter()
        e0, c0 = (meter.read() if meter.available else None), cpu_seconds()
        stamps = [first, *gen]
        t_end = time.perf_counter()
        e1, c1 = (meter.read() if meter.available else None), cpu_seconds()
        if device and device.startswith("cuda"):
            torch.cuda.synchronize()
        n_dec = len(stamps) - 1
        if meter.available and e0 is not None and e1 is not None:
            joules = meter.joules(e0, e1)
            method = f"measured (RAPL, {len(meter.domains)} package(s))"
        else:
            joules = (c1 - c0) * core_watts
            method = f"estimated (CPU-seconds x {core_watts:g} W/core)"
        ttft = t_first - t_start
        speeds.append(
            ContextSpeed(
                context=L,
                ttft_s=ttft,
                prefill_tok_s=L / ttft,
                decode_tok_s=n_dec / (t_end - t_first) if n_dec > 0 else 0.0,
                decode_tokens=n_dec,
                energy_j_per_1k_tokens=joules / n_dec * 1000 if n_dec > 0 else 0.0,
                energy_method=method,
                kv_cache=_cache_kind(model),
                kv_bytes=model.last_cache.nbytes() if model.last_cache is not None else 0,
                decode_step=model.decode_step.ran or "",
            )
        )
    peak = peak_rss_bytes()
    return Efficiency(
        file_bytes=file_bytes,
        n_params=n_params,
        weight_bytes=weight_bytes,
        bits_per_weight=bpw,
        bits_per_weight_memory=weight_bytes * 8 / n_params,
        load_s=load_s,
        rss_before_load_bytes=rss0,
        peak_rss_bytes=peak,
        contexts=speeds,
    )


def measure_in_subprocess(
    model_name: str,
    variant: object,
    contexts: list[int],
    decode_tokens: int,
    core_watts: float,
    dtype: str,
    device: str | None,
    ctx: int | None,
    timeout: float = 3600,
) -> Efficiency:
    import subprocess

    from tinytitan.errors import TinyTitanError

    args = [
        sys.executable,
        "-m",
        "tinytitan.eval.efficiency",
        model_name,
        "--variant",
        json.dumps(variant),
        "--contexts",
        ",".join(map(str, contexts)),
        "--decode-tokens",
        str(decode_tokens),
        "--core-watts",
        str(core_watts),
        "--dtype",
        dtype,
    ]
    if device:
        args += ["--device", device]
    if ctx:
        args += ["--ctx", str(ctx)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise TinyTitanError(f"speed measurement failed: {msg.removeprefix('error: ')}")
    d = json.loads(p.stdout.strip().splitlines()[-1])
    d["contexts"] = [ContextSpeed(**c) for c in d["contexts"]]
    return Efficiency(**d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tinytitan.eval.efficiency", description=__doc__.splitlines()[0]
    )
    ap.add_argument("model")
    ap.add_argument("--variant", default="null", help="JSON of the variant (null = as loaded)")
    ap.add_argument("--contexts", default="512")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--core-watts", type=float, default=10.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    ap.add_argument("--ctx", type=int, default=None)
    a = ap.parse_args(argv)
    from tinytitan.errors import TinyTitanError

    try:
        eff = measure(
            a.model,
            json.loads(a.variant),
            [int(x) for x in a.contexts.split(",")],
            a.decode_tokens,
            a.core_watts,
            a.dtype,
            a.device,
            a.ctx,
        )
    except TinyTitanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(eff)))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# -- the task kind: preparation (options of its job identity) and scoring, for eval/runner.py ------------
@dataclass
class SpeedState:
    contexts: list[int]
    decode_tokens: int
    core_watts: float


def prepare_task(r: Run) -> dict[str, Any]:
    p = r.spec.params
    contexts = r.cfg.contexts or list(p["contexts"])
    too_long = [c for c in contexts if c > r.model.ctx]
    if too_long:
        raise ContextLengthError(
            f"speed: context {too_long[0]} is beyond the model's context of {r.model.ctx}"
        )
    decode = r.cfg.decode_tokens or int(p.get("decode_tokens", 32))
    watts = r.cfg.core_watts if r.cfg.core_watts is not None else float(p.get("core_watts", 10.0))
    r.state = SpeedState(contexts, decode, watts)
    return {
        "contexts": contexts,
        "decode_tokens": decode,
        "core_watts": watts,
        "machine": machine_id(),
        "device": str(r.model.device),
    }


def kv_contexts(ctx: int) -> list[int]:
    """Context lengths whose KV-cache size the speed task records: powers of two from 512, and ctx."""
    out, n = [], 512
    while n < ctx:
        out.append(n)
        n *= 2
    return [*out, ctx]


def run_task(r: Run) -> list[Metric]:
    st: SpeedState = r.state
    r.reporter.task_start(r.spec.name, 1, 0, "measurements")
    args = (
        str(r.model.source.path),
        r.variant,
        st.contexts,
        st.decode_tokens,
        st.core_watts,
        dtype_name(r.model),
        str(r.model.device),
        None,
    )
    # a quantize() output in memory cannot be loaded again elsewhere; a saved artifact can
    in_memory = r.variant is None and bool(r.variant_json) and r.model.source.kind != "artifact"
    fresh = not (r.cfg.speed_in_process or in_memory)
    e = measure_in_subprocess(*args) if fresh else measure(*args, model=r.model)
    r.reporter.advance(1)
    m = [
        Metric("file_bytes", e.file_bytes, None, 1, {"unit": "bytes"}),
        Metric(
            "bits_per_weight",
            e.bits_per_weight,
            None,
            1,
            {
                "n_params": e.n_params,
                "weight_bytes": e.weight_bytes,
                "memory_bits_per_weight": e.bits_per_weight_memory,
            },
        ),
        Metric(
            "load_s", e.load_s, None, 1, {"unit": "s"} if fresh else {"unit": "s", "note": "not measured"}
        ),
        Metric(
            "peak_rss_bytes",
            e.peak_rss_bytes,
            None,
            1,
            {
                "unit": "bytes",
                "rss_before_load_bytes": e.rss_before_load_bytes,
                "fresh_process": fresh,
            },
        ),
    ]
    from tinytitan.engine import PREFILL_CHUNK

    # the one buffer of the runtime that grows with the context: a prefill chunk's global-attention scores
    scratch = 4 * PREFILL_CHUNK * r.model.config.n_heads
    m.append(Metric("attn_scratch_bytes_per_position", scratch, None, 1, {"unit": "bytes"}))
    for n in kv_contexts(r.model.ctx):  # arithmetic, from the model's cache layout (recommend uses it)
        m.append(Metric(f"kv_bytes@ctx={n}", r.model.kv_bytes(n), None, 1, {"unit": "bytes", "context": n}))
    for c in e.contexts:
        ex = {"context": c.context, "decode_tokens": c.decode_tokens}
        ran = {"kv_cache": c.kv_cache, "decode_step": c.decode_step}  # what the timed generation ran on
        m += [
            Metric(f"ttft_s@ctx={c.context}", c.ttft_s, None, 1, {**ex, "unit": "s"}),
            Metric(
                f"prefill_tok_s@ctx={c.context}", c.prefill_tok_s, None, c.context, {**ex, "unit": "tokens/s"}
            ),
            Metric(
                f"decode_tok_s@ctx={c.context}",
                c.decode_tok_s,
                None,
                c.decode_tokens,
                {**ex, **ran, "unit": "tokens/s"},
            ),
            Metric(
                f"energy_j_per_1k_tokens@ctx={c.context}",
                c.energy_j_per_1k_tokens,
                None,
                c.decode_tokens,
                {**ex, "unit": "J", "method": c.energy_method},
            ),
        ]
        if c.kv_cache:  # measured on the generation's own cache (results from before have no figure)
            m.append(
                Metric(f"kv_bytes_used@ctx={c.context}", c.kv_bytes, None, 1, {**ex, **ran, "unit": "bytes"})
            )
    return m
