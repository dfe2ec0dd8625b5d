"""KL divergence of a model against a reference, the way llama.cpp's `--kl-divergence` reports it.

The reference runs once over the perplexity windows (llama.cpp's default method: windows of n_ctx, second
half scored) and what KLD needs is cached next to the results store as safetensors, one file per window
(written atomically, so an interrupted build resumes per window). A full vocabulary of log-probs is too big
to keep (Gemma 3: 262,144 floats per token, ~77 GB for WikiText-2), so by default (`cache: hidden`) each
scored position keeps the *input of the reference's output head* (its final normalized hidden state: 640
floats for Gemma 3 270M, 2.5 KB per token), plus the log-prob of the next token and the reference's top
token. At KLD time the reference's own output head turns those back into its full distribution: exactly
the reference's log-probs, so the KLD is exact over the whole vocabulary, for 1/400 of the storage. (The
head is a single matrix product; the transformer body of the reference is never run again.)

`cache: topk` keeps instead the top-k token ids and log-probs (float32, k = `top_k`) and lumps the rest of
the vocabulary into one outcome: KLD = sum_topk p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),
the exact KL of the distributions coarsened to k + 1 outcomes, a lower bound of the true KLD (measured on
WikiText-2 with a 4-bit variant: 20 % low for Gemma 3 270M and 29 % low for SmolLM2 at k = 64). It needs
no reference model at KLD time.

Per scored token, with P the reference and Q the evaluated model: KLD = sum_i p_i (log p_i - log q_i);
Δp = q(next token) - p(next token); same top = argmax Q == argmax P. Aggregates as llama.cpp: mean ±
sqrt((E[x^2] - E[x]^2) / (n - 1)) (uncertainty 0 for n <= 10); percentiles interpolate linearly between
sorted values at fraction * (n - 1); same-top share ± sqrt(p(1 - p) / (n - 1)); PPL(Q), PPL(P) and
ln(PPL(Q)/PPL(P)) with its covariance-corrected uncertainty.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tinytitan.errors import TaskError
from tinytitan.eval.perplexity import NLLStats, Window, mean_and_uncertainty, scored_log_probs
from tinytitan.eval.run_state import dtype_name, variant_config
from tinytitan.io.folders import atomic_path
from tinytitan.store import Metric, canonical_json

if TYPE_CHECKING:
    from tinytitan.eval.run_state import Run

CACHE_VERSION = 2
MODES = ("hidden", "topk")
DEFAULT_TOP_K = 64
_CHUNK = 64  # positions per step when rebuilding full distributions (bounds memory at 262k vocab)


def cache_dir(folder: Path, ref_identity: str, tokens: list[int], n_ctx: int, mode: str, top_k: int) -> Path:
    """The reference cache of one (reference model+variant, token sequence, n_ctx, mode)."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, ref_identity, n_ctx, mode, top_k if mode == "topk" else 0]).encode())
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return folder / "kld_ref" / h.hexdigest()[:32]


def _window_file(d: Path, w: Window) -> Path:
    return d / f"w{w.index:06d}.safetensors"


def missing_windows(d: Path, ws: list[Window]) -> list[Window]:
    return [w for w in ws if not _window_file(d, w).exists()]


def cache_window(
    lm_ref, w: Window, d: Path, mode: str = "hidden", top_k: int = DEFAULT_TOP_K
) -> torch.Tensor:
    """Run the reference on one window and store what KLD needs (atomic write); returns its log-probs.
    mode "hidden": the head's inputs; "topk": the top-k log-probs (top_k = 0: the full vocabulary)."""
    lp = scored_log_probs(lm_ref, w)  # [n, V]
    targets = torch.tensor(w.targets[w.first + 1 :], dtype=torch.long)
    tensors = {
        "target_logp": lp.gather(-1, targets[:, None])[:, 0].float().contiguous(),
        "top": lp.argmax(-1).to(torch.int32).contiguous(),
    }
    if mode == "hidden":
        tensors["hidden"] = lm_ref.last_hidden[0][:-1].contiguous()  # positions first .. n_ctx - 2
    elif top_k > 0:
        vals, idx = torch.topk(lp, min(top_k, lp.shape[-1]), dim=-1)
        tensors["topk_logp"] = vals.float().contiguous()
        tensors["topk_idx"] = idx.to(torch.int32).contiguous()
    else:
        tensors["logp"] = lp.float().contiguous()
    with atomic_path(_window_file(d, w)) as tmp:
        meta = {"version": str(CACHE_VERSION), "mode": mode, "top_k": str(top_k)}
        save_file(tensors, str(tmp), metadata=meta)
    return lp


@dataclass
class KLDWindow:
    """Everything one window contributes; merged exactly across windows (and resumed runs)."""

    nll: NLLStats  # of Q
    nll_base: NLLStats  # of P
    sum_nll_nll_base: float
    kld: list[float]
    dp: list[float]  # Δp per token (probability, not %)
    same_top: int

    def to_json(self) -> dict:
        return {
            "nll": self.nll.to_list(),
            "nll_base": self.nll_base.to_list(),
            "cross": self.sum_nll_nll_base,
            "kld": self.kld,
            "dp": self.dp,
            "same_top": self.same_top,
        }

    @classmethod
    def from_json(cls, d: dict) -> KLDWindow:
        return cls(
            NLLStats(int(d["nll"][0]), d["nll"][1], d["nll"][2]),
            NLLStats(int(d["nll_base"][0]), d["nll_base"][1], d["nll_base"][2]),
            d["cross"],
            list(d["kld"]),
            list(d["dp"]),
            int(d["same_top"]),
        )


@torch.inference_mode()
def _reference_log_probs(ref_model, hidden: torch.Tensor) -> torch.Tensor:
    """The reference's full log-probs from its head's inputs [n, D] -> float64 [n, V]."""
    out = ref_model.module.lm_head(hidden.to(ref_model.device)[None])[0]
    return torch.log_softmax(out.double().cpu(), dim=-1)


def kld_window(lm, w: Window, d: Path, ref_model=None, q_all: torch.Tensor | None = None) -> KLDWindow:
    """lm: the evaluated model's RuntimeLM; ref_model: the reference Model (needed by mode "hidden");
    q_all: the evaluated model's log-probs on this window when already computed (the reference measured
    against itself: the pass that filled the cache)."""
    ref = load_file(str(_window_file(d, w)))
    if q_all is None:
        q_all = scored_log_probs(lm, w)  # [n, V] float32
    targets = torch.tensor(w.targets[w.first + 1 :], dtype=torch.long)
    nll = -q_all.double().gather(-1, targets[:, None])[:, 0]
    nll_base = -ref["target_logp"].double()
    top_ref = ref["top"].long()
    klds = []
    for s in range(0, q_all.shape[0], _CHUNK):
        q = q_all[s : s + _CHUNK].double()
        if "hidden" in ref:
            if ref_model is None:
                raise ValueError("this KLD cache keeps hidden states: the reference's output head is needed")
            p_log = _reference_log_probs(ref_model, ref["hidden"][s : s + _CHUNK])
            klds.append((p_log.exp() * (p_log - q)).sum(-1))
        elif "logp" in ref:  # full vocabulary
            p_log = ref["logp"][s : s + _CHUNK].double()
            klds.append((p_log.exp() * (p_log - q)).sum(-1))
        else:
            p_log = ref["topk_logp"][s : s + _CHUNK].double()
            idx = ref["topk_idx"][s : s + _CHUNK].long()
            q_k = q.gather(-1, idx)
            p_k = p_log.exp()
            part = (p_k * (p_log - q_k)).sum(-1)
            p_tail = (1.0 - p_k.sum(-1)).clamp_min(0.0)
            q_tail = (1.0 - q_k.exp().sum(-1)).clamp_min(1e-30)
            tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()), 0.0)
            klds.append(part + tail)
    kld = torch.cat(klds)
    same = int((q_all.argmax(-1) == top_ref).sum())
    dp = (-nll).exp() - (-nll_base).exp()
    return KLDWindow(
        nll=NLLStats.of(nll),
        nll_base=NLLStats.of(nll_base),
        sum_nll_nll_base=float((nll * nll_base).sum()),
        kld=[float(x) for x in kld],
        dp=[float(x) for x in dp],
        same_top=same,
    )


def _mean_unc(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    s = NLLStats(n, float(values.sum()), float((values * values).sum()))
    mean, unc = mean_and_uncertainty(s)
    return mean, (unc if n > 10 else 0.0)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    j = min(i + 1, len(sorted_values) - 1)
    return float((1 - p) * sorted_values[i] + p * sorted_values[j])


def summarize(parts: list[KLDWindow]) -> dict[str, tuple[float, float | None, str]]:
    """metric -> (value, uncertainty or None, unit), as llama.cpp's KL divergence statistics."""
    kld = np.sort(np.array([x for p in parts for x in p.kld], dtype=np.float64))
    dp = np.array([x for p in parts for x in p.dp], dtype=np.float64)
    n = len(kld)
    nll = NLLStats.merge(p.nll for p in parts)
    base = NLLStats.merge(p.nll_base for p in parts)
    cross = sum(p.sum_nll_nll_base for p in parts)
    ln_q, ln_q_unc = mean_and_uncertainty(nll)
    ln_b, ln_b_unc = mean_and_uncertainty(base)
    cov = (cross / n - (nll.sum / n) * (base.sum / n)) / (n - 1) if n >= 10 else 0.0
    ratio_unc = math.sqrt(max(ln_q_unc**2 + ln_b_unc**2 - 2 * cov, 0.0))
    kld_mean, kld_unc = _mean_unc(kld)
    dp_mean, dp_unc = _mean_unc(dp)
    mse, mse_unc = _mean_unc(dp * dp)
    rms = math.sqrt(mse)
    same = sum(p.same_top for p in parts) / n
    median = float(kld[n // 2]) if n % 2 else float(0.5 * (kld[n // 2] + kld[n // 2 - 1]))
    return {
        "kld_mean": (kld_mean, kld_unc, "nats"),
        "kld_median": (median, None, "nats"),
        "kld_p90": (_percentile(kld, 0.90), None, "nats"),
        "kld_p99": (_percentile(kld, 0.99), None, "nats"),
        "kld_max": (float(kld[-1]), None, "nats"),
        "delta_p_mean": (100 * dp_mean, 100 * dp_unc, "%"),
        "delta_p_rms": (100 * rms, 100 * (0.5 / rms * mse_unc if rms > 0 else 0.0), "%"),
        "same_top_p": (100 * same, 100 * math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0, "%"),
        "ppl": (math.exp(ln_q), math.exp(ln_q) * ln_q_unc, ""),
        "ppl_ref": (math.exp(ln_b), math.exp(ln_b) * ln_b_unc, ""),
        "ln_ppl_ratio": (ln_q - ln_b, ratio_unc, ""),
    }


# -- the task kind: preparation (options of its job identity) and scoring, for eval/runner.py ------------
@dataclass
class KldState:
    windows: list  # eval.perplexity.Window
    reference: tuple[str, Any, str, bool]  # (name, variant, identity text, is it the evaluated model)
    mode: str
    top_k: int


def _reference(r: Run) -> tuple[str, Any, str, bool]:
    """(reference name, variant, identity text, is it the evaluated model itself), without loading it."""
    from tinytitan import zoo
    from tinytitan.runtime import checkpoint_sha256

    if r.cfg.reference_model is not None:
        ref = r.cfg.reference_model
        vjson = variant_config(ref, None)
        same = ref.source.sha256 == r.model.source.sha256 and vjson == r.variant_json
        return ref.source.name, None, canonical_json([ref.source.sha256, vjson]), same
    name = r.cfg.reference or r.name
    variant = r.cfg.reference_variant
    ref_vjson = "" if variant is None else canonical_json(variant)
    artifact = r.model.artifact
    if r.cfg.reference is None and variant is None and artifact is not None:
        src = artifact["source"]  # a quantized artifact is compared with the file it was made from
        name = src["path"] if Path(src["path"]).exists() else src["name"]
        return name, None, canonical_json([src["sha256"], ""]), False
    if name == r.name and ref_vjson == r.variant_json:
        return name, variant, canonical_json([r.model.source.sha256, r.variant_json]), True
    path = zoo.resolve(name)
    sha = checkpoint_sha256(path)  # the same file hash a loaded model reports
    return name, variant, canonical_json([sha, ref_vjson]), False


def prepare_task(r: Run) -> dict[str, Any]:
    from tinytitan.eval import perplexity

    opts = perplexity.prepare_task(r)
    opts.pop("stride", None)
    reference = _reference(r)
    mode = str(r.spec.params.get("cache", "hidden"))
    if mode not in MODES:
        raise TaskError(f"{r.spec.path}: kld cache must be one of {', '.join(MODES)}; got {mode!r}")
    top_k = int(r.spec.params.get("top_k", DEFAULT_TOP_K))
    r.state = KldState(r.state.windows, reference, mode, top_k)
    return {
        **opts,
        "cache": mode,
        **({"top_k": top_k} if mode == "topk" else {}),
        "reference": reference[2],
    }


def _load_reference(r: Run):
    """The reference model (the evaluated one when they are the same), checked to share the tokenizer."""
    name, variant, _, same = r.state.reference
    if same:
        return r.lm
    from tinytitan.eval.api import RuntimeLM
    from tinytitan.eval.loading import load_model

    if r.cfg.reference_model is not None:
        ref = r.cfg.reference_model
    else:
        r.reporter.note(f"kld: loading the reference {name}")
        ref = load_model(name, variant, dtype=dtype_name(r.model), device=str(r.model.device))
    probe = "Tokenizer check: 12 apples, naïve café."
    if (
        ref.tokenizer.encode(probe) != r.model.tokenizer.encode(probe)
        or ref.config.vocab_size != r.model.config.vocab_size
    ):
        raise TaskError(f"kld: the reference {name} does not share the model's tokenizer")
    return RuntimeLM(ref, batch_size=r.cfg.batch_size)


def run_task(r: Run) -> list[Metric]:
    st: KldState = r.state
    ws, mode, top_k = st.windows, st.mode, st.top_k
    name, _, ident, same = st.reference
    tokens = [t for w in ws for t in w.targets]
    d = cache_dir(r.store.folder, ident, tokens, int(r.spec.params.get("n_ctx", 512)), mode, top_k)
    ref_lm = None
    done = r.store.items(r.scope)
    missing = missing_windows(d, ws)
    if missing:
        ref_lm = _load_reference(r)
        r.reporter.task_start("kld reference", len(ws), len(ws) - len(missing), "windows")
        for w in missing:
            lp = cache_window(ref_lm, w, d, mode, top_k)
            if same and str(w.index) not in done:  # the model is its reference: that pass is its own too
                part = kld_window(r.lm, w, d, ref_lm.model, q_all=lp).to_json()
                done[str(w.index)] = part
                r.store.save_items(r.scope, {str(w.index): part})
            r.reporter.advance(1)
    todo = [w for w in ws if str(w.index) not in done]
    if todo and mode == "hidden" and ref_lm is None:
        ref_lm = _load_reference(r)  # its output head rebuilds the full reference distributions
    r.reporter.task_start(r.spec.name, len(ws), len(ws) - len(todo), "windows")
    for w in todo:
        part = kld_window(r.lm, w, d, ref_lm.model if ref_lm is not None else None).to_json()
        done[str(w.index)] = part
        r.store.save_items(r.scope, {str(w.index): part})
        r.reporter.advance(1)
    parts = [KLDWindow.from_json(done[str(w.index)]) for w in ws]
    n = sum(len(p.kld) for p in parts)
    extra_all = {"reference": name, "cache": str(d), "mode": mode}
    return [
        Metric(k, v, unc, n, {**extra_all, "unit": unit} if unit else extra_all)
        for k, (v, unc, unit) in summarize(parts).items()
    ]
