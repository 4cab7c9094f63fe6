"""Each `logger=` option builds from its YAML, records what it is given, and fails in one line when
its package is missing."""

import json
import struct
import sys
import time
from importlib import resources

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from contrastive_cli.errors import UserError
from contrastive_cli.loggers import NoLogger, TensorBoardLogger, WandbLogger

RUN_CONFIG = {"method": {"name": "simclr", "temperature": 0.5}, "trainer": {"epochs": 2}}
# Two logging steps as the loop makes them: training scalars, then the monitors (None = not measured).
STEPS = [({"loss": 2.0, "lr": 0.1, "emb_std": 0.9, "neg_cos": None}, 0),
         ({"loss": 1.5, "lr": 0.05, "emb_std": 0.8, "knn_top1": 0.75}, 10)]


def logger_cfg(name: str):
    return OmegaConf.load(resources.files("contrastive_cli.configs").joinpath("logger", f"{name}.yaml"))


def build(name: str, run_dir):
    logger = instantiate(logger_cfg(name), run_dir=run_dir, run_config=RUN_CONFIG)
    for scalars, step in STEPS:
        logger.log(scalars, step)
    logger.close()
    return logger


def test_the_group_has_the_documented_options():
    names = sorted(p.name[:-5] for p in resources.files("contrastive_cli.configs").joinpath("logger").iterdir()
                   if p.name.endswith(".yaml"))
    assert names == ["csv", "tensorboard", "wandb"]


def test_csv_is_no_external_logger_and_writes_nothing(tmp_path):
    assert isinstance(build("csv", tmp_path), NoLogger)
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="logger=tensorboard needs the tensorboard extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert isinstance(build("tensorboard", tmp_path), TensorBoardLogger)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["monitor/emb_std", "monitor/knn_top1", "train/loss", "train/lr"]
    read = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert read["train/loss"] == [(0, 2.0), (10, 1.5)]
    assert read["train/lr"] == [(0, pytest.approx(0.1)), (10, pytest.approx(0.05))]  # stored as float32
    assert read["monitor/emb_std"] == [(0, pytest.approx(0.9)), (10, pytest.approx(0.8))]
    assert read["monitor/knn_top1"] == [(10, 0.75)]


def wandb_records(path):
    """The records of an offline run's `.wandb` file: a LevelDB-style log (32 KiB blocks, a 7-byte
    header per chunk) of protobuf `Record`s after a 7-byte `:W&B` file header. wandb >= 0.19 ships no
    Python reader for it (`wandb sync --view` is gone), so this is the format read by hand. A chunk
    still being written (its length runs past the end of the file) ends the list."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + n > len(data):
            return
        chunks, pos = chunks + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            yield wandb_internal_pb2.Record.FromString(chunks)
            chunks = b""


def finished_run_records(run_dir, timeout: float = 60.0) -> list:
    """The records of the run's file once its `exit` record is there. `run.finish()` can return
    before wandb's service process has written the run file to the end: under a loaded CI machine
    the file once held none of the history records yet when read right after finish()."""
    deadline = time.monotonic() + timeout
    while True:
        files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        records = list(wandb_records(files[0])) if files else []
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_wandb_offline_run_file_holds_the_scalars_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="logger=wandb needs the wandb extra")
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))  # nothing lands in ~/.config or ~/.cache
    monkeypatch.setenv("WANDB_MODE", "offline")  # the YAML's mode: null defers to this
    monkeypatch.setenv("WANDB_SILENT", "true")

    assert isinstance(build("wandb", tmp_path / "run"), WandbLogger)
    records = finished_run_records(tmp_path / "run")
    assert any(r.HasField("exit") for r in records), [r.WhichOneof("record_type") for r in records]
    rows = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            for r in records if r.HasField("history")]
    rows = [{k: v for k, v in row.items() if not k.startswith("_") or k == "_step"} for row in rows]
    assert rows == [{"_step": 0, "train/loss": 2.0, "train/lr": 0.1, "monitor/emb_std": 0.9},
                    {"_step": 10, "train/loss": 1.5, "train/lr": 0.05, "monitor/emb_std": 0.8,
                     "monitor/knn_top1": 0.75}]
    (run,) = [r.run for r in records if r.HasField("run")]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert {k: v for k, v in config.items() if not k.startswith("_")} == RUN_CONFIG


@pytest.mark.parametrize("package, cls", [("tensorboard", TensorBoardLogger), ("wandb", WandbLogger)])
def test_missing_package_is_a_one_line_user_error(tmp_path, monkeypatch, package, cls):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` fail as if absent
    with pytest.raises(UserError) as err:
        cls(run_dir=tmp_path, run_config=RUN_CONFIG)
    assert str(err.value) == (f"logger={package}: needs the {package} package; "
                              f"pip install 'contrastive_cli[{package}]'")


def test_wandb_rejects_an_unknown_mode_before_importing_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"logger.mode='ofline': must be null, online, offline or disabled"):
        WandbLogger(run_dir=tmp_path, run_config=RUN_CONFIG, mode="ofline")


def test_tensorboard_gets_the_config_the_hparams_with_the_final_numbers_and_the_pngs(tmp_path):
    pytest.importorskip("tensorboard", reason="logger=tensorboard needs the tensorboard extra")
    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(tmp_path / "loss.png")
    logger = instantiate(logger_cfg("tensorboard"), run_dir=tmp_path, run_config=RUN_CONFIG)
    logger.log(*STEPS[0])
    summary = {"knn_top1": 0.91, "knn5_top1": 0.97, "final_loss": 1.5,
               "settings": {"method": "simclr", "lr": 1.0, "temperature": None}}
    logger.finish(summary, {"loss": tmp_path / "loss.png", "tsne": tmp_path / "absent.png"})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["loss"]
    assert events.Images("loss")[0].width == 40 and events.Images("loss")[0].height == 30
    assert "config/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "temperature: 0.5" in text and "epochs: 2" in text
    metrics = {t: events.Scalars(t)[0].value for t in events.Tags()["scalars"] if t.startswith("final/")}
    assert metrics == {"final/knn_top1": pytest.approx(0.91), "final/knn5_top1": pytest.approx(0.97),
                       "final/final_loss": 1.5}
    assert set(events.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}


def test_wandb_online_without_an_api_key_fails_at_once_instead_of_asking(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="logger=wandb needs the wandb extra")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))  # no `wandb login` entry either
    with pytest.raises(UserError, match=r"^logger=wandb: no W&B API key \(set WANDB_API_KEY or run `wandb login` "
                                        r"first\), or log without one with logger.mode=offline$"):
        WandbLogger(run_dir=tmp_path / "run", run_config=RUN_CONFIG)  # before wandb.init: no prompt, no wait
