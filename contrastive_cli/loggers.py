"""Experiment trackers next to metrics.csv: none (`logger=csv`), TensorBoard, Weights & Biases.

Built with `hydra.utils.instantiate(cfg.logger, run_dir=..., run_config=...)` (not `config=`: that is
the name of instantiate's own first parameter); the training loop calls `log(scalars, step)` and,
once at the end (in a `finally`), `close()`.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import UserError, check

log = logging.getLogger(__name__)
WANDB_RUN = "wandb_run.json"  # in a run folder trained with logger=wandb: how to reach its W&B run again

# Where each known scalar goes in the tracker's tree; unknown names land under train/.
SECTIONS = {"loss": "train", "lr": "train", "emb_std": "monitor", "neg_cos": "monitor", "knn_top1": "monitor",
            "zeroshot_top1": "monitor", "retrieval_r1": "monitor"}


def tag(name: str) -> str:
    """`loss` -> `train/loss`, `knn_top1` -> `monitor/knn_top1`; a name with a `/` is kept."""
    return name if "/" in name else f"{SECTIONS.get(name, 'train')}/{name}"


def tagged(scalars: dict[str, float | None]) -> dict[str, float]:
    return {tag(k): float(v) for k, v in scalars.items() if v is not None}


def require(package: str) -> Any:
    """Import an optional backend, or fail with one line that says what to install."""
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as e:
        if e.name != package:  # installed, but one of *its* dependencies is missing: show that
            raise
        raise UserError(
            f"logger={package}: needs the {package} package; pip install 'contrastive_cli[{package}]'"
        ) from None


def final_metrics(summary: dict) -> dict[str, float]:
    """The run's end numbers that a tracker shows beside its settings."""
    keys = ("knn_top1", "knn5_top1", "knn_best", "final_loss", "zeroshot_top1", "zeroshot_top1_best",
            "retrieval_r1_best", "i2t_r1", "t2i_r1")
    return {f"final/{k}": float(summary[k]) for k in keys if isinstance(summary.get(k), (int, float))}


def hparams(summary: dict) -> dict[str, float | str | bool]:
    """The settings a table of runs compares (summary.json's `settings`), as a tracker's hparams."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in summary.get("settings", {}).items()}


def read_png(path: Path):
    """(H, W, 3) uint8 of a PNG, or None when it is not there."""
    if not Path(path).is_file():
        return None
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class NoLogger:
    """`logger=csv`: no external tracker; the loop's metrics.csv and PNG plots are the record."""

    def __init__(self, run_dir: Path | str, run_config: dict | None = None):
        self.run_dir = Path(run_dir)

    def log(self, scalars: dict[str, float | None], step: int) -> None:
        pass

    def finish(self, summary: dict, images: dict[str, Path]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files in `<run_dir>/tensorboard/`; view with `tensorboard --logdir outputs`."""

    def __init__(self, run_dir: Path | str, run_config: dict | None = None):
        require("tensorboard")  # torch's wrapper imports it lazily
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if run_config is not None:  # TEXT tab: the resolved config, as YAML in a code block
            if isinstance(run_config, DictConfig):
                run_config = OmegaConf.to_container(run_config, resolve=True)
            text = OmegaConf.to_yaml(OmegaConf.create(run_config))
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "))

    def log(self, scalars: dict[str, float | None], step: int) -> None:
        for name, value in tagged(scalars).items():
            self.writer.add_scalar(name, value, global_step=step)

    def finish(self, summary: dict, images: dict[str, Path]) -> None:
        """HPARAMS tab: the settings with the final numbers; IMAGES tab: the run's PNGs."""
        metrics = final_metrics(summary)
        if metrics:
            self.writer.add_hparams(hparams(summary), metrics, run_name=".")
        for name, path in images.items():
            pixels = read_png(path)
            if pixels is not None:
                self.writer.add_image(name, pixels, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run; its local files go to `<run_dir>/wandb/`."""

    def __init__(
        self,
        run_dir: Path | str,
        run_config: dict | None = None,
        project: str = "contrastive_cli",
        entity: str | None = None,
        name: str | None = None,
        mode: str | None = None,  # None: WANDB_MODE if set, else wandb's default (online)
    ):
        check(mode in (None, "online", "offline", "disabled"),
              f"logger.mode={mode!r}: must be null, online, offline or disabled")
        wandb = require("wandb")
        effective = mode or os.environ.get("WANDB_MODE") or "online"
        if effective == "online" and not _wandb_key():
            raise UserError("logger=wandb: no W&B API key (set WANDB_API_KEY or run `wandb login` first), or log "
                            "without one with logger.mode=offline")
        if isinstance(run_config, DictConfig):  # instantiate() turns a dict keyword into a DictConfig
            run_config = OmegaConf.to_container(run_config, resolve=True)
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        # reinit=True: a `-m` sweep runs its jobs in one process; each job gets its own run.
        try:
            self.run = wandb.init(project=project, entity=entity, name=name, dir=str(run_dir),
                                  mode=mode, config=run_config, reinit=True)
        except wandb.errors.UsageError as e:  # no API key online, a bad entity, ...: one line
            raise UserError(f"logger=wandb: {e}") from None
        # for cl-eval / cl-embed, which add their results to this run later (eval_to_tracker)
        (Path(run_dir) / WANDB_RUN).write_text(json.dumps({"id": self.run.id, "project": project, "entity": entity,
                                                           "mode": "offline" if self.run.offline else mode}) + "\n")

    def log(self, scalars: dict[str, float | None], step: int) -> None:
        self.run.log(tagged(scalars), step=step)

    def finish(self, summary: dict, images: dict[str, Path]) -> None:
        """The final numbers in the run's summary; the PNGs as images (the config went in at init)."""
        import wandb

        self.run.summary.update(final_metrics(summary))
        pictures = {f"images/{n}": wandb.Image(str(p)) for n, p in images.items() if Path(p).is_file()}
        if pictures:
            self.run.log(pictures)

    def close(self) -> None:
        self.run.finish()


def _wandb_key() -> bool:
    """Whether wandb has an API key without asking for one: WANDB_API_KEY, or a `wandb login` entry in
    the netrc file (where wandb keeps it) for its host."""
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        auth = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def eval_to_tracker(train_cfg, run_dir: Path, scalars: dict[str, float], images: dict[str, Path], step: int) -> None:
    """cl-eval's and cl-embed's results into the tracker of the training run they read (its TensorBoard
    folder; its W&B run, resumed by id), under eval/, at the checkpoint's step. Nothing when that run used
    none; a tracker that cannot be reached is one warning, never the command's failure."""
    target = str(OmegaConf.select(train_cfg, "logger._target_", default="") or "")
    try:
        if target.endswith("TensorBoardLogger") and (run_dir / "tensorboard").is_dir():
            require("tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            for name, value in scalars.items():
                writer.add_scalar(f"eval/{name}", value, global_step=step)
            for name, path in images.items():
                pixels = read_png(path)
                if pixels is not None:
                    writer.add_image(f"eval/{name}", pixels, global_step=step, dataformats="HWC")
            writer.close()
            log.info("added to the run's TensorBoard: %s", run_dir / "tensorboard")
        elif target.endswith("WandbLogger") and (run_dir / WANDB_RUN).is_file():
            info = json.loads((run_dir / WANDB_RUN).read_text())
            wandb = require("wandb")
            if (info.get("mode") or os.environ.get("WANDB_MODE") or "online") == "online" and not _wandb_key():
                raise UserError("no W&B API key (WANDB_API_KEY or `wandb login`)")
            run = wandb.init(id=info["id"], resume="allow", project=info.get("project"), entity=info.get("entity"),
                             mode=info.get("mode"), dir=str(run_dir), reinit=True)
            run.log({**{f"eval/{k}": v for k, v in scalars.items()},
                     **{f"eval/{k}": wandb.Image(str(p)) for k, p in images.items() if Path(p).is_file()}})
            run.finish()
            log.info("added to the run's W&B run %s", info["id"])
    except (UserError, ImportError, OSError, ValueError) as e:
        log.warning("the run's tracker did not take the results (%s); they are in the files above", e)
