"""The runtime on a CUDA GPU: prefill and decode speed, eager and as a CUDA graph, GPU memory, and how far
the GPU's logits are from the CPU's on the same weights.

    python bench/bench_cuda.py --shapes gemma-3-270m smollm2-135m --json bench/cuda_h200.json

Models: a checkpoint folder (--model, any tt.load path), or random weights with a real model's shapes
(--shapes: Gemma 3 270M, SmolLM2-135M), written as a Hugging Face checkpoint and loaded through tt.load.
Random weights change no speed or memory figure (the same kernels on the same shapes) and are what a
machine without the model files can run; the tokens they generate are meaningless, so the quality figure
here is only the GPU-vs-CPU agreement on the same weights. Each model is measured as float32, and as its
w8 and w4g32 variants (quantized on the CPU, saved, loaded on the GPU as `tinytitan quantize` artifacts),
each with a float32 and a float16 KV cache: eager (one launch per operator), replayed as a CUDA graph (the
default on CUDA) and, with --compiled, torch.compile's fused kernels replayed as a CUDA graph
(`--compile` on CUDA).

Decode: tokens/s over --decode tokens after a --prompt-token prompt, greedy, no stop; prefill: tokens/s of
that prompt (first token's latency). Median of --repeat runs after a warm-up run. Peak GPU memory:
torch.cuda.max_memory_allocated over the model's runs. Needs a CUDA device for the speed figures; with
--device cpu it runs the same code on the CPU (a check of the script, not a benchmark).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tinytitan as tt
from tinytitan.decode_step import DecodeStep
from tinytitan.engine import SamplingParams
from tinytitan.quant.artifact import save_artifact

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"

# Hugging Face configs with the real models' shapes (read from their GGUF files; tests/fixtures' tokenizer)
SHAPES = {
    "gemma-3-270m": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "sliding_window": 512,
        "query_pre_attn_scalar": 256,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
        "layer_types": ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)],
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
    },
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}
# a small one to check the script itself on any machine
SHAPES["tiny"] = {**SHAPES["smollm2-135m"], "vocab_size": 300, "hidden_size": 64, "intermediate_size": 128}
SHAPES["tiny"] |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def random_checkpoint(shape: str, out: Path, seed: int = 0) -> Path:
    """A Hugging Face checkpoint folder with `shape`'s config and random weights (normal, std 0.02; norms at
    their neutral value), and the test fixtures' small tokenizer."""
    from safetensors.torch import save_file

    cfg = SHAPES[shape]
    gemma = cfg["model_type"].startswith("gemma")
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], d), "model.norm.weight": (d,)}
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if gemma else []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + n + ".weight": (d,) for n in norms}
        shapes |= {
            p + "self_attn.q_proj.weight": (h * hd, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.o_proj.weight": (d, h * hd),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        }
        if gemma:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, s in shapes.items():
        if name.endswith("norm.weight"):  # Gemma stores w of (1 + w): 0 is neutral; Llama stores the factor
            tensors[name] = torch.zeros(s) if gemma else torch.ones(s)
        else:
            tensors[name] = (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((FIXTURES / "hf_tiny_llama" / name).read_bytes())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_generation(model, prompt: list[int], n_new: int) -> tuple[float, float, float]:
    """(prefill tok/s, decode tok/s, steady decode tok/s) of one greedy generation with the model's decode
    step. Every generation has a cache of its own, so its first decode step records a CUDA graph: decode
    counts that step (what a request sees), steady starts after it (the replay rate)."""
    sync(model.device)
    t0 = time.perf_counter()
    gen = model.generate_ids(prompt, n_new, SamplingParams(), set())  # the one generation path
    next(gen)  # the first token: argmax read back, so the prefill has finished
    t1 = time.perf_counter()
    next(gen)  # the first decode step (a graph's recording)
    t2 = time.perf_counter()
    rest = list(gen)
    sync(model.device)
    t3 = time.perf_counter()
    return len(prompt) / (t1 - t0), (len(rest) + 1) / (t3 - t1), len(rest) / (t3 - t2)


def measure(model, prompt: list[int], n_new: int, repeat: int) -> dict:
    timed_generation(model, prompt, n_new)  # warm-up: allocator, cuBLAS handles, compilation
    runs = [timed_generation(model, prompt, n_new) for _ in range(repeat)]
    return {
        "prefill_tok_s": statistics.median(r[0] for r in runs),
        "decode_tok_s": statistics.median(r[1] for r in runs),
        "decode_runs": [round(r[1], 1) for r in runs],
        "steady_decode_tok_s": statistics.median(r[2] for r in runs),
    }


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Mean KL(a || b) per position and how often the top token agrees, logits [T, V]."""
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    kld = (la.exp() * (la - lb)).sum(-1)
    return {"kld_mean": kld.mean().item(), "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}


def set_mode(model, mode: str) -> None:
    """eager: the module's forward per step; graph: replayed as a CUDA graph (the default on CUDA; on a
    CPU, graph means torch.compile); compiled: torch.compile's kernels replayed as a CUDA graph."""
    if model.device.type == "cuda":
        model.decode_step = DecodeStep(model.module, compiled=mode == "compiled", cuda_graphs=mode != "eager")
    else:
        model.set_compile(mode != "eager")


def graph_vs_eager(model, prompt: list[int], steps: int, mode: str) -> dict:
    """Logits of `steps` decode steps replayed from the CUDA graph vs the same steps run eagerly."""
    out = {}
    for compiled in (False, True):
        set_mode(model, mode if compiled else "eager")
        cache = model.generation_cache(len(prompt), steps + 1)
        with torch.inference_mode():
            model.module(torch.tensor([prompt], device=model.device), cache=cache, start=0)
            ids = prompt[-1:]
            logits = []
            for i in range(steps):
                x = torch.tensor([ids[-1:]], device=model.device)
                row = model.decode_step(x, cache, len(prompt) + i)[0]
                logits.append(row.float().cpu())
                ids.append(int(row.argmax()))
        out[compiled] = torch.stack(logits)
    return {"max_abs_diff": (out[True] - out[False]).abs().max().item(), **agreement(out[False], out[True])}


def bench_model(path: Path, label: str, args, work: Path, rows: list[dict], save) -> None:
    """Appends a row per variant and KV cache to `rows`, calling save() after each."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    cpu_base = tt.load(path, device="cpu")
    vocab = cpu_base.config.vocab_size
    prompt = torch.randint(3, min(vocab, 300), (args.prompt,), generator=g).tolist()
    check = prompt[:256]
    for variant in args.variants:
        if variant == "f32":
            art, cpu = path, cpu_base
        else:
            art = work / f"{label}-{variant}"
            if not art.exists():
                t0 = time.perf_counter()
                save_artifact(tt.load(path, device="cpu", variant=variant), art)
                took = time.perf_counter() - t0
                print(f"{label} {variant}: quantized and saved in {took:.1f} s", flush=True)
            cpu = tt.load(art, device="cpu")
        cpu_logits = cpu.logits(check)
        for kv in args.kv:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            model = tt.load(art, device=str(device), kv_quant=kv)
            load_s = time.perf_counter() - t0
            row = {"model": label, "variant": variant, "kv": kv or "f32", "load_s": round(load_s, 2)}
            row["weight_bytes"] = model.weight_bytes()
            kinds = {type(m).__name__ for m in model.module.modules()}
            row["matrices"] = sorted(k for k in kinds if k.endswith("Matrix"))
            row |= {f"vs_cpu_{k}": v for k, v in agreement(cpu_logits, model.logits(check)).items()}
            for mode in ["eager", "graph"] + (["compiled"] if args.compiled else []):
                set_mode(model, mode)
                t0 = time.perf_counter()
                timed_generation(model, prompt[:16], 2)  # the first step: recording (and compiling)
                row[f"{mode}_first_step_s"] = time.perf_counter() - t0
                res = measure(model, prompt, args.decode, args.repeat)
                graphed = getattr(model.decode_step, "_graphed", None)
                if graphed is not None:  # why a graph or its compiled kernels were given up, if they were
                    res["fallback"] = graphed.disabled or graphed.fallback_reason
                row |= {f"{mode}_{k}": v for k, v in res.items()}
                print(
                    f"{label} {variant} kv={row['kv']} {mode}: prefill {res['prefill_tok_s']:.0f} tok/s, "
                    f"decode {res['decode_tok_s']:.1f} tok/s {res['decode_runs']}, "
                    f"after the first step {res['steady_decode_tok_s']:.1f}",
                    flush=True,
                )
            for mode in ["graph"] + (["compiled"] if args.compiled else []):
                diff = graph_vs_eager(model, prompt[:64], 24, mode)
                row |= {f"{mode}_vs_eager_{k}": v for k, v in diff.items()}
            if device.type == "cuda":
                row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
            print(json.dumps(row), flush=True)
            rows.append(row)
            save()
            del model


def long_context(path: Path, label: str, args) -> dict:
    """Decode at the end of a --long-token prompt with a float16 cache, eager and graph; peak GPU memory."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = tt.load(path, device=str(device), kv_quant="f16", ctx=args.long)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 300, (args.long - args.decode,), generator=g).tolist()
    row = {"model": label, "variant": "f32", "kv": "f16", "context": args.long}
    for mode in ["eager", "graph"] + (["compiled"] if args.compiled else []):
        set_mode(model, mode)
        timed_generation(model, prompt[:64], 4)  # warm-up (a CPU step's compilation)
        prefill, decode, steady = timed_generation(model, prompt, args.decode)
        row |= {
            f"{mode}_prefill_tok_s": prefill,
            f"{mode}_decode_tok_s": decode,
            f"{mode}_steady_tok_s": steady,
        }
        print(f"{label} {args.long} ctx {mode}: prefill {prefill:.0f}, decode {decode:.1f} tok/s", flush=True)
    if device.type == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=[], choices=sorted(SHAPES))
    ap.add_argument("--model", nargs="*", default=[], help="checkpoint folders or GGUF files (tt.load paths)")
    ap.add_argument("--variants", nargs="+", default=["f32", "w8", "w4g32"])
    ap.add_argument("--kv", nargs="+", default=[None, "f16"], type=lambda s: None if s == "f32" else s)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--long", type=int, default=0, help="fill a context this long, decode at its end")
    ap.add_argument("--compiled", action="store_true", help="also torch.compile's kernels in the graph")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", type=Path, default=None, help="folder for checkpoints and artifacts")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tt_cuda_"))
    models = [(Path(m), Path(m).name) for m in args.model]
    for shape in args.shapes:
        folder = work / f"random-{shape}"
        if not (folder / "model.safetensors").exists():
            random_checkpoint(shape, folder)
        models.append((folder, f"{shape} (random weights)"))
    machine = {"torch": torch.__version__, "python": platform.python_version(), "device": args.device}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine}
    result |= {"args": vars(args) | {"work": str(work)}, "rows": [], "long": []}

    def save() -> None:  # after every row: a run cut short keeps what it measured
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))

    if args.long and models:  # first: the figure a short run must not lose
        result["long"].append(long_context(*models[0], args))
        save()
    for path, label in models:
        bench_model(path, label, args, work, result["rows"], save)
    print(json.dumps(machine))


if __name__ == "__main__":
    main()
