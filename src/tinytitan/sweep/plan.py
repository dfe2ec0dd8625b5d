"""What a sweep runs: the variants of a model and the task set of a budget (quick, standard, full).

A variant is named the way `tinytitan quantize` names schemes ("w8", "w4g32-imatrix", "q4_k",
"w4g32-imatrix-kv8"), plus two sweep-only forms: "base" (the model as loaded: the reference) and
"plan:150MB" / "plan:4.0bpw" (a mixed-precision variant planned to that budget).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tinytitan.errors import TinyTitanError

BASE = "base"

# From 8 down to 3.2 bits per weight, and a budget-planned variant. The last is 108 MB on Gemma 3 270M:
# 3-bit blocks, and the embedding's rows in 4, 3 and 2 bits by use (KLD 0.56 on WikiText-2, where
# w3g64-imatrix, 117.5 MB, has 0.75). More in a sweep's --variants: the same recovered by distillation
# ("...-imatrix-kd100": KLD 0.48, +16 minutes on a 2-core AMX CPU), a KV-cache quantized one
# (w4g32-imatrix-kv8), 2.5 bits (w2g64-imatrix: unusable on Gemma 3 270M, KLD 5.4).
DEFAULT_VARIANTS = (
    BASE,
    "w8",
    "w4g32-imatrix",
    "plan:150MB",
    "w3g64-e4g32@10+3g64@30+2g64-imatrix",
)


@dataclass(frozen=True)
class TaskRun:
    """One task of a budget with the options it runs under (an `EvalConfig` subset)."""

    task: str
    options: dict[str, Any] = field(default_factory=dict)


# quick: a screen on the embedded evaluation pack (eval/pack), about two minutes per variant of Gemma 3
# 270M on a 2-core CPU: task scores of 20-30 items are +-9-11 points, so most of them are noise (the board
# says which); standard: several minutes per variant, full sets via --data; full: whole sets, 32K contexts.
BUDGETS: dict[str, tuple[TaskRun, ...]] = {
    "quick": (
        TaskRun("kld", {"limit": 3}),  # 3 windows of 512: 3 x 255 = 765 scored positions, perplexity too
        TaskRun("arc_easy", {"limit": 30}),
        TaskRun("piqa", {"limit": 20}),
        TaskRun("boolq", {"limit": 20}),
        TaskRun("passkey", {"lengths": [1024], "depths": [0.0, 0.5, 1.0]}),
        TaskRun("speed", {"contexts": [512], "decode_tokens": 32}),
    ),
    "standard": (
        TaskRun("kld", {"limit": 32}),
        TaskRun("arc_easy", {"limit": 500}),
        TaskRun("piqa", {"limit": 500}),
        TaskRun("boolq", {"limit": 500}),
        TaskRun("hellaswag", {"limit": 500}),
        TaskRun("passkey", {"lengths": [1024, 4096, 16384], "depths": [0.0, 0.25, 0.5, 0.75, 1.0]}),
        TaskRun("speed", {"contexts": [512, 4096], "decode_tokens": 64}),
    ),
    "full": (
        TaskRun("kld", {"limit": 80}),
        TaskRun("ppl", {}),
        TaskRun("arc_easy", {}),
        TaskRun("piqa", {}),
        TaskRun("boolq", {}),
        TaskRun("hellaswag", {}),
        TaskRun("passkey", {"lengths": [1024, 4096, 16384, 32768]}),
        TaskRun("niah_single", {"lengths": [1024, 4096, 16384, 32768]}),
        TaskRun("speed", {"contexts": [512, 4096, 16384], "decode_tokens": 64}),
    ),
}

_PLAN = re.compile(r"^plan:(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>mb|gb|kb|bpw)(?:-kd(?P<kd>\d+)?)?$")


@dataclass(frozen=True)
class VariantSpec:
    name: str  # as the user wrote it, normalised
    kind: str  # "base" | "scheme" | "plan"
    target_bytes: int | None = None
    target_bpw: float | None = None
    recover_steps: int = 0  # plan:...-kd: the plan recovered by distillation (quant/recover.py)

    @property
    def build_id(self) -> str:
        """What else decides the artifact: the planner's identity for plan: variants ("" otherwise)."""
        if self.kind != "plan":
            return ""
        from tinytitan.quant.mixed import planner_id

        return planner_id()

    @property
    def slug(self) -> str:
        """A folder name for the variant's artifact (a new planner plans into a new folder)."""
        name = re.sub(r"[^a-z0-9._-]+", "_", self.name)
        return f"{name}{self.build_id}" if self.build_id else name


def parse_variant_spec(text: str) -> VariantSpec:
    """'base', a quantization scheme, or 'plan:SIZE' / 'plan:BITSbpw'; errors name what is accepted."""
    from tinytitan.quant.schemes import parse_variant

    name = text.strip().lower()
    if name in (BASE, "reference", "ref"):
        return VariantSpec(BASE, "base")
    m = _PLAN.match(name)
    if m:
        from tinytitan.quant.schemes import MAX_RECOVER_STEPS, RECOVER_STEPS

        num, unit = float(m["num"]), m["unit"]
        steps = 0 if m["kd"] is None and "-kd" not in name else int(m["kd"] or RECOVER_STEPS)
        if not 0 <= steps <= MAX_RECOVER_STEPS or ("-kd" in name and steps == 0):
            raise TinyTitanError(f"variant {text!r}: recovery steps must be 1..{MAX_RECOVER_STEPS}")
        kd = f"-kd{steps}" if steps else ""
        if unit == "bpw":
            if not 1.0 < num <= 16.0:
                raise TinyTitanError(f"variant {text!r}: bits per weight must be between 1 and 16")
            return VariantSpec(f"plan:{num:g}bpw{kd}", "plan", target_bpw=num, recover_steps=steps)
        scale = {"kb": 1e3, "mb": 1e6, "gb": 1e9}[unit]
        size = int(num * scale)
        return VariantSpec(f"plan:{num:g}{unit.upper()}{kd}", "plan", target_bytes=size, recover_steps=steps)
    if name.startswith("plan:"):
        raise TinyTitanError(
            f"variant {text!r}: write a plan as plan:150MB or plan:4.0bpw (recovered: plan:150MB-kd)"
        )
    parse_variant(name)  # unknown schemes fail here, listing the known ones
    return VariantSpec(name, "scheme")


def parse_variants(texts: list[str] | str | None) -> list[VariantSpec]:
    if texts is None:
        texts = list(DEFAULT_VARIANTS)
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()]
    out: list[VariantSpec] = []
    for t in texts:
        v = parse_variant_spec(t)
        if v not in out:
            out.append(v)
    if not out:
        raise TinyTitanError("no variants to sweep")
    return out


def budget_tasks(budget: str, tasks: list[str] | str | None = None) -> list[TaskRun]:
    """The budget's task set, or the named tasks with the budget's options where it has them."""
    if budget not in BUDGETS:
        raise TinyTitanError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
    runs = list(BUDGETS[budget])
    if tasks is None:
        return runs
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    from tinytitan.eval.registry import parse_task_list

    parse_task_list(names)  # unknown tasks fail here, listing the known ones
    known = {r.task: r for r in runs}
    return [known.get(n, TaskRun(n, {})) for n in names]
