"""The CPU decode step compiled ahead of time (AOTInductor) and kept on disk, reused by every later process.

torch.compile pays its tracing again in every process (tens of seconds on 2 cores, even with inductor's
caches warm). Here the step is exported once (torch.export), compiled by AOTInductor to a shared library,
and stored in $TINYTITAN_HOME/steps/<key>; a later process opens the library in milliseconds and runs it
from the first token. The library holds code, not weights: the model's tensors (the GGUF's block views,
the norms) are handed to it at load, so it reads the same memory the eager model does. The key is what the
code depends on: the model's structure (every tensor's name, shape, dtype and storage kind, the config),
the compute and cache dtypes, the source of the model code and kernels, torch's version and the CPU's
flags. A change to any of these is another key, so a stale library is never run.

The step runs on fixed-shape float caches written at a tensor position (as a CUDA graph replays it:
`FullLayerCache.update_at`), the rotary tables passed in: the cache's capacity, the ring size and the
tables' length are the graph's only symbols. Its next-token logits equal the eager step's to float32
rounding (the same kernels in the same order; inductor fuses the small ops).

Building takes about a minute on 2 cores (export ~6 s, compilation ~50 s). `build_in_background` runs it
in a separate low-priority process, so a first run decodes eagerly and never waits; `tinytitan pull`
builds in the foreground.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from tinytitan import native
from tinytitan.config import ModelConfig
from tinytitan.errors import first_line
from tinytitan.io.folders import atomic_write_text, publish_folder, save_tensors
from tinytitan.models import attention_kernel
from tinytitan.models.cache import FullLayerCache, KVCache, RingLayerCache
from tinytitan.models.layers import Rotary
from tinytitan.zoo import home

log = logging.getLogger(__name__)

FORMAT = 2  # the layout of a stored step (bump when the manifest or the inputs change)
PACKAGE = Path(__file__).resolve().parent
# the sources whose code the compiled step contains (a change to any is a new key)
CODE = [
    "aot_step.py", "models/layers.py", "models/cache.py", "models/gemma3.py", "models/llama.py",
    "models/attention_kernel.py", "quant/modules.py", "quant/ggml_matrix.py",
    "csrc/ggml_matmul.cpp", "csrc/decode_attention.cpp",
]  # fmt: skip
MAX_BATCH = 16  # rows a stored step takes at most (the GGML kernel's rows; more run eagerly)
FAILED = "failed.txt"  # written instead of a step when building failed (the reason; not retried for this key)


def steps_dir() -> Path:
    """Where steps are stored: $TINYTITAN_STEPS, default $TINYTITAN_HOME/steps."""
    return Path(os.environ.get("TINYTITAN_STEPS") or home() / "steps")


def _rotaries(module: nn.Module) -> list[Rotary]:
    seen: dict[int, Rotary] = {}
    for m in module.modules():
        if isinstance(m, Rotary):
            seen.setdefault(id(m), m)
    return list(seen.values())


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, shared ones under each of their names (a tied head)."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def step_key(module: nn.Module, cfg: ModelConfig, dtype: torch.dtype, cache_dtype: torch.dtype) -> str:
    """What the compiled step depends on, hashed (see the module's docstring)."""
    h = hashlib.sha256()
    for name in CODE:
        h.update((PACKAGE / name).read_bytes())
    tensors = []
    for name, t in sorted(_tensors(module).items()):
        tensors.append([name, list(t.shape), str(t.dtype)])
    kinds = sorted(
        f"{name}:{type(m).__name__}:{getattr(m, 'gtype', '')}:{getattr(m, 'exact', '')}"
        for name, m in module.named_modules()
        if m.__class__.__module__.startswith("tinytitan.quant")
    )
    described = {
        "format": FORMAT, "torch": torch.__version__, "cpu": native.cpu_flags(), "config": repr(cfg),
        "module": type(module).__qualname__, "dtype": str(dtype), "cache": str(cache_dtype),
        "tensors": tensors, "kinds": kinds, "attention_kernel": attention_kernel.load(build=False),
    }  # fmt: skip
    h.update(json.dumps(described, sort_keys=True).encode())
    return h.hexdigest()[:32]


class _Exported(nn.Module):
    """The step as torch.export sees it: (ids, pos, tables, caches) -> logits, the caches written in place.

    tables: each rotary's cos and sin; caches: each layer's k and v (and a ring's slot positions)."""

    def __init__(self, module: nn.Module, template: KVCache) -> None:
        super().__init__()
        self.module = module
        self.template = template
        self.rotaries = _rotaries(module)

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor, tables: list[torch.Tensor], caches: list[torch.Tensor]
    ) -> torch.Tensor:
        saved = [r.tables() for r in self.rotaries]
        try:
            for i, r in enumerate(self.rotaries):
                r.use_tables(tables[2 * i], tables[2 * i + 1])
            _bind(self.template, caches)
            return self.module(ids, cache=self.template, start=pos, last_only=True)[:, -1]
        finally:
            for r, (c, s) in zip(self.rotaries, saved, strict=True):
                r.use_tables(c, s)


def _bind(cache: KVCache, tensors: list[torch.Tensor]) -> None:
    """Point the cache's layers at `tensors` (as `_cache_tensors` lists them)."""
    it = iter(tensors)
    for layer in cache.layers:
        layer.k, layer.v = next(it), next(it)
        if isinstance(layer, RingLayerCache):
            layer.slot_pos = next(it)


def _cache_tensors(cache: KVCache) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for layer in cache.layers:
        out += [layer.k, layer.v]
        if isinstance(layer, RingLayerCache):
            out.append(layer.slot_pos)
    return out


def supported(cache: KVCache) -> bool:
    """Whether a stored step can run on this cache: fixed-shape float layers (static)."""
    for layer in cache.layers:
        if type(layer) is FullLayerCache:
            if layer.k.shape[2] != layer.max_len + 1:
                return False
        elif type(layer) is not RingLayerCache or not layer.padded:
            return False
    return bool(cache.layers)


def _export_any_batch(module: nn.Module, cfg: ModelConfig, dtype: torch.dtype, cache_dtype: torch.dtype):
    """The exported step and the most rows it takes: MAX_BATCH, or fewer where the model's matrices
    change their method at fewer rows (a bf16 matrix turns to a GEMM at GEMM_MIN_ROWS): export names the
    bound in its error, and the step is exported again up to it."""
    most = MAX_BATCH
    for _ in range(3):
        try:
            return _export(module, cfg, dtype, cache_dtype, most), most
        except Exception as e:
            found = re.search(r"batch = Dim\('batch', max=(\d+)\)", str(e))
            if found is None or int(found.group(1)) >= most or int(found.group(1)) < 2:
                raise
            most = int(found.group(1))
    raise RuntimeError("the decode step could not be exported for any batch size")


def _export(
    module: nn.Module, cfg: ModelConfig, dtype: torch.dtype, cache_dtype: torch.dtype, most: int = MAX_BATCH
):
    from torch.export import Dim, export

    kv = "f16" if cache_dtype == torch.float16 else None
    # two rows as the example: the batch is a symbol (one library serves a lone request and a batch)
    template = KVCache.for_model(cfg, 64, 2, cache_dtype, "cpu", kv, static=True)
    rotaries = _rotaries(module)
    for r in rotaries:
        r.reserve(128)  # a table exists once a forward has run; made here if none has
    if any(r.table is None for r in rotaries):
        with torch.inference_mode():
            module(torch.zeros(1, 1, dtype=torch.long), cache=KVCache.for_model(cfg, 4, 1, dtype), start=0)
    tables = [t for r in rotaries for t in r.tables()]
    caches = _cache_tensors(template)
    cap, ring, rows, batch = (
        Dim("cap", min=2, max=1 << 20),
        Dim("ring", min=2, max=1 << 20),
        Dim("rows", max=1 << 22),
        Dim("batch", min=1, max=most),
    )
    cache_shapes: list = []
    for layer in template.layers:
        d = ring if isinstance(layer, RingLayerCache) else cap
        kv_shape = {0: batch, 2: d}
        cache_shapes += [kv_shape, kv_shape] + (
            [{0: batch, 1: d}] if isinstance(layer, RingLayerCache) else []
        )
    ids = torch.zeros(2, 1, dtype=torch.long)
    pos = torch.tensor([3, 5], dtype=torch.long)
    shapes = {
        "ids": {0: batch},
        "pos": {0: batch},
        "tables": [{0: rows}] * len(tables),
        "caches": cache_shapes,
    }
    wrapper = _Exported(module, template)
    modes = {m: m.training for m in module.modules()}
    module.eval()  # the step decodes: no dropout, whatever the module was doing (an adapter in training)
    try:
        # size-oblivious: a batch of one is traced as any other size (not specialised away from 2..N)
        from torch.fx.experimental import _config as fx_config

        with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
            return export(wrapper, (ids, pos, tables, caches), dynamic_shapes=shapes, strict=False)
    finally:
        for m, training in modes.items():
            m.training = training


def build(module: nn.Module, cfg: ModelConfig, dtype: torch.dtype, cache_dtype: torch.dtype) -> Path:
    """Export and compile the step for this module in this process (about a minute) and publish it under
    its key; returns the folder. A failure is recorded (FAILED) so that it is not retried for the key."""

    attention_kernel.load(build=True)  # the step calls it (built once per machine, ~10 s)
    key = step_key(module, cfg, dtype, cache_dtype)
    dest = steps_dir() / key
    if (dest / "manifest.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=dest.parent))
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices about its pytree internals
            warnings.simplefilter("ignore", FutureWarning)
            ep, most = _export_any_batch(module, cfg, dtype, cache_dtype)
            package = torch._inductor.aoti_compile_and_package(
                ep,
                package_path=str(stage / "step.pt2"),
                inductor_configs={"aot_inductor.package_constants_in_so": False},
            )
        with zipfile.ZipFile(package) as z:
            names = [n for n in z.namelist() if n.endswith((".wrapper.so", ".wrapper.json"))]
            for n in names:
                (stage / Path(n).name.replace(Path(n).name.split(".")[0], "step")).write_bytes(z.read(n))
        os.unlink(package)
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(stage / "step.wrapper.so"), 1)
        model_tensors = _tensors(module)
        own: dict[str, torch.Tensor] = {}
        constants = {}
        for name, fqn in runner.get_constant_names_to_original_fqns().items():
            inner = fqn.removeprefix("module.")
            if fqn.startswith("module.") and inner in model_tensors:
                constants[name] = {"model": inner}
            elif fqn in ep.constants:  # made by the step itself (a scalar tensor): stored with it
                own[fqn] = ep.constants[fqn].detach().contiguous().clone()
                constants[name] = {"own": fqn}
            else:
                raise RuntimeError(f"the compiled step needs a tensor {fqn!r} that the model does not hold")
        big = {k: t.numel() for k, t in own.items() if t.numel() > 1 << 16}
        if big:  # the model's weights must be handed in, never copied into the step
            raise RuntimeError(f"the step would store model-sized tensors of its own: {big}")
        save_tensors(own, stage / "constants.safetensors")
        manifest = {
            "format": FORMAT, "key": key, "constants": constants, "torch": torch.__version__,
            "max_batch": most,
        }  # fmt: skip
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=1))
        publish_folder(stage, dest)  # fsynced, then in place of a FAILED record of an earlier try
        return dest
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, Exception):
            dest.mkdir(exist_ok=True)
            atomic_write_text(dest / FAILED, first_line(e) + "\n")
        raise


class AotStep:
    """(ids [B, 1], cache, start) -> logits [B, V] from a stored compiled step: CPU, static float caches
    (`supported`); anything else is the caller's to run eagerly. start: the position of every row, or a
    tensor [B] of each row's own (a batch whose rows stand at different positions; the caller then keeps
    the positions within the cache and sets the layers' lengths)."""

    def __init__(self, folder: Path, module: nn.Module) -> None:
        from safetensors.torch import load_file

        manifest = json.loads((folder / "manifest.json").read_text())
        self.folder = folder
        self.max_batch = int(manifest["max_batch"])  # rows it takes at most (more: the caller runs eagerly)
        self.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(folder / "step.wrapper.so"), 1)
        own = load_file(str(folder / "constants.safetensors"))
        model_tensors = _tensors(module)
        constants = {}
        for name, where in manifest["constants"].items():
            constants[name] = model_tensors[where["model"]] if "model" in where else own[where["own"]]
        # user_managed: the step reads the model's own tensors (no copy), so it sees in-place changes
        self.runner.update_constant_buffer(constants, False, True, True)
        self._keep = constants
        self.rotaries = _rotaries(module)
        self._pos = torch.zeros(1, dtype=torch.long)

    def __call__(self, ids: torch.Tensor, cache: KVCache, start: int | torch.Tensor) -> torch.Tensor:
        rows = isinstance(start, torch.Tensor)
        if not rows and start >= cache.max_len:
            raise ValueError(f"KV cache overflow: position {start + 1} > {cache.max_len}")
        for r in self.rotaries:
            r.reserve(cache.max_len + 1)
        if rows:
            pos = start
        else:
            pos = self._pos if ids.shape[0] == 1 else torch.empty(ids.shape[0], dtype=torch.long)
            pos.fill_(start)
        tables = [t for r in self.rotaries for t in r.tables()]
        (out,) = self.runner.run([ids, pos, *tables, *_cache_tensors(cache)])
        if not rows:
            for layer in cache.layers:  # the Python side of the cache, which the compiled code does not run
                layer.length = start + 1
        return out


def find(module: nn.Module, cfg: ModelConfig, dtype: torch.dtype, cache_dtype: torch.dtype) -> Path:
    """The folder this module's step is (or would be) stored in."""
    return steps_dir() / step_key(module, cfg, dtype, cache_dtype)


def open_step(folder: Path, module: nn.Module) -> AotStep | None:
    """The step stored in `folder`, or None when none is stored (or it cannot be opened here)."""
    if not (folder / "manifest.json").exists():
        return None
    try:
        return AotStep(folder, module)
    except Exception as e:  # a library this torch cannot open, a damaged folder: eager, with the reason
        log.warning(
            "stored compiled step %s cannot be used (%s); decoding eagerly", folder.name, first_line(e)
        )
        return None


def background_enabled() -> bool:
    return os.environ.get("TINYTITAN_COMPILE", "auto") == "auto"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_in_background(argv: list[str], folder: Path) -> subprocess.Popen | None:
    """Start `python -m tinytitan.aot_build --key KEY ARGV` (it loads the model as ARGV says and builds its
    step) as a detached low-priority process, unless the step exists, its build failed before, or another
    live process is building it. The child's output goes to steps/.KEY.log."""
    if (folder / FAILED).exists() or (folder / "manifest.json").exists():
        return None
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = folder.parent / f".{folder.name}.building"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return None  # another process is building it
            lock.unlink(missing_ok=True)  # left by a build that was killed
    else:
        return None
    cmd = [sys.executable, "-m", "tinytitan.aot_build", "--key", folder.name, *argv]
    with open(folder.parent / f".{folder.name}.log", "wb") as log_file:
        # its own process group (a Ctrl-C of this one does not stop it) in this session: a new session
        # would be a new scheduler autogroup, where its low priority no longer yields to this process
        # (a first run decoded many times slower beside it); one thread, so it takes at most one core
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        child = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            preexec_fn=_background_priority,
        )  # fmt: skip
    os.write(fd, str(child.pid).encode())
    os.close(fd)
    log.info(
        "building the compiled decode step in the background (pid %d, ~1 min); decoding eagerly", child.pid
    )
    return child


def _background_priority() -> None:
    os.setpgrp()
    os.nice(19)


class Stored:
    """The stored step of one module and cache dtype: opened when present; built in the background
    (rebuild: the arguments that make a separate process load the same model) or now, when asked."""

    POLL = 32  # decode steps between two looks for a step a background build has published

    def __init__(
        self, module: nn.Module, cfg: ModelConfig, dtype: torch.dtype, cache_dtype: torch.dtype,
        rebuild: list[str] | None,
    ) -> None:  # fmt: skip
        self.module, self.cfg, self.dtype, self.cache_dtype = module, cfg, dtype, cache_dtype
        attention_kernel.load(build=True)  # eager and compiled steps both call it; part of the key
        self.rebuild = rebuild
        self.folder = find(module, cfg, dtype, cache_dtype)
        self.step = open_step(self.folder, module)
        self.process: subprocess.Popen | None = None
        self._calls = 0

    def build_now(self) -> AotStep | None:
        if self.step is None:
            build(self.module, self.cfg, self.dtype, self.cache_dtype)
            self.step = open_step(self.folder, self.module)
        return self.step

    def start_background(self) -> None:
        if self.step is None and self.rebuild is not None and self.process is None and background_enabled():
            argv = [*self.rebuild, "--cache-dtype", str(self.cache_dtype).removeprefix("torch.")]
            self.process = build_in_background(argv, self.folder)

    def ready(self) -> AotStep | None:
        """The step, once it is stored (looked for every POLL calls while a build runs)."""
        if self.step is None and self.process is not None:
            self._calls += 1
            if self._calls % self.POLL == 0 and self.process.poll() is not None:
                self.step = open_step(self.folder, self.module)
                self.process = None
        return self.step
