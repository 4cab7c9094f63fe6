"""The console scripts as a user types them: train, evaluate, sweep, and every bad input."""

import json
import struct

import pytest
from conftest import error_lines, run_cli


def _last_ckpt(root):
    found = sorted(root.glob("outputs/train/*/*/checkpoints/last.pt"))
    assert found, "no checkpoint written"
    return found[-1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short cl-train run on the embedded default data, shared by the tests below."""
    cwd = tmp_path_factory.mktemp("user")
    proc = run_cli("cl-train", "trainer.epochs=2", "trainer.batch_size=128", "encoder.width=8",
                   "trainer.checkpoint_every=1", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd, _last_ckpt(cwd)


def test_train_writes_run_dir(trained):
    cwd, ckpt = trained
    run = ckpt.parent.parent
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["epoch", "step", "loss", "lr", "time"] and len(rows) == 3
    assert {p.name for p in ckpt.parent.iterdir()} == {"last.pt", "epoch_0001.pt", "epoch_0002.pt"}
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 * (1347 // 128) and 0 < summary["knn_top1"] <= 1
    assert summary["knn5_top1"] > summary["knn_top1"]  # digits: 200 neighbours spill over ~135-image classes
    log = (run / "train.log").read_text()
    assert "k=200 is more than the smallest class's" in log and "5-NN: " in log
    # the last epoch's record is written once, under two names
    assert (ckpt.parent / "epoch_0002.pt").stat().st_ino == ckpt.stat().st_ino


def test_eval_writes_json_and_tsne(trained, tmp_path):
    cwd, ckpt = trained
    proc = run_cli("cl-eval", f"checkpoint={ckpt}", "eval.tsne_samples=300", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "k-NN top-1" in proc.stdout and "linear top-1" in proc.stdout
    out = next(tmp_path.glob("outputs/eval/*/*"))
    result = json.loads((out / "eval.json").read_text())
    for key in ("knn_top1", "knn5_top1", "linear_top1", "n_train", "n_test", "dataset", "checkpoint"):
        assert key in result
    assert result["n_train"] == 1347 and result["n_test"] == 450 and result["dataset"] == "digits"
    assert 0.3 < result["linear_top1"] <= 1.0
    png = (out / "tsne.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 300


def test_multirun_makes_one_dir_per_job(tmp_path):
    proc = run_cli("cl-train", "-m", "optimizer.lr=0.03,0.1", "trainer.epochs=1", "trainer.batch_size=256",
                   "encoder.width=8", "trainer.knn_monitor=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(tmp_path.glob("outputs/multirun/*/*/*/checkpoints/last.pt"))
    assert len(jobs) == 2
    lrs = sorted(float(j.parent.parent.joinpath(".hydra/config.yaml").read_text().split("lr: ")[1].split()[0])
                 for j in jobs)
    assert lrs == [0.03, 0.1]


BAD_TRAIN = [
    (["method=nope"], "method=nope: unknown option; choose from"),
    (["encoder=vgg"], "encoder=vgg: unknown option"),
    (["trainer.epochs=abc"], "trainer.epochs"),
    (["trainer.epochs=0"], "trainer.epochs=0"),
    (["optimizer.lr=0"], "optimizer.lr=0"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1"),
    (["method.temperature=0"], "method.temperature=0"),
    (["trainer.batch_size=1"], "trainer.batch_size=1"),
    (["trainer.bogus=1"], "trainer.bogus: unknown key"),
    (["+trainer.bogus=1"], "trainer.bogus: unknown key"),
    (["+bogus=3"], "bogus: unknown key"),
    (["+method.bogus=3"], "method.bogus: unknown key"),
    (["dataset=cifar10", "paths.data_dir=nowhere", "dataset.source.download=false"], "dataset cifar10 not found"),
    (["trainer.resume=missing.pt"], "trainer.resume=missing.pt: no such file"),
    (["-m", "optimizer.lr=0.1,-1"], "optimizer.lr=-1"),
    (["optimizer.lr=nan"], "optimizer.lr=nan: must be a finite number"),
    (["optimizer.lr=inf"], "optimizer.lr=inf: must be a finite number"),
    (["method.temperature=nan"], "method.temperature=nan: must be a finite number"),
    (["schedule.warmup_epochs=inf"], "schedule.warmup_epochs=inf: must be a finite number"),
    (["optimizer.momentum=nan"], "optimizer.momentum=nan: must be a finite number"),
    (["dataset=imagefolder"], "dataset.source.root: missing; give dataset.source.root=<folder of images>"),
    (["trainer.seed=-1"], "trainer.seed=-1: must be an integer in [0, 2^32)"),
    (["trainer.device=cudaXYZ"], "trainer.device=cudaXYZ: choose from auto, cpu, cuda, cuda:N"),
    (["dataset.root=/data"], "dataset.root: unknown key; did you mean dataset.source.root?"),
    (["+dataset.root=/data"], "did you mean dataset.source.root?"),
    (["trainer.epoch=3"], "trainer.epoch: unknown key; did you mean trainer.epochs?"),
    (["methd=simclr"], "methd: unknown config group or key; did you mean method=simclr?"),
    (["~trainer.epochs"], "~trainer.epochs: removes a setting cl-train needs (its built-in default would run without "
                          "a word); set trainer.epochs=<value> instead"),
    (["method=simclr2", "--cfg", "job"], "method=simclr2: unknown option; choose from"),  # checked before printing
    (["-m", "hydra/sweeper=optuna", "optimizer.lr=interval(1.0,0.1)"],
     "optimizer.lr=interval(1.0,0.1): an interval's low end must be below its high end (interval(0.1,1.0))"),
    (["method=glob(sim*)"], "Sweep parameters 'method=glob(sim*)' requires --multirun"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_bad_train_input_is_one_line(tmp_path, args, expected):
    proc = run_cli("cl-train", *args, cwd=tmp_path)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1 and lines[0].startswith("cl-train: error:"), proc.stderr
    assert expected in lines[-1]
    assert not list(tmp_path.glob("outputs/**/*.pt"))
    if "not found" not in expected:  # caught before the run: not even a run folder is made
        assert not (tmp_path / "outputs").exists()


def test_bad_checkpoints_are_one_line(tmp_path, trained):
    _, ckpt = trained
    torn = tmp_path / "torn.pt"
    torn.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    legacy = tmp_path / "legacy.pt"  # the old pickle format: torch's warnings must not precede the line
    import torch

    torch.save({"weights": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    cases = [("missing.pt", "no such file"), (str(torn), "not a readable cl-train checkpoint (a truncated or damaged"),
             (str(text), "not a readable cl-train checkpoint (a text file, starting 'hello')"),
             (str(tmp_path), "a folder without checkpoints/ inside"), (str(legacy), "not a cl-train checkpoint")]
    for path, expected in cases:
        proc = run_cli("cl-eval", f"checkpoint={path}", cwd=tmp_path)
        lines = error_lines(proc)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[-1].startswith("cl-eval: error: checkpoint=") and expected in lines[-1], lines
    assert not (tmp_path / "outputs").exists()  # a refusal before any work leaves no run folder
    proc = run_cli("cl-train", "trainer.batch_size=5000", cwd=tmp_path)  # refused inside the job, after loading data
    assert proc.returncode == 1 and "use trainer.batch_size<=1347" in proc.stderr and not (tmp_path / "outputs").exists()
    proc = run_cli("cl-eval", cwd=tmp_path)
    assert proc.returncode != 0 and error_lines(proc) == ["cl-eval: error: checkpoint: missing; give checkpoint=<path to a .pt checkpoint>"]


def test_eval_embed_and_export_take_a_run_folder_and_say_which_checkpoint(tmp_path, trained):
    import shutil

    _, ckpt = trained
    run = tmp_path / "run"
    shutil.copytree(ckpt.parent.parent, run, ignore=shutil.ignore_patterns("*.png", ".hydra"))
    proc = run_cli("cl-eval", f"checkpoint={run}", "eval.tsne_samples=0", "eval.linear_max_iter=20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"checkpoint={run} is a run folder: using {run / 'checkpoints' / 'last.pt'}" in proc.stdout + proc.stderr
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr  # not a terminal: no tqdm bars in the log
    evaluated = json.loads(next((tmp_path / "outputs" / "eval").rglob("eval.json")).read_text())["checkpoint"]
    assert evaluated == str(run / "checkpoints" / "last.pt")
    shutil.copy(run / "checkpoints" / "epoch_0001.pt", run / "checkpoints" / "best.pt")  # what knn_every writes
    proc = run_cli("cl-export", f"checkpoint={run}", "format=state_dict", f"out={tmp_path / 'enc.pt'}", cwd=tmp_path)
    assert proc.returncode == 0 and "using its best.pt" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert json.loads((tmp_path / "enc.pt.json").read_text())["epoch"] == 1


def test_resume_from_torn_checkpoint_is_refused(tmp_path, trained):
    _, ckpt = trained
    torn = tmp_path / "torn.pt"
    torn.write_bytes(ckpt.read_bytes()[:1000])
    proc = run_cli("cl-train", f"trainer.resume={torn}", cwd=tmp_path)
    assert proc.returncode != 0 and error_lines(proc)[-1].startswith(f"cl-train: error: trainer.resume={torn}")
