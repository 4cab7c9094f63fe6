"""The console entry points `cl-train` and `cl-eval`.

Before Hydra runs, the overrides are composed and checked once (each value of a sweep too), so a
typo costs one line and exit status 1 instead of a stack trace or a half-finished sweep. Inside a
job, a UserError prints one line; under `-m` the other jobs still run and the exit status is 1.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import UserError

CONFIG_MODULE = "contrastive_cli.configs"
_failures: list[str] = []
_HYDRA_FLAGS_WITH_VALUE = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")


def _fail(prog: str, message: str) -> None:
    line = " ".join(str(message).split())
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    _failures.append(line)


def _group_options(group: str) -> list[str]:
    root = resources.files(CONFIG_MODULE).joinpath(group)
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")) if root.is_dir() else []


def _override_sets(overrides: list[str]) -> list[list[str]]:
    """One override list per sweep value (the other sweeps at their first value), hydra.* left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as e:
        raise UserError(str(e).strip().splitlines()[0]) from None
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if key.lstrip("+~").startswith(("hydra.", "hydra/")):
            continue
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    if not choices:
        return [[]]
    sets = [[c[0] for c in choices]]
    for i, c in enumerate(choices):
        for v in c[1:]:
            sets.append([*sets[0][:i], v, *sets[0][i + 1 :]])
    return sets


def _explain(e: Exception, overrides: list[str]) -> str:
    from hydra.errors import MissingConfigException

    text = str(e).strip()
    if isinstance(e, MissingConfigException):
        for o in overrides:
            group, _, value = o.lstrip("+").partition("=")
            if group and "." not in group and _group_options(group) and value not in _group_options(group):
                return f"{group}={value}: unknown option; choose from {', '.join(_group_options(group))}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines and lines[0].startswith("Could not override"):
        key = lines[0].split("'")[1] if "'" in lines[0] else lines[0]
        return f"{key}: unknown key (see `--cfg job` for the keys there are; a new key needs +{key}=...)"
    return lines[0] if lines else type(e).__name__


def _precheck(config_name: str, argv: list[str], validate) -> None:
    """Compose and validate every job a command line asks for; exit 1 with one line on the first error."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return  # --help, --cfg, --info, -cd ...: Hydra's own business
    overrides = [a for a in argv if not a.startswith("-")]
    from hydra import compose, initialize_config_module
    from omegaconf.errors import MissingMandatoryValue

    prog = "cl-train" if config_name == "train" else "cl-eval"
    try:
        sets = _override_sets(overrides)
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            for ov in sets:
                try:
                    cfg = compose(config_name=config_name, overrides=ov)
                except UserError:
                    raise
                except Exception as e:
                    raise UserError(_explain(e, ov)) from None
                try:
                    validate(cfg)
                except MissingMandatoryValue as e:
                    raise UserError(f"{e.full_key}: missing; give {e.full_key}=<path to a .pt checkpoint>") from None
    except UserError as e:
        _fail(prog, str(e))
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="train")
def train_job(cfg: DictConfig) -> dict | None:
    from .distributed import launched_by_torchrun
    from .train import run_training

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    devices = cfg.trainer.get("devices", 1)
    if isinstance(devices, int) and devices > 1 and not launched_by_torchrun():
        return _launch_ddp(devices, run_dir)
    try:
        return run_training(cfg, run_dir)
    except UserError as e:
        _fail("cl-train", str(e))
        return None


def _launch_ddp(devices: int, run_dir: Path) -> None:
    """`cl-train trainer.devices=N`: the same job under torchrun, N processes, in this job's run dir."""
    import subprocess

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
           "-m", "contrastive_cli.train", *overrides, f"hydra.run.dir={run_dir}"]
    code = subprocess.run(cmd).returncode
    if code:
        _fail("cl-train", f"trainer.devices={devices}: a training process exited with status {code} (see above)")


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="eval")
def eval_job(cfg: DictConfig) -> dict | None:
    from .evaluate import run_evaluation

    try:
        result = run_evaluation(cfg, Path(HydraConfig.get().runtime.output_dir))
    except UserError as e:
        _fail("cl-eval", str(e))
        return None
    rows = [("dataset", result["dataset"]), ("n_train / n_test", f"{result['n_train']} / {result['n_test']}"),
            ("k-NN top-1 (k=200)", f"{result['knn_top1']:.4f}"), ("5-NN top-1", f"{result['knn5_top1']:.4f}"),
            ("linear top-1", f"{result['linear_top1']:.4f}")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"wrote {Path(HydraConfig.get().runtime.output_dir) / 'eval.json'}")
    return result


def train() -> None:
    """`cl-train [overrides]`: pretrain an encoder."""
    from .config import validate_train

    _precheck("train", sys.argv[1:], validate_train)
    train_job()
    if _failures:
        sys.exit(1)


def evaluate() -> None:
    """`cl-eval checkpoint=<path> [overrides]`: k-NN, linear probe and t-SNE of a checkpoint."""
    from .config import validate_eval

    _precheck("eval", sys.argv[1:], validate_eval)
    eval_job()
    if _failures:
        sys.exit(1)


if __name__ == "__main__":
    train()

