"""What a careless or hostile user runs into: shared run folders, resumes that change the run,
damaged or diverged checkpoints, sweeps that fail half-way, bad images, numerical corners."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, compose_cfg, error_lines, run_cli
from omegaconf import OmegaConf
from PIL import Image

from contrastive_cli import checkpoint, cli, engine
from contrastive_cli.errors import Interrupted, UserError
from contrastive_cli.train import run_training

# ------------------------------------------------------------------------------------------ run folders


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    from datetime import datetime

    import hydra.core.utils

    class Frozen(datetime):  # Hydra's ${now:...}: one second, forever
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    first = cli._run_dir_overrides("train", ["trainer.seed=1"])
    second = cli._run_dir_overrides("train", ["trainer.seed=2"])
    evals = [cli._run_dir_overrides("eval", ["checkpoint=x.pt"]) for _ in range(2)]
    assert first == ["hydra.run.dir=outputs/train/2026-01-02/03-04-05"]
    assert second == ["hydra.run.dir=outputs/train/2026-01-02/03-04-05_1"]
    assert evals == [["hydra.run.dir=outputs/eval/2026-01-02/03-04-05"], ["hydra.run.dir=outputs/eval/2026-01-02/03-04-05_1"]]
    assert (tmp_path / "outputs/train/2026-01-02/03-04-05_1").is_dir()


def test_two_runs_started_together_never_share_a_folder(tmp_path, fast_train):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [*fast_train, "trainer.epochs=1"]
    procs = [subprocess.Popen([str(BIN / "cl-train"), *args, f"trainer.seed={s}"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    runs = sorted(tmp_path.glob("outputs/train/*/*"))
    assert len(runs) == 2
    seeds = sorted(OmegaConf.load(r / ".hydra" / "config.yaml").trainer.seed for r in runs)
    assert seeds == [1, 2]
    for r in runs:
        assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["epoch_0001.pt", "last.pt"]
        assert checkpoint.load(r / "checkpoints" / "last.pt")["history"][0]["epoch"] == 1


def test_an_explicit_run_folder_with_another_runs_checkpoints_is_refused(tmp_path):
    (tmp_path / "taken" / "checkpoints").mkdir(parents=True)
    (tmp_path / "taken" / "checkpoints" / "last.pt").write_bytes(b"x")
    proc = run_cli("cl-train", "hydra.run.dir=taken", cwd=tmp_path)
    assert proc.returncode == 1 and error_lines(proc) == [
        "cl-train: error: hydra.run.dir=taken: holds another run's checkpoints (taken/checkpoints/last.pt); "
        "choose a new folder, or continue that run with trainer.resume=taken"]
    (tmp_path / "afile").write_text("")
    for bad, reason in (("afile", "exists and is not a folder"), ("afile/sub", "cannot create it"),
                        ("/proc/cl_cannot_be_here", "cannot create it")):
        proc = run_cli("cl-train", f"hydra.run.dir={bad}", cwd=tmp_path)
        lines = error_lines(proc)
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert lines[0].startswith(f"cl-train: error: hydra.run.dir={bad}: {reason}"), lines


# ------------------------------------------------------------------------------------------ resume


def interrupted_run(overrides: list[str], run_dir, at_step: int, monkeypatch) -> None:
    """Train in-process and SIGTERM this process right after step `at_step`: it must stop there."""
    real, count = engine.optimizer_step, [0]

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        count[0] += 1
        if count[0] == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(engine, "optimizer_step", step)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        run_training(compose_cfg("train", overrides), run_dir)
    assert e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the loop's handler is gone with the loop
    monkeypatch.setattr(engine, "optimizer_step", real)


RESUME_CASES = [
    ("sgd", "fp32", "simclr"), ("adamw", "fp32", "simclr"), ("lars", "fp32", "simclr"), ("sgd", "bf16", "simclr"),
    ("sgd", "fp16", "simclr"), ("sgd", "fp32", "moco"), ("adamw", "bf16", "byol"),
    ("sgd", "fp32", "contrastive_margin"), ("lars", "fp32", "triplet"),
    # views made in DataLoader workers, and a method that draws from the global RNG every step
    ("sgd", "fp32", "triplet", "method.mining=random", "augmentation.on_device=false", "trainer.workers=1"),
    # multi-crop: gradients clipped after the scaler's unscale, the last layer frozen across the cut (progress
    # 0.65 < 0.7), the teacher's temperature from the checkpoint; SwAV's queue and frozen prototypes across the
    # cut (its step count from the checkpoint), local crops made in DataLoader workers. Two local crops of 8 px
    # (`auto` makes none this small, and two take the local crops' path as six do)
    ("sgd", "fp16", "dino", "method.freeze_last_layer=0.7", "augmentation.local_crops=2", "augmentation.local_size=0.5"),
    ("sgd", "fp32", "swav", "method.queue_size=256", "method.freeze_prototypes=15", "augmentation.on_device=false",
     "trainer.workers=1", "augmentation.local_crops=2", "augmentation.local_size=0.5"),
]


@pytest.mark.parametrize("case", RESUME_CASES, ids=["-".join(c) for c in RESUME_CASES])
def test_resume_restores_every_optimizer_precision_and_method_exactly(tmp_path, monkeypatch, case):
    optimizer, precision, method, *extra = case
    heads = {"simclr": ["method.proj_hidden_dim=32", "method.proj_dim=16"],
             "moco": ["method.proj_hidden_dim=32", "method.proj_dim=16", "method.queue_size=256"],
             "byol": ["method.proj_hidden_dim=32", "method.proj_dim=16", "method.pred_hidden_dim=32"],
             "dino": ["method.hidden_dim=32", "method.bottleneck_dim=16", "method.out_dim=64"],
             "swav": ["method.proj_hidden_dim=32", "method.proj_dim=16", "method.num_prototypes=20"]}
    ov = [f"method={method}", f"optimizer={optimizer}", f"trainer.precision={precision}", "trainer.epochs=2",
          # 16 px: what is checked is the state across the cut, and fp16 steps slowly on a CPU (emulated)
          "dataset.image_size=16", "trainer.batch_size=128", "encoder.width=8", "trainer.knn_monitor=false", "trainer.seed=7",
          "schedule.warmup_epochs=1", *heads.get(method, []), *extra]
    run_training(compose_cfg("train", ov), tmp_path / "straight")
    interrupted_run(ov, tmp_path / "cut", at_step=13, monkeypatch=monkeypatch)  # epoch 2, batch 3 of 10
    # resume naming nothing but the run folder: seed, method, optimizer ... come from the checkpoint
    resume = [f"trainer.resume={tmp_path / 'cut'}"]
    summary = run_training(compose_cfg("train", resume), tmp_path / "resumed", resume)
    assert summary["steps"] == 20
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    for part in ("model", "scaler"):
        for k, v in a[part].items():
            assert (torch.equal(v, b[part][k]) if isinstance(v, torch.Tensor) else v == b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_mid_epoch_checkpoint_resumes_only_on_the_same_device_type_and_data(tmp_path, fast_train, monkeypatch):
    interrupted_run(fast_train, tmp_path / "cut", at_step=13, monkeypatch=monkeypatch)
    path = tmp_path / "cut" / "checkpoints" / "last.pt"
    resume = [f"trainer.resume={tmp_path / 'cut'}"]
    for key, value in (("device", "cuda"), ("images", 999)):
        ckpt = checkpoint.load(path)
        ckpt["partial"][key] = value
        checkpoint.save_atomic({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "moved" / "checkpoints" / "last.pt")
        with pytest.raises(UserError, match=f"written inside an epoch with {key}={value}, this run has {key}="):
            run_training(compose_cfg("train", [f"trainer.resume={tmp_path / 'moved'}"]), tmp_path / "r",
                         [f"trainer.resume={tmp_path / 'moved'}"])
    assert run_training(compose_cfg("train", resume), tmp_path / "ok", resume)["steps"] == 20


def test_run_folders_are_passed_to_hydra_as_it_reads_them():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for folder in ("outputs/train/2026-11-26/10-00-00_1", "/data/my runs/a,b=c", "C:\\runs\\x", "it's", "end\\"):
        assert parser.parse_override(f"hydra.run.dir={cli._quote(folder)}").value() == folder


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-epoch run with non-default settings."""
    cwd = tmp_path_factory.mktemp("finished")
    proc = run_cli("cl-train", "trainer.epochs=2", "trainer.batch_size=128", "encoder.width=8", "trainer.seed=5",
                   "method.temperature=0.3", "trainer.knn_monitor=false", "trainer.checkpoint_every=1",
                   "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd, cwd / "run"


def test_a_resume_that_changes_the_run_is_one_line_naming_the_keys(finished):
    cwd, run = finished
    cases = [(["method.temperature=0.5"], "method.temperature (0.3 -> 0.5)"),
             (["trainer.seed=0"], "trainer.seed (5 -> 0)"),
             (["optimizer=adamw", "trainer.precision=fp16"], "optimizer (_target_, betas, lr ...), trainer.precision"),
             (["trainer.batch_size=64"], "trainer.batch_size (128 -> 64)"),
             # not trainer.device's prefix match: two processes are another global batch
             (["trainer.devices=2"], "trainer.devices (1 -> 2)")]
    for extra, expected in cases:
        proc = run_cli("cl-train", f"trainer.resume={run}", *extra, cwd=cwd)
        lines = error_lines(proc)
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "a resumed run keeps the settings it was started with" in lines[0] and expected in lines[0], lines


def test_resuming_a_finished_run_names_the_checkpoint_it_read(finished, tmp_path):
    _, run = finished
    proc = run_cli("cl-train", f"trainer.resume={run}", "method.temperature=0.3", "hydra.run.dir=again", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["checkpoint"] == str(run / "checkpoints" / "last.pt") and summary["steps"] == 20
    assert not (tmp_path / "again" / "checkpoints").exists()
    # the run folder's .hydra/config.yaml says what ran: the checkpoint's config
    assert OmegaConf.load(tmp_path / "again" / ".hydra" / "config.yaml").trainer.seed == 5


def test_a_resume_into_a_new_folder_removes_the_killed_runs_orphan_temporary_file(finished, tmp_path):
    _, run = finished
    orphan = run / "checkpoints" / f".last.pt.{checkpoint._HOST}.999999.abc123.tmp"  # a save killed by kill -9
    orphan.write_bytes(b"half a checkpoint")
    proc = run_cli("cl-train", f"trainer.resume={run}", "hydra.run.dir=elsewhere", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not orphan.exists()


def test_damaged_and_non_finite_checkpoints_are_one_line(finished, tmp_path):
    from test_checkpoint import flip_tensor_byte

    _, run = finished
    ckpt = checkpoint.load(run / "checkpoints" / "last.pt")
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    flip_tensor_byte(flipped, next(v for v in ckpt["model"].values() if v.ndim == 2 and v.numel() > 100))
    ckpt["encoder"]["net.0.1.running_var"] = torch.full_like(ckpt["encoder"]["net.0.1.running_var"], float("inf"))
    ckpt.pop("format")
    diverged = tmp_path / "diverged.pt"
    checkpoint.save_atomic(ckpt, diverged)
    partial = tmp_path / "partial.pt"
    torch.save({"format": checkpoint.FORMAT, "config": ckpt["config"], "epoch": 2}, partial)
    for prog, key in (("cl-eval", "checkpoint"), ("cl-train", "trainer.resume")):
        for path, expected in ((flipped, "damaged checkpoint"), (diverged, "its weights are not finite"),
                               (partial, "incomplete checkpoint, missing step")):
            proc = run_cli(prog, f"{key}={path}", cwd=tmp_path)
            lines = error_lines(proc)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert lines == [f"{prog}: error: {key}={path}: " + lines[0].split(f"{path}: ", 1)[1]], lines
            assert expected in lines[0], lines


def test_a_diverged_model_never_overwrites_the_last_finite_checkpoint(tmp_path, fast_train, monkeypatch):
    from contrastive_cli.methods.simclr import SimCLR

    real = SimCLR.on_step_end

    def poison(self, progress):  # epoch 2 (steps 11..20): batch-norm variance overflows, the loss does not
        real(self, progress)
        if progress > 0.6:
            self.encoder.net[0][1].running_var.fill_(float("inf"))

    monkeypatch.setattr(SimCLR, "on_step_end", poison)
    with pytest.raises(UserError, match=r"weights became non-finite \(encoder.net.0.1.running_var\) by epoch 2, step 20; "
                                        r"last good checkpoint: .*last.pt"):
        run_training(compose_cfg("train", fast_train), tmp_path)
    kept = checkpoint.load(tmp_path / "checkpoints" / "last.pt")  # refuses non-finite weights itself
    assert kept["epoch"] == 1


def test_weights_that_explode_but_stay_finite_stop_the_run_and_no_checkpoint_holds_them(tmp_path):
    # the command: LARS at lr 1e30 takes the weights to ~1e28, finite, in one step
    proc = run_cli("cl-train", "trainer.epochs=3", "optimizer.lr=1e30", "schedule.warmup_epochs=0",
                   "trainer.batch_size=1024", "trainer.checkpoint_every=1", "hydra.run.dir=run", cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("cl-train: error: weights exploded (norm ") and "by epoch 1, step 1" in lines[-1], lines
    assert "no checkpoint was written (try a lower optimizer.lr than this run's 1e+30" in lines[-1], lines
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").glob("*.pt"))


def test_a_loss_far_above_its_first_value_is_a_divergence():
    state = engine.TrainState(trace=[{"loss": 20.0}])
    loop = engine.Loop(epochs=3, batch_size=8, lr=1.0)
    engine._check_loss(19_999.0, state, 2, loop, Path("ckpts"))  # under 1000x the first: a bad phase, not a divergence
    with pytest.raises(UserError, match=r"loss exploded to 2\.1e\+04 \(first 20\) at epoch 3, step 0; no checkpoint "
                                        r"was written \(try a lower optimizer.lr than this run's 1, e.g. 0.1\)"):
        engine._check_loss(21_000.0, state, 2, loop, Path("ckpts"))
    small = engine.TrainState(trace=[{"loss": -0.01}])  # SimSiam starts near 0: the scale is at least 1
    engine._check_loss(-999.0, small, 0, loop, Path("ckpts"))
    with pytest.raises(UserError, match="loss exploded"):
        engine._check_loss(-1001.0, small, 0, loop, Path("ckpts"))
    with pytest.raises(UserError, match=r"loss became nan .*trainer.precision=bf16 / fp32"):  # fp32 helps fp16 only
        engine._check_loss(float("nan"), small, 0, engine.Loop(epochs=3, batch_size=8, lr=1.0, precision="fp16"),
                           Path("ckpts"))


@pytest.mark.slow
def test_the_divergence_message_gives_advice_that_works(tmp_path):
    # VICReg under SGD (the failing default before LARS) diverges on digits in 3 epochs at 32 px
    # (digits' size then; at today's 16 px its 3 epochs stay finite): a run that diverges for sure
    big = "dataset.image_size=32"
    proc = run_cli("cl-train", "method=vicreg", "optimizer=sgd", "trainer.precision=fp32", "trainer.epochs=3",
                   "trainer.knn_monitor=false", big, "hydra.run.dir=diverged", cwd=tmp_path)
    line = error_lines(proc)[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("loss became nan" in line or "exploded" in line) and "precision" not in line, line
    advised = line.split("e.g. ")[1].rstrip(")")
    assert float(advised) == pytest.approx(0.006), line
    proc = run_cli("cl-train", "method=vicreg", "optimizer=sgd", "trainer.precision=fp32", "trainer.epochs=3",
                   "trainer.knn_monitor=false", big, f"optimizer.lr={advised}", "hydra.run.dir=advised", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import csv

    with open(tmp_path / "advised" / "metrics.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    assert losses[-1] < losses[0], losses


def test_eval_embed_export_and_load_encoder_refuse_a_checkpoint_whose_features_are_not_finite(finished, tmp_path):
    from contrastive_cli import load_encoder

    _, run = finished
    ckpt = checkpoint.load(run / "checkpoints" / "last.pt")
    for name in ("encoder", "model"):  # finite weights of ~1e30: the features overflow (the 4.3e28 case)
        for key, w in ckpt[name].items():
            if w.is_floating_point() and w.ndim == 4:
                ckpt[name][key] = w * 1e30
    ckpt.pop("format")
    huge = tmp_path / "huge.pt"
    checkpoint.save_atomic(ckpt, huge)
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    expected = f"{huge}: its encoder gives non-finite features (nan/inf) on "
    for prog, args in (("cl-eval", []), ("cl-embed", [f"input={tmp_path / 'imgs'}"]), ("cl-export", [])):
        proc = run_cli(prog, f"checkpoint={huge}", *args, cwd=tmp_path)
        lines = error_lines(proc)
        assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert lines[0].startswith(f"{prog}: error: {expected}") and "an earlier checkpoint" in lines[0], lines
    assert not list(tmp_path.rglob("embeddings.npy")) and not list(tmp_path.rglob("*.onnx"))
    with pytest.raises(UserError, match=re.escape(expected)):
        load_encoder(huge)
    encoder, preprocess = load_encoder(run / "checkpoints" / "last.pt")  # a sane one: no grad unless asked
    feats = encoder(preprocess(np.zeros((32, 32, 3), np.uint8)))
    assert not feats.requires_grad and feats.numpy().shape[0] == 1
    assert all(p.requires_grad for p in load_encoder(run / "checkpoints" / "last.pt", trainable=True)[0].parameters())


# ------------------------------------------------------------------------------------------ sweeps


def test_sweep_expansion_covers_every_combination_glob_range_and_interval():
    sets = cli._override_sets(["method=glob([sim*,moco*])", "trainer.seed=range(0,2)", "optimizer.lr=interval(0.01,1)",
                               "hydra.run.dir=x"], multirun=True)
    assert len(sets) == 5 * 2 * 2  # sim*: simclr, simsiam; moco*: moco, moco_imagenet, moco_v3
    assert ["method=moco_imagenet", "trainer.seed=1", "optimizer.lr=1"] in sets
    assert ["method=simclr", "trainer.seed=0", "optimizer.lr=0.01"] in sets
    with pytest.raises(UserError, match="selects no value"):
        cli._override_sets(["method=glob(nothing*)"], multirun=True)


BAD_SWEEPS = [
    (["method=simclr,moco", "trainer.batch_size=256,260"], "trainer.batch_size=260: must be a multiple of method.bn_splits=8"),
    (["method=glob(*)", "trainer.batch_size=260"], "trainer.batch_size=260: must be a multiple"),
    (["method=glob(simclr2*)"], "method=glob(simclr2*): the sweep selects no value"),
    (["trainer.seed=0,1", "dataset=fashion_mnist,cifar10", "paths.data_dir=nowhere", "dataset.source.download=false"], "dataset cifar10 not found"),
    (["trainer.batch_size=128,4096"], "trainer.batch_size=4096: x 1 process(es) is larger than the training set "
                                      "(1347 images); use trainer.batch_size<=1347"),
    (["method=moco", "trainer.batch_size=2048"], "use trainer.batch_size<=1344"),  # a multiple of its 8 BN splits
]


@pytest.mark.parametrize(("args", "expected"), BAD_SWEEPS, ids=[" ".join(a) for a, _ in BAD_SWEEPS])
def test_a_sweep_is_checked_whole_before_its_first_job(tmp_path, args, expected):
    proc = run_cli("cl-train", "-m", *args, "trainer.epochs=1", cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines == [lines[-1]] and lines[0].startswith("cl-train: error: ") and expected in lines[0], lines
    assert not list(tmp_path.glob("outputs/**/*.pt")) and not list(tmp_path.glob("outputs/multirun/*/*/*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_a_sweep_over_devices_is_checked_before_training(tmp_path):
    proc = run_cli("cl-train", "-m", "trainer.device=cpu,cuda", cwd=tmp_path)
    assert proc.returncode == 1 and error_lines(proc) == [
        "cl-train: error: device=cuda: CUDA is not available here (use auto or cpu)"]


def test_a_sweep_over_image_folders_finds_the_empty_one_first(tmp_path):
    good, empty = tmp_path / "good", tmp_path / "empty"
    write_folder(good)
    empty.mkdir()
    proc = run_cli("cl-train", "-m", "dataset=imagefolder", f"dataset.source.root={good},{empty}",
                   "trainer.batch_size=2", cwd=tmp_path)
    assert proc.returncode == 1 and len(error_lines(proc)) == 1
    assert error_lines(proc)[0].startswith(f"cl-train: error: dataset.source.root={empty}: ")


# ------------------------------------------------------------------------------------------ one line each

def write_folder(root, bad: bool = False) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    if bad:
        good = (root / "a" / "0.png").read_bytes()
        (root / "a" / "cut.png").write_bytes(good[: len(good) // 2])  # truncated
        (root / "b" / "notes.jpg").write_text("not an image")


def test_unreadable_images_are_skipped_and_listed_in_one_warning(tmp_path, caplog):
    from contrastive_cli.data import load_imagefolder

    write_folder(tmp_path / "img", bad=True)
    with caplog.at_level("WARNING"):
        splits = load_imagefolder(str(tmp_path / "img"), image_size=8, test_fraction=0.25)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("skipped 2 unreadable image file(s): ")
    assert "cut.png" in warnings[0] and "notes.jpg" in warnings[0]
    assert len(splits.train) + len(splits.test) == 8
    for ds in (splits.train, splits.test):
        assert all(ds[i][0].shape == (3, 8, 8) for i in range(len(ds)))


def test_eval_finds_a_moved_image_folder(tmp_path, fast_train):
    from contrastive_cli.evaluate import run_evaluation

    write_folder(tmp_path / "img")
    run_training(compose_cfg("train", [*fast_train, "trainer.epochs=1", "dataset=imagefolder", "trainer.batch_size=4",
                                       f"dataset.source.root={tmp_path / 'img'}", "dataset.image_size=8"]),
                 tmp_path / "run")
    (tmp_path / "img").rename(tmp_path / "moved")
    ckpt = f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}"
    (tmp_path / "eval").mkdir()
    with pytest.raises(UserError, match="give paths.image_root=<its folder now>"):
        run_evaluation(compose_cfg("eval", [ckpt, "eval.tsne_samples=0"]), tmp_path / "eval")
    result = run_evaluation(compose_cfg("eval", [ckpt, "eval.tsne_samples=0", f"paths.image_root={tmp_path / 'moved'}"]),
                            tmp_path / "eval")
    assert result["n_train"] + result["n_test"] == 8


def test_a_warm_up_longer_than_the_run_is_named(tmp_path, fast_train, caplog):
    with caplog.at_level("WARNING"):
        run_training(compose_cfg("train", [*fast_train, "trainer.epochs=1", "schedule.warmup_epochs=2"]), tmp_path)
    assert "schedule.warmup_epochs=2 is longer than the run (trainer.epochs=1): the lr only reaches 50% of its peak" \
        in caplog.text


def test_a_batch_size_that_drops_over_a_tenth_of_the_images_is_named_with_one_that_does_not(
        tmp_path, fast_train, caplog):
    with caplog.at_level("WARNING"):
        run_training(compose_cfg("train", [*fast_train, "trainer.epochs=1", "trainer.batch_size=1024"]), tmp_path)
    assert ("trainer.batch_size=1024 drops 323 of the 1347 training images every epoch (only full batches train; a "
            "different 323 each epoch); trainer.batch_size=673 would drop 1") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # 128: 67 of 1347 (5%), said nowhere
        run_training(compose_cfg("train", [*fast_train, "trainer.epochs=1"]), tmp_path / "b")
    assert "drops" not in caplog.text


def test_a_queue_smaller_than_one_batch_is_refused_and_dino_without_multicrop_is_named(tmp_path, fast_train):
    with pytest.raises(UserError, match=r"^method.queue_size=10: smaller than one step's entries \(\d+: \d per image of a "
                                        r"global batch of 128\); use method.queue_size>=\d+$"):
        run_training(compose_cfg("train", [*fast_train, "method=moco", "method.queue_size=10"]), tmp_path / "moco")
    proc = run_cli("cl-train", "method=dino", "augmentation=simclr", "trainer.epochs=1", "trainer.batch_size=128",
                   "encoder.width=8", "trainer.knn_monitor=false", "hydra.run.dir=dino", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DINO with a two-view augmentation: no multi-crop" in proc.stdout + proc.stderr


def test_extending_a_finished_run_names_the_lr_of_its_extra_epochs_and_restart_gives_them_a_fresh_cosine(
        tmp_path, fast_train, caplog):
    import csv
    import math

    # warm-up off so the cosine's numbers are plain; log every step to read each step's lr
    run_training(compose_cfg("train", [*fast_train, "schedule.warmup_epochs=0", "trainer.log_every=1"]), tmp_path / "a")
    extend = [f"trainer.resume={tmp_path / 'a'}", "trainer.epochs=3"]
    with caplog.at_level("INFO"):
        run_training(compose_cfg("train", extend), tmp_path / "tail", extend)
    # 10 steps per epoch, LARS lr 1.0: the cosine over 30 steps at step 20, then at 29
    assert (f"the 1 epoch(s) beyond the 2 planned (steps 21-30) run at lr {0.5 * (1 + math.cos(math.pi * 20 / 30)):.3g} "
            f"-> {0.5 * (1 + math.cos(math.pi * 29 / 30)):.3g}, the tail of a cosine over the new length; for a fresh "
            "cosine over them add trainer.extend=restart (from trainer.extend_peak=0.1 x optimizer.lr = 0.1)") in caplog.text
    caplog.clear()
    again = [*extend, "trainer.extend=restart"]
    with caplog.at_level("INFO"):
        run_training(compose_cfg("train", again), tmp_path / "restart", again)
    assert "trainer.extend=restart: the 1 epoch(s) beyond the 2 planned (steps 21-30) run a fresh cosine from lr 0.1" \
        in caplog.text

    def lr_after(run, step):
        with open(tmp_path / run / "steps.csv") as f:
            return next(float(r["lr"]) for r in csv.DictReader(f) if int(r["step"]) == step)

    assert lr_after("restart", 21) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 1 / 10)))
    assert lr_after("tail", 21) == pytest.approx(0.5 * (1 + math.cos(math.pi * 21 / 30)))
    # the restart is stored: resuming the extended run keeps its schedule
    assert checkpoint.load(tmp_path / "restart" / "checkpoints" / "last.pt")["extension"] == {"from_step": 20, "peak": 0.1}


def test_resume_auto_starts_a_run_then_continues_it_in_its_folder(tmp_path):
    fast = ["trainer.batch_size=128", "encoder.width=8", "trainer.knn_monitor=false", "schedule.warmup_epochs=0"]
    first = run_cli("cl-train", "trainer.resume=auto", "hydra.run.dir=R", "trainer.epochs=1", *fast, cwd=tmp_path)
    assert first.returncode == 0 and "no checkpoint in R yet: starting the run there" in first.stderr, first.stderr
    again = run_cli("cl-train", "trainer.resume=auto", "hydra.run.dir=R", "trainer.epochs=2", *fast, cwd=tmp_path)
    assert again.returncode == 0 and "trainer.resume=auto: continuing the run in R" in again.stderr, again.stderr
    rows = (tmp_path / "R" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]  # epoch 1 once, then epoch 2
    proc = run_cli("cl-train", "trainer.resume=auto", *fast, cwd=tmp_path)
    assert proc.returncode == 1 and error_lines(proc) == ["cl-train: error: trainer.resume=auto: needs hydra.run.dir="
                                                          "<the run's folder> (the folder a requeued job continues in)"]


def test_eval_help_lists_no_training_groups_and_eval_log_is_written(finished, tmp_path):
    proc = run_cli("cl-eval", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "checkpoint: ???" in proc.stdout
    assert "method:" not in proc.stdout and "augmentation" not in proc.stdout
    _, run = finished
    proc = run_cli("cl-eval", f"checkpoint={run / 'checkpoints' / 'last.pt'}", "eval.tsne_samples=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = next(tmp_path.glob("outputs/eval/*/*/eval.log")).read_text()
    assert "k-NN top-1 (k=200, T=0.1)" in log and "linear top-1" in log
