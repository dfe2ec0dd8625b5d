"""The 262k x 640 int8 output head at batch 1: torch's weight-only int8 kernel vs an int8 x int8 GEMM
(`torch._int_mm`) with the activation quantized per token, time and relative error (random weights).

    python bench/probe_int8_head.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=262144)
    ap.add_argument("--cols", type=int, default=640)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 127, (a.rows, a.cols), dtype=torch.int8, generator=g)
    scale = (torch.rand(a.rows, generator=g) * 0.01).to(torch.bfloat16)
    x = torch.randn(1, a.cols, generator=g).to(torch.bfloat16)

    def weight_only() -> torch.Tensor:
        return torch._weight_int8pack_mm(x, q, scale).float()

    def int8_gemm() -> torch.Tensor:
        xf = x.float()
        s = xf.abs().amax() / 127
        xq = torch.round(xf / s).to(torch.int8)
        return torch._int_mm(xq, q.t()).float() * (s * scale.float())

    def ms(f) -> float:
        f()
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) * 1e3

    ref = weight_only()
    err = float((int8_gemm() - ref).norm() / ref.norm())
    print(
        f"_weight_int8pack_mm {ms(weight_only):.1f} ms; _int_mm (int8 activations) {ms(int8_gemm):.1f} ms, "
        f"relative error {err:.2%}"
    )


if __name__ == "__main__":
    main()
