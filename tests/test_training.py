"""Training on the embedded digits data: resume is exact, precision, CPU threads (every method's loss and
k-NN at its defaults: tests/test_defaults.py)."""

import pytest
import torch
from conftest import compose_cfg

from contrastive_cli import checkpoint
from contrastive_cli.train import run_training


def test_resume_matches_a_straight_run(tmp_path, fast_train):
    straight = compose_cfg("train", [*fast_train, "trainer.epochs=2"])
    run_training(straight, tmp_path / "straight")
    first = compose_cfg("train", [*fast_train, "trainer.epochs=1"])
    run_training(first, tmp_path / "first")
    resumed = compose_cfg("train", [*fast_train, "trainer.epochs=2",
                                    f"trainer.resume={tmp_path / 'first' / 'checkpoints' / 'last.pt'}"])
    run_training(resumed, tmp_path / "resumed")
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 2 * (1347 // 128) and a["epoch"] == b["epoch"] == 2
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert (tmp_path / "resumed" / "metrics.csv").read_text().count("\n") == 3  # header + both epochs


def test_bf16_autocast_runs_a_step_on_cpu(tmp_path, fast_train):
    cfg = compose_cfg("train", [*fast_train, "trainer.epochs=1", "trainer.precision=bf16", "trainer.channels_last=true"])
    summary = run_training(cfg, tmp_path)
    assert summary["steps"] == 1347 // 128 and summary["final_loss"] == summary["final_loss"]  # finite


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_on_one_without(monkeypatch, native):
    from contrastive_cli import train
    from contrastive_cli.config import TrainerCfg

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert train.resolve_precision(TrainerCfg(precision="auto"), cpu).dtype == (torch.bfloat16 if native else None)
    assert train.resolve_precision(TrainerCfg(precision="fp32"), cpu).dtype is None  # an explicit choice wins
    assert train.resolve_precision(TrainerCfg(precision="bf16"), cpu).dtype == torch.bfloat16
    assert train.resolve_precision(TrainerCfg(precision="auto"), torch.device("cuda")).dtype == torch.bfloat16


def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch):
    """Detected, not assumed: torch's cpuinfo map decides, and on Linux it agrees with /proc/cpuinfo."""
    from pathlib import Path

    from contrastive_cli.train import cpu_has_native_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "flags" in cpuinfo.read_text():
        flags = set(cpuinfo.read_text().split())
        assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
    for caps, expected in (({"avx512_bf16": True, "amx_bf16": False}, True), ({"amx_bf16": True}, True),
                           ({"avx512_bf16": False, "avx2": True}, False), ({"bf16": True, "neon": True}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps, raising=False)
        assert cpu_has_native_bf16() is expected, caps


def test_non_finite_loss_stops_with_one_clear_error(tmp_path, fast_train):
    from contrastive_cli.errors import UserError

    cfg = compose_cfg("train", [*fast_train, "trainer.epochs=2", "optimizer.lr=1e30", "trainer.log_every=1"])
    with pytest.raises(UserError, match="loss became nan|loss became inf"):
        run_training(cfg, tmp_path)


def test_imagefolder_trains_through_dataloader_workers_and_evaluates(tmp_path, fast_train):
    from PIL import Image

    from contrastive_cli.evaluate import run_evaluation

    rng = torch.Generator().manual_seed(0)
    for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
        (tmp_path / "img" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            noise = torch.randint(0, 40, (20 + i, 24, 3), generator=rng)
            pixels = (torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "img" / f"class{c}" / f"{i}.png")
    cfg = compose_cfg("train", [*fast_train, "dataset=imagefolder", f"dataset.source.root={tmp_path / 'img'}",
                                "dataset.image_size=16", "trainer.batch_size=4", "trainer.workers=2",
                                "trainer.epochs=1", "dataset.source.cache_gb=0",
                                "dataset.source.cache_dir=null"])  # not cached: decoded in workers
    summary = run_training(cfg, tmp_path / "run")
    assert summary["steps"] == 14 // 4  # 18 images, 4 (test_fraction 0.2) held out for evaluation
    ev = compose_cfg("eval", [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", "eval.tsne_samples=4"])
    (tmp_path / "eval").mkdir()
    result = run_evaluation(ev, tmp_path / "eval")
    assert result["n_train"] == 14 and result["n_test"] == 4 and result["dataset"] == "imagefolder"
    assert (tmp_path / "eval" / "tsne.png").is_file()


def test_cpu_augmentation_in_workers_trains(tmp_path, fast_train):
    cfg = compose_cfg("train", [*fast_train, "trainer.epochs=1", "augmentation.on_device=false", "trainer.workers=2"])
    summary = run_training(cfg, tmp_path)
    assert summary["steps"] == 1347 // 128 and summary["final_loss"] > 0


DENORMALS = """
import sys, torch
from hydra import compose, initialize_config_module
if sys.argv[1] == "late":  # OpenMP's threads start here, before the setting
    (torch.ones(1 << 22) * 2).sum()
    torch.set_flush_denormal(True)
if sys.argv[1] == "cl-train":  # cl-train's first torch work, in every job and in run_training: the config's checks
    from contrastive_cli.config import validate_train_job
    with initialize_config_module(config_module="contrastive_cli.configs", version_base="1.3"):
        validate_train_job(compose(config_name="train", overrides=["method=moco"]), [])
# the smallest denormal float32, from its bits (no float conversion, which the setting would flush);
# 4M of them: the product is split over every OpenMP thread, and a thread without the setting keeps them
x = torch.ones(1 << 22, dtype=torch.int32).view(torch.float32)
print(int((x * 2).count_nonzero()), torch.get_num_threads())
"""


def test_cl_train_reads_denormals_as_zero_in_every_cpu_thread():
    # after a softmax over many logits (CPC's InfoNCE) the backward's matmuls run on denormal operands,
    # several times slower on x86: cl-train flushes them, before OpenMP's threads start so they inherit it
    import subprocess
    import sys

    def run(mode):
        out = subprocess.run([sys.executable, "-c", DENORMALS, mode], capture_output=True, text=True, check=True)
        return [int(v) for v in out.stdout.split()]

    assert run("plain")[0] == 1 << 22  # the control: IEEE arithmetic keeps them
    nonzero, threads = run("cl-train")
    assert nonzero == 0, (nonzero, threads)
    late, threads = run("late")  # set after the threads started, it reaches the calling thread only
    assert 0 < late < 1 << 22 if threads > 1 else late == 0, (late, threads)
