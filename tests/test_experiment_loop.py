"""The experiment loop: the online k-NN and best.pt, what a run records, progress, transfer
evaluation, the user's own configs, failed sweep jobs and the report of a real sweep."""

import csv
import json
import logging

import pytest
from conftest import compose_cfg, error_lines, run_cli

from contrastive_cli import checkpoint
from contrastive_cli.engine import CollapseMonitor
from contrastive_cli.evaluate import run_evaluation
from contrastive_cli.train import run_training


def test_online_knn_equals_cl_eval_and_best_pt_keeps_the_best(tmp_path, fast_train, caplog):
    caplog.set_level(logging.INFO, logger="contrastive_cli")
    common = [*fast_train, "trainer.epochs=3", "trainer.checkpoint_every=1", "optimizer.lr=0.3"]
    cfg = compose_cfg("train", [*common, "trainer.knn_every=1", "trainer.progress=log", "trainer.progress_every=4"])
    summary = run_training(cfg, tmp_path / "run")
    logged = caplog.text
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    online = [r["knn_top1"] for r in ckpt["history"]]
    assert len(online) == 3 and all(0 < v <= 1 for v in online)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["knn_top1"]) for r in rows] == pytest.approx(online)
    for epoch in (1, 2, 3):  # cl-eval on the same checkpoint and split gives the same number
        path = tmp_path / "run" / "checkpoints" / f"epoch_{epoch:04d}.pt"
        out = tmp_path / f"eval{epoch}"
        out.mkdir()
        result = run_evaluation(compose_cfg("eval", [f"checkpoint={path}", "eval.tsne_samples=0",
                                                     "eval.linear_max_iter=50"]), out)
        assert result["knn_top1"] == pytest.approx(online[epoch - 1], abs=1 / 450 + 1e-9), epoch
    best = checkpoint.load(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["epoch"] == 1 + online.index(max(online))
    assert summary["knn_best"] == round(max(online), 4) and summary["knn_best_epoch"] == best["epoch"]
    assert summary["knn_top1"] == round(online[-1], 4)
    # log mode: a line at the first step, then at the first loss read (every log_every=10) 4 or more steps on
    assert "step 1/30 " in logged and "step 10/30 " in logged and "step 11/30 " not in logged and "eta " in logged
    assert "knn_top1" in logged.split("epoch 1/3")[1].splitlines()[0]

    # the monitor reads the model without changing it: the same run without it trains the same
    caplog.clear()
    plain = compose_cfg("train", [*common, "trainer.progress=none"])
    run_training(plain, tmp_path / "plain")
    other = checkpoint.load(tmp_path / "plain" / "checkpoints" / "last.pt")
    assert [r["loss"] for r in other["history"]] == [r["loss"] for r in ckpt["history"]]
    assert not (tmp_path / "plain" / "checkpoints" / "best.pt").exists()
    assert "step 1/30 " not in caplog.text and "epoch 3/3" in caplog.text
    steps = list(csv.DictReader(open(tmp_path / "plain" / "steps.csv")))
    assert [int(r["step"]) for r in steps][:3] == [1, 10, 11]  # first step of each epoch, and every log_every


def test_collapse_monitor_watches_neg_cos(caplog):
    healthy_std = 1.0 / 128**0.5
    m = CollapseMonitor(ratio=0.1, patience=2, neg_cos=0.9)
    for epoch in (1, 2, 3):
        assert not m.update(healthy_std, 128, epoch, neg_cos=0.5)
    with caplog.at_level(logging.WARNING, logger="contrastive_cli"):
        m.update(healthy_std, 128, 4, neg_cos=0.98)
        assert not m.warned  # one epoch is not yet a pattern
        assert m.update(healthy_std, 128, 5, neg_cos=0.98)
        assert m.warned_cos and not m.warned
        m.update(0.0, 128, 6, neg_cos=0.98)
        m.update(0.0, 128, 7, neg_cos=0.98)  # a collapse after it is still named, once
    assert "look alike since epoch 4" in caplog.text and "0.980 > 0.90" in caplog.text
    assert caplog.text.count("look alike") == 1 and caplog.text.count("look collapsed since epoch 6") == 1
    # a checkpoint written before neg_cos was watched restores as it was
    old = CollapseMonitor(0.1, 2, 0.9, **{"low_epochs": 1, "warned": False})
    assert old.high_epochs == 0 and old.low_epochs == 1


def test_run_records_overrides_and_cl_eval_transfers_to_another_dataset(tmp_path):
    from test_data import write_mnist

    args = ["trainer.epochs=1", "trainer.batch_size=128", "encoder.width=8", "method.temperature=0.3",
            "trainer.knn_monitor=false", "trainer.seed=3"]
    proc = run_cli("cl-train", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = next(tmp_path.glob("outputs/train/*/*/checkpoints/last.pt"))
    summary = json.loads((ckpt.parent.parent / "summary.json").read_text())
    assert summary["overrides"] == args
    assert summary["settings"] == {"experiment": None, "method": "simclr", "encoder": "small_cnn", "dataset": "digits",
                                   "optimizer": "lars", "epochs": 1, "batch_size": 128, "lr": 1.0,
                                   "temperature": 0.3, "precision": "auto", "seed": 3}
    write_mnist(tmp_path / "data" / "MNIST" / "raw", n_train=60, n_test=20, gz=False)
    proc = run_cli("cl-eval", f"checkpoint={ckpt}", "dataset=mnist", f"paths.data_dir={tmp_path / 'data'}",
                   "dataset.source.download=false", "eval.tsne_samples=20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("outputs/eval/*/*/eval.json")).read_text())
    assert result["transfer"] is True and result["pretrained_on"] == "digits" and result["dataset"] == "mnist"
    assert result["n_train"] == 60 and result["n_test"] == 20
    assert result["overrides"] == args and result["settings"]["method"] == "simclr"
    assert result["eval_overrides"][1] == "dataset=mnist"
    proc = run_cli("cl-eval", f"checkpoint={ckpt}", "dataset=cifar10", cwd=tmp_path)
    assert proc.returncode == 1 and len(error_lines(proc)) == 1
    assert "dataset=cifar10: has 3 channel(s)" in proc.stderr and "digits with 1" in proc.stderr


def test_a_users_own_method_from_a_config_dir(tmp_path):
    (tmp_path / "my_configs" / "method").mkdir(parents=True)
    (tmp_path / "my_configs" / "method" / "mine.yaml").write_text(
        "_target_: my_methods.Mine\n_partial_: true\ntemperature: 0.3\nproj_hidden_dim: 32\nproj_dim: 16\n")
    (tmp_path / "my_methods.py").write_text(
        "from contrastive_cli.methods.simclr import SimCLR\n\n\nclass Mine(SimCLR):\n    pass\n")
    small = ["trainer.epochs=1", "trainer.batch_size=256", "encoder.width=8", "trainer.knn_monitor=false"]
    for flag in (["--config-dir", "my_configs"], ["hydra.searchpath=[file://my_configs]"]):
        proc = run_cli("cl-train", *flag, "method=mine", *small, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(tmp_path.glob("outputs/train/*/*/summary.json"))
    assert len(runs) == 2
    for run in runs:
        summary = json.loads(run.read_text())
        assert summary["method"] == "my_methods.Mine" and summary["settings"]["method"] == "mine"
    proc = run_cli("cl-train", "--config-dir", "my_configs", "method=nope", cwd=tmp_path)
    assert proc.returncode == 1 and len(error_lines(proc)) == 1
    assert "method=nope: unknown option; choose from barlow_twins" in proc.stderr and ", mine, " in proc.stderr


def test_a_sweep_with_a_failed_job_is_reported(tmp_path):
    proc = run_cli("cl-train", "-m", "optimizer.lr=0.06,1e30", "trainer.epochs=1", "trainer.batch_size=256",
                   "encoder.width=8", "trainer.knn_every=1", "trainer.log_every=1", cwd=tmp_path)
    assert proc.returncode == 1  # the other job still ran
    sweep = next(tmp_path.glob("outputs/multirun/*/*"))
    assert (sweep / "0" / "summary.json").is_file() and not (sweep / "0" / "error.txt").exists()
    error = (sweep / "1" / "error.txt").read_text()
    assert "loss became" in error and error.count("\n") == 1
    proc = run_cli("cl-report", str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["job"]: r for r in csv.DictReader(open(sweep / "report.csv"))}
    assert set(rows) == {"0", "1"}
    assert rows["0"]["status"] == "done" and rows["1"]["status"].startswith("failed")
    assert 0 < float(rows["0"]["knn_best"]) <= 1 and rows["0"]["optimizer.lr"] == "0.06"
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optuna_searches_the_online_knn(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the [optuna] extra is not installed")
    import yaml

    proc = run_cli("cl-train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1",
                   "hydra.sweeper.sampler.seed=0", "optimizer.lr=interval(0.01,0.3)",
                   "method.temperature=choice(0.2,0.5)", "trainer.epochs=1", "trainer.knn_every=1",
                   "trainer.batch_size=256", "encoder.width=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\x1b[" not in proc.stdout + proc.stderr  # not a terminal: no colour codes in the log
    sweep = next(tmp_path.glob("outputs/multirun/*/*"))
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optimizer.lr", "method.temperature"}
    assert 0.01 <= result["best_params"]["optimizer.lr"] <= 0.3
    knn = [json.loads((sweep / str(j) / "summary.json").read_text())["knn_best"] for j in range(3)]
    assert result["best_value"] == pytest.approx(max(knn), abs=1e-4)


def test_tensorboard_logger_gets_the_runs_scalars(tmp_path, fast_train):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_cfg("train", [*fast_train, "trainer.epochs=2", "trainer.knn_every=1", "logger=tensorboard"])
    run_training(cfg, tmp_path)
    events = EventAccumulator(str(next((tmp_path / "tensorboard").iterdir()).parent)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "monitor/emb_std", "monitor/neg_cos", "monitor/knn_top1"} <= tags
    history = checkpoint.load(tmp_path / "checkpoints" / "last.pt")["history"]
    knn = events.Scalars("monitor/knn_top1")
    assert [e.step for e in knn] == [r["step"] for r in history]
    assert [e.value for e in knn] == pytest.approx([r["knn_top1"] for r in history])
    # cl-eval of that run's checkpoint adds its numbers and its t-SNE to the same TensorBoard, at its step
    result = run_evaluation(compose_cfg("eval", [f"checkpoint={tmp_path / 'checkpoints' / 'last.pt'}",
                                                 "eval.linear_max_iter=20", "eval.tsne_samples=200"]), tmp_path / "e")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert sorted(events.Tags()["images"]) == ["eval/tsne", "loss"]  # loss.png from the run itself
    assert events.Images("eval/tsne")[0].step == history[-1]["step"]
    assert events.Scalars("eval/knn_top1")[0].value == pytest.approx(result["knn_top1"])
    from contrastive_cli.embed import run_embed  # and cl-embed its neighbours picture

    run_embed(compose_cfg("embed", [f"checkpoint={tmp_path / 'checkpoints' / 'last.pt'}", "input=digits",
                                    "neighbours=3"]), tmp_path / "emb")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "eval/neighbours" in events.Tags()["images"]


def test_wandb_run_gets_the_eval_results_of_its_checkpoint(tmp_path, fast_train, monkeypatch):
    pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network here: the run and its resumption are offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_training(compose_cfg("train", [*fast_train, "trainer.epochs=1", "logger=wandb"]), tmp_path / "run")
    run_id = json.loads((tmp_path / "run" / "wandb_run.json").read_text())["id"]
    run_evaluation(compose_cfg("eval", [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}",
                                        "eval.linear_max_iter=20", "eval.tsne_samples=200"]), tmp_path / "e")
    runs = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the training run, then cl-eval resuming it by id
    assert list((runs[-1] / "files" / "media" / "images" / "eval").glob("tsne_*.png"))
