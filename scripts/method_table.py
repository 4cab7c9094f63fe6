"""Train every method as a user would, evaluate each checkpoint, print a markdown table.

    python scripts/method_table.py --methods all dataset=fashion_mnist trainer.epochs=10

Runs `cl-train method=X [overrides]` and `cl-eval checkpoint=...` for each method (one after the
other, nothing else in parallel), in a scratch folder (`--workdir`, default ./outputs/method_table),
and prints one JSON line per method followed by the table. Extra arguments are passed to cl-train
as overrides, the same for every method. The table starts with the untrained floor: the encoder as
initialised (seed 0), scored by cl-eval's own code, once per kind of evaluation encoder (CPC reads
features pooled over its patch grid, so it has a floor of its own). A run that fails is a row with
its one-line error, not the end of the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path


def all_methods() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("contrastive_cli.configs").joinpath("method").iterdir()
                  if p.name.endswith(".yaml"))


def run(cmd: list[str], cwd: Path) -> tuple[float, str | None]:
    """(wall seconds, the command's last error line or None)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    error = (lines[-1] if lines else f"exit status {proc.returncode}") if proc.returncode else None
    return time.perf_counter() - start, error


def floor(method: str, overrides: list[str], workdir: Path) -> dict:
    """cl-eval of the untrained encoder that `cl-train method=X [overrides]` starts from."""
    from hydra import compose, initialize_config_module

    from contrastive_cli.evaluate import run_evaluation
    from contrastive_cli.train import untrained_checkpoint

    out = workdir / f"floor_{method}"
    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_module(config_module="contrastive_cli.configs", version_base="1.3"):
        path = untrained_checkpoint(compose("train", [f"method={method}", *overrides]), out / "untrained.pt")
        return run_evaluation(compose("eval", [f"checkpoint={path}", "eval.tsne_samples=0"]), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all", help="comma-separated method options, or all (the default)")
    ap.add_argument("--workdir", default="outputs/method_table")
    args, overrides = ap.parse_known_args()
    methods = all_methods() if args.methods == "all" else args.methods.split(",")
    bindir = Path(sys.executable).parent
    workdir = Path(args.workdir).resolve()
    rows = []
    floors = {"random small_cnn, untrained": "simclr"}
    if "cpc" in methods:
        floors["random CPC encoder (pooled patches), untrained"] = "cpc"
    for name, method in floors.items():
        r = floor(method, overrides, workdir)
        rows.append({"method": name, "knn_top1": round(r["knn_top1"], 4), "knn5_top1": round(r["knn5_top1"], 4),
                     "linear_top1": round(r["linear_top1"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    for method in methods:
        cwd = workdir / method
        cwd.mkdir(parents=True, exist_ok=True)
        row = {"method": method, "overrides": " ".join(overrides)}
        train_s, error = run([str(bindir / "cl-train"), f"method={method}", *overrides], cwd)
        row["train_wall_s"] = round(train_s, 1)
        if error is None:
            ckpt = sorted(cwd.glob("outputs/train/*/*/checkpoints/last.pt"))[-1]
            summary = json.loads((ckpt.parent.parent / "summary.json").read_text())
            eval_s, error = run([str(bindir / "cl-eval"), f"checkpoint={ckpt}"], cwd)
            row.update(final_loss=round(summary["final_loss"], 4), collapse_warning=summary["collapse_warning"])
        if error is None:
            result = json.loads(sorted(cwd.glob("outputs/eval/*/*/eval.json"))[-1].read_text())
            row.update(eval_wall_s=round(eval_s, 1), knn_top1=round(result["knn_top1"], 4),
                       knn5_top1=round(result["knn5_top1"], 4), linear_top1=round(result["linear_top1"], 4))
            if "zeroshot_top1" in result:  # clip, siglip: zero-shot with the held-out prompts
                row.update(zeroshot_top1=result["zeroshot_top1"], zeroshot_top5=result["zeroshot_top5"])
        else:
            row["error"] = error
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| method | train wall time | final loss | collapse warning | k-NN top-1 (k=200) | 5-NN top-1 | "
          "linear top-1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | {r['train_wall_s'] / 60:.1f} min | failed: {r['error']} | | | | |")
            continue
        wall = f"{r['train_wall_s'] / 60:.1f} min" if "train_wall_s" in r else "-"
        loss = f"{r['final_loss']:.3f}" if "final_loss" in r else "-"
        warned = ("yes" if r["collapse_warning"] else "no") if "collapse_warning" in r else "-"
        print(f"| {r['method']} | {wall} | {loss} | {warned} | {r['knn_top1']:.4f} | {r['knn5_top1']:.4f} | "
              f"{r['linear_top1']:.4f} |")


if __name__ == "__main__":
    main()
