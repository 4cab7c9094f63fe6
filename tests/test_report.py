"""cl-report on hand-written run folders: a sweep with done, running and failed jobs, an eval elsewhere."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contrastive_cli import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_job(job: Path, overrides: list[str], metrics: list[dict] | None = None, summary: dict | None = None,
             error: str | None = None) -> None:
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / ".hydra" / "config.yaml").write_text("trainer:\n  epochs: 3\n")
    (job / "checkpoints").mkdir()
    if metrics is not None:
        fields = ["epoch", "step", "loss", "lr", "time", "emb_std", "neg_cos", *(["knn_top1"] if "knn_top1" in metrics[0] else [])]
        with open(job / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, restval="0.5")
            w.writeheader()
            w.writerows(metrics)
    if summary is not None:
        (job / "summary.json").write_text(json.dumps({"overrides": overrides, **summary}))
        for name in ("last", "best"):
            (job / "checkpoints" / f"{name}.pt").write_bytes(b"")
    if error is not None:
        (job / "error.txt").write_text(error + "\n")


def epochs(losses, knn=None, seconds=10.0):
    rows = [{"epoch": i + 1, "step": 10 * (i + 1), "loss": loss, "time": seconds * (i + 1)} for i, loss in enumerate(losses)]
    for row, k in zip(rows, knn or [None] * len(rows), strict=True):
        if knn is not None:  # the column exists only when the online k-NN monitor was on
            row["knn_top1"] = "" if k is None else k
    return rows


def write_eval(folder: Path, checkpoint: Path, knn: float, mtime: float) -> None:
    folder.mkdir(parents=True)
    path = folder / "eval.json"
    path.write_text(json.dumps({"checkpoint": str(checkpoint.resolve()), "knn_top1": knn, "knn5_top1": knn - 0.05,
                                "linear_top1": knn + 0.05, "dataset": "cifar10", "epoch": 3}))
    os.utime(path, (mtime, mtime))


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # keeps the repository's own outputs/eval out of the search
    root = tmp_path / "multirun" / "12-00-00"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    common = ["trainer.epochs=3"]  # the same in every job: not a swept column
    make_job(root / "0", ["method=simclr", "optimizer.lr=0.1", *common], epochs([6.0, 5.0, 4.5], [None, 0.6, 0.55]),
             {"epochs": 3, "final_loss": 4.5, "wall_time_s": 31.25, "knn_top1": 0.55, "knn_best": 0.6, "knn_best_epoch": 2})
    make_job(root / "1", ["method=moco", "optimizer.lr=0.01", *common], epochs([7.0, 6.5, 6.0]),
             {"epochs": 3, "final_loss": 6.0, "wall_time_s": 40.0, "knn_top1": 0.65})
    make_job(root / "2", ["method=simclr", "optimizer.lr=0.01", *common], epochs([6.2], [0.3]))
    make_job(root / "3", ["method=moco", "optimizer.lr=0.1", *common], error="loss became nan at epoch 1, step 7")
    best = root / "0" / "checkpoints" / "best.pt"
    write_eval(tmp_path / "evals" / "new", best, 0.7, mtime=2_000_000_000)
    write_eval(tmp_path / "evals" / "old", best, 0.1, mtime=1_000_000_000)  # older: must not win
    write_eval(tmp_path / "evals" / "other", tmp_path / "elsewhere" / "last.pt", 0.9, mtime=2_000_000_000)
    return root


def read_csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {r["job"]: r for r in csv.DictReader(f)}


def test_sweep_report_rows_files_and_png(sweep, tmp_path, capsys):
    assert report.main([str(sweep), "--evals", str(tmp_path / "evals")]) == 0
    printed = capsys.readouterr().out

    rows = read_csv(sweep / "report.csv")
    with open(sweep / "report.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)][1:] == ["1", "0", "2", "3"]  # best k-NN first, no metric last
    assert {j: r["status"] for j, r in rows.items()} == {
        "0": "done", "1": "done", "2": "unfinished", "3": "failed: loss became nan at epoch 1, step 7"}
    assert "trainer.epochs" not in rows["0"]
    assert {j: (r["method"], r["optimizer.lr"]) for j, r in rows.items()} == {
        "0": ("simclr", "0.1"), "1": ("moco", "0.01"), "2": ("simclr", "0.01"), "3": ("moco", "0.1")}
    assert (rows["0"]["knn_best"], rows["0"]["knn_best_epoch"], rows["0"]["epochs"]) == ("0.6000", "2", "3")
    assert (rows["2"]["knn_best"], rows["2"]["epochs"], rows["2"]["final_loss"]) == ("0.3000", "1", "6.2000")
    assert rows["3"]["epochs"] == "0" and rows["3"]["final_loss"] == ""
    assert (rows["0"]["eval_ckpt"], rows["0"]["knn_top1"], rows["0"]["linear_top1"]) == ("best", "0.7000", "0.7500")
    assert all(rows[j]["knn_top1"] == rows[j]["eval_ckpt"] == "" for j in "123")

    md = (sweep / "report.md").read_text().splitlines()
    assert len(md) == 2 + 4 and all(line.startswith("| ") and line.endswith(" |") for line in md)
    assert set(md[1].replace("|", "").split()) == {"---"}
    assert md[0].count("|") == md[2].count("|") == len(rows["0"]) + 1

    assert printed.splitlines()[0].split()[:4] == ["job", "status", "method", "optimizer.lr"]
    assert "failed: loss became nan" in printed

    png = sweep / "report.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(png) as im:
        width, height = im.size
    assert width > 2 * height > 400  # two metric panels and the loss curves, side by side


def test_single_run_without_metric_and_damaged_summary(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    make_job(run, ["method=byol", "optimizer.lr=0.5", "hydra.run.dir=run"], epochs([3.0, 2.0]))
    (run / "summary.json").write_text('{"epochs": 2, "final_')  # cut off mid-write
    out = tmp_path / "out"
    assert report.main([str(run), "--out", str(out)]) == 0
    (row,) = read_csv(out / "report.csv").values()
    assert (row["job"], row["status"], row["epochs"], row["final_loss"]) == ("run", "done", "2", "2.0000")
    assert (row["method"], row["optimizer.lr"]) == ("byol", "0.5")  # a single run: every override is a column
    assert "hydra.run.dir" not in row  # ... but where it was written to
    assert "summary.json unreadable" in row["note"] and row["knn_best"] == ""
    assert (out / "report.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (run / "report.csv").exists()


def test_several_dirs_are_labelled_by_their_own_name(sweep, tmp_path):
    single = tmp_path / "single"
    make_job(single, ["optimizer.lr=0.3"], epochs([5.0]))
    assert report.main([str(sweep), str(single), "--out", str(tmp_path / "out")]) == 0
    assert set(read_csv(tmp_path / "out" / "report.csv")) == {"12-00-00/0", "12-00-00/1", "12-00-00/2",
                                                               "12-00-00/3", "single"}


def test_missing_dir_is_one_line_and_exit_1(tmp_path):
    missing = tmp_path / "no_such_sweep"
    proc = subprocess.run([sys.executable, "-m", "contrastive_cli.report", str(missing)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"cl-report: error: {missing}: no such directory"]


def test_dir_without_runs_is_an_error(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert report.main([str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"cl-report: error: {tmp_path / 'empty'}: no run folder")


def test_image_text_jobs_are_ranked_by_their_own_score(tmp_path, monkeypatch):
    # CLIP's monitor is zero-shot (labelled data) or retrieval recall@1 (pairs), not the image tower's k-NN
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "multirun"

    def job(n: str, overrides: list[str], column: str, scores: list[float], summary: dict | None):
        make_job(root / n, overrides, summary=summary)
        rows = [{"epoch": i + 1, "step": i + 1, "loss": 3.0 - i, column: s} for i, s in enumerate(scores)]
        with open(root / n / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["epoch", "step", "loss", column])
            w.writeheader()
            w.writerows(rows)

    job("0", ["method=clip", "optimizer.lr=0.001"], "zeroshot_top1", [0.5, 0.8, 0.7],
        {"epochs": 3, "final_loss": 1.0, "knn_top1": 0.5, "zeroshot_top1": 0.7, "zeroshot_top1_best": 0.8})
    job("1", ["method=clip", "optimizer.lr=0.01"], "zeroshot_top1", [0.4, 0.6, 0.6],
        {"epochs": 3, "final_loss": 1.0, "knn_top1": 0.9, "zeroshot_top1": 0.6, "zeroshot_top1_best": 0.6})
    job("2", ["method=siglip", "optimizer.lr=0.01"], "zeroshot_top1", [0.65], None)  # still running
    (root / "ev").mkdir()
    (root / "ev" / "eval.json").write_text(json.dumps({
        "checkpoint": str((root / "1" / "checkpoints" / "best.pt").resolve()), "knn_top1": 0.9, "knn5_top1": 0.9,
        "linear_top1": 0.9, "zeroshot_top1": 0.61, "zeroshot_top5": 0.99}))
    assert report.main([str(root)]) == 0
    with open(root / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["job"] for r in table] == ["0", "2", "1"]  # by zero-shot, though job 1's k-NN is the highest
    assert [(r["zeroshot_best"], r["zeroshot_last"]) for r in table] == [
        ("0.8000", "0.7000"), ("0.6500", "0.6500"), ("0.6000", "0.6000")]
    assert (table[2]["zeroshot_top1"], table[2]["zeroshot_top5"], table[2]["knn_last"]) == ("0.6100", "0.9900", "0.9000")
    assert "retrieval_r1_best" not in table[0] and "i2t_r1" not in table[0]  # no pairs job here: no empty columns
    # a pairs job (retrieval) beside them, and a SimCLR job: the k-NN ranks again, each score in its column
    job("3", ["method=clip", "dataset=pairs"], "retrieval_r1", [0.2, 0.3], {"epochs": 2, "retrieval_r1_best": 0.3})
    make_job(root / "4", ["method=simclr"], epochs([5.0], [0.95]), {"epochs": 1, "knn_top1": 0.95, "knn_best": 0.95})
    assert report.main([str(root)]) == 0
    with open(root / "report.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert table[0]["job"] == "4" and table[-1]["job"] == "3" and table[-1]["retrieval_r1_best"] == "0.3000"
