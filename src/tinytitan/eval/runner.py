"""`evaluate()`: run tasks on a model (or a quantized variant of one), resumably, into the results store.

For each task: its job identity (model file sha256, variant config, task, spec version, options such as
--limit, few-shot count, seed, data file sha256) is checked against the store. A finished job is not run
again: its rows are returned from the store. Otherwise the job's finished items (perplexity windows,
questions, long-context cells) are read back from the store's progress table, only the missing ones are
computed (each committed as soon as it is done), and the metric rows are written when the job completes.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from tinytitan.errors import ContextLengthError, DataError, TaskError, TinyTitanError
from tinytitan.eval.generation import prepare_generate, run_generate
from tinytitan.eval.registry import TaskSpec, parse_task_list
from tinytitan.store import (
    JobIdentity,
    Metric,
    ResultRow,
    Store,
    canonical_json,
    default_store_path,
    machine_id,
)

MC_CHUNK = 8  # questions committed together (a kill loses at most this many)
SKIPPED, FAILED = "skipped", "failed"  # why a job has no rows (Store.note_skip)


@dataclass
class EvalConfig:
    """Options of one `evaluate` call (the CLI's flags)."""

    limit: int | None = None  # items (questions, perplexity windows, samples per long-context cell)
    num_fewshot: int | None = None  # None: the spec's default
    seed: int = 1234  # few-shot sampling and long-context prompts
    data: list[str] = field(default_factory=list)  # --data DIR | TASK=PATH
    batch_size: int = 16
    reference: str | None = None  # kld: reference model (default: the same model, no variant)
    reference_variant: Any = None
    reference_model: Any = None  # kld: an already loaded reference Model (instead of loading `reference`)
    lengths: list[int] | None = None  # long-context grid (default: the spec's, up to the model's context)
    depths: list[float] | None = None
    haystack: str | None = None  # a text file whose sentences fill the haystack (default: filler)
    samples: int | None = None  # long context: prompts per (length, depth) cell (default: the spec's)
    contexts: list[int] | None = None  # speed: context lengths
    decode_tokens: int | None = None
    core_watts: float | None = None
    speed_in_process: bool = False  # measure speed here instead of in a fresh process (tests)
    heatmap_dir: Path | None = None
    force: bool = False  # forget finished jobs and their items, and recompute


class Reporter:
    """Progress callbacks (the CLI draws bars; the default is silent)."""

    def task_start(self, task: str, total: int, done: int, what: str = "items") -> None: ...

    def advance(self, n: int = 1) -> None: ...

    def task_end(self, task: str, rows: list[ResultRow], cached: bool) -> None: ...

    def note(self, message: str) -> None: ...


# -- models -------------------------------------------------------------------------------------------
def load_model(
    name: str, variant: Any = None, dtype: str = "float32", device: str | None = None, ctx: int | None = None
):
    """tt.load, passing a variant through when the runtime supports variants."""
    from tinytitan import runtime

    # the float32 reference (or a variant quantized from it): the figures compare against it
    kwargs: dict[str, Any] = {"dtype": dtype, "device": device, "ctx": ctx, "reference": True}
    if variant is not None:
        if "variant" not in inspect.signature(runtime.load).parameters:
            raise TinyTitanError(
                f"variant {variant!r} requested, but this tinytitan cannot load variants yet "
                "(tinytitan.load has no `variant` parameter)"
            )
        kwargs["variant"] = variant
    return runtime.load(name, **kwargs)


def variant_config(model, variant: Any) -> str:
    """Canonical JSON of the variant's full config ('' when the model is used as loaded)."""
    quant = getattr(model, "quant", None)  # tinytitan.quant: Model.quant.config is the QuantConfig
    if quant is not None and hasattr(getattr(quant, "config", None), "to_dict"):
        return canonical_json(quant.config.to_dict())
    for attr in ("variant", "quant_config", "variant_config"):
        cfg = getattr(model, attr, None)
        if cfg is None:
            continue
        if hasattr(cfg, "to_dict"):
            return canonical_json(cfg.to_dict())
        if is_dataclass(cfg) and not isinstance(cfg, type):
            return canonical_json({"scheme": type(cfg).__name__, **asdict(cfg)})
        if isinstance(cfg, dict | str):
            return canonical_json(cfg)
    return "" if variant is None else canonical_json(variant)


@dataclass
class Run:
    """What a task runner gets."""

    spec: TaskSpec
    cfg: EvalConfig
    store: Store
    model: Any  # tinytitan.Model
    lm: Any  # RuntimeLM
    name: str
    variant: Any
    variant_json: str
    reporter: Reporter
    prepared: dict[str, Any] = field(default_factory=dict)  # what `prepare` found (docs, tokens, ...)
    scope: str = ""
    ident: JobIdentity | None = None


# -- multiple choice / loglikelihood ---------------------------------------------------------------------
def _prepare_mc(r: Run) -> dict[str, Any]:
    from tinytitan.eval.data import load_docs

    docs = load_docs(r.spec.name, r.spec.data, r.cfg.data, r.cfg.limit)
    r.prepared["docs"] = docs
    k = r.spec.num_fewshot if r.cfg.num_fewshot is None else r.cfg.num_fewshot
    r.prepared["num_fewshot"] = k
    return {"limit": r.cfg.limit, "num_fewshot": k, "seed": r.cfg.seed, **docs.identity()}


def _run_mc(r: Run) -> list[Metric]:
    from tinytitan.eval.multiple_choice import aggregate, build_items, score_items

    items = build_items(r.spec, r.prepared["docs"], r.prepared["num_fewshot"], r.cfg.seed, r.cfg.limit)
    done = r.store.items(r.scope)
    todo = [it for it in items if str(it.index) not in done]
    r.reporter.task_start(r.spec.name, len(items), len(items) - len(todo), "questions")
    for s in range(0, len(todo), MC_CHUNK):
        chunk = todo[s : s + MC_CHUNK]
        records = score_items(r.lm, chunk)
        r.store.save_items(r.scope, records)
        done.update(records)
        r.reporter.advance(len(chunk))
    records = [done[str(it.index)] for it in items]
    return [Metric(m, v, se, n) for m, v, se, n in aggregate(r.spec, records)]


# -- perplexity -------------------------------------------------------------------------------------------
def _text_tokens(r: Run, model) -> list[int]:
    from tinytitan.eval.data import load_docs

    docs = load_docs(r.spec.name, r.spec.data, r.cfg.data, r.cfg.limit)
    r.prepared["docs"] = docs
    return model.tokenizer.encode(docs.docs[0]["text"])  # BOS first where the model adds it (llama.cpp)


def _prepare_ppl(r: Run) -> dict[str, Any]:
    from tinytitan.eval.perplexity import windows

    p = r.spec.params
    n_ctx, stride = int(p.get("n_ctx", 512)), p.get("stride")
    if n_ctx > r.model.ctx:
        raise ContextLengthError(
            f"{r.spec.name}: n_ctx {n_ctx} is beyond the model's context of {r.model.ctx}"
        )
    tokens = _text_tokens(r, r.model)
    bos = r.model.tokenizer.bos_id if r.model.tokenizer.add_bos else None
    ws = windows(tokens, n_ctx, bos, stride, r.cfg.limit)
    docs = r.prepared["docs"]
    if docs.origin.startswith("pack") and r.cfg.limit is not None and len(ws) < r.cfg.limit:
        raise DataError(
            f"{r.spec.name}: the embedded pack's text makes {len(ws)} windows of {n_ctx} tokens for this "
            f"model, fewer than --limit {r.cfg.limit}; pass --data DIR (a folder holding "
            f"{r.spec.data.get('local', {}).get('path', 'the text')}) or a smaller --limit"
        )
    r.prepared["windows"] = ws
    return {"limit": r.cfg.limit, "n_ctx": n_ctx, "stride": stride, **docs.identity()}


def _run_ppl(r: Run) -> list[Metric]:
    from tinytitan.eval.perplexity import NLLStats, from_stats, mean_and_uncertainty, window_stats

    ws = r.prepared["windows"]
    done = r.store.items(r.scope)
    r.reporter.task_start(r.spec.name, len(ws), sum(str(w.index) in done for w in ws), "windows")
    for w in ws:
        if str(w.index) in done:
            continue
        s = window_stats(r.lm, w)
        done[str(w.index)] = s.to_list()
        r.store.save_items(r.scope, {str(w.index): s.to_list()})
        r.reporter.advance(1)
    stats = NLLStats.merge(NLLStats(int(done[str(w.index)][0]), *done[str(w.index)][1:]) for w in ws)
    p = r.spec.params
    res = from_stats(stats, len(ws), int(p.get("n_ctx", 512)), p.get("stride"))
    _, nll_unc = mean_and_uncertainty(stats)
    extra = {"windows": len(ws), "n_ctx": res.n_ctx, "stride": res.stride}
    return [
        Metric("ppl", res.ppl, res.ppl_stderr, res.n_tokens, extra),
        Metric("nll", res.nll, nll_unc, res.n_tokens, {**extra, "unit": "nats/token"}),
    ]


# -- KL divergence ------------------------------------------------------------------------------------------
def _reference(r: Run) -> tuple[str, Any, str, bool]:
    """(reference name, variant, identity text, is it the evaluated model itself), without loading it."""
    from tinytitan import zoo
    from tinytitan.runtime import Source

    if r.cfg.reference_model is not None:
        ref = r.cfg.reference_model
        vjson = variant_config(ref, None)
        same = ref.source.sha256 == r.model.source.sha256 and vjson == r.variant_json
        return ref.source.name, None, canonical_json([ref.source.sha256, vjson]), same
    name = r.cfg.reference or r.name
    variant = r.cfg.reference_variant
    ref_vjson = "" if variant is None else canonical_json(variant)
    artifact = getattr(r.model, "artifact", None)
    if r.cfg.reference is None and variant is None and artifact is not None:
        src = artifact["source"]  # a quantized artifact is compared with the file it was made from
        name = src["path"] if Path(src["path"]).exists() else src["name"]
        return name, None, canonical_json([src["sha256"], ""]), False
    if name == r.name and ref_vjson == r.variant_json:
        return name, variant, canonical_json([r.model.source.sha256, r.variant_json]), True
    path = zoo.resolve(name)
    sha = Source(path=path, kind="", name=name).sha256  # the same file hash a loaded model reports
    return name, variant, canonical_json([sha, ref_vjson]), False


def _prepare_kld(r: Run) -> dict[str, Any]:
    from tinytitan.eval.kld import DEFAULT_TOP_K, MODES

    opts = _prepare_ppl(r)
    opts.pop("stride", None)
    r.prepared["reference"] = _reference(r)
    mode = str(r.spec.params.get("cache", "hidden"))
    if mode not in MODES:
        raise TaskError(f"{r.spec.path}: kld cache must be one of {', '.join(MODES)}; got {mode!r}")
    top_k = int(r.spec.params.get("top_k", DEFAULT_TOP_K))
    r.prepared.update(mode=mode, top_k=top_k)
    return {
        **opts,
        "cache": mode,
        **({"top_k": top_k} if mode == "topk" else {}),
        "reference": r.prepared["reference"][2],
    }


def _load_reference(r: Run):
    """The reference model (the evaluated one when they are the same), checked to share the tokenizer."""
    name, variant, _, same = r.prepared["reference"]
    if same:
        return r.lm
    from tinytitan.eval.api import RuntimeLM

    if r.cfg.reference_model is not None:
        ref = r.cfg.reference_model
    else:
        r.reporter.note(f"kld: loading the reference {name}")
        ref = load_model(name, variant, dtype=_dtype_name(r.model), device=str(r.model.device))
    probe = "Tokenizer check: 12 apples, naïve café."
    if (
        ref.tokenizer.encode(probe) != r.model.tokenizer.encode(probe)
        or ref.config.vocab_size != r.model.config.vocab_size
    ):
        raise TaskError(f"kld: the reference {name} does not share the model's tokenizer")
    return RuntimeLM(ref, batch_size=r.cfg.batch_size)


def _run_kld(r: Run) -> list[Metric]:
    from tinytitan.eval import kld

    ws = r.prepared["windows"]
    name, _, ident, _ = r.prepared["reference"]
    mode, top_k = r.prepared["mode"], r.prepared["top_k"]
    tokens = [t for w in ws for t in w.targets]
    d = kld.cache_dir(r.store.folder, ident, tokens, int(r.spec.params.get("n_ctx", 512)), mode, top_k)
    ref_lm = None
    done = r.store.items(r.scope)
    same = r.prepared["reference"][3]
    missing = kld.missing_windows(d, ws)
    if missing:
        ref_lm = _load_reference(r)
        r.reporter.task_start("kld reference", len(ws), len(ws) - len(missing), "windows")
        for w in missing:
            lp = kld.cache_window(ref_lm, w, d, mode, top_k)
            if same and str(w.index) not in done:  # the model is its reference: that pass is its own too
                part = kld.kld_window(r.lm, w, d, ref_lm.model, q_all=lp).to_json()
                done[str(w.index)] = part
                r.store.save_items(r.scope, {str(w.index): part})
            r.reporter.advance(1)
    todo = [w for w in ws if str(w.index) not in done]
    if todo and mode == "hidden" and ref_lm is None:
        ref_lm = _load_reference(r)  # its output head rebuilds the full reference distributions
    r.reporter.task_start(r.spec.name, len(ws), len(ws) - len(todo), "windows")
    for w in todo:
        part = kld.kld_window(r.lm, w, d, ref_lm.model if ref_lm is not None else None).to_json()
        done[str(w.index)] = part
        r.store.save_items(r.scope, {str(w.index): part})
        r.reporter.advance(1)
    parts = [kld.KLDWindow.from_json(done[str(w.index)]) for w in ws]
    n = sum(len(p.kld) for p in parts)
    extra_all = {"reference": name, "cache": str(d), "mode": mode}
    return [
        Metric(k, v, unc, n, {**extra_all, "unit": unit} if unit else extra_all)
        for k, (v, unc, unit) in kld.summarize(parts).items()
    ]


def _dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


# -- long context -------------------------------------------------------------------------------------------
def _prepare_long(r: Run) -> dict[str, Any]:
    from tinytitan.eval.data import sha256_files

    p = r.spec.params
    max_tokens = int(p.get("max_tokens", 16))
    if r.cfg.lengths:
        too_long = [L for L in r.cfg.lengths if r.model.ctx < L]
        if too_long:
            raise ContextLengthError(
                f"{r.spec.name}: length {too_long[0]} is beyond the model's context of {r.model.ctx} tokens"
                f" (lengths up to {r.model.ctx} can be tested)"
            )
        lengths = sorted(set(r.cfg.lengths))
    else:
        lengths = [L for L in p["lengths"] if r.model.ctx >= L]
        dropped = [L for L in p["lengths"] if r.model.ctx < L]
        if dropped:
            r.reporter.note(f"{r.spec.name}: lengths {dropped} skipped (beyond the model's {r.model.ctx})")
    if not lengths:
        raise ContextLengthError(f"{r.spec.name}: no length fits the model's context of {r.model.ctx} tokens")
    depths = sorted(set(r.cfg.depths if r.cfg.depths is not None else p["depths"]))
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise TaskError(f"{r.spec.name}: depths must be between 0 and 1; got {depths}")
    samples = int(r.cfg.samples or p.get("samples", 1))  # prompts per (length, depth) cell
    if r.cfg.limit is not None:
        samples = min(samples, int(r.cfg.limit))
    hay = "filler"
    if r.cfg.haystack and p["generator"] != "kv_retrieval":
        hay = sha256_files([Path(r.cfg.haystack).expanduser()])[:16]
    r.prepared.update(lengths=lengths, depths=depths, samples=samples, max_tokens=max_tokens)
    return {
        "lengths": lengths,
        "depths": depths,
        "limit": samples,
        "haystack": hay,
        "seed": r.cfg.seed,
        "max_tokens": max_tokens,
    }


def _run_long(r: Run) -> list[Metric]:
    from tinytitan.eval import longcontext as lc
    from tinytitan.eval.api import GenerateRequest

    p, pr = r.spec.params, r.prepared
    tok = r.model.tokenizer
    hay = lc.Haystack.from_file(tok, r.cfg.haystack) if r.cfg.haystack else lc.Haystack(tok, lc.FILLER)
    cells = [(L, d, s) for L in pr["lengths"] for d in pr["depths"] for s in range(pr["samples"])]
    done = r.store.items(r.scope)
    key = lambda L, d, s: f"{L}:{d:.4f}:{s}"  # noqa: E731
    todo = [c for c in cells if key(*c) not in done]
    r.reporter.task_start(r.spec.name, len(cells), len(cells) - len(todo), "prompts")
    for L, d, s in todo:
        rng = random.Random(f"{r.cfg.seed}:{r.spec.name}:{L}:{d:.4f}:{s}")
        target = min(L, r.model.ctx - pr["max_tokens"])  # leave room for the answer at the context's end
        sample = lc.build_sample(r.spec.name, p["generator"], tok, target, d, rng, p, hay)
        out = r.lm.generate_until([GenerateRequest(sample.prompt_ids, sample.stop, pr["max_tokens"])])[0]
        rec = {
            **lc.score(sample, out),
            "tokens": sample.length,
            "output": out[:200],
            "answers": sample.answers,
        }
        r.store.save_items(r.scope, {key(L, d, s): rec})
        done[key(L, d, s)] = rec
        r.reporter.advance(1)
    metrics: list[Metric] = []
    want = [m for m in ("exact_match", "score") if m in r.spec.metrics] or ["exact_match"]

    def mean(vals: list[float]) -> tuple[float, float]:
        from tinytitan.eval.multiple_choice import mean_stderr

        return sum(vals) / len(vals), mean_stderr(vals)

    grid: dict[tuple[int, float], float] = {}
    for m in want:
        allv = [done[key(*c)][m] for c in cells]
        v, se = mean(allv)
        metrics.append(Metric(m, v, se, len(allv), {"lengths": pr["lengths"], "depths": pr["depths"]}))
        for L in pr["lengths"]:
            vals = [done[key(L, d, s)][m] for d in pr["depths"] for s in range(pr["samples"])]
            v, se = mean(vals)
            metrics.append(Metric(f"{m}@len={L}", v, se, len(vals), {"length": L}))
        for L in pr["lengths"]:
            for d in pr["depths"]:
                vals = [done[key(L, d, s)][m] for s in range(pr["samples"])]
                toks = [done[key(L, d, s)]["tokens"] for s in range(pr["samples"])]
                v, se = mean(vals)
                if m == want[0]:
                    grid[(L, d)] = v
                metrics.append(
                    Metric(
                        f"{m}@len={L},depth={d:.2f}",
                        v,
                        se,
                        len(vals),
                        {"length": L, "depth": d, "prompt_tokens": toks},
                    )
                )
    folder = r.cfg.heatmap_dir or (r.store.folder / "heatmaps")
    vlabel = _variant_label(r)
    label = f"{Path(r.name).name} ({vlabel})"
    png = folder / f"{r.spec.name}-{Path(r.name).name}-{vlabel.replace('/', '_')}.png"
    try:
        lc.heatmap({label: grid}, png, f"{r.spec.name}", want[0])
        metrics[0] = Metric(
            metrics[0].name,
            metrics[0].value,
            metrics[0].stderr,
            metrics[0].n,
            {**metrics[0].extra, "heatmap": str(png)},
        )
    except ImportError:
        r.reporter.note("matplotlib is not installed: no heatmap drawn")
    return metrics


def _variant_label(r: Run) -> str:
    if not r.variant_json:
        return "base"
    if isinstance(r.variant, str):
        return r.variant
    name = json.loads(r.variant_json).get("name") if r.variant_json.startswith("{") else None
    return str(name or (r.ident.variant_hash if r.ident else "variant"))


# -- efficiency -----------------------------------------------------------------------------------------
def _prepare_speed(r: Run) -> dict[str, Any]:
    p = r.spec.params
    contexts = r.cfg.contexts or list(p["contexts"])
    too_long = [c for c in contexts if c > r.model.ctx]
    if too_long:
        raise ContextLengthError(
            f"speed: context {too_long[0]} is beyond the model's context of {r.model.ctx}"
        )
    decode = r.cfg.decode_tokens or int(p.get("decode_tokens", 32))
    watts = r.cfg.core_watts if r.cfg.core_watts is not None else float(p.get("core_watts", 10.0))
    r.prepared.update(contexts=contexts, decode=decode, watts=watts)
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


def _run_speed(r: Run) -> list[Metric]:
    from tinytitan.eval import efficiency as ef

    pr = r.prepared
    r.reporter.task_start(r.spec.name, 1, 0, "measurements")
    args = (
        str(r.model.source.path),
        r.variant,
        pr["contexts"],
        pr["decode"],
        pr["watts"],
        _dtype_name(r.model),
        str(r.model.device),
        None,
    )
    # a quantize() output in memory cannot be loaded again elsewhere; a saved artifact can
    in_memory = r.variant is None and bool(r.variant_json) and r.model.source.kind != "artifact"
    fresh = not (r.cfg.speed_in_process or in_memory)
    e = ef.measure_in_subprocess(*args) if fresh else ef.measure(*args, model=r.model)
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


RUNNERS: dict[str, tuple[Callable[[Run], dict[str, Any]], Callable[[Run], list[Metric]]]] = {
    "multiple_choice": (_prepare_mc, _run_mc),
    "loglikelihood": (_prepare_mc, _run_mc),
    "perplexity": (_prepare_ppl, _run_ppl),
    "kld": (_prepare_kld, _run_kld),
    "longcontext": (_prepare_long, _run_long),
    "efficiency": (_prepare_speed, _run_speed),
    "generate": (prepare_generate, run_generate),
}


def evaluate(
    model: Any,
    tasks: str | list[str] | list[TaskSpec],
    *,
    variant: Any = None,
    config: EvalConfig | None = None,
    store: Store | str | Path | None = None,
    reporter: Reporter | None = None,
    name: str | None = None,
    lm: Any = None,
) -> list[ResultRow]:
    """Run `tasks` on `model` (a zoo name, a path, or a loaded tinytitan Model) and return the rows.

    variant: passed to `tinytitan.load(..., variant=...)` when `model` is a name, and recorded in the rows.
    """
    from tinytitan import __version__
    from tinytitan.eval.api import RuntimeLM

    cfg = config or EvalConfig()
    rep = reporter or Reporter()
    specs = (
        tasks
        if tasks and isinstance(tasks, list) and isinstance(tasks[0], TaskSpec)
        else parse_task_list(tasks)
    )  # type: ignore[arg-type]
    own_store = not isinstance(store, Store)
    st = store if isinstance(store, Store) else Store(store or default_store_path())
    try:
        if isinstance(model, str | Path):
            name = name or str(model)
            model = load_model(str(model), variant)
        name = name or model.source.name
        vjson = variant_config(model, variant)
        lm = lm or RuntimeLM(model, batch_size=cfg.batch_size)
        machine = machine_id()
        rows: list[ResultRow] = []
        for spec in specs:
            run = Run(spec, cfg, st, model, lm, name, variant, vjson, rep)
            prepare, execute = RUNNERS[spec.type]
            try:
                options = {"dtype": _dtype_name(model), **prepare(run)}
                ident = JobIdentity(name, model.source.sha256, vjson, spec.name, spec.version, options)
                run.ident, run.scope = ident, ident.scope
                if cfg.force:
                    st.forget(ident)
                elif st.is_done(ident):
                    done_rows = st.rows(job_key=ident.job_key)
                    rep.task_end(spec.name, done_rows, True)
                    rows += done_rows
                    continue
                st.start_job(ident)
                metrics = execute(run)
            except TinyTitanError as e:  # the board shows a blank with this reason instead of a number
                skipped = isinstance(e, DataError | TaskError | ContextLengthError)
                st.note_skip(
                    name, model.source.sha256, vjson, spec.name, str(e), SKIPPED if skipped else FAILED
                )
                raise
            new_rows = st.finish_job(ident, metrics, __version__, machine)
            rep.task_end(spec.name, new_rows, False)
            rows += new_rows
        return rows
    finally:
        if own_store:
            st.close()


def rows_to_json(rows: list[ResultRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=1)
