"""The generation worker: one thread owns the model and interleaves every active sequence.

Requests are split into jobs (one per choice). The worker keeps up to `max_active` sequences, each with
its own KV cache, and advances them in turn, one step each per round: a decode step is one token, a
prefill step one chunk of the prompt. So every stream makes progress and a long prompt never stalls
the others; a sequence whose client went away is dropped at its next turn and its cache freed. Each
forward is batch 1: the model's forward takes one start position for the whole batch, so sequences at
different positions cannot share a step (batched decoding would need per-row positions there). Batch 1
also keeps every answer exactly what a lone request gets. Throughput is one sequence's; the gain over a
plain queue is fairness (every stream advances, first tokens come early), not speed.

Events flow back to the asyncio side through `Handle.emit` (thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from tinytitan.engine import PREFILL_CHUNK, Sampler, SamplingParams, StopMatcher
from tinytitan.quant.ggml_matrix import generating
from tinytitan.runtime import Model
from tinytitan.serve.json_constraint import JsonSampler, token_table
from tinytitan.serve.json_schema import Node
from tinytitan.tokenizer import StreamDecoder

log = logging.getLogger("tinytitan.serve")


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step and their log-probabilities


@dataclass
class Delta:
    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Finish:
    index: int
    reason: str  # "stop" | "length"
    completion_tokens: int


@dataclass
class Failure:
    message: str


Event = Delta | Finish | Failure


@dataclass
class Job:
    """One choice to generate."""

    index: int
    prompt_ids: list[int]
    max_tokens: int  # already within the context: len(prompt_ids) + max_tokens <= ctx + 1
    params: SamplingParams
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: the chosen token's log-prob and the top k
    schema: Node | None = None  # constrain the output to JSON that follows this node


class Handle:
    """One request as the worker sees it: where its events go, and whether its client has left."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancel()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Busy(Exception):
    """The queue of waiting jobs is full."""


class Sequence:
    """One job in progress: its cache, its sampler and where it is."""

    def __init__(self, model: Model, job: Job, handle: Handle) -> None:
        self.model, self.job, self.handle = model, job, handle
        self.decode = model.decode_step
        self.cache = model.generation_cache(len(job.prompt_ids), job.max_tokens)
        self.prefilled = 0
        self.pos = len(job.prompt_ids)
        self.generated = 0
        self.logits: torch.Tensor | None = None
        self.decoder = StreamDecoder(model.tokenizer)
        self.matcher = StopMatcher(job.stop)
        self.json: JsonSampler | None = None
        if job.schema is not None:
            self.json = JsonSampler(job.schema, token_table(model.tokenizer), job.params, job.max_tokens)
        self.sampler = self.json or Sampler(job.params)

    def _forward(self, ids: list[int], start: int) -> torch.Tensor:
        x = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        if len(ids) == 1:
            return self.decode(x, self.cache, start)[0]
        with generating():  # a prompt chunk (GGML block matrices may multiply in bf16)
            return self.model.module(x, cache=self.cache, start=start, last_only=True)[0, -1]

    def step(self) -> bool:
        """Advance by one prefill chunk or one token; True when the sequence has finished."""
        job = self.job
        if self.prefilled < len(job.prompt_ids):
            chunk = job.prompt_ids[self.prefilled : self.prefilled + PREFILL_CHUNK]
            self.logits = self._forward(chunk, self.prefilled)
            self.prefilled += len(chunk)
            if self.prefilled < len(job.prompt_ids):
                return False
        assert self.logits is not None
        logits = self.logits.float().cpu()
        token = self.sampler(logits)
        if token in self.model.tokenizer.eos_ids:
            return self._finish("stop")
        self.generated += 1
        text = self.matcher.push(self.decoder.push(token))
        info = [_logprob(logits, token, job.logprobs)] if job.logprobs is not None else []
        if self.matcher.stopped:
            self.handle.emit(Delta(job.index, text, info))
            return self._finish("stop", flush=False)
        if text or info:
            self.handle.emit(Delta(job.index, text, info))
        if self.json is not None and self.json.done:
            return self._finish("stop")
        if self.generated >= job.max_tokens or self.pos >= self.model.ctx:
            return self._finish("length")
        self.logits = self._forward([token], self.pos)
        self.pos += 1
        return False

    def _finish(self, reason: str, flush: bool = True) -> bool:
        if flush:
            rest = self.matcher.push(self.decoder.flush()) + self.matcher.flush()
            if rest:
                self.handle.emit(Delta(self.job.index, rest))
        self.handle.emit(Finish(self.job.index, reason, self.generated))
        return True


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logp = torch.log_softmax(logits, dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logp, top)
        alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), alternatives)


class Worker:
    """Owns the model; runs jobs from a bounded queue on one thread, interleaving up to `max_active`."""

    def __init__(self, model: Model, max_active: int = 8, max_queue: int = 64) -> None:
        self.model = model
        self.max_active, self.max_queue = max_active, max_queue
        self._queue: queue.Queue[tuple[Job, Handle]] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._active: list[Sequence] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.finished = 0  # sequences that ended: done, failed or dropped
        self.dropped = 0  # sequences ended early because their client left

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="tinytitan-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, jobs: list[Job], handle: Handle) -> None:
        """Queue a request's jobs, all or none; raises Busy when the queue has no room for them."""
        with self._lock:
            if self._waiting + len(jobs) > self.max_queue:
                raise Busy(f"the server is busy ({self._waiting} jobs waiting); try again shortly")
            self._waiting += len(jobs)
        for job in jobs:
            self._queue.put((job, handle))

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "active": len(self._active),
                "waiting": self._waiting,
                "finished": self.finished,
                "dropped": self.dropped,
            }

    def _admit(self, block: bool) -> None:
        while len(self._active) < self.max_active:
            try:
                job, handle = self._queue.get(block=block, timeout=0.05)
            except queue.Empty:
                return
            block = False
            with self._lock:
                self._waiting -= 1
            if handle.cancelled:
                continue
            try:
                seq = Sequence(self.model, job, handle)
            except Exception as e:  # e.g. a schema too big for the budget: fail this job only
                log.exception("could not start a job")
                handle.emit(Failure(f"could not start generation: {e}"))
                continue
            with self._lock:
                self._active.append(seq)

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._admit(block=not self._active)
                for seq in list(self._active):
                    finished = dropped = seq.handle.cancelled
                    if not finished:
                        try:
                            finished = seq.step()
                        except Exception as e:
                            log.exception("generation failed")
                            seq.handle.emit(Failure(f"generation failed: {type(e).__name__}: {e}"))
                            finished = True
                    if finished:
                        with self._lock:
                            self._active.remove(seq)
                            self.finished += 1
                            self.dropped += dropped
        self._drain()

    def _drain(self) -> None:
        """At shutdown: tell every waiting and active request that it will not be served."""
        handles = [seq.handle for seq in self._active]
        while True:
            try:
                handles.append(self._queue.get_nowait()[1])
            except queue.Empty:
                break
        with self._lock:
            self._active.clear()
            self._waiting = 0
        for handle in dict.fromkeys(handles):
            handle.emit(Failure("the server is shutting down"))
