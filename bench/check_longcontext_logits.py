"""Is our runtime faithful at long context? The next-token distribution after N tokens of a book, ours vs
llama.cpp on the same GGUF (float32 here, llama.cpp's own kernels there): KL, top-1 and top-5 overlap.

    python bench/check_longcontext_logits.py --tokens 8192
    python bench/check_longcontext_logits.py --tokens 32760      # ~2 min ours + ~6 min llama.cpp on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

BOOK = Path(__file__).resolve().parents[2] / "shared" / "data" / "pg2701-moby-dick" / "2701-0.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--text", default=str(BOOK), help="a long text file (default: Moby-Dick in ../shared)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import llama_cpp
    import numpy as np
    import torch

    import tinytitan as tt
    from tinytitan import zoo
    from tinytitan.engine import prefill

    torch.set_num_threads(a.threads)
    path = str(zoo.resolve(a.model))
    m = tt.load(a.model)
    ids = m.tokenizer.encode(Path(a.text).read_text(encoding="utf-8"), add_bos=True)[: a.tokens]
    with torch.inference_mode():
        ours = prefill(m.module, ids, m.new_cache(len(ids) + 1)).double()
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=len(ids) + 8,
        n_batch=512,
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )
    llm.eval(ids)
    raw = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    ref = torch.from_numpy(np.ctypeslib.as_array(raw, shape=(llm.n_vocab(),)).copy()).double()
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(ours[: ref.shape[0]], -1)
    kl = float((lp.exp() * (lp - lq)).sum())
    top5 = set(ours.topk(5).indices.tolist()) & set(ref.topk(5).indices.tolist())
    print(
        f"{a.model} after {len(ids)} tokens: KL(llama.cpp || ours) = {kl:.4g}, "
        f"top-1 ours {int(ours.argmax())} llama.cpp {int(ref.argmax())}, top-5 shared {len(top5)}/5"
    )


if __name__ == "__main__":
    main()
