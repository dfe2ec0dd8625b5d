"""Regenerate what tinytitan ships precomputed for its embedded models (`src/tinytitan/precomputed/`):
the self-generated calibration text (`calib/`) and the mixed-precision planner's per-tensor sensitivities
(`plans/`). Both are made by the library's own code in an empty $TINYTITAN_HOME and copied over.

    python scripts/make_precomputed.py gemma-3-270m          # ~6 + ~9 + ~30 minutes on a 2-core CPU

A later run of the library finds them through `zoo.cached` (its own cache in $TINYTITAN_HOME wins).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "tinytitan" / "precomputed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument(
        "--plan-budget", default="150MB", help="any budget: the sensitivities do not depend on it"
    )
    ap.add_argument("--no-plans", action="store_true", help="only the calibration text")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TINYTITAN_HOME"] = tmp
        os.environ["TINYTITAN_NO_PRECOMPUTED"] = "1"  # measure, never read a shipped copy
        from tinytitan import zoo
        from tinytitan.quant.calib import self_generated
        from tinytitan.quant.mixed import plan_to_budget
        from tinytitan.quant.schemes import RECOVER_TOKENS
        from tinytitan.runtime import load
        from tinytitan.sweep.plan import parse_variant_spec

        for name in args.models:
            zoo.pull(name)
            model = load(name)
            self_generated(model, 4096, seed=0, progress=print)  # calibrated rounding, the planner
            self_generated(model, RECOVER_TOKENS, seed=0, progress=print)  # recovery by distillation
            if not args.no_plans:
                spec = parse_variant_spec(f"plan:{args.plan_budget}")
                plan_to_budget(model, budget_bytes=spec.target_bytes)
        for kind in ("calib", "plans"):
            for f in sorted((Path(tmp) / kind).glob("*.json")):
                (OUT / kind).mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, OUT / kind / f.name)
                print(f"wrote {OUT / kind / f.name}")


if __name__ == "__main__":
    main()
