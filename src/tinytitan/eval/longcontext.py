"""Long-context probes that need no data: passkey, needles in a haystack, key-value retrieval, variable
tracking (RULER-like), over a grid of lengths x insertion depths, exact-match scored, drawn as a heatmap.

Every prompt is built to a token length: haystack sentences (a filler text, or sentences of a user's text
file, repeated as needed) are added until the prompt is as long as asked (never longer), with the needle(s)
inserted between sentences at the given depth (0 = the start of the haystack, 1 = its end). The prompt is
then encoded once, as a whole. When the length equals the model's context, the prompt is shortened by the
answer budget so that the answer fits. Prompts are seeded by (seed, task, length, depth, sample), so a
reference model and its quantized variant see identical prompts.

Scoring: the model continues greedily for `max_tokens` (stopping at a newline); each expected answer counts
as found when it appears in the output as a whole token (digits not glued to other digits, names not glued
to other letters). score = fraction found, exact_match = 1 when all are found.
"""

from __future__ import annotations

import random
import re
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tinytitan.errors import ContextLengthError, TaskError
from tinytitan.eval.run_state import variant_label
from tinytitan.io.folders import atomic_path
from tinytitan.store import Metric

if TYPE_CHECKING:
    from tinytitan.eval.run_state import Run

FILLER = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
]
_WORDS = [
    "amber",
    "apple",
    "arrow",
    "autumn",
    "badger",
    "basil",
    "beacon",
    "birch",
    "bison",
    "blossom",
    "breeze",
    "canyon",
    "cedar",
    "cobalt",
    "comet",
    "coral",
    "cotton",
    "crystal",
    "dawn",
    "delta",
    "desert",
    "ember",
    "falcon",
    "fern",
    "fjord",
    "forest",
    "garnet",
    "glacier",
    "granite",
    "harbor",
    "hazel",
    "heron",
    "indigo",
    "island",
    "ivory",
    "jasper",
    "juniper",
    "kestrel",
    "lagoon",
    "lantern",
    "lemon",
    "lilac",
    "lotus",
    "maple",
    "marble",
    "meadow",
    "meteor",
    "mint",
    "mirror",
    "moss",
    "nectar",
    "oasis",
    "ocean",
    "olive",
    "onyx",
    "orchid",
    "otter",
    "pebble",
    "pepper",
    "pine",
    "plume",
    "prairie",
    "quartz",
    "raven",
    "reef",
    "ripple",
    "river",
    "saffron",
    "sage",
    "sapphire",
    "shadow",
    "silver",
    "spruce",
    "summit",
    "thistle",
    "thunder",
    "tiger",
    "topaz",
    "tulip",
    "tundra",
    "valley",
    "velvet",
    "violet",
    "walnut",
    "willow",
    "winter",
    "zephyr",
]


@dataclass
class Sample:
    prompt_ids: list[int]
    answers: list[str]  # every one must appear in the output
    length: int  # tokens in the prompt
    depth: float
    task: str
    stop: list[str] = field(default_factory=lambda: ["\n"])


class Haystack:
    """An endless sequence of sentences (cycled) with their token counts."""

    def __init__(self, tokenizer, sentences: list[str]) -> None:
        if not sentences:
            raise TaskError("the haystack text has no sentences")
        self.tok = tokenizer
        self.sentences = sentences
        self._counts: dict[int, int] = {}

    @classmethod
    def from_file(cls, tokenizer, path: str | Path) -> Haystack:
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise TaskError(f"cannot read the haystack file {p}: {e.strerror or e}") from None
        text = re.sub(r"\s+", " ", text).strip()
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
        return cls(tokenizer, sentences)

    def sentence(self, i: int) -> str:
        return self.sentences[i % len(self.sentences)]

    def count(self, i: int) -> int:
        k = i % len(self.sentences)
        if k not in self._counts:
            self._counts[k] = len(self.tok.encode(" " + self.sentences[k], add_bos=False))
        return self._counts[k]

    def take(self, n_tokens: int, start: int = 0) -> list[str]:
        out, total, i = [], 0, start
        while True:
            c = self.count(i)
            if total + c > n_tokens:
                return out
            out.append(self.sentence(i))
            total += c
            i += 1


class _Generated(Haystack):
    """A haystack whose sentences are made on demand (the key-value pairs of kv_retrieval)."""

    def __init__(self, tokenizer, make: Callable[[int], str]) -> None:
        self.tok = tokenizer
        self.make = make
        self._cache: dict[int, str] = {}
        self.sentences = ["x"]  # unused: sentence() and count() are overridden

    def sentence(self, i: int) -> str:
        if i not in self._cache:
            self._cache[i] = self.make(i)
        return self._cache[i]

    def count(self, i: int) -> int:
        return len(self.tok.encode(" " + self.sentence(i), add_bos=False))


@dataclass
class Probe:
    """What a generator produces before fitting: fixed text around a haystack with needles at depths."""

    head: str
    tail: str
    needles: list[tuple[float, str]]  # (depth, sentence)
    answers: list[str]
    joiner: str = " "


def _key(rng: random.Random) -> str:
    return f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def passkey(rng: random.Random, params: dict) -> Probe:
    key = str(rng.randint(10000, 99999))
    return Probe(
        head="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n",
        tail="\nWhat is the pass key? The pass key is",
        needles=[(params["depth"], f"The pass key is {key}. Remember it. {key} is the pass key.")],
        answers=[key],
    )


def niah_single(rng: random.Random, params: dict) -> Probe:
    key, value = _key(rng), str(rng.randint(1_000_000, 9_999_999))
    return Probe(
        head="Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n",
        tail=f"\nWhat is the special magic number for {key} mentioned in the provided text? "
        f"The special magic number for {key} mentioned in the provided text is",
        needles=[(params["depth"], f"One of the special magic numbers for {key} is: {value}.")],
        answers=[value],
    )


def _spread(depth: float, n: int) -> list[float]:
    return [d - 1.0 if d > 1.0 else d for d in (depth + j / n for j in range(n))]


def niah_multi(rng: random.Random, params: dict) -> Probe:
    n = int(params.get("needles", 4))
    key = _key(rng)
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), n)]
    return Probe(
        head="Some special magic numbers are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the numbers afterwards.\n",
        tail=f"\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
        f"The special magic numbers for {key} mentioned in the provided text are",
        needles=[
            (d, f"One of the special magic numbers for {key} is: {v}.")
            for d, v in zip(_spread(params["depth"], n), values, strict=True)
        ],
        answers=values,
    )


def variable_tracking(rng: random.Random, params: dict) -> Probe:
    hops = int(params.get("hops", 4))
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if v not in names:
            names.append(v)
    value = str(rng.randint(10000, 99999))
    lines = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)
    ]
    d = params["depth"]
    depths = [d + (1.0 - d) * j / (hops + 1) for j in range(hops + 1)]
    return Probe(
        head="Memorize and track the chain(s) of variable assignment hidden in the following text.\n",
        tail=f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
        f"are assigned the value {value}, they are:",
        needles=list(zip(depths, lines, strict=True)),
        answers=names,
    )


def kv_retrieval(rng: random.Random, params: dict) -> Probe:
    key, value = _uuid(rng), _uuid(rng)
    return Probe(
        head="Extract the value corresponding to the specified key in the JSON object below.\n\n"
        "JSON data:\n{",
        tail=f'}}\n\nKey: "{key}"\nThe value associated with the specified key is: "',
        needles=[(params["depth"], f'"{key}": "{value}",')],
        answers=[value],
        joiner="\n",
    )


GENERATORS: dict[str, Callable[[random.Random, dict], Probe]] = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_multi": niah_multi,
    "variable_tracking": variable_tracking,
    "kv_retrieval": kv_retrieval,
}


def _assemble(probe: Probe, hay: list[str]) -> str:
    """Insert the needles into the haystack sentences at their depths (by sentence count)."""
    body = list(hay)
    for depth, needle in sorted(probe.needles, key=lambda x: -x[0]):  # deepest first keeps indices valid
        body.insert(round(depth * len(hay)), needle)
    return probe.head + probe.joiner.join(body) + probe.tail


def build_sample(
    task: str,
    generator: str,
    tokenizer,
    length: int,
    depth: float,
    rng: random.Random,
    params: dict,
    haystack: Haystack | None,
) -> Sample:
    """A prompt of at most `length` tokens (and as close to it as whole sentences allow)."""
    probe = GENERATORS[generator](rng, {**params, "depth": depth})
    if generator == "kv_retrieval":
        kv_rng = random.Random(rng.random())
        pairs: dict[int, str] = {}

        def make(i: int) -> str:
            while i not in pairs:
                pairs[len(pairs)] = f'"{_uuid(kv_rng)}": "{_uuid(kv_rng)}",'
            return pairs[i]

        haystack = _Generated(tokenizer, make)
    assert haystack is not None
    enc = lambda text: tokenizer.encode(text)  # noqa: E731 — BOS where the model adds it
    fixed = len(enc(_assemble(probe, [])))
    if fixed >= length:
        raise ContextLengthError(
            f"{task}: a {length}-token prompt is too short for the question ({fixed} tokens)"
        )
    n_hay = len(haystack.take(length - fixed))
    for _ in range(50):
        ids = enc(_assemble(probe, [haystack.sentence(i) for i in range(n_hay)]))
        if len(ids) > length:
            over = len(ids) - length
            while over > 0 and n_hay > 0:
                n_hay -= 1
                over -= haystack.count(n_hay)
            continue
        room = length - len(ids)
        if room < haystack.count(n_hay):  # the next sentence would not fit: done
            return Sample(ids, probe.answers, len(ids), depth, task)
        while room >= haystack.count(n_hay):
            room -= haystack.count(n_hay)
            n_hay += 1
    return Sample(ids, probe.answers, len(ids), depth, task)  # pragma: no cover - converges in a few steps


def found(answer: str, output: str) -> bool:
    """`answer` occurs in `output` as a whole token (no digit/letter glued to either side)."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", output) is not None


def score(sample: Sample, output: str) -> dict:
    hits = [found(a, output) for a in sample.answers]
    frac = sum(hits) / len(hits)
    return {"score": frac, "exact_match": 1.0 if all(hits) else 0.0}


def heatmap(
    panels: dict[str, dict[tuple[int, float], float]], path: Path, title: str, metric: str = "exact_match"
) -> Path:
    """One panel per label (e.g. reference, 4-bit): rows = depth, columns = length, colour = score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({L for cells in panels.values() for L, _ in cells})
    depths = sorted({d for cells in panels.values() for _, d in cells})
    width = max(2.6, 0.9 * len(lengths) + 1.2)  # per panel, so short grids stay readable
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels) + 0.8, 1.4 + 0.45 * len(depths)), squeeze=False
    )
    im = None
    for k, (ax, (label, cells)) in enumerate(zip(axes[0], panels.items(), strict=True)):
        grid = [[cells.get((L, d), float("nan")) for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if k == 0:
            ax.set_ylabel("needle depth")
        ax.set_title(label, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:  # not NaN
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.suptitle(f"{title}: {metric}", fontsize=10)
    fig.tight_layout()
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# -- the task kind: preparation (options of its job identity) and scoring, for eval/runner.py ------------
@dataclass
class LongState:
    lengths: list[int]
    depths: list[float]
    samples: int  # prompts per (length, depth) cell
    max_tokens: int


def prepare_task(r: Run) -> dict[str, Any]:
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
    r.state = LongState(lengths, depths, samples, max_tokens)
    return {
        "lengths": lengths,
        "depths": depths,
        "limit": samples,
        "haystack": hay,
        "seed": r.cfg.seed,
        "max_tokens": max_tokens,
    }


def run_task(r: Run) -> list[Metric]:
    from tinytitan.eval.api import GenerateRequest

    p, st = r.spec.params, r.state
    tok = r.model.tokenizer
    hay = Haystack.from_file(tok, r.cfg.haystack) if r.cfg.haystack else Haystack(tok, FILLER)
    cells = [(L, d, s) for L in st.lengths for d in st.depths for s in range(st.samples)]
    done = r.store.items(r.scope)
    key = lambda L, d, s: f"{L}:{d:.4f}:{s}"  # noqa: E731
    todo = [c for c in cells if key(*c) not in done]
    r.reporter.task_start(r.spec.name, len(cells), len(cells) - len(todo), "prompts")
    for L, d, s in todo:
        rng = random.Random(f"{r.cfg.seed}:{r.spec.name}:{L}:{d:.4f}:{s}")
        target = min(L, r.model.ctx - st.max_tokens)  # leave room for the answer at the context's end
        sample = build_sample(r.spec.name, p["generator"], tok, target, d, rng, p, hay)
        out = r.lm.generate_until([GenerateRequest(sample.prompt_ids, sample.stop, st.max_tokens)])[0]
        rec = {
            **score(sample, out),
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
        metrics.append(Metric(m, v, se, len(allv), {"lengths": st.lengths, "depths": st.depths}))
        for L in st.lengths:
            vals = [done[key(L, d, s)][m] for d in st.depths for s in range(st.samples)]
            v, se = mean(vals)
            metrics.append(Metric(f"{m}@len={L}", v, se, len(vals), {"length": L}))
        for L in st.lengths:
            for d in st.depths:
                vals = [done[key(L, d, s)][m] for s in range(st.samples)]
                toks = [done[key(L, d, s)]["tokens"] for s in range(st.samples)]
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
    vlabel = variant_label(r)
    label = f"{Path(r.name).name} ({vlabel})"
    png = folder / f"{r.spec.name}-{Path(r.name).name}-{vlabel.replace('/', '_')}.png"
    try:
        heatmap({label: grid}, png, f"{r.spec.name}", want[0])
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
