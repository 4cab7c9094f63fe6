"""Every method as a new user picks it by name: `cl-train method=X` on the default data with nothing
overridden but the run folder, then `cl-eval` of its checkpoint. Each must lower its loss, raise no
collapse warning and beat the k-NN of the untrained encoder it started from by MARGIN. The methods are
read from the package's method group, so a method added later is covered the day it lands.

The methods train in two `cl-train -m method=...` sweeps (as a user sweeps over methods: the start-up
is paid once per sweep) side by side with one torch thread each, started in the background before the
session's first test (conftest's `start_in_background`: they take most of the suite's time, and the
other tests leave a core idle much of theirs; on 2 cores two 1-thread runs train 1.26x as many images
per second as one 2-thread run). Then one `cl-eval -m checkpoint=...` scores every run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
from importlib import resources
from pathlib import Path

import pytest
from conftest import BACKGROUND, BIN, cli_env, compose_cfg
from hydra.utils import get_class

from contrastive_cli.evaluate import run_evaluation
from contrastive_cli.train import untrained_checkpoint

METHODS = sorted(p.name[:-5] for p in resources.files("contrastive_cli.configs").joinpath("method").iterdir()
                 if p.name.endswith(".yaml"))
MARGIN = 0.03  # k-NN (k=200) above the untrained encoder's, as the issue that asked for this test set it
# about how many SimCLR runs each takes (their 1-thread times in a sweep, 2026-12-05: simclr 29 s, most 31-50 s,
# barlow_twins_imagenet 373 s, cpc 170 s, vicreg 92 s); the others about one
COST = {"barlow_twins_imagenet": 9, "cpc": 4, "vicreg": 2, "barlow_twins": 1.5, "simsiam": 1.5, "moco_v3": 1.5,
        "clip": 1.3, "siglip": 1.3, "nnclr": 1.2, "byol": 1.2}
ZERO_SHOT = 0.5  # clip, siglip: zero-shot top-1 with the held-out prompts (chance 0.1; 16 px digits gave 0.98 and 0.97)


def halves() -> list[list[str]]:
    """The methods in two lists of about equal cost, the costliest placed first."""
    parts: list[list[str]] = [[], []]
    for m in sorted(METHODS, key=lambda m: -COST.get(m, 1)):
        min(parts, key=lambda p: sum(COST.get(x, 1) for x in p)).append(m)
    return parts


def idle_priority() -> None:
    """Lowest CPU priority (nice 19): the sweeps take the CPU the other tests leave; at equal priority
    they took it from them, and the OpenMP threads of a test's own training waited on a core held by a
    sweep (one 4 s ResNet fixture took 119 s; the suite 25 min instead of 21)."""
    os.nice(19)


def start_in_background(root: Path) -> list[subprocess.Popen]:
    """`cl-train -m method=<half of the methods>` twice, nothing set but the sweep folder, from `root`."""
    procs = []
    for i, part in enumerate(halves()):
        with open(root / f"train{i}.stderr", "w") as stderr:  # a file, not a pipe: nobody reads it till the end
            procs.append(subprocess.Popen([str(BIN / "cl-train"), "-m", f"method={','.join(part)}",
                                           f"hydra.sweep.dir={root / f'train{i}'}"], cwd=root,
                                          stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                          env={**cli_env(), "OMP_NUM_THREADS": "1"}, preexec_fn=idle_priority))
    return procs


@pytest.fixture(scope="session")
def default_runs(request) -> dict:
    """{method: {"run": folder, "summary": summary.json, "eval": eval.json or None}}, plus "stderr" of both
    sweeps, for the failures' messages."""
    root, sweeps = request.config.stash[BACKGROUND][__name__]
    # each half's cl-eval starts as soon as that half has trained, beside the other half's training
    # (t-SNE off: a cl-eval setting, not a training one; the k-NN, 5-NN and linear numbers are the same)
    evals: dict[int, subprocess.Popen] = {}
    deadline = time.monotonic() + 3600
    while len(evals) < len(sweeps) and time.monotonic() < deadline:
        for i, sweep in enumerate(sweeps):
            if i not in evals and sweep.poll() is not None:
                done = [str(p.parent / "checkpoints" / "last.pt") for p in (root / f"train{i}").glob("*/summary.json")]
                with open(root / f"eval{i}.stderr", "w") as err:
                    evals[i] = subprocess.Popen([str(BIN / "cl-eval"), "-m", f"checkpoint={','.join(done)}",
                                                 "eval.tsne_samples=0", f"hydra.sweep.dir={root / f'eval{i}'}"],
                                                cwd=root, stdout=subprocess.DEVNULL, stderr=err, text=True,
                                                env=cli_env())
        time.sleep(1)
    stderr = []
    for i in range(len(sweeps)):
        stderr += [ln for ln in (root / f"train{i}.stderr").read_text().splitlines() if ln.strip()][-20:]
        if i in evals:
            evals[i].wait(timeout=1200)
            stderr += [ln for ln in (root / f"eval{i}.stderr").read_text().splitlines() if ln.strip()][-20:]
    runs = {}
    for path in root.glob("train*/*/summary.json"):
        summary = json.loads(path.read_text())
        runs[summary["settings"]["method"]] = {"run": path.parent, "summary": summary, "eval": None}
    checkpoints = {str(r["run"] / "checkpoints" / "last.pt"): m for m, r in runs.items()}
    for path in root.glob("eval*/*/eval.json"):
        result = json.loads(path.read_text())
        runs[checkpoints[result["checkpoint"]]]["eval"] = result
    return {**runs, "stderr": stderr}


@pytest.fixture(scope="session")
def floors(tmp_path_factory) -> dict:
    """cl-eval's k-NN of the untrained encoder, per kind of evaluation encoder (CPC scores features pooled
    over its patch grid; every other method the encoder itself), from the seed every run starts from."""
    root, found, kinds = tmp_path_factory.mktemp("floors"), {}, {}
    for method in METHODS:
        cfg = compose_cfg("train", [f"method={method}"])
        kind = kinds[method] = get_class(cfg.method._target_).eval_encoder.__qualname__
        if kind not in found:
            out = root / method
            out.mkdir()
            path = untrained_checkpoint(cfg, out / "untrained.pt")
            found[kind] = run_evaluation(compose_cfg("eval", [f"checkpoint={path}", "eval.tsne_samples=0"]), out)
    return {m: found[kinds[m]] for m in METHODS}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_at_its_defaults(default_runs, floors, method):
    run = default_runs.get(method)
    assert run is not None and run["eval"] is not None, default_runs["stderr"]
    summary, result = run["summary"], run["eval"]
    assert summary["overrides"] == [f"method={method}"]  # nothing but the method (and the run folder)
    losses = [float(r["loss"]) for r in csv.DictReader(open(Path(run["run"]) / "metrics.csv"))]
    assert len(losses) == summary["epochs"] and losses[-1] < losses[0], losses
    assert not summary["collapse_warning"], (Path(run["run"]) / "train.log").read_text()[-3000:]
    floor = floors[method]["knn_top1"]
    assert result["knn_top1"] >= floor + MARGIN, (method, result["knn_top1"], floor)
    assert summary["knn_top1"] == pytest.approx(result["knn_top1"], abs=1e-3)  # the run's own k-NN is cl-eval's
    if "zeroshot_top1" in result:  # the image-text methods: their class names, prompted unlike in training
        assert result["zeroshot_top1"] >= ZERO_SHOT, (method, result["zeroshot_top1"])
        assert summary["zeroshot_top1"] == pytest.approx(result["zeroshot_top1"], abs=1e-3)
