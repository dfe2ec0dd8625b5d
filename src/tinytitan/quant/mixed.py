"""Mixed precision to a byte budget.

1. Candidates per tensor: the source's own blocks ("keep", lossless) and lower-bit schemes; for the tied
   embedding/head also row tiers (its most used rows in more bits than the rest).
2. Sensitivity: the KL divergence from the reference on calibration tokens when that tensor alone is
   replaced by a candidate (the model below the tensor's layer is reused, only the rest is re-run),
   over the tokens in the reference's top 64 at some calibration position (renormalised among them).
3. Plan: the per-tensor choice with the least total predicted loss (sum of sensitivities) whose total
   size fits the budget - a multiple-choice knapsack solved by a Lagrangian sweep plus a greedy fill.
4. The plan is printed with its predicted loss, then the assembled model's KL is measured on held-out
   calibration tokens and printed beside the prediction.

Sensitivities are cached per model, method, calibration text and candidate set; for the embedded models
with their shipped calibration text they ship too (`tinytitan/precomputed/plans/`, measured by
`measure_sensitivities` through scripts/make_precomputed.py), as llama.cpp users ship an importance
matrix beside a model: measuring them takes tens of minutes on a 2-core CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from tinytitan import zoo
from tinytitan.errors import TinyTitanError
from tinytitan.io.folders import atomic_write_text
from tinytitan.models.cache import KVCache
from tinytitan.quant.api import linear_names, quantize_weight
from tinytitan.quant.calib import calibration_sequences, collect_stats
from tinytitan.quant.modules import QuantEmbedding, QuantLinear
from tinytitan.quant.recover import RecoverSettings, recover
from tinytitan.quant.schemes import QuantConfig, TensorScheme, parse_variant
from tinytitan.quant.stored import (
    StoredTensor,
    assemble_quantized,
    float_weight,
    param_counts,
    runtime_matrix,
)

BLOCK_CANDIDATES = ("keep", "w8", "w4g32", "w3g32")
EMBEDDING_CANDIDATES = (
    *("keep", "w8", "w4g32", "w4g64", "w4g128", "w3g32"),
    # row tiers (row_tiers.py): the rows the calibration text uses most get the bits
    *("8@10+4g32", "8@10+4g32@20+3g32", "8@10+4g32@20+2g32", "8@5+4g32@25+2g32", "8@5+4g32@15+2g32"),
)
# Bump when the same budget would now be planned differently (new candidates, new selection rule): a
# sweep then builds and measures its plan: variants again instead of reusing the old artifact and rows.
PLANNER_VERSION = 2  # 2: row-tiered embedding candidates
SENS_TOKENS = 256
SENS_TOP_K = 64


class BudgetError(TinyTitanError):
    """No plan fits the requested size."""


@dataclass
class Option:
    scheme: str
    nbytes: int
    dkl: float  # KL increase when this tensor alone uses this scheme


def _scheme(name: str) -> TensorScheme:
    return parse_variant(f"keep-e{name}").embedding if "@" in name else parse_variant(name).blocks


@torch.inference_mode()
def _layer_inputs(module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Hidden state entering each block (and after the last), from the reference model."""
    x = module.embed_tokens(ids)
    if getattr(module, "embed_scale", None) is not None:
        x = x * torch.tensor(module.embed_scale, dtype=x.dtype)
    cache = KVCache.for_model(module.cfg, ids.shape[1], 1, x.dtype)
    states = [x]
    for block in module.layers:
        x = block(x, cache, 0)
        states.append(x)
    return states


@torch.inference_mode()
def _run_from(
    module, states: list[torch.Tensor], layer: int, vocab: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probs from `layer` up; with `vocab`, over those tokens only (renormalised among them)."""
    x = states[layer]
    cache = KVCache.for_model(module.cfg, x.shape[1], 1, x.dtype)
    for block in module.layers[layer:]:
        x = block(x, cache, 0)
    h = module.norm(x)[0]
    if vocab is None:
        return torch.log_softmax(module.lm_head(h).float(), dim=-1)
    head = module.lm_head
    w = head.matrix.rows(vocab) if isinstance(head, QuantLinear) else head.weight[vocab]
    return torch.log_softmax(h.float() @ w.float().T, dim=-1)


def sensitivity_vocab(ref_lp: torch.Tensor, top: int = SENS_TOP_K) -> torch.Tensor:
    """The tokens sensitivities are measured over: every token in the reference's top `top` at any
    calibration position (they hold nearly all of the probability mass; the full 262k-row head would
    cost ~50x more per candidate)."""
    return torch.unique(ref_lp.topk(top, dim=-1).indices)


def _kl(ref_lp: torch.Tensor, lp: torch.Tensor) -> float:
    return float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())


def _swap(module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


def measure_sensitivities(
    model, stats, sens_ids: list[int], method: str, console: Console
) -> tuple[dict[str, list[Option]], dict[str, dict[str, StoredTensor]]]:
    from rich.progress import Progress

    module = model.module
    ids = torch.tensor([sens_ids])
    states = _layer_inputs(module, ids)
    vocab = sensitivity_vocab(_run_from(module, states, 0))
    ref_lp = _run_from(module, states, 0, vocab)
    names = ["embed_tokens", *linear_names(module)]
    options: dict[str, list[Option]] = {}
    stored: dict[str, dict[str, StoredTensor]] = {}
    total = sum(len(EMBEDDING_CANDIDATES if n == "embed_tokens" else BLOCK_CANDIDATES) for n in names)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("sensitivity", total=total)
        for name in names:
            w = float_weight(module, name)
            cands = EMBEDDING_CANDIDATES if name == "embed_tokens" else BLOCK_CANDIDATES
            options[name], stored[name] = [], {}
            for cand in cands:
                bar.update(task, description=f"sensitivity {name} {cand}")
                m = method if cand != "keep" else "rtn"
                if name == "embed_tokens" and m == "gptq":
                    m = "imatrix"  # GPTQ over 262k rows is slow; importance-weighted rounding instead
                st = quantize_weight(
                    "lm_head" if name == "embed_tokens" else name, w, _scheme(cand), m, stats, model
                )
                stored[name][cand] = st
                if cand == "keep" and st.scheme.kind == "ggml":
                    dkl = 0.0  # the reference *is* the source's blocks, dequantized
                else:
                    matrix = runtime_matrix(st, w, model.device)
                    if name == "embed_tokens":
                        old_e = _swap(module, "embed_tokens", QuantEmbedding(matrix, cand))
                        old_h = _swap(module, "lm_head", QuantLinear(matrix, cand))
                        try:
                            lp = _run_from(module, _layer_inputs(module, ids), 0, vocab)
                        finally:
                            _swap(module, "embed_tokens", old_e)
                            _swap(module, "lm_head", old_h)
                    else:
                        layer = int(name.split(".")[1])
                        old = _swap(module, name, QuantLinear(matrix, cand))
                        try:
                            lp = _run_from(module, states, layer, vocab)
                        finally:
                            _swap(module, name, old)
                    dkl = max(_kl(ref_lp, lp), 0.0)
                options[name].append(Option(cand, st.nbytes(), dkl))
                bar.advance(task)
            if not console.is_terminal and (name == "embed_tokens" or name.endswith("down_proj")):
                console.print(f"sensitivity: {name} done")
    return options, stored


def solve(options: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """Least total dkl with total bytes <= budget (Lagrangian relaxation, then greedy upgrades)."""
    smallest = sum(min(o.nbytes for o in opts) for opts in options.values())
    if smallest > budget:
        raise BudgetError(
            f"no plan fits {budget / 1e6:.1f} MB; the smallest reachable is {smallest / 1e6:.1f} MB"
        )

    def pick(lam: float) -> dict[str, Option]:
        return {n: min(opts, key=lambda o: (o.dkl + lam * o.nbytes, o.nbytes)) for n, opts in options.items()}

    lo, hi = 0.0, 1.0
    while sum(o.nbytes for o in pick(hi).values()) > budget:
        hi *= 4
        if hi > 1e12:
            break
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(o.nbytes for o in pick(mid).values()) > budget:
            lo = mid
        else:
            hi = mid
    plan = pick(hi)
    used = sum(o.nbytes for o in plan.values())
    improved = True
    while improved:  # spend what is left on the best loss-per-byte upgrades
        improved = False
        best = None
        for n, opts in options.items():
            cur = plan[n]
            for o in opts:
                extra = o.nbytes - cur.nbytes
                if o.dkl < cur.dkl and used + extra <= budget:
                    gain = (cur.dkl - o.dkl) / max(extra, 1)
                    if best is None or gain > best[0]:
                        best = (gain, n, o, extra)
        if best:
            _, n, o, extra = best
            plan[n], used, improved = o, used + extra, True
    return plan


def plan_to_budget(
    model,
    budget_bytes: int | None = None,
    target_bpw: float | None = None,
    calib_text: str | None = None,
    method: str = "imatrix",
    console: Console | None = None,
    seed: int = 0,
    recover_steps: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
):
    """Plan, assemble and verify a mixed-precision variant. Returns the quantized Model (with .quant).

    recover_steps: then recover the plan by distillation (quant/recover.py). The plan itself is chosen
    for plain rounding: the sensitivities are measured before any training."""
    console = console or Console(stderr=True)
    module = model.module
    n_params, float_bytes = param_counts(module)
    if budget_bytes is None:
        if target_bpw is None:
            raise TinyTitanError("give a target size or bits per weight")
        budget_bytes = int(target_bpw * n_params / 8)
    seqs = calibration_sequences(model, calib_text, 4096, seed=seed)
    if len(seqs) < 2:
        raise TinyTitanError("calibration text is too short for planning: it needs two 512-token windows")
    held_out = seqs[-1][:SENS_TOKENS]
    sens_ids = seqs[0][:SENS_TOKENS]
    console.print(
        f"planning {model.source.name} to {budget_bytes / 1e6:.1f} MB "
        f"({8 * budget_bytes / n_params:.2f} bits/weight), method {method}"
    )
    stats = collect_stats(module, seqs[:-1], want_hessian=method == "gptq")
    calib_id = hashlib.sha256(json.dumps(seqs).encode()).hexdigest()[:12]
    what = [BLOCK_CANDIDATES, EMBEDDING_CANDIDATES, SENS_TOKENS, SENS_TOP_K]
    cands = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:8]
    relative = f"plans/{model.source.sha256[:16]}-{method}-{calib_id}-{cands}.json"
    cache_file, found = zoo.home() / relative, zoo.cached(relative)
    stored: dict[str, dict[str, StoredTensor]] = {}
    if found is not None:  # sensitivities depend only on model, method, calibration and candidates
        raw = json.loads(found.read_text())
        options = {n: [Option(**o) for o in opts] for n, opts in raw.items()}
        console.print(f"sensitivities from {found}")
    else:
        options, stored = measure_sensitivities(model, stats, sens_ids, method, console)
        raw = {n: [o.__dict__ for o in opts] for n, opts in options.items()}
        atomic_write_text(cache_file, json.dumps(raw))
    plan = solve(options, budget_bytes - float_bytes)
    tensors = {}
    for n, o in plan.items():
        st = stored.get(n, {}).get(o.scheme)
        if st is None:
            m = method if o.scheme != "keep" else "rtn"
            if n == "embed_tokens" and m == "gptq":
                m = "imatrix"
            w = float_weight(module, n)
            st = quantize_weight(
                "lm_head" if n == "embed_tokens" else n, w, _scheme(o.scheme), m, stats, model
            )
        tensors[f"{n}.weight"] = st
    overrides = {k: st.scheme for k, st in tensors.items()}
    config = QuantConfig(
        name=f"mixed-{budget_bytes / 1e6:.0f}MB",
        blocks=_scheme("keep"),
        embedding=overrides["embed_tokens.weight"],
        method=method,
        overrides=overrides,
    )
    qmodel = assemble_quantized(model, config, tensors)
    predicted = sum(o.dkl for o in plan.values())
    ids = torch.tensor([held_out])
    ref_lp = _run_from(module, _layer_inputs(module, ids), 0)
    q_lp = _run_from(qmodel.module, _layer_inputs(qmodel.module, ids), 0)
    sens_ref = _run_from(module, _layer_inputs(module, torch.tensor([sens_ids])), 0)
    sens_q = _run_from(qmodel.module, _layer_inputs(qmodel.module, torch.tensor([sens_ids])), 0)
    measured, measured_cal = _kl(ref_lp, q_lp), _kl(sens_ref, sens_q)
    print_plan(console, plan, options, qmodel, predicted, measured, measured_cal)
    qmodel.quant.notes.append(
        f"plan: predicted KL {predicted:.4f}, measured {measured_cal:.4f} on the "
        f"calibration tokens and {measured:.4f} on held-out tokens"
    )
    if recover_steps:
        settings = RecoverSettings(recover_steps)
        qmodel = recover(model, qmodel, settings, calib_text, progress)
        console.print(qmodel.quant.notes[-1])
    return qmodel


def print_plan(
    console: Console,
    plan: dict[str, Option],
    options: dict[str, list[Option]],
    qmodel,
    predicted: float,
    measured: float,
    measured_cal: float,
) -> None:
    kinds: dict[tuple[str, str], list[int]] = {}
    for n, o in plan.items():
        kind = n if n == "embed_tokens" else n.split(".", 2)[2]
        kinds.setdefault((kind, o.scheme), []).append(o.nbytes)
    t = Table(title="mixed-precision plan")
    for c in ("tensor kind", "scheme", "tensors", "MB"):
        t.add_column(c)
    for (kind, scheme), sizes in sorted(kinds.items()):
        t.add_row(kind, scheme, str(len(sizes)), f"{sum(sizes) / 1e6:.2f}")
    console.print(t)
    info = qmodel.quant
    console.print(
        f"size {info.file_bytes() / 1e6:.1f} MB ({info.bits_per_weight():.2f} bits/weight); "
        f"predicted KL {predicted:.4f} (sum of per-tensor sensitivities), measured KL "
        f"{measured_cal:.4f} on the calibration tokens, {measured:.4f} on held-out tokens"
    )
    if not math.isfinite(measured):
        console.print("warning: measured KL is not finite")


def planner_id() -> str:
    """Identifies what a plan for a given budget comes out as: the planner's version and candidates."""
    what = [PLANNER_VERSION, BLOCK_CANDIDATES, EMBEDDING_CANDIDATES, SENS_TOKENS, SENS_TOP_K]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:8]
