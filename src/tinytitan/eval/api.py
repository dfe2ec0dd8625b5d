"""The model interface every task uses: three batched requests, as in lm-evaluation-harness.

- `loglikelihood([(context, continuation), ...])` -> [(log P(continuation | context), is_greedy), ...]
- `loglikelihood_rolling([text, ...])` -> [log P(text), ...] (the whole text, in disjoint windows)
- `generate_until([GenerateRequest(context, stop, max_tokens), ...])` -> [text, ...] (greedy)

`RuntimeLM` implements them on a loaded tinytitan `Model` (or any quantized variant of one). Tokenization
follows lm-evaluation-harness exactly, so our scores and lm-eval's (through `lm_eval_adapter`) agree:
- trailing whitespace of the context moves to the front of the continuation;
- context + continuation is encoded as one string and split after the context's own token count;
- BOS is added where the model's metadata asks (Gemma yes, SmolLM2 no), like lm-eval's default;
- an empty context becomes the prefix token (BOS, else EOS);
- an input longer than the model's window is cut from the left to the last max_length + 1 tokens.

Batching: unique inputs are sorted by length (longest first) and packed into right-padded batches. With
causal attention a real position never sees the padding after it, so no mask is needed and padded rows
give the same logits as unpadded ones. The output head runs only at the positions that are scored (a
hook selects them), which for Gemma's 262k-token vocabulary is most of the work saved.

Shared prompts: inputs whose unscored part is the same (the choices of one multiple-choice question) run
that prefix once, into a KV cache that is then repeated for each choice, and only the choices' tokens
are run on top of it. An ARC-Easy question's four choices cost one question plus four answers instead of
four questions plus four answers. The output head then runs once over the answers of several questions
(one read of Gemma's 262k-row head instead of one per question). The logits are those of the whole input
up to float rounding (the prefix's keys and values are the same numbers; only the matmul shapes differ).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tinytitan.errors import ContextLengthError
from tinytitan.models.head import head_positions

Progress = Callable[[int], None]  # called with the number of requests just finished
LONG_INPUT = (
    1024  # longer inputs run alone, prefilled in chunks through a KV cache (bounded attention memory)
)
MIN_SHARED_PREFIX = 8  # shorter common prefixes are not worth a forward of their own


@dataclass
class GenerateRequest:
    context: str | list[int]  # text, or token ids used as they are
    stop: list[str] = field(default_factory=list)  # stop strings (not included in the output)
    max_tokens: int = 32


class LM(ABC):
    """The three requests. Implementations batch internally; results come back in request order."""

    @abstractmethod
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], progress: Progress | None = None
    ) -> list[tuple[float, bool]]: ...

    @abstractmethod
    def loglikelihood_rolling(
        self, texts: Sequence[str], progress: Progress | None = None
    ) -> list[float]: ...

    @abstractmethod
    def generate_until(
        self, requests: Sequence[GenerateRequest], progress: Progress | None = None
    ) -> list[str]: ...


class RuntimeLM(LM):
    """The three requests on a tinytitan Model: batched, head evaluated only where scored."""

    def __init__(
        self,
        model,  # tinytitan.Model (or a quantized variant of one)
        batch_size: int = 16,
        max_batch_tokens: int = 4096,
        max_scored_positions: int = 256,
        max_length: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_scored_positions = max_scored_positions
        self.max_length = min(max_length or model.ctx, model.ctx)
        self.forward_calls = 0  # sequences run through the model (tests count recomputation with it)
        self.last_hidden: list[torch.Tensor] = []  # the output head's inputs of the latest _score, per row

    # -- tokenization -------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        pid = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if pid is None:
            raise ContextLengthError("the model has neither BOS nor EOS; an empty context cannot be scored")
        return pid

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) exactly as lm-evaluation-harness splits them."""
        if context == "":
            cont = self.encode(continuation, add_bos=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    # -- the three requests -------------------------------------------------------------------------
    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], progress: Progress | None = None
    ) -> list[tuple[float, bool]]:
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], progress)

    def loglikelihood_rolling(self, texts: Sequence[str], progress: Progress | None = None) -> list[float]:
        out = []
        for text in texts:
            windows = rolling_windows(self.encode(text, add_bos=False), self.prefix_token_id, self.max_length)
            out.append(sum(lp for lp, _ in self.loglikelihood_tokens(windows)))
            if progress:
                progress(1)
        return out

    def generate_until(
        self, requests: Sequence[GenerateRequest], progress: Progress | None = None
    ) -> list[str]:
        out = []
        for r in requests:
            ids = r.context if isinstance(r.context, list) else self.encode(r.context)
            if len(ids) + 1 > self.model.ctx:
                raise ContextLengthError(
                    f"the prompt is {len(ids)} tokens; with the answer it does not fit in the context of "
                    f"{self.model.ctx} tokens"
                )
            c = self.model.complete(ids, max_tokens=r.max_tokens, temperature=0.0, stop=r.stop)
            out.append(c.text)
            if progress:
                progress(1)
        return out

    # -- scoring core -------------------------------------------------------------------------------
    def loglikelihood_tokens(
        self, pairs: Sequence[tuple[list[int], list[int]]], progress: Progress | None = None
    ) -> list[tuple[float, bool]]:
        """Sum of log-probs of each continuation given its context, and whether greedy decoding
        would have produced it. Identical model inputs are run once."""
        inputs: dict[tuple[int, ...], int] = {}  # model input -> longest continuation scored on it
        plan = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("an empty continuation cannot be scored")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            inp = tuple(whole[:-1])
            n = min(len(cont), len(inp))
            inputs[inp] = max(inputs.get(inp, 0), n)
            plan.append((inp, list(cont)[-n:]))
        results: dict[tuple[int, ...], torch.Tensor] = {}  # input -> log-probs at its last n positions
        users = Counter(inp for inp, _ in plan)
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}  # unscored prefix -> inputs that share it
        for inp, n in inputs.items():
            groups.setdefault(inp[: len(inp) - n], []).append(inp)
        alone: list[tuple[int, ...]] = []
        pending: list[tuple[tuple[int, ...], torch.Tensor]] = []  # (input, its head inputs) not yet scored

        def flush() -> None:
            results.update(self._head_log_probs(pending))
            if progress:
                progress(sum(users[x] for x, _ in pending))
            pending.clear()

        for prefix, members in groups.items():
            if len(members) < 2 or len(prefix) < MIN_SHARED_PREFIX or len(members[0]) > LONG_INPUT:
                alone += members
                continue
            for i in range(0, len(members), self.batch_size):
                part = members[i : i + self.batch_size]
                hidden = self._shared_hidden(list(prefix), [list(x[len(prefix) :]) for x in part])
                queued = sum(h.shape[0] for _, h in pending)
                if pending and queued + sum(h.shape[0] for h in hidden) > self.max_scored_positions:
                    flush()
                pending.extend(zip(part, hidden, strict=True))
        if pending:
            flush()
        order = sorted(alone, key=len, reverse=True)
        for batch in self._batches(order, inputs):
            logps = self._score([list(x) for x in batch], [inputs[x] for x in batch])
            for x, lp in zip(batch, logps, strict=True):
                results[x] = lp
            if progress:
                progress(sum(users[x] for x in batch))
        out = []
        for inp, cont in plan:
            lp = results[inp][-len(cont) :]  # [n, V] log-probs predicting the continuation
            target = torch.tensor(cont, dtype=torch.long)
            total = float(lp.gather(-1, target[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target).all())
            out.append((total, greedy))
        return out

    def _batches(
        self, order: list[tuple[int, ...]], n_scored: dict[tuple[int, ...], int]
    ) -> list[list[tuple[int, ...]]]:
        batches: list[list[tuple[int, ...]]] = []
        cur: list[tuple[int, ...]] = []
        scored = 0
        for x in order:
            width = len(cur[0]) if cur else len(x)  # longest first: the first row sets the padded width
            if cur and (
                width > LONG_INPUT
                or len(cur) >= self.batch_size
                or width * (len(cur) + 1) > self.max_batch_tokens
                or scored + n_scored[x] > self.max_scored_positions
            ):
                batches.append(cur)
                cur, scored = [], 0
            cur.append(x)
            scored += n_scored[x]
        if cur:
            batches.append(cur)
        return batches

    @torch.inference_mode()
    def _score(self, rows: list[list[int]], n_last: list[int]) -> list[torch.Tensor]:
        """float32 log-softmax [n_last[i], V] at the last n_last[i] positions of each row."""
        self.forward_calls += len(rows)
        if len(rows) == 1 and len(rows[0]) > LONG_INPUT:
            logits = [self._logits_long(rows[0], n_last[0])]
        else:
            logits = self._logits_batch(rows, n_last)
        return [torch.log_softmax(x.float(), dim=-1) for x in logits]

    @torch.inference_mode()
    def _shared_hidden(self, prefix: list[int], suffixes: list[list[int]]) -> list[torch.Tensor]:
        """The output head's inputs [len, D] at every position of each suffix, all continuing one prefix:
        the prefix runs once (batch 1, no head), its cache is repeated for the suffixes, and the head
        itself is left to `_head_log_probs`, which runs it once for several questions."""
        from tinytitan.engine import PREFILL_CHUNK

        m = self.model
        self.forward_calls += len(suffixes)
        width = max(len(x) for x in suffixes)
        cache = m.new_cache(len(prefix) + width)
        none = torch.empty(0, dtype=torch.long, device=m.device)
        for s in range(0, len(prefix), PREFILL_CHUNK):
            chunk = torch.tensor([prefix[s : s + PREFILL_CHUNK]], dtype=torch.long, device=m.device)
            with head_positions(m.module, none, defer=True):
                m.module(chunk, cache=cache, start=s)
        cache.repeat_batch(len(suffixes))
        ids = torch.zeros((len(suffixes), width), dtype=torch.long)
        flat = []
        for i, x in enumerate(suffixes):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            flat.extend(i * width + p for p in range(len(x)))
        index = torch.tensor(flat, dtype=torch.long, device=m.device)
        with head_positions(m.module, index, defer=True) as hp:
            m.module(ids.to(m.device), cache=cache, start=len(prefix))
        return list(torch.split(hp.selected, [len(x) for x in suffixes]))

    @torch.inference_mode()
    def _head_log_probs(
        self, pending: list[tuple[tuple[int, ...], torch.Tensor]]
    ) -> dict[tuple[int, ...], torch.Tensor]:
        """One output-head call over the collected head inputs -> float32 log-softmax per input."""
        hidden = torch.cat([h for _, h in pending])
        logits = self.model.module.lm_head(hidden[None])[0].float().cpu()
        parts = torch.split(logits, [h.shape[0] for _, h in pending])
        return {x: torch.log_softmax(lp, dim=-1) for (x, _), lp in zip(pending, parts, strict=True)}

    def _logits_batch(self, rows: list[list[int]], n_last: list[int]) -> list[torch.Tensor]:
        width = max(len(r) for r in rows)
        dev = self.model.device
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        flat = []
        for i, (r, n) in enumerate(zip(rows, n_last, strict=True)):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            flat.extend(i * width + p for p in range(len(r) - n, len(r)))
        index = torch.tensor(flat, dtype=torch.long, device=dev)
        with head_positions(self.model.module, index) as hp:
            # the model's own cache kind: a variant with an int8/int4 KV cache is scored through it
            out = self.model.module(ids.to(dev), cache=self.model.new_cache(width, len(rows)))
        logits = out.reshape(-1, out.shape[-1]).float().cpu()
        self.last_hidden = list(torch.split(hp.selected.cpu(), n_last))
        return list(torch.split(logits, n_last))

    def _logits_long(self, row: list[int], n_last: int) -> torch.Tensor:
        """One long sequence: chunked prefill through a KV cache, the head only on the last n_last."""
        from tinytitan.engine import PREFILL_CHUNK

        m = self.model
        cache = m.new_cache(len(row))  # the model's own cache kind (int8/int4 KV for such variants)
        first = len(row) - n_last
        out, hidden = [], []
        for s in range(0, len(row), PREFILL_CHUNK):
            chunk = row[s : s + PREFILL_CHUNK]
            lo = max(first - s, 0)
            x = torch.tensor([chunk], dtype=torch.long, device=m.device)
            if lo >= len(chunk):
                with head_positions(m.module, torch.tensor([len(chunk) - 1], device=m.device)):
                    m.module(x, cache=cache, start=s)  # head on one position only; result unused
                continue
            index = torch.arange(lo, len(chunk), device=m.device)
            with head_positions(m.module, index) as hp:
                out.append(m.module(x, cache=cache, start=s).reshape(-1, m.config.vocab_size).float().cpu())
            hidden.append(hp.selected.cpu())
        self.last_hidden = [torch.cat(hidden)]
        return torch.cat(out)


def rolling_windows(
    tokens: list[int], prefix_token: int, max_length: int
) -> list[tuple[list[int], list[int]]]:
    """Disjoint blocks of up to max_length predicted tokens, each with as much preceding context as fits
    (the first block is conditioned on the prefix token). Every token is predicted exactly once; this is
    lm-evaluation-harness's rolling loglikelihood with context_len = 1."""
    out = []
    for s in range(0, len(tokens), max_length):
        e = min(s + max_length, len(tokens))
        ctx = [prefix_token] if s == 0 else tokens[max(0, e - 1 - max_length) : s]
        out.append((ctx, tokens[s:e]))
    return out
