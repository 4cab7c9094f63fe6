"""Train every method with the same settings, evaluate each checkpoint, print a markdown table.

    python scripts/method_table.py dataset=fashion_mnist encoder=small_cnn trainer.epochs=10

Runs `cl-train` and `cl-eval` as a user would (one after the other, nothing else in parallel), in
a scratch folder (`--workdir`, default ./outputs/method_table), and prints one JSON line per method
followed by the table. Extra arguments are passed to cl-train as overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("simclr", "moco", "byol", "contrastive_margin", "triplet", "dcl", "moco_v3", "simsiam", "barlow_twins", "vicreg",
           "nnclr", "supcon", "dino", "swav", "cpc")


def run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workdir", default="outputs/method_table")
    args, overrides = ap.parse_known_args()
    bindir = Path(sys.executable).parent
    rows = []
    for method in args.methods.split(","):
        cwd = Path(args.workdir).resolve() / method
        cwd.mkdir(parents=True, exist_ok=True)
        train_s = run([str(bindir / "cl-train"), f"method={method}", *overrides], cwd)
        ckpt = sorted(cwd.glob("outputs/train/*/*/checkpoints/last.pt"))[-1]
        summary = json.loads((ckpt.parent.parent / "summary.json").read_text())
        eval_s = run([str(bindir / "cl-eval"), f"checkpoint={ckpt}"], cwd)
        result = json.loads(sorted(cwd.glob("outputs/eval/*/*/eval.json"))[-1].read_text())
        row = {"method": method, "overrides": " ".join(overrides), "train_wall_s": round(train_s, 1),
               "eval_wall_s": round(eval_s, 1), "final_loss": round(summary["final_loss"], 4),
               "collapse_warning": summary["collapse_warning"], "knn_top1": round(result["knn_top1"], 4),
               "knn5_top1": round(result["knn5_top1"], 4), "linear_top1": round(result["linear_top1"], 4)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| method | train wall time | final loss | k-NN top-1 (k=200) | 5-NN top-1 | linear top-1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['train_wall_s'] / 60:.1f} min | {r['final_loss']:.3f} | {r['knn_top1']:.4f} | "
              f"{r['knn5_top1']:.4f} | {r['linear_top1']:.4f} |")


if __name__ == "__main__":
    main()
