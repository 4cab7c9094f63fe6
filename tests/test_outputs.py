"""Every output of cl-eval, cl-embed and cl-export is whole or absent: a stopped or failing command leaves
all of its files or none (no truncated index.csv beside a complete embeddings.npy, no 124-byte PNG),
with the umask's mode, and a folder it cannot write is named as the user gave it."""

import csv
import os
import signal
import stat

import numpy as np
import pytest
from conftest import compose_cfg, error_lines, run_cli

from contrastive_cli import cli, files
from contrastive_cli.errors import UserError


def test_whole_renames_all_files_together_or_leaves_none(tmp_path):
    a, b = tmp_path / "out" / "a.npy", tmp_path / "out" / "b.csv"
    with pytest.raises(RuntimeError, match="stopped half-way"):
        with files.whole(a, b) as (ta, tb):
            np.save(ta, np.ones(3))  # the same suffix: np.save adds none
            tb.write_text("half")
            raise RuntimeError("stopped half-way")
    assert os.listdir(tmp_path / "out") == []
    old = os.umask(0o022)
    try:
        with files.whole(a, b) as (ta, tb):
            np.save(ta, np.ones(3))
            tb.write_text("row\n")
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path / "out")) == ["a.npy", "b.csv"] and np.load(a).tolist() == [1, 1, 1]
    assert stat.S_IMODE(a.stat().st_mode) == 0o644 == stat.S_IMODE(b.stat().st_mode)  # not mkstemp's 0600


def test_a_sigterm_while_cl_embed_writes_leaves_none_of_its_files(tmp_path, digits_ckpt, monkeypatch):
    from contrastive_cli.embed import run_embed

    real_writer = csv.writer

    def writer_then_sigterm(f, *args, **kwargs):  # the moment: embeddings.npy done, index.csv half
        w = real_writer(f, *args, **kwargs)
        f.write("0,half a row")
        os.kill(os.getpid(), signal.SIGTERM)
        return w

    old = signal.signal(signal.SIGTERM, cli._on_sigterm)  # what cl-embed installs
    try:
        monkeypatch.setattr(csv, "writer", writer_then_sigterm)
        out = tmp_path / "embed"
        with pytest.raises(cli._Terminated):
            run_embed(compose_cfg("embed", [f"checkpoint={digits_ckpt}", "input=digits", "neighbours=4"]), out)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert os.listdir(out) == []  # no embeddings.npy, no index.csv, no temporary file
    monkeypatch.undo()
    run_embed(compose_cfg("embed", [f"checkpoint={digits_ckpt}", "input=digits", "neighbours=4"]), out)
    assert sorted(os.listdir(out)) == ["embed.json", "embeddings.npy", "index.csv", "neighbours.csv", "neighbours.png"]
    with open(out / "index.csv") as f:
        assert sum(1 for _ in f) == 1 + 1797


def test_a_failing_tsne_leaves_no_png_and_no_eval_json(tmp_path, digits_ckpt, monkeypatch):
    from contrastive_cli import evaluate

    def half_png(feats, labels, classes, path, *args):
        path.write_bytes(b"\x89PNG\r\n" + b"\0" * 118)  # the 124-byte PNG, then the stop
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "tsne_png", half_png)
    with pytest.raises(KeyboardInterrupt):
        evaluate.run_evaluation(compose_cfg("eval", [f"checkpoint={digits_ckpt}", "eval.linear_max_iter=20"]), tmp_path / "e")
    assert not (tmp_path / "e").exists() or os.listdir(tmp_path / "e") == []


def test_export_follows_the_umask_and_names_out_when_it_cannot_write(tmp_path, digits_ckpt):
    out = tmp_path / "enc.pt"
    proc = run_cli("cl-export", f"checkpoint={digits_ckpt}", "format=state_dict", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 == stat.S_IMODE((tmp_path / "enc.pt.json").stat().st_mode)
    (tmp_path / "a_file").write_text("")
    bad = tmp_path / "a_file" / "enc.pt"  # its folder is a file (a read-only folder does not stop root)
    proc = run_cli("cl-export", f"checkpoint={digits_ckpt}", "format=state_dict", f"out={bad}", cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"cl-export: error: out={bad}: cannot write") and ".tmp" not in lines[0], lines


def test_an_unwritable_embed_folder_is_one_line_naming_the_file(tmp_path, digits_ckpt):
    from contrastive_cli.embed import run_embed

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=r"a_file/embeddings.npy: cannot write it \(") as e:
        run_embed(compose_cfg("embed", [f"checkpoint={digits_ckpt}", "input=digits", "neighbours=0"]), tmp_path / "a_file")
    assert ".tmp" not in str(e.value)


def test_a_run_folder_in_use_is_refused_naming_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    import socket

    fast = ["trainer.epochs=1", "trainer.batch_size=128", "encoder.width=8", "trainer.knn_monitor=false"]
    with files.run_lock(tmp_path / "R"):  # this process writes there (two resumes started together)
        proc = run_cli("cl-train", "hydra.run.dir=R", *fast, cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == (f"cl-train: error: {tmp_path / 'R'}: in use by pid {os.getpid()} on host {socket.gethostname()} "
                        "(its .lock): two processes would write the same files; wait for that run to end, or choose "
                        "another hydra.run.dir")
    assert not (tmp_path / "R" / "checkpoints").exists()
    (tmp_path / "R").mkdir(exist_ok=True)
    (tmp_path / "R" / ".lock").write_text("pid 999999 on host gone\n")  # left by a killed run: no flock held
    proc = run_cli("cl-train", "hydra.run.dir=R", *fast, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "R" / "checkpoints" / "last.pt").is_file() and not (tmp_path / "R" / ".lock").exists()
