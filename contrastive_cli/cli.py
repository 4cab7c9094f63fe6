"""The console entry points `cl-train` and `cl-eval`.

Before Hydra runs, the command line is composed and checked: every job of a sweep (every
combination, glob/range/interval sweeps expanded), and for a sweep also what can be known without
training (device present, data present, batch size against the data). A typo costs one line and
exit status 1 instead of a stack trace or a half-finished sweep. Each run then gets a folder of its
own, claimed atomically, so two runs started in the same second never share one. Inside a job, a
UserError prints one line; under `-m` the other jobs still run and the exit status is 1.
SIGTERM / SIGINT during training end the run after a step with a checkpoint (exit 143 / 130).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from . import files
from .errors import Interrupted, UserError

CONFIG_MODULE = "contrastive_cli.configs"
_LAUNCHED = "CL_TRAIN_DDP_LAUNCHER"  # set for the ranks that `cl-train trainer.devices=N` starts
_failures: list[str] = []
_search: list[str] = []  # hydra.searchpath entries and --config-dir folders: the user's own config groups


class _Terminated(BaseException):
    """SIGTERM outside the training loop (which handles it itself): leave with one line."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated()


def _fail(prog: str, message: str) -> None:
    line = " ".join(str(message).split())
    print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    _failures.append(line)


def _group_dirs(group: str) -> list:
    """The folders a config group's options come from: the package's, then the user's search path."""
    roots = [resources.files(CONFIG_MODULE)]
    for entry in _search:
        if entry.startswith("pkg://"):
            try:
                roots.append(resources.files(entry[len("pkg://"):].replace("/", ".")))
            except ModuleNotFoundError:
                continue
        else:
            roots.append(Path(entry.removeprefix("file://")).expanduser())
    return [d for d in (r.joinpath(group) for r in roots) if d.is_dir()]


def _group_options(group: str) -> list[str]:
    return sorted({p.name[:-5] for d in _group_dirs(group) for p in d.iterdir() if p.name.endswith(".yaml")})


_VALUE_FLAGS = ("-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name")
_SHOW_FLAGS = ("-c", "--cfg", "--resolve", "-p", "--package")  # print the config: it must compose first


def _split_argv(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(overrides, --config-dir folders, whether another of Hydra's flags (--help, --cfg ...) is there)."""
    overrides, dirs, other = [], [], False
    it = iter(argv)
    for a in it:
        if a in ("-cd", "--config-dir"):
            dirs.append(next(it, ""))
        elif a in _VALUE_FLAGS:  # `--cfg job`: 'job' is the flag's, not an override
            other = True
            next(it, "")
        elif a.startswith("--config-dir="):
            dirs.append(a.split("=", 1)[1])
        elif a.startswith("-"):
            other = other or a not in ("-m", "--multirun")
        else:
            overrides.append(a)
    return overrides, dirs, other


def _searchpath(overrides: list[str], dirs: list[str]) -> list[str]:
    """One hydra.searchpath override with the user's entries and --config-dir folders (as Hydra
    searches them), for composing in the pre-check; also remembered for listing group options."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries = []
    for o in OverridesParser.create().parse_overrides([o for o in overrides if o.startswith("hydra.searchpath=")]):
        value = o.value()
        entries += [str(v) for v in (value if isinstance(value, list) else [value])]
    entries += [f"file://{Path(d).expanduser().resolve()}" for d in dirs]
    _search[:] = entries
    return [f"hydra.searchpath=[{','.join(_quote(e) for e in entries)}]"] if entries else []


def _sweep_values(o) -> list[str]:
    """The values one sweep override stands for: choices, range(), glob() over a group's options,
    and an interval()'s two ends (what a search sweeper such as Optuna may try)."""
    from hydra.core.override_parser.types import ValueType

    key = o.get_key_element().lstrip("+~")
    if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
        values = o.value().filter(_group_options(key.replace(".", "/")))
    elif o.is_discrete_sweep():
        values = list(o.sweep_string_iterator())
    elif o.is_interval_sweep():
        ends = (o.value().start, o.value().end)
        if not ends[0] < ends[1]:  # Optuna's own error is a traceback at its first trial
            raise UserError(f"{o.input_line}: an interval's low end must be below its high end "
                            f"(interval({min(ends)},{max(ends)}))")
        values = [str(int(v)) if float(v).is_integer() else repr(v) for v in ends]
    else:
        values = [o.get_value_element_as_str()]
    if not values:
        raise UserError(f"{o.input_line}: the sweep selects no value (options: {', '.join(_group_options(key))})")
    return values


def _override_sets(overrides: list[str], multirun: bool) -> list[list[str]]:
    """One override list per job: under -m every combination of the sweeps (as Hydra's basic
    sweeper runs them); hydra.* overrides left out."""
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
        if multirun and o.is_sweep_override():
            choices.append([f"{key}={v}" for v in _sweep_values(o)])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]


def _did_you_mean(key: str, cfg) -> str:
    """'; did you mean X?' for a wrong key: the key of `cfg` with the same last name (dataset.root ->
    dataset.source.root), else the closest spelling."""
    import difflib

    from omegaconf import OmegaConf

    from .config import flatten

    keys = [k for k in flatten(OmegaConf.to_container(cfg, resolve=False)) if not k.startswith("hydra")] if cfg else []
    group = key.split(".")[0]
    for folder in _group_dirs(group):  # keys that only other options of the group have
        for option in (p for p in folder.iterdir() if p.name.endswith(".yaml")):
            text = option.read_text()
            keys += [f"{group}.{k}" for k in flatten(OmegaConf.to_container(OmegaConf.create(text), resolve=False))]
    keys = list(dict.fromkeys(k for k in keys if not k.split(".")[-1].startswith("_")))
    leaf = key.split(".")[-1]
    same = [k for k in keys if k.split(".")[-1] == leaf and k != key]
    if same:
        return f"; did you mean {max(same, key=lambda k: len(_common_prefix(k, key)))}?"
    close = difflib.get_close_matches(key, [k for k in keys if k != key], n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _close_group(key: str, overrides: list[str]) -> str:
    """'method=simclr' for the override 'methd=simclr': the closest config group, with its value."""
    import difflib

    groups = sorted({p.name for r in [resources.files(CONFIG_MODULE)] for p in r.iterdir()
                     if p.is_dir() and not p.name.startswith(("_", "."))})
    close = difflib.get_close_matches(key, groups, n=1, cutoff=0.7)
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key and "=" in o), "")
    return f"{close[0]}={value}" if close else ""


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _explain(e: Exception, overrides: list[str], compose) -> str:
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
        try:  # the config without the bad override, to find the key that was meant
            rest = compose([o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key])
        except Exception:
            rest = None
        group = _close_group(key, overrides) if "." not in key else ""
        if group:  # methd=simclr: a misspelt group name, not a key
            return f"{key}: unknown config group or key; did you mean {group}?"
        return f"{key}: unknown key{_did_you_mean(key, rest)} (see `--cfg job` for the keys there are; a new key needs +{key}=...)"
    return lines[0] if lines else type(e).__name__


def _precheck(config_name: str, argv: list[str], validate, runtime_check=None) -> bool:
    """Compose and validate every job a command line asks for; exit 1 with one line on the first
    error. Returns False where Hydra's own flags (--help, --cfg, ...) take over."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides, dirs, other = _split_argv(argv)
    flags = [a.split("=", 1)[0] for a in argv if a.startswith("-") and a not in ("-m", "--multirun")]
    shows = bool(flags) and all(f in _SHOW_FLAGS for f in flags)
    if other and not shows:
        return False  # --help, --info ...: Hydra's own business
    from hydra import compose, initialize_config_module
    from omegaconf.errors import MissingMandatoryValue

    prog = f"cl-{config_name}"
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = None
        try:
            search = _searchpath(overrides, dirs)

            def composed(ov):
                return compose(config_name=config_name, overrides=[*ov, *search])

            for o in overrides:  # a typed section's key comes back as its schema default, silently
                key = o[1:].split("=", 1)[0]
                if o.startswith("~") and key.split(".")[0] in ("trainer", "schedule", "paths", "eval"):
                    raise UserError(f"{o}: removes a setting {prog} needs (its built-in default would run without a "
                                    f"word); set {key}=<value> instead")
            sets = _override_sets(overrides, multirun)
            for ov in sets:
                cfg = None
                try:
                    cfg = composed(ov)
                except UserError:
                    raise
                except Exception as e:
                    raise UserError(_explain(e, ov, composed)) from None
                if shows:  # --cfg job shows what composes (a resume's stored config is not looked up)
                    continue
                try:
                    cfg = validate(cfg, ov)
                    if multirun and runtime_check is not None:
                        runtime_check(cfg)
                except MissingMandatoryValue as e:  # one not caught by the check of ??? values
                    raise UserError(f"{e.full_key}: missing; give {e.full_key}=<value>") from None
        except UserError as e:
            message = str(e)
            if message.split(":", 1)[0].count(".") and "unknown key" in message and "did you mean" not in message:
                message += _did_you_mean(message.split(":", 1)[0], cfg)
            _fail(prog, message)
            sys.exit(1)
    return not shows


# ------------------------------------------------------------------------------------------- run dirs

def _quote(value: str) -> str:
    """A value as a Hydra override: plain where the grammar allows, else single-quoted (a backslash
    is escaped only before a quote or at the end, as the grammar reads it)."""
    if re.fullmatch(r"[\w./\-:]+", value):
        return value
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"


def _claim(pattern: str) -> str:
    """Create the first free folder of `pattern`, `pattern_1`, `pattern_2`, ...: mkdir is atomic, so
    two runs started in the same second get two folders."""
    base = Path(pattern)
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in range(10_000):
            candidate = base if n == 0 else base.with_name(f"{base.name}_{n}")
            try:
                candidate.mkdir()
                return str(candidate)
            except FileExistsError:
                continue
    except OSError as e:
        raise UserError(f"{pattern}: cannot create the run folder ({e.strerror or e})") from None
    raise UserError(f"{pattern}: no free run folder name")


def _check_explicit_dir(key: str, folder: str, resume: str | None, sweep: bool) -> None:
    """An explicit hydra.run.dir / hydra.sweep.dir must be a writable folder that holds no other
    run's checkpoints (the run being resumed there may)."""
    import os

    p = Path(folder).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{key}={folder}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{key}={folder}: cannot create it ({e.strerror or e})") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{key}={folder}: not writable")
    found = sorted(p.glob("*/checkpoints/*.pt" if sweep else "checkpoints/*.pt"))
    if found and not (resume and Path(resume).expanduser().resolve().is_relative_to(p.resolve())):
        raise UserError(f"{key}={folder}: holds another run's checkpoints ({found[0]}); choose a new folder"
                        + ("" if sweep else f", or continue that run with trainer.resume={folder}"))


def _run_dir_overrides(config_name: str, argv: list[str]) -> list[str]:
    """hydra.run.dir / hydra.sweep.dir for Hydra: Hydra's dated folder claimed for this run alone, or
    the user's explicit one (as Hydra will read it: unquoted, interpolations resolved), checked."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    overrides, dirs, _ = _split_argv(argv)
    hydra_overrides = [a for a in overrides if a.lstrip("+~").startswith("hydra") and
                       not a.startswith("hydra.searchpath=")] + _searchpath(overrides, dirs)
    first = _override_sets(overrides, multirun)[0]  # a job of the sweep, for the config's own values
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=[*first, *hydra_overrides], return_hydra_config=True)
            folder = str(OmegaConf.select(cfg, key))
    except Exception:
        return []  # a pattern that needs Hydra's run-time values: leave the folder to Hydra
    if any(a.lstrip("+").split("=", 1)[0] == key for a in hydra_overrides):
        _check_explicit_dir(key, folder, OmegaConf.select(cfg, "trainer.resume", default=None), sweep=multirun)
        return []
    return [f"{key}={_quote(_claim(folder))}"]


# ------------------------------------------------------------------------------------------- jobs

def _overrides() -> list[str]:
    return [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("hydra")]


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="train")
def train_job(cfg: DictConfig) -> dict | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    error = run_dir / "error.txt"  # a failed job of a sweep says why, for cl-report
    error.unlink(missing_ok=True)
    failed_before = len(_failures)
    # one writer per run folder: cl-train itself (its DDP ranks under it), or rank 0 of a torchrun by hand
    locking = (not os.environ.get(_LAUNCHED) and os.environ.get("RANK", "0") == "0"
               and os.environ.get("SLURM_NODEID", "0") == "0")  # a job of several nodes: the first one's
    try:
        with files.run_lock(run_dir) if locking else contextlib.nullcontext():
            return _train(cfg, run_dir, failed_before)
    except UserError as e:  # the folder is in use
        _fail("cl-train", str(e))
        return _job_result(None)


def _train(cfg: DictConfig, run_dir: Path, failed_before: int):
    from .distributed import launched_by_torchrun
    from .train import run_training

    error = run_dir / "error.txt"
    try:
        overrides, resumed = _overrides(), None
        if cfg.trainer.get("resume"):  # a resumed run keeps its settings, its number of processes too
            from .config import resolve_resume

            resumed = resolve_resume(cfg, overrides)
        devices = (resumed[0] if resumed else cfg).trainer.devices
        if devices > 1 and not launched_by_torchrun():
            _launch_ddp(devices, run_dir)
            summary = _read_summary(run_dir) if len(_failures) == failed_before else None
        else:
            summary = run_training(cfg, run_dir, overrides, resumed)
        return _job_result(summary)
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"cl-train: {e}", file=sys.stderr, flush=True)
        # a sweep stops here too: the user asked to stop. Under cl-train's own launcher a rank that
        # stopped as asked leaves with 0, so torchrun reports no failed child; the launcher exits 143 / 130
        sys.exit(0 if os.environ.get(_LAUNCHED) else 128 + e.signum)
    except UserError as e:
        _fail("cl-train", str(e))
    except OSError as e:  # disk full or folder gone while writing logs, metrics or pictures
        _fail("cl-train", f"{e.filename or run_dir}: {e.strerror or e}")
    except Exception as e:
        _record_error(error, f"{type(e).__name__}: {e}")
        raise
    if os.environ.get("RANK", "0") == "0" and len(_failures) > failed_before:
        _record_error(error, _failures[-1])
        _discard_if_bare(run_dir)
    return _job_result(None)


def _discard_if_bare(run_dir: Path) -> None:
    """A single run refused before any work leaves no folder (a sweep's failed job keeps its
    error.txt for cl-report): removed when it holds only Hydra's bookkeeping and the log."""
    import shutil

    from hydra.types import RunMode

    outputs = (Path.cwd() / "outputs").resolve()
    # only the dated folders made under ./outputs: a folder the user named may be theirs (even the cwd)
    if HydraConfig.get().mode != RunMode.RUN or not run_dir.is_dir() or not run_dir.resolve().is_relative_to(outputs):
        return
    bare = {".hydra", ".lock", "error.txt", f"{HydraConfig.get().job.name}.log"}
    if all(p.name in bare for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        for parent in run_dir.resolve().parents:  # outputs/train/<date>, emptied: gone too
            if not parent.is_relative_to(outputs) or any(parent.iterdir()):
                break
            parent.rmdir()


def _read_summary(run_dir: Path) -> dict | None:
    import json

    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _job_result(summary: dict | None):
    """What the job returns to Hydra's sweeper: the summary; for a search sweeper (Optuna), the
    number it maximizes: the best online score, else the final one. None marks a failed trial (NaN
    would end the whole search)."""
    if "optuna" not in str(HydraConfig.get().sweeper.get("_target_", "")).lower():
        return summary
    # the run's own monitor: k-NN; for CLIP/SigLIP zero-shot top-1, or retrieval recall@1 on pairs
    keys = ("zeroshot_top1_best", "retrieval_r1_best", "knn_best", "zeroshot_top1", "knn_top1")
    score = next((summary[k] for k in keys if k in (summary or {})), None)
    return None if score is None else float(score)


def _record_error(path: Path, line: str) -> None:
    try:
        path.write_text(" ".join(line.split()) + "\n")
    except OSError:
        pass


def _launch_ddp(devices: int, run_dir: Path) -> None:
    """`cl-train trainer.devices=N`: the same job under torchrun, N processes, in this job's run dir.
    SIGTERM / SIGINT are passed on, so the ranks stop together with a checkpoint."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", *_rendezvous(), f"--nproc_per_node={devices}",
           "-m", "contrastive_cli.cli", *_overrides(), f"hydra.run.dir={_quote(str(run_dir))}"]
    # a session of its own: a Ctrl-C in the terminal reaches only this process, which passes it to the
    # training processes themselves (torchrun, signalled, would kill them after its own traceback)
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, _LAUNCHED: "1"})
    received = []

    def forward(signum, frame):
        received.append(signum)
        for pid in _children(proc.pid) or [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if received:
        sys.exit(128 + received[0])
    if code:
        _fail("cl-train", f"trainer.devices={devices}: a training process exited with status {code} (see above)")


def _rendezvous(env=os.environ) -> list[str]:
    """torchrun's rendezvous options: this machine alone, or, in a SLURM job of several nodes with one
    task per node (Hydra's submitit launcher with hydra.launcher.nodes=N), every node's torchrun meeting
    at the job's first node, port 29500 + the job id's last three digits."""
    import subprocess

    nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")) or 1)
    if nodes <= 1 or int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1) != 1:
        return ["--standalone"]
    try:
        head = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                              text=True, check=True, timeout=60).stdout.split()[0]
    except (OSError, KeyError, IndexError, subprocess.SubprocessError) as e:
        raise UserError(f"a SLURM job on {nodes} nodes, but its first node is unknown (scontrol show hostnames "
                        f"$SLURM_JOB_NODELIST: {e}); launch cl-torchrun on each node yourself") from None
    job = env.get("SLURM_JOB_ID", "0")
    return [f"--nnodes={nodes}", f"--node_rank={env.get('SLURM_NODEID', '0')}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={head}:{29500 + int(job[-3:] or 0)}", f"--rdzv_id=slurm{job}"]


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc); empty where that cannot be read."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _guarded(prog: str, work, where):
    """A job's work; a UserError or an OSError becomes one line (and the job's result None), and a run
    folder left with nothing in it is removed."""
    try:
        return work()
    except UserError as e:
        _fail(prog, str(e))
    except OSError as e:
        _fail(prog, f"{e.filename or where}: {e.strerror or e}")
    if prog not in ("cl-export", "cl-pack"):
        _discard_if_bare(Path(HydraConfig.get().runtime.output_dir))
    return None


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="eval")
def eval_job(cfg: DictConfig) -> dict | None:
    from .evaluate import run_evaluation

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    result = _guarded("cl-eval", lambda: run_evaluation(cfg, out_dir, _overrides()), out_dir)
    if result is None:
        return None
    rows = [("dataset", result["dataset"])]
    if "knn_top1" in result:
        rows += [("n_train / n_test", f"{result['n_train']} / {result['n_test']}"),
                 ("k-NN top-1 (k=200)", f"{result['knn_top1']:.4f}"), ("5-NN top-1", f"{result['knn5_top1']:.4f}"),
                 ("linear top-1", f"{result['linear_top1']:.4f}")]
    if "zeroshot_top1" in result:
        rows += [("zero-shot top-1 / top-5", f"{result['zeroshot_top1']:.4f} / {result['zeroshot_top5']:.4f}")]
    if "i2t_r1" in result:
        rows += [(f"{name} R@1/5/10", " / ".join(f"{result[f'{d}_r{k}']:.4f}" for k in (1, 5, 10)))
                 for d, name in (("i2t", "image->text"), ("t2i", "text->image"))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"wrote {out_dir / 'eval.json'}")
    return result


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="search")
def search_job(cfg: DictConfig) -> dict | None:
    from .search import run_search

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    result = _guarded("cl-search", lambda: run_search(cfg, out_dir), out_dir)
    if result is not None:
        print(f"{len(result['queries'])} quer{'y' if len(result['queries']) == 1 else 'ies'} x top {result['k']} of "
              f"{result['n_index']} images; wrote {out_dir / 'search.png'}, {out_dir / 'search.csv'}")
    return result


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="embed")
def embed_job(cfg: DictConfig) -> dict | None:
    from .embed import run_embed

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    result = _guarded("cl-embed", lambda: run_embed(cfg, out_dir), out_dir)
    if result is None:
        return None
    print(f"{result['n']} images x {result['feature_dim']} features"
          + (f" ({len(result['skipped'])} unreadable skipped)" if result["skipped"] else ""))
    print(f"wrote {out_dir / 'embeddings.npy'}, {out_dir / 'index.csv'}"
          + (f", {result['neighbours']['png']}" if "neighbours" in result else ""))
    return result


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="export")
def export_job(cfg: DictConfig) -> dict | None:
    from .export import run_export

    meta = _guarded("cl-export", lambda: run_export(cfg), cfg.out)
    if meta is None:
        return None
    print(f"wrote {meta['file']} ({meta['format']}, {meta['channels']} x {meta['input_size']} x {meta['input_size']} "
          f"-> {meta['feature_dim']} features; checked: max difference {meta['max_abs_diff']:.1e}) and {meta['file']}.json")
    if "text" in meta:
        print(f"wrote {meta['text']['file']} (the text tower: {meta['text']['tokenizer']} token ids x "
              f"{meta['text']['context_length']} -> {meta['feature_dim']}; checked: max difference "
              f"{meta['text']['max_abs_diff']:.1e})")
    return meta


def _brace_lists(argv: list[str]) -> list[str]:
    """`dataset.source.path=data/shard-{000000..000099}.tar` as typed (the shell took its quotes): Hydra's
    grammar reads a brace as a dictionary, so such a value is handed over quoted."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        braces = re.search(r"\{[^{}:]*(\.\.|,)[^{}:]*\}.*\.tar$", value)  # not a dictionary: {a: 1, b: 2}
        out.append(f"{key}={_quote(value)}" if eq and braces and value[:1] not in "'\"" and not key.startswith("-")
                   else arg)
    return out


def _main(prog: str, config_name: str, job, validate, runtime_check=None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    sys.argv[1:] = _brace_lists(sys.argv[1:])
    if os.getcwd() not in sys.path:  # a user's own `_target_: my_methods.Mine` imports as under `python -m`
        sys.path.append(os.getcwd())
    try:
        if config_name == "train" and "hydra/sweeper=optuna" in sys.argv and not any(
                a.startswith("hydra.sweeper.direction=") for a in sys.argv):
            sys.argv.append("hydra.sweeper.direction=maximize")  # the job returns the k-NN: higher is better
        if config_name == "train" and "hydra/sweeper=optuna" in sys.argv and not sys.stderr.isatty():
            _plain_optuna_log()
        if config_name == "train" and any(a.lstrip("+") == "trainer.resume=auto" for a in sys.argv[1:]):
            try:
                sys.argv[1:] = _auto_resume(sys.argv[1:])
            except UserError as e:
                _fail(prog, str(e))
                sys.exit(1)
        if _precheck(config_name, sys.argv[1:], validate, runtime_check) and config_name not in ("export", "pack"):
            try:
                sys.argv += _run_dir_overrides(config_name, sys.argv[1:])
            except UserError as e:
                _fail(prog, str(e))
                sys.exit(1)
        job()
    except KeyboardInterrupt:
        print(f"{prog}: stopped by SIGINT", file=sys.stderr, flush=True)
        sys.exit(130)
    except _Terminated:
        print(f"{prog}: stopped by SIGTERM", file=sys.stderr, flush=True)
        sys.exit(143)
    if _failures:
        sys.exit(1)


def _auto_resume(argv: list[str]) -> list[str]:
    """trainer.resume=auto (SLURM requeue scripts): continue the run in hydra.run.dir when it has a
    checkpoint, else start it there."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    if any(a in ("-m", "--multirun") for a in argv):
        raise UserError("trainer.resume=auto: resumes one run in its folder; not with -m (a sweep)")
    overrides, dirs, _ = _split_argv(argv)
    if not any(a.lstrip("+").startswith("hydra.run.dir=") for a in overrides):
        raise UserError("trainer.resume=auto: needs hydra.run.dir=<the run's folder> (the folder a requeued job "
                        "continues in)")
    rest = [a for a in overrides if a.lstrip("+") != "trainer.resume=auto"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[a for a in rest if a.startswith("hydra.")] + _searchpath(
            overrides, dirs), return_hydra_config=True)
    folder = Path(str(OmegaConf.select(cfg, "hydra.run.dir"))).expanduser()
    if any((folder / "checkpoints").glob("*.pt")):
        print(f"cl-train: trainer.resume=auto: continuing the run in {folder}", file=sys.stderr, flush=True)
        return [a if a.lstrip("+") != "trainer.resume=auto" else f"trainer.resume={_quote(str(folder))}" for a in argv]
    print(f"cl-train: trainer.resume=auto: no checkpoint in {folder} yet: starting the run there", file=sys.stderr,
          flush=True)
    return [a for a in argv if a.lstrip("+") != "trainer.resume=auto"]


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="pack")
def pack_job(cfg: DictConfig) -> dict | None:
    from .pack import run_pack

    result = _guarded("cl-pack", lambda: run_pack(cfg), cfg.out)
    if result is not None:
        print(f"{result['train']} training and {result['test']} held-out samples in {result['shards']} shards"
              + (f" ({len(result['skipped'])} unreadable skipped)" if result["skipped"] else "")
              + f"; wrote {result['out']}/index.json")
    return result


def _plain_optuna_log() -> None:
    """Optuna's own handler colours its lines (colorlog) even into a file or a pipe: hand them to
    Hydra's plain log handlers instead."""
    try:
        import optuna
    except ImportError:
        return
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()


def train() -> None:
    """`cl-train [overrides]`: pretrain an encoder."""
    from .config import validate_train_job

    _main("cl-train", "train", train_job, validate_train_job, _runtime_check)


def _runtime_check(cfg: DictConfig) -> None:
    from .train import runtime_check

    runtime_check(cfg)


def evaluate() -> None:
    """`cl-eval checkpoint=<path> [overrides]`: k-NN, linear probe and t-SNE of a checkpoint."""
    from .config import validate_eval_job

    _main("cl-eval", "eval", eval_job, validate_eval_job)


def embed() -> None:
    """`cl-embed checkpoint=<path> input=<folder | dataset>`: features, index and neighbours."""
    from .config import validate_embed_job

    _main("cl-embed", "embed", embed_job, validate_embed_job)


def search() -> None:
    """`cl-search checkpoint=<path> index=<cl-embed folder> text=...`: images found by a sentence."""
    from .search import validate_search_job

    _main("cl-search", "search", search_job, validate_search_job)


def export() -> None:
    """`cl-export checkpoint=<path> format=state_dict|torchscript|onnx [out=FILE]`: the encoder alone."""
    from .config import validate_export_job

    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        _fail("cl-export", "-m: one export per command (run cl-export once per checkpoint and format)")
        sys.exit(1)
    _main("cl-export", "export", export_job, validate_export_job)


def pack() -> None:
    """`cl-pack input=<folder | pairs file> out=<folder>`: WebDataset shards for dataset=shards."""
    from .pack import validate_pack_job

    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        _fail("cl-pack", "-m: one pack per command")
        sys.exit(1)
    _main("cl-pack", "pack", pack_job, validate_pack_job)


def torchrun() -> None:
    """`cl-torchrun [torchrun's options] -m contrastive_cli.cli [overrides]`: torchrun itself, except that
    a SIGTERM / SIGINT to it (a cluster's preemption) ends in one line instead of its agent's traceback;
    its ranks stop as under cl-train, each after its step, rank 0 with a checkpoint. The older module
    name, `-m contrastive_cli.train`, is read as `-m contrastive_cli.cli`."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main

    args = sys.argv[1:]
    for i in range(len(args) - 1):
        if args[i] == "-m" and args[i + 1] == "contrastive_cli.train":
            args[i + 1] = "contrastive_cli.cli"
            break
    try:
        main(args)
    except SignalException as e:
        print(f"cl-torchrun: stopped by {e.sigval.name}; continue with trainer.resume=<the run folder>",
              file=sys.stderr, flush=True)
        sys.exit(128 + int(e.sigval))


if __name__ == "__main__":  # what cl-train trainer.devices=N and cl-torchrun run in each rank
    train()
