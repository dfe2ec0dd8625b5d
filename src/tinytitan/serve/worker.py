"""The generation worker: one thread owns the model and generates every active sequence as one batch.

Requests are split into jobs (one per choice). The worker keeps up to `max_active` sequences in a
Stepper (tinytitan.engine): each step runs one forward over every decoding sequence (continuous
batching: a tiny model's decode step reads all its weights whatever the batch, so a step of 8 rows costs
little more than a step of one) plus one prompt chunk of a sequence still prefilling, so a long prompt
never stalls the others. New jobs join between steps; a sequence that ends, or whose client went away,
leaves at once and its row is freed.

Events flow back to the asyncio side through `Handle.emit` (thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field

import torch

from tinytitan.engine import Generation, Sampler, SamplingParams, StopMatcher
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


class Sequence(Generation):
    """One job in the batch: text streaming, stop strings, JSON constraints and log-probabilities on top
    of the Stepper's generation."""

    def __init__(self, model: Model, job: Job, handle: Handle) -> None:
        self.job, self.handle = job, handle
        self.decoder = StreamDecoder(model.tokenizer)
        self.matcher = StopMatcher(job.stop)
        self.json: JsonSampler | None = None
        if job.schema is not None:
            self.json = JsonSampler(job.schema, token_table(model.tokenizer), job.params, job.max_tokens)
        sampler = self.json or Sampler(job.params)
        super().__init__(job.prompt_ids, job.max_tokens, job.params, model.tokenizer.eos_ids, sampler)
        self.closed = False

    def choose(self, logits: torch.Tensor) -> int | None:
        try:
            return self._choose(logits.float().cpu())
        except Exception as e:  # this sequence's own failure (its sampler, its schema): the others go on
            log.exception("generation failed")
            self.handle.emit(Failure(f"generation failed: {type(e).__name__}: {e}"))
            self.finished, self.closed = "error", True
            return None

    def _choose(self, logits: torch.Tensor) -> int | None:
        job = self.job
        token = super().choose(logits)
        if token is None:
            return None
        text = self.matcher.push(self.decoder.push(token))
        info = [_logprob(logits, token, job.logprobs)] if job.logprobs is not None else []
        if text or info:
            self.handle.emit(Delta(job.index, text, info))
        if self.matcher.stopped or (self.json is not None and self.json.done):
            self.finished = "stop"
        return token

    def close(self) -> None:
        """Tell the client how the sequence ended (once)."""
        if self.closed:
            return
        self.closed = True
        if not self.matcher.stopped:
            rest = self.matcher.push(self.decoder.flush()) + self.matcher.flush()
            if rest:
                self.handle.emit(Delta(self.job.index, rest))
        reason = "length" if self.finished == "length" else "stop"
        self.handle.emit(Finish(self.job.index, reason, len(self.tokens)))


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logp = torch.log_softmax(logits, dim=-1)
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = torch.topk(logp, top)
        alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), alternatives)


class Worker:
    """Owns the model; runs jobs from a bounded queue on one thread, up to `max_active` as one batch."""

    def __init__(self, model: Model, max_active: int = 8, max_queue: int = 64) -> None:
        self.model = model
        self.max_active, self.max_queue = max_active, max_queue
        self._queue: queue.Queue[tuple[Job, Handle]] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self.stepper = model.stepper(max_rows=max_active)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.finished = 0  # sequences that ended: done, failed or dropped
        self.dropped = 0  # sequences ended early because their client left
        self.widest = 0  # the most sequences one step has decoded together

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
                "active": len(self.stepper.active),
                "waiting": self._waiting,
                "finished": self.finished,
                "dropped": self.dropped,
                "widest_batch": self.widest,
            }

    def _admit(self, block: bool) -> None:
        while len(self.stepper.active) < self.max_active:
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
                with self._lock:
                    self.stepper.add(seq)
            except Exception as e:  # e.g. a schema too big for the budget: fail this job only
                log.exception("could not start a job")
                handle.emit(Failure(f"could not start generation: {e}"))

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                self._admit(block=not self.stepper.busy)
                for seq in list(self.stepper.active):
                    if seq.handle.cancelled:  # its client left: the row is freed before the next step
                        with self._lock:
                            self.stepper.drop(seq)
                            self.finished += 1
                            self.dropped += 1
                if not self.stepper.busy:
                    continue
                self.widest = max(self.widest, self.stepper.decoding)
                try:
                    events = self.stepper.step()
                except Exception as e:  # the batch's forward failed: every sequence in it fails
                    log.exception("generation failed")
                    for seq in list(self.stepper.active):
                        seq.handle.emit(Failure(f"generation failed: {type(e).__name__}: {e}"))
                        with self._lock:
                            self.stepper.drop(seq, "error")
                            self.finished += 1
                    continue
                for seq, _ in events:
                    if seq.finished:
                        seq.close()
                        with self._lock:
                            self.finished += 1
        self._drain()

    def _drain(self) -> None:
        """At shutdown: tell every waiting and active request that it will not be served."""
        handles = [seq.handle for seq in self.stepper.active]
        while True:
            try:
                handles.append(self._queue.get_nowait()[1])
            except queue.Empty:
                break
        with self._lock:
            for seq in list(self.stepper.active):
                self.stepper.drop(seq)
            self._waiting = 0
        for handle in dict.fromkeys(handles):
            handle.emit(Failure("the server is shutting down"))
