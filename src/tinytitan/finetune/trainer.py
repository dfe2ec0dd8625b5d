"""The training loop: LoRA on a frozen base, gradient accumulation, warmup + cosine schedule, seeded,
checkpointed so that a resumed run follows the very trajectory an uninterrupted one would.

Exact resumption rests on three facts: the example order of an epoch is a pure function of (seed, epoch);
the dropout masks of a step come from a generator seeded with (seed, step); and the checkpoint holds
the adapter, the optimizer's moments and the step count (safetensors + JSON, written atomically).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tinytitan.errors import TinyTitanError
from tinytitan.finetune.adapter import save_adapter, write_folder
from tinytitan.finetune.data import IGNORE, Batch, Example, collate, epoch_order, micro_batches
from tinytitan.finetune.lora import (
    LoraConfig,
    adapter_state,
    attach,
    load_adapter_state,
    trainable_parameters,
)
from tinytitan.io.folders import atomic_write_text, recover_folder

CHECKPOINT = "checkpoint"
STATE = "state.json"
TENSORS = "trainer.safetensors"
LOG = "train_log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0  # passes over the training data (fractions allowed: 0.5 = half an epoch)
    batch_size: int = 8  # examples per forward pass
    grad_accum: int = 1  # forward passes per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 1e-3  # peak learning rate (LoRA tolerates ~10x what full fine-tuning does)
    warmup: int = 10  # optimizer steps of linear warmup from 0 to lr
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the adapter matrices
    max_grad_norm: float = 1.0  # clip the adapter's gradient norm (0 = off)
    seed: int = 0  # adapter init, example order and dropout
    max_len: int = 512  # longest example in tokens; longer ones are a data error
    bf16: bool = True  # run the float base's matmuls in bfloat16 (autocast); adapters stay float32
    save_every: int = 50  # optimizer steps between checkpoints
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)

    def digest(self, lora: LoraConfig, data_sha: str) -> str:
        """What must be equal for a checkpoint to be resumed (everything but the checkpoint cadence)."""
        d = {k: v for k, v in asdict(self).items() if k != "save_every"}
        blob = json.dumps([d, lora.to_dict(), data_sha], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class StepRecord:
    step: int
    epoch: float
    loss: float  # mean loss per target token over the step's batches
    lr: float
    tokens: int  # real tokens processed in this step
    seconds: float


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    complete: bool  # False when stopped early (--max-minutes); the same command resumes it
    log: list[dict[str, Any]] = field(default_factory=list)
    eval_losses: list[dict[str, float]] = field(default_factory=list)
    n_params: int = 0
    seconds: float = 0.0


class Reporter:
    """Progress callbacks (the CLI draws a bar; the default is silent)."""

    def start(self, total_steps: int, done: int) -> None: ...

    def step(self, record: StepRecord) -> None: ...

    def note(self, message: str) -> None: ...


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, total - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def data_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, e.labels]).encode())
    return h.hexdigest()[:16]


class _SelectTargets:
    """Run the output head only where a target counts (Gemma's head is 262k rows: most of the work)."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.head, self.index, self.handle = head, None, None

    def __enter__(self) -> _SelectTargets:
        def select(_m: torch.nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x.reshape(-1, x.shape[-1]).index_select(0, self.index)[None], *args[1:])

        self.handle = self.head.register_forward_pre_hook(select)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()


def batch_loss_sum(module: torch.nn.Module, batch: Batch, bf16: bool) -> torch.Tensor:
    """Sum of the cross-entropy over the batch's target positions (float32 scalar)."""
    flat = batch.targets.reshape(-1)
    index = (flat != IGNORE).nonzero()[:, 0]
    with _SelectTargets(module.lm_head) as sel, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        sel.index = index
        logits = module(batch.ids)[0]  # [n_target, V]
    return F.cross_entropy(logits.float(), flat[index], reduction="sum")


def eval_loss(module: torch.nn.Module, examples: list[Example], pad_id: int, cfg: TrainConfig) -> float:
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in micro_batches(examples, list(range(len(examples))), cfg.batch_size):
            batch = collate(chunk, pad_id)
            total += float(batch_loss_sum(module, batch, cfg.bf16))
            count += batch.n_target
    module.train(was_training)
    return total / max(count, 1)


class Trainer:
    def __init__(
        self,
        model,  # tinytitan Model: float or quantized; an adapter is attached to its module in place
        train: list[Example],
        lora: LoraConfig,
        cfg: TrainConfig,
        out: str | Path,
        eval_examples: list[Example] | None = None,
        reporter: Reporter | None = None,
        max_minutes: float | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> None:
        from tinytitan.quant.ggml_matrix import GgmlMatrix

        if any(isinstance(m, GgmlMatrix) for m in model.module.modules()):  # the kernel has no backward
            raise TinyTitanError(
                "this model runs its GGUF file's blocks, which cannot be trained through; fine-tune the "
                "float32 reference (tinytitan.load(..., reference=True)) or a quantized variant"
            )
        self.model, self.train_examples, self.lora, self.cfg = model, train, lora, cfg
        self.out = Path(out)
        self.eval_examples = eval_examples or []
        self.reporter = reporter or Reporter()
        self.max_minutes = max_minutes
        self.on_step = on_step
        tok = model.tokenizer
        self.pad_id = tok.eos_id if tok.eos_id is not None else 0
        self.module = model.module
        self.attached = attach(self.module, lora, seed=cfg.seed)
        model.module_changed()
        self.params = trainable_parameters(self.module)
        self.bf16 = cfg.bf16 and model.quant is None and model.device.type == "cpu"
        self.opt = torch.optim.AdamW(
            [p for _, p in self.params], lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False
        )
        per_step = cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = max(1, math.ceil(len(train) / per_step))
        self.total_steps = cfg.max_steps or max(1, round(cfg.epochs * self.steps_per_epoch))
        self.digest = cfg.digest(lora, data_digest(train))
        self.step = 0
        self.log: list[dict[str, Any]] = []
        self.eval_losses: list[dict[str, float]] = []

    # -- checkpoints --------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT

    def save_checkpoint(self) -> None:
        tensors = {f"adapter.{k}": v for k, v in adapter_state(self.module).items()}
        opt = self.opt.state_dict()
        for idx, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().clone()
        state = {
            "format": "tinytitan-finetune-checkpoint",
            "version": 1,
            "digest": self.digest,
            "step": self.step,
            "total_steps": self.total_steps,
            "param_groups": opt["param_groups"],
            "log": self.log,
            "eval_losses": self.eval_losses,
        }
        write_folder(self.checkpoint_dir, {STATE: state, TENSORS: tensors})

    def try_resume(self) -> bool:
        d = self.checkpoint_dir
        recover_folder(d)  # a checkpoint save interrupted between the renames of the fallback replace
        if not (d / STATE).exists():
            return False
        try:
            state = json.loads((d / STATE).read_text())
            tensors = load_file(str(d / TENSORS))
        except Exception as e:  # a checkpoint we cannot read is not silently replaced
            raise TinyTitanError(f"{d}: unreadable checkpoint ({e}); delete it to start over") from None
        if state.get("digest") != self.digest:
            raise TinyTitanError(
                f"{d} holds a run with different data or settings; use another output folder, or --force "
                "to start over"
            )
        load_adapter_state(
            self.module,
            {k.removeprefix("adapter."): v for k, v in tensors.items() if k.startswith("adapter.")},
            str(d),
        )
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = v
        self.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.step = int(state["step"])
        self.log = list(state["log"])
        self.eval_losses = list(state["eval_losses"])
        self.reporter.note(f"resuming from step {self.step} of {self.total_steps} ({d})")
        return True

    # -- the loop -----------------------------------------------------------------------------------
    def _step_batches(self, step: int) -> tuple[float, list[Batch]]:
        """The micro-batches of optimizer step `step` (epoch boundaries never split a step)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = epoch_order(len(self.train_examples), self.cfg.seed, epoch)
        per_step = self.cfg.batch_size * self.cfg.grad_accum
        chosen = order[within * per_step : (within + 1) * per_step]
        chunks = micro_batches(self.train_examples, chosen, self.cfg.batch_size)
        return epoch + within / self.steps_per_epoch, [collate(c, self.pad_id) for c in chunks]

    def _one_step(self) -> StepRecord:
        t0 = time.perf_counter()
        epoch, batches = self._step_batches(self.step)
        n_target = sum(b.n_target for b in batches)
        lr = lr_at(self.step, self.total_steps, self.cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)  # this step's dropout masks
            for b in batches:
                loss = batch_loss_sum(self.module, b, self.bf16) / max(n_target, 1)
                loss.backward()
                total += loss.item()
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.cfg.max_grad_norm)
        self.opt.step()
        self.step += 1
        return StepRecord(
            self.step, epoch, total, lr, sum(b.n_tokens for b in batches), time.perf_counter() - t0
        )

    def _epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def run(self) -> TrainResult:
        t_start = time.perf_counter()
        self.try_resume()
        self.module.train()
        self.reporter.start(self.total_steps, self.step)
        stopped = False
        try:
            while self.step < self.total_steps:
                rec = self._one_step()
                self.log.append(asdict(rec))
                self.reporter.step(rec)
                over_time = (
                    self.max_minutes is not None and time.perf_counter() - t_start > 60 * self.max_minutes
                )
                if self.eval_examples and (self._epoch_end(self.step) or over_time):
                    loss = eval_loss(self.module, self.eval_examples, self.pad_id, self.cfg)
                    self.eval_losses.append({"step": self.step, "epoch": rec.epoch, "eval_loss": loss})
                    self.reporter.note(f"step {self.step}: eval loss {loss:.4f}")
                if self.step % self.cfg.save_every == 0:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(rec)
                if over_time:
                    stopped = self.step < self.total_steps
                    break
        except KeyboardInterrupt:
            self.save_checkpoint()
            self.reporter.note(f"interrupted at step {self.step}: run the same command again to resume")
            raise
        finally:
            self.module.eval()
        self.save_checkpoint()  # a rerun of a finished run finds it done; a stopped one continues
        if stopped:
            self.reporter.note(
                f"stopped at step {self.step} of {self.total_steps} (--max-minutes): run the same command "
                "again to continue"
            )
        result = TrainResult(
            self.step,
            self.total_steps,
            not stopped,
            self.log,
            self.eval_losses,
            self.attached.n_params,
            time.perf_counter() - t_start,
        )
        self.save_adapter(result)
        return result

    def save_adapter(self, result: TrainResult) -> Path:
        training = {
            "config": asdict(self.cfg),
            "steps": result.steps,
            "total_steps": result.total_steps,
            "complete": result.complete,
            "examples": len(self.train_examples),
            "final_loss": self.log[-1]["loss"] if self.log else None,
            "eval_losses": self.eval_losses,
            "n_params": result.n_params,
        }
        atomic_write_text(self.out / LOG, "".join(json.dumps(rec) + "\n" for rec in self.log))
        return save_adapter(self.model, self.lora, self.out, training)
