"""`cl-report DIR [DIR...]`: one table and one picture for the jobs of a sweep, finished or not.

Reads only what cl-train and cl-eval leave on disk (.hydra/overrides.yaml, metrics.csv, summary.json,
error.txt, eval.json) and never imports torch, so it starts fast beside a sweep that is still training.
"""

import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import yaml

from .errors import UserError

PROG = "cl-report"
RUN_MARKERS = (".hydra/overrides.yaml", "metrics.csv", "summary.json")
EVAL_KEYS = ("knn_top1", "knn5_top1", "linear_top1")
FIXED = ("epochs", "final_loss", "knn_best", "knn_best_epoch", "knn_last", "train_time_s", "wall_time_s")
# CLIP / SigLIP runs: their monitor (zero-shot on labelled data, retrieval recall@1 on pairs) and cl-eval's
IMAGE_TEXT = ("zeroshot_best", "zeroshot_last", "retrieval_r1_best")
IMAGE_TEXT_EVAL = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")
MONITORS = {"knn": "knn_top1", "zeroshot": "zeroshot_top1", "retrieval": "retrieval_r1"}  # metrics.csv columns


def _num(text) -> float | None:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _first(*values):
    return next((v for v in values if v is not None), None)


def _read(path: Path, parse, notes: list[str]):
    """`parse(text)` of the file, None when it is absent; a damaged file becomes a note, not an error."""
    if not path.is_file():
        return None
    try:
        return parse(path.read_text())
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError, csv.Error) as e:
        notes.append(f"{path.name} unreadable ({type(e).__name__})")
        return None


def _json_dict(text: str) -> dict:
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    return d


def _metrics(text: str, notes: list[str]) -> list[dict]:
    rows = []
    for r in csv.DictReader(text.splitlines()):
        try:
            rows.append({"epoch": int(r["epoch"]), "loss": float(r["loss"]), "time": _num(r.get("time")),
                         **{k: _num(r.get(col)) for k, col in MONITORS.items()}})
        except (KeyError, TypeError, ValueError):
            # the trainer rewrites the file every epoch: a reader can catch a half-written last row
            notes.append("metrics.csv: skipped a damaged row")
    return rows


def _overrides(run: Path, summary: dict, notes: list[str]) -> dict[str, str]:
    items = _read(run / ".hydra" / "overrides.yaml", yaml.safe_load, notes)
    if not isinstance(items, list):
        items = summary.get("overrides") if isinstance(summary.get("overrides"), list) else []
    out = {}
    for o in items:
        key, _, value = str(o).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra"):  # where the run was written to is no setting of the run
            out[key] = value
    return out


def _is_eval(folder: Path) -> bool:
    """cl-eval's folders carry .hydra/overrides.yaml too; they name a checkpoint, a training run never does."""
    if (folder / "eval.json").is_file():
        return True
    items = _read(folder / ".hydra" / "overrides.yaml", yaml.safe_load, [])
    return isinstance(items, list) and any(str(o).lstrip("+").startswith("checkpoint=") for o in items)


def find_runs(root: Path) -> list[Path]:
    """The run folders at or below `root`, in natural order (job 10 after job 9)."""
    runs = []
    for here, dirs, _ in os.walk(root):
        folder = Path(here)
        if any((folder / m).is_file() for m in RUN_MARKERS) and not _is_eval(folder):
            runs.append(folder)
            dirs.clear()  # a run folder holds checkpoints, never another run
        else:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(runs, key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.parts])


def load_job(run: Path, label: str) -> dict:
    """One row of the report: status, overrides and metrics of the job in `run`."""
    notes: list[str] = []
    summary = _read(run / "summary.json", _json_dict, notes)
    error = _read(run / "error.txt", str.strip, notes)
    history = _read(run / "metrics.csv", lambda t: _metrics(t, notes), notes) or []
    if (run / "summary.json").is_file():
        status = "done"
    elif error is not None:
        status = "failed: " + (error.splitlines()[0] if error else "(no message)")
    else:
        status = "unfinished"
    s, last = summary or {}, history[-1] if history else {}
    online = [(r["knn"], r["epoch"]) for r in history if r["knn"] is not None]
    best, best_epoch = max(online, default=(None, None))
    zeroshot = [r["zeroshot"] for r in history if r["zeroshot"] is not None]
    retrieval = [r["retrieval"] for r in history if r["retrieval"] is not None]
    return {"job": label, "status": status, "epochs": _first(s.get("epochs"), last.get("epoch"), 0),
            "final_loss": _first(_num(s.get("final_loss")), last.get("loss")),
            "knn_best": _first(_num(s.get("knn_best")), best),
            "knn_best_epoch": _first(s.get("knn_best_epoch"), best_epoch),
            # summary's knn_top1 is the k-NN after the last epoch; a running job has only the online one
            "knn_last": _first(_num(s.get("knn_top1")), online[-1][0] if online else None),
            # training alone (metrics.csv), and the job's wall time with the k-NN monitor and the summary
            "train_time_s": last.get("time"), "wall_time_s": _first(_num(s.get("wall_time_s")), last.get("time")),
            "zeroshot_best": _first(_num(s.get("zeroshot_top1_best")), max(zeroshot, default=None)),
            "zeroshot_last": _first(_num(s.get("zeroshot_top1")), zeroshot[-1] if zeroshot else None),
            "retrieval_r1_best": _first(_num(s.get("retrieval_r1_best")), max(retrieval, default=None)),
            "note": "; ".join(dict.fromkeys(notes)), "_run": run,
            "_params": _overrides(run, s, notes), "_history": [(r["epoch"], r["loss"]) for r in history]}


def find_evals(dirs: list[Path]) -> list[tuple[float, Path, dict]]:
    """(mtime, checkpoint it scored, contents) of every readable eval.json under `dirs`."""
    found = []
    for path in dict.fromkeys(p.resolve() for d in dirs for p in d.rglob("eval.json")):
        try:
            e = json.loads(path.read_text())
            found.append((path.stat().st_mtime, Path(e["checkpoint"]).resolve(), e))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # being written, or not cl-eval's: an eval is extra, a job's row does not depend on it
    return found


def attach_evals(rows: list[dict], evals: list[tuple[float, Path, dict]]) -> None:
    for row in rows:
        mine = [e for e in evals if row["_run"] in e[1].parents]
        if mine:
            _, ckpt, e = max(mine, key=lambda e: e[0])
            row.update({"eval_ckpt": ckpt.stem, **{k: _num(e.get(k)) for k in (*EVAL_KEYS, *IMAGE_TEXT_EVAL)}})


def build_report(dirs: list[Path], eval_dirs: list[Path]) -> tuple[list[dict], list[str], list[str]]:
    """Rows sorted best first, the table's columns, and the swept parameters."""
    for d in [*dirs, *eval_dirs]:
        if not d.is_dir():
            raise UserError(f"{d}: " + ("not a directory" if d.exists() else "no such directory"))
    runs: dict[Path, Path] = {}  # run folder -> the DIR it was found under (the first, if given twice)
    for d in dirs:
        found = find_runs(d.resolve())
        if not found:
            raise UserError(f"{d}: no run folder in it (none holds .hydra/overrides.yaml, metrics.csv or summary.json)")
        for run in found:
            runs.setdefault(run, d.resolve())
    # several DIRs, or a DIR that is itself the run: the parent's name keeps the labels apart
    rows = [load_job(run, run.relative_to(root.parent if len(dirs) > 1 or run == root else root).as_posix())
            for run, root in runs.items()]
    default = Path("outputs/eval")
    attach_evals(rows, find_evals([*eval_dirs, *dirs, *([default] if default.is_dir() else [])]))
    keys = list(dict.fromkeys(k for r in rows for k in r["_params"]))
    swept = keys if len(rows) == 1 else [k for k in keys if len({r["_params"].get(k) for r in rows}) > 1]
    for r in rows:
        r.update({k: r["_params"].get(k, "") for k in swept})
    metric, _ = report_metric(rows)
    for r in rows:
        r["_metric"] = metric(r)
    rows.sort(key=lambda r: (r["_metric"] is None, -(r["_metric"] or 0.0)))
    image_text = [k for k in IMAGE_TEXT if any(r[k] is not None for r in rows)]
    evals = [k for k in (*EVAL_KEYS, *IMAGE_TEXT_EVAL) if any(r.get(k) is not None for r in rows)]
    extra = (["eval_ckpt", *evals] if any("eval_ckpt" in r for r in rows) else []) + \
        (["note"] if any(r["note"] for r in rows) else [])
    return rows, ["job", "status", *swept, *FIXED, *image_text, *extra], swept


def _image_text_score(r: dict) -> float | None:
    """A CLIP / SigLIP job's own score: zero-shot top-1 (best online, cl-eval's, last), else recall@1 on
    held-out pairs (best online, else cl-eval's mean of both directions)."""
    pair = (r.get("i2t_r1"), r.get("t2i_r1"))
    return _first(r.get("zeroshot_best"), r.get("zeroshot_top1"), r.get("zeroshot_last"), r.get("retrieval_r1_best"),
                  (pair[0] + pair[1]) / 2 if None not in pair else None)


def report_metric(rows: list[dict]):
    """(score of a row, its axis label) that ranks and plots the jobs: the k-NN (best available), or for a
    table whose scored jobs are all image-text ones, their own score (their image tower's k-NN is a column)."""
    scored = [r for r in rows if _image_text_score(r) is not None or
              _first(r["knn_best"], r.get("knn_top1"), r["knn_last"]) is not None]
    if scored and all(_image_text_score(r) is not None for r in scored):
        return _image_text_score, "zero-shot top-1 / retrieval R@1 (best available)"
    return (lambda r: _first(r["knn_best"], r.get("knn_top1"), r["knn_last"])), "k-NN top-1 (best available)"


def _cell(row: dict, col: str) -> str:
    v = row.get(col)
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.1f}" if col.endswith("time_s") else f"{v:.4f}"
    return str(v)


def text_table(rows: list[dict], columns: list[str]) -> str:
    cells = [columns, *([_cell(r, c) for c in columns] for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(columns), line(["---"] * len(columns)),
                      *(line([_cell(r, c) for c in columns]) for r in rows)]) + "\n"


def _values(row: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={row['_params'].get(k, '')}" for k in keys)


def _metric_panel(ax, rows: list[dict], param: str, others: list[str]) -> None:
    """The metric against `param`, one line per combination of the `others`."""
    values = [r["_params"].get(param, "") for r in rows]
    nums = [_num(v) for v in values]
    numeric = all(n is not None for n in nums)
    if numeric:
        x_of = dict(zip(values, nums, strict=True))
    else:
        cats = sorted(set(values))
        x_of = {v: i for i, v in enumerate(cats)}
        ax.set_xticks(range(len(cats)), cats, rotation=20 if len(cats) > 4 else 0)
        ax.set_xlim(-0.5, len(cats) - 0.5)
    lines: dict[str, list] = {}
    for r, v in zip(rows, values, strict=True):
        if r["_metric"] is not None:
            lines.setdefault(_values(r, others), []).append((x_of[v], r["_metric"]))
    for label, points in lines.items():
        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=label or None)
    if numeric and min(nums) > 0 and max(nums) / min(nums) >= 100:  # lr, wd sweeps span decades
        ax.set_xscale("log")
    label = report_metric(rows)[1]
    if not lines:
        ax.text(0.5, 0.5, f"no {label.split(' (')[0]} yet", ha="center", va="center", transform=ax.transAxes)
    elif others:
        ax.legend(fontsize=7)
    ax.set(xlabel=param, ylabel=label)
    ax.grid(alpha=0.3)


def plot(rows: list[dict], swept: list[str], path: Path) -> None:
    """Metric against each swept parameter (left), every job's loss curve (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(swept) + 1, figsize=(5 * (len(swept) + 1), 4), squeeze=False)
    for ax, p in zip(axes[0][:-1], swept, strict=True):
        _metric_panel(ax, rows, p, [q for q in swept if q != p])
    ax = axes[0][-1]
    for r in rows:
        if r["_history"]:
            ax.plot(*zip(*r["_history"], strict=True), marker="o", ms=2, label=_values(r, swept) or r["job"])
    if any(r["_history"] for r in rows):
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no finished epoch yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="epoch", ylabel="training loss", title="loss curves")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """`cl-report DIR [DIR...]`: print the jobs' table; write report.csv, report.md and report.png."""
    ap = argparse.ArgumentParser(prog=PROG, description="Tabulate and plot the jobs of cl-train runs and sweeps "
                                 "(done, failed or still running), with the cl-eval results of their checkpoints.")
    ap.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                    help="a multirun folder, a run folder, or a folder holding several (searched recursively)")
    ap.add_argument("--evals", action="append", type=Path, default=[], metavar="DIR",
                    help="also search DIR for eval.json (repeatable; outputs/eval and the DIRs are always searched)")
    ap.add_argument("--out", type=Path, metavar="DIR", help="where to write report.{csv,md,png} (default: the first DIR)")
    args = ap.parse_args(argv)
    out = args.out or args.dirs[0]
    try:
        rows, columns, swept = build_report(args.dirs, args.evals)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "report.csv", "w", newline="") as f:
            csv.writer(f).writerows([columns, *([_cell(r, c) for c in columns] for r in rows)])
        (out / "report.md").write_text(markdown_table(rows, columns))
        plot(rows, swept, out / "report.png")
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(text_table(rows, columns))
    print(f"wrote {out / 'report.csv'}, report.md, report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
