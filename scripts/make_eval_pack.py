"""Build tinytitan's embedded evaluation pack from the public sets in a data folder laid out like
../shared/data (see its SOURCES.md). The pack holds the *first* N items of each set, unchanged, so a
score on the pack equals the score on the full set with `--limit N`, item for item.

    python scripts/make_eval_pack.py --data ../shared/data      # rewrites src/tinytitan/eval/pack/

The manifest (pack.json) records each file's sha256, item count and licence; the text's capacity in
512-token windows is counted with the two embedded models' tokenizers when they are installed.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import json
from pathlib import Path

PACK = Path(__file__).resolve().parents[1] / "src" / "tinytitan" / "eval" / "pack"
VERSION = "1"
ITEMS = 300  # per zero-shot task
ARTICLES = 3  # WikiText-2 test articles kept for perplexity / KLD


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wikitext_head(src: Path, n_articles: int) -> str:
    lines = src.read_text(encoding="utf-8").split("\n")
    # a top-level article starts with a line " = Title = " (section headings are " = = ... = = ")
    starts = [i for i, line in enumerate(lines) if line.startswith(" = ") and not line.startswith(" = = ")]
    return "\n".join(lines[: starts[n_articles]]) + "\n"


def windows_of(text: str, n_ctx: int = 512) -> dict[str, int]:
    """Perplexity windows (n_ctx tokens, BOS included where the model adds it) per embedded model."""
    out = {}
    try:
        from tinytitan import zoo
        from tinytitan.tokenizer import Tokenizer
    except ImportError:
        return out
    for name in ("gemma-3-270m", "smollm2-135m-instruct"):
        try:
            tok = Tokenizer.from_gguf_path(zoo.resolve(name))
        except Exception as e:  # a model that is not installed: its count is left out
            print(f"  {name}: not counted ({type(e).__name__}: {e})")
            continue
        out[name] = len(tok.encode(text)) // n_ctx
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="a folder laid out like ../shared/data")
    ap.add_argument("--items", type=int, default=ITEMS)
    args = ap.parse_args()
    d: Path = args.data
    PACK.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, dict] = {}

    text = wikitext_head(d / "wikitext-2" / "test.txt", ARTICLES)
    (PACK / "wikitext-2-test-head.txt").write_text(text, encoding="utf-8")
    wiki = {
        "path": "wikitext-2-test-head.txt",
        "format": "text",
        "items": 1,
        "windows": windows_of(text),
        "source": f"wikitext-2/test.txt: its first {ARTICLES} articles ({text.count(chr(10))} lines)",
        "license": "CC BY-SA 3.0",
    }
    for t in ("ppl", "ppl_strided", "kld"):
        tasks[t] = wiki

    arc = json.loads((d / "arc-easy" / "test.json").read_text(encoding="utf-8"))[: args.items]
    (PACK / "arc_easy-test.json").write_text(json.dumps(arc, indent=1, ensure_ascii=False) + "\n")
    tasks["arc_easy"] = {
        "path": "arc_easy-test.json",
        "format": "json",
        "items": len(arc),
        "source": f"arc-easy/test.json: its first {len(arc)} questions",
        "license": "CC BY-SA 4.0",
    }

    piqa = (d / "piqa" / "valid.jsonl").read_text(encoding="utf-8").splitlines()[: args.items]
    labels = (d / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").splitlines()[: args.items]
    (PACK / "piqa-valid.jsonl").write_text("\n".join(piqa) + "\n", encoding="utf-8")
    (PACK / "piqa-valid-labels.lst").write_text("\n".join(labels) + "\n", encoding="utf-8")
    tasks["piqa"] = {
        "path": "piqa-valid.jsonl",
        "format": "jsonl",
        "labels": "piqa-valid-labels.lst",
        "items": len(piqa),
        "source": f"piqa/valid.jsonl and valid-labels.lst: their first {len(piqa)} lines",
        "license": "Academic Free License v. 3.0",
    }

    boolq = (d / "boolq" / "dev.jsonl").read_text(encoding="utf-8").splitlines()[: args.items]
    (PACK / "boolq-dev.jsonl").write_text("\n".join(boolq) + "\n", encoding="utf-8")
    tasks["boolq"] = {
        "path": "boolq-dev.jsonl",
        "format": "jsonl",
        "items": len(boolq),
        "source": f"boolq/dev.jsonl: its first {len(boolq)} lines",
        "license": "CC BY-SA 3.0",
    }

    hs = bz2.decompress((d / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes()).decode("utf-8")
    hs_lines = hs.split("\n")[: 6 * args.items]
    (PACK / "hellaswag-val.txt").write_text("\n".join(hs_lines) + "\n", encoding="utf-8")
    tasks["hellaswag"] = {
        "path": "hellaswag-val.txt",
        "format": "hellaswag_text",
        "items": len(hs_lines) // 6,
        "source": f"hellaswag/hellaswag_val_full.txt.bz2: its first {len(hs_lines) // 6} items",
        "license": "MIT",
    }

    for spec in tasks.values():
        files = [spec["path"], *([spec["labels"]] if "labels" in spec else [])]
        spec["sha256"] = hashlib.sha256(b"".join((PACK / f).read_bytes() for f in files)).hexdigest()
    manifest = {"name": "tinytitan-eval-pack", "version": VERSION, "tasks": tasks}
    (PACK / "pack.json").write_text(json.dumps(manifest, indent=1) + "\n")
    for t, spec in tasks.items():
        print(f"{t}: {spec['path']} {spec['items']} items {spec.get('windows', '')} {spec['sha256'][:12]}")


if __name__ == "__main__":
    main()
