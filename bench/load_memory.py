"""Memory of loading an artifact and generating with it: RSS and peak RSS (VmHWM) after import, load and
128 greedy tokens after a 512-token prompt, each artifact in a fresh process (eager decode step).

    python bench/load_memory.py ~/.cache/tinytitan/bench/gemma-3-270m-w4g32 [...] [--src OTHER/src ...]

With --src, the same runs are made with other source trees too (e.g. a worktree of an older commit), in
turns, so a change is measured against what it replaced in one run: `git worktree add /tmp/before REV`,
then `--src src /tmp/before/src`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
def status():
    lines = [l for l in open('/proc/self/status') if l.startswith(('VmRSS', 'VmHWM'))]
    d = {l.split(':')[0]: int(l.split()[1]) for l in lines}
    return {'rss_mb': d['VmRSS'] / 1e3, 'hwm_mb': d['VmHWM'] / 1e3}
out = {'start': status()}
import torch
out['import'] = status()
import tinytitan as tt
m = tt.load(sys.argv[1])
out['loaded'] = status()
ids = m.tokenizer.encode('The capital of France is ' * 120)[:512]
m.complete(ids, max_tokens=128)
out['generated'] = status()
print(json.dumps(out))
"""


def run(src: str, artifact: str) -> dict:
    env = dict(os.environ, PYTHONPATH=src)
    res = subprocess.run([sys.executable, "-c", CHILD, artifact], env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--src", nargs="+", default=[str(Path(__file__).resolve().parents[1] / "src")])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print("| artifact | source | loaded RSS MB | peak RSS at load MB | peak RSS after 128 tokens MB |")
    print("|---|---|---:|---:|---:|")
    for artifact in args.artifacts:
        path = str(Path(artifact).expanduser())
        for _ in range(args.repeat):
            for src in args.src:
                r = run(src, path)
                row = [
                    Path(path).name,
                    src,
                    r["loaded"]["rss_mb"],
                    r["loaded"]["hwm_mb"],
                    r["generated"]["hwm_mb"],
                ]
                print(
                    "| " + " | ".join(f"{v:.0f}" if isinstance(v, float) else v for v in row) + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
