"""Constrained decoding: a sampler that only picks tokens which keep the output valid JSON.

Every token's bytes are computed once per tokenizer. A candidate token is valid when its bytes, fed to
the JSON parser (`json_grammar`), leave a document that can still be completed within the tokens left.
Greedy decoding checks candidates most likely first (the top 16, 256, then 4,096); sampling draws with
the request's temperature / top-k / top-p and, when the draw is invalid, masks it and draws again. Both
are exact and cheap when the model mostly wants valid tokens; when it does not (after 4,096 candidates
or 16 draws), every valid token is found by walking the vocabulary in byte order (tokens that share an
invalid prefix are skipped together) and the choice is made among those.
"""

from __future__ import annotations

import bisect
import weakref

import numpy as np
import torch

from tinytitan.engine import Sampler, SamplingParams
from tinytitan.serve.json_grammar import Frame, Str, feed_bytes, start
from tinytitan.serve.json_schema import Node
from tinytitan.tokenizer import Tokenizer

STAGES = (16, 256, 4096)  # greedy: candidates checked, most likely first, before the vocabulary walk
REDRAWS = 16  # sampling: invalid draws masked and redrawn before the vocabulary walk


class TokenTable:
    """The bytes every token adds to the text, sorted for a prefix-sharing walk, and which tokens are
    plain string text (the bulk of a vocabulary: valid inside any JSON string as they are)."""

    def __init__(self, pieces: list[bytes], eos_ids: set[int] | frozenset[int]) -> None:
        self.bytes = pieces  # token id -> the bytes it adds (b"" for control and unused tokens)
        self.eos_ids = frozenset(eos_ids)
        chars = np.array([_plain_chars(b) for b in pieces], dtype=np.int64)
        self.plain_ids = np.flatnonzero(chars > 0)  # no quote, backslash or control byte; whole UTF-8
        self.plain_chars = chars[self.plain_ids]  # the characters each plain token adds
        order = sorted((b, i) for i, b in enumerate(pieces) if b)  # control/unused tokens add nothing
        self.sorted_bytes = [b for b, _ in order]
        self.sorted_ids = [i for _, i in order]
        other = [(b, i) for b, i in order if chars[i] == 0]
        self.other_bytes = [b for b, _ in other]  # the rest, for the walk inside strings
        self.other_ids = [i for _, i in other]

    def token_bytes(self, token: int) -> bytes:
        return self.bytes[token] if token < len(self.bytes) else b""


_tables: weakref.WeakKeyDictionary[Tokenizer, TokenTable] = weakref.WeakKeyDictionary()


def token_table(tokenizer: Tokenizer) -> TokenTable:
    """One table per tokenizer, built on first use (~0.1 s for a 262k vocabulary)."""
    table = _tables.get(tokenizer)
    if table is None:
        pieces = [tokenizer.token_to_bytes(i, special=False) for i in range(tokenizer.vocab_size)]
        table = _tables[tokenizer] = TokenTable(pieces, tokenizer.eos_ids)
    return table


class JsonSampler:
    """A sampler (logits [V] -> token id) whose tokens always spell valid JSON for `node` in at most
    `max_tokens` tokens. `done` turns true once the document is complete: stop generating then."""

    def __init__(self, node: Node, table: TokenTable, params: SamplingParams, max_tokens: int) -> None:
        self.state: Frame = start(node)
        if self.state.est() > max_tokens:
            raise ValueError(f"max_tokens {max_tokens} is too small: the schema needs {self.state.est()}")
        self.table = table
        self.left = max_tokens
        self.params = params
        self.sampler = Sampler(params)

    @property
    def done(self) -> bool:
        return self.state.done

    def __call__(self, logits: torch.Tensor) -> int:
        logits = logits.float().cpu()
        token, state = self._pick(logits, self.left - 1)
        self.state, self.left = state, self.left - 1
        return token

    def _check(self, token: int, budget: int) -> Frame | None:
        """The state after `token`, if it keeps the document completable within `budget` more tokens."""
        if token in self.table.eos_ids:
            return self.state if self.state.can_end() else None
        data = self.table.token_bytes(token)
        if not data:
            return None
        state = feed_bytes(self.state, data)
        return state if state is not None and state.est() <= budget else None

    def _pick(self, logits: torch.Tensor, budget: int) -> tuple[int, Frame]:
        if self.params.temperature <= 0:  # greedy: the most likely valid token
            done_k = 0
            for k in STAGES:
                k = min(k, logits.shape[0])
                for token in torch.topk(logits, k).indices.tolist()[done_k:]:
                    state = self._check(token, budget)
                    if state is not None:
                        return token, state
                done_k = k
            valid = self._valid(budget)
            token = valid[int(torch.argmax(logits[valid]))] if len(valid) else -1
        else:  # sample; an invalid draw is masked out and the draw repeated
            work = logits
            for _ in range(REDRAWS):
                token = self.sampler(work)
                state = self._check(token, budget)
                if state is not None:
                    return token, state
                work = logits.clone() if work is logits else work
                work[token] = float("-inf")
            valid = self._valid(budget)  # little valid mass left: find it all, draw among it
            if len(valid):
                masked = torch.full_like(logits, float("-inf"))
                masked[valid] = logits[valid]
                token = self.sampler(masked)
        state = self._check(token, budget) if len(valid) else None
        if state is None:  # cannot happen while est() is exact; say so rather than emit invalid JSON
            raise RuntimeError("JSON constraint reached a state with no valid token")
        return token, state

    def _valid(self, budget: int) -> torch.Tensor:
        """The ids of every valid token."""
        table, state = self.table, self.state
        ids: list[int] = []
        if isinstance(state, Str) and not state.need and not state.esc:  # inside a string: plain
            n = state.n + table.plain_chars  # tokens are valid unless too long for what is left
            rest = state.parent.resume(None).est()  # type: ignore[union-attr]
            ok = 1 + np.maximum(0, state.min_len - n) + rest <= budget
            if state.max_len is not None:
                ok &= n <= state.max_len
            ids = table.plain_ids[ok].tolist()
            ids += self._walk(table.other_bytes, table.other_ids, budget)
        else:
            ids = self._walk(table.sorted_bytes, table.sorted_ids, budget)
        if state.can_end():
            ids += sorted(table.eos_ids)
        return torch.tensor(ids, dtype=torch.long)

    def _walk(self, sorted_bytes: list[bytes], sorted_ids: list[int], budget: int) -> list[int]:
        """Valid tokens of a byte-sorted list, reusing the parser states of shared prefixes."""
        out, n = [], len(sorted_bytes)
        path: list[Frame] = [self.state]  # path[d]: the state after the first d bytes of `prev`
        prev, i = b"", 0
        while i < n:
            tok = sorted_bytes[i]
            common, limit = 0, min(len(prev), len(tok), len(path) - 1)
            while common < limit and prev[common] == tok[common]:
                common += 1
            del path[common + 1 :]
            state: Frame | None = path[-1]
            depth = common
            while depth < len(tok):
                state = path[-1].feed(tok[depth])
                if state is None:
                    break
                path.append(state)
                depth += 1
            prev = tok
            if state is None:  # every token that starts with tok[:depth + 1] is invalid too
                nxt = _successor(tok[: depth + 1])
                i = n if nxt is None else bisect.bisect_left(sorted_bytes, nxt, i + 1)
                continue
            if state.est() <= budget:
                out.append(sorted_ids[i])
            i += 1
        return out


def _plain_chars(data: bytes) -> int:
    """Characters in `data` if it is plain JSON string text (else 0)."""
    if not data or b'"' in data or b"\\" in data or min(data) < 0x20:
        return 0
    try:
        return len(data.decode("utf-8"))
    except UnicodeDecodeError:
        return 0


def _successor(prefix: bytes) -> bytes | None:
    """The smallest byte string greater than every string that starts with `prefix`."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return None
    p[-1] += 1
    return bytes(p)
