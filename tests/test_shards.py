"""WebDataset shards: cl-pack, streaming across ranks and workers (every key once per epoch, equal steps),
a mid-epoch resume that sees no sample twice, training and evaluation from shards, and bad input."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BIN, cli_env, error_lines, run_cli
from PIL import Image

wds = pytest.importorskip("webdataset")

from contrastive_cli.data.samples import decode_on, parse, read_samples  # noqa: E402
from contrastive_cli.data.shards import ShardImages, load_shards, quotas  # noqa: E402
from contrastive_cli.errors import UserError  # noqa: E402


def png(seed: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_shards(folder: Path, n: int, per_shard: int, sizes: bool = True, captions: bool = False,
                 labels: bool = True) -> list[Path]:
    """Shards "made elsewhere" (webdataset's own writer): sample i is key{i} with label i (so a batch's
    labels say which samples it holds), counted in a sizes.json as open_clip's are."""
    folder.mkdir(parents=True, exist_ok=True)
    paths, counts = [], {}
    for s, first in enumerate(range(0, n, per_shard)):
        path = folder / f"part-{s:04d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(first, min(n, first + per_shard)):
                sink.write({"__key__": f"key{i:05d}", "png": png(i), **({"cls": str(i)} if labels else {}),
                            **({"txt": f"sample number {i}"} if captions else {})})
        paths.append(path)
        counts[path.name] = min(n, first + per_shard) - first
    if sizes:
        (folder / "sizes.json").write_text(json.dumps(counts))
    return paths


def epoch_labels(data: ShardImages, epoch: int, rank: int, world: int, workers: int, batch: int = 8):
    stream = data.stream(batch, seed=0, epoch=epoch, workers=workers, rank=rank, world=world)
    out = [y.tolist() for _, y in stream]
    return out


@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards64")
    write_shards(folder, 64, 8)
    return folder


def test_two_ranks_two_workers_see_every_key_once_per_epoch_in_equal_steps(shards64):
    data = load_shards(str(shards64), image_size=12, shuffle_buffer=4).train
    orders = []
    for epoch in (0, 1):
        per_rank = [epoch_labels(data, epoch, rank, 2, 2) for rank in (0, 1)]
        assert [len(b) for b in per_rank] == [4, 4]  # 64 samples / (8 x 2 ranks): the same steps on both ranks
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert sorted(seen) == list(range(64)) and set(seen.values()) == {1}
        orders.append([i for b in per_rank[0] for i in b])
    assert orders[0] != orders[1]  # shards reshuffled per epoch


def test_uneven_shards_still_give_every_rank_the_same_steps(tmp_path):
    write_shards(tmp_path, 70, 8)  # 9 shards, the last of 6: one rank has more samples than the other
    data = load_shards(str(tmp_path), image_size=12, shuffle_buffer=4).train
    steps = [len(epoch_labels(data, 0, rank, 2, 2)) for rank in (0, 1)]
    assert steps == [70 // 16] * 2
    assert quotas([17, 8], 3) == [2, 1] and sum(quotas([5, 5, 5], 7)) == 7


def test_a_stream_resumed_from_its_position_sees_no_sample_twice(shards64):
    data = load_shards(str(shards64), image_size=12, shuffle_buffer=4).train
    for workers in (0, 2):
        stream = data.stream(8, seed=0, epoch=0, workers=workers)
        before = []
        for k, (_, y) in enumerate(stream):
            before += y.tolist()
            if k == 2:
                break
        rest = data.stream(8, seed=0, epoch=0, workers=workers, start=3, resume=stream.position())
        assert len(rest) == 8 - 3
        after = [i for _, y in rest for i in y.tolist()]
        both = Counter(before + after)
        assert sorted(both) == list(range(64)) and set(both.values()) == {1}  # none twice, none skipped


def test_evaluation_reads_every_sample_once_in_order(shards64):
    data = load_shards(str(shards64), image_size=12).train
    labels = [i for _, y in data.stream(10, seed=0, epoch=0, shuffle=False, drop_last=False) for i in y.tolist()]
    assert labels == list(range(64))


def test_the_shard_reader_reads_what_webdataset_reads(tmp_path):
    """The header walk (what training reads shards with) against webdataset's own reader: long keys (a
    pax header), a folder in the key, members it skips over (.json), a GNU tar and a gzipped one."""
    import tarfile

    long_key = "deep/" + "k" * 150
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for i, key in enumerate(["x0", long_key, "sub/x2"]):
            sink.write({"__key__": key, "png": png(i), "cls": str(i), "json": {"i": i}, "txt": f"caption {i} é"})
    with tarfile.open(tmp_path / "a.tar") as src, tarfile.open(tmp_path / "gnu.tar", "w", format=tarfile.GNU_FORMAT) as gnu, \
            tarfile.open(tmp_path / "a.tar.gz", "w:gz") as gz:
        for m in src.getmembers():
            gnu.addfile(m, src.extractfile(m))
            gz.addfile(m, src.extractfile(m))
    for name in ("a.tar", "gnu.tar", "a.tar.gz"):
        theirs = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
                  for s in wds.tarfile_samples([{"url": str(tmp_path / name)}])]
        assert list(read_samples(str(tmp_path / name), None)) == theirs and len(theirs) == 3, name
        assert [sorted(f) for _, f in read_samples(str(tmp_path / name))] == [["cls", "png", "txt"]] * 3
    assert theirs[1][0] == long_key


def test_jpeg_decoders_agree_when_the_image_is_stored_larger(monkeypatch):
    """simplejpeg (where installed) and Pillow's draft mode both scale a 96 px JPEG in the decoder for 24 px;
    the full decode then resize is the reference."""
    from contrastive_cli.data import samples

    rng = np.random.default_rng(3)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((96, 96), Image.BICUBIC)
    buf = io.BytesIO()
    smooth.save(buf, "JPEG", quality=95)
    fields = {"jpg": buf.getvalue()}
    outs = {}
    for name, jpeg, draft in (("simplejpeg", samples.JPEG, True), ("draft", None, True), ("full", None, False)):
        if name == "simplejpeg" and jpeg is None:
            continue
        monkeypatch.setattr(samples, "JPEG", jpeg)
        monkeypatch.setattr(samples, "DRAFT", draft)
        outs[name] = parse(fields, 24, 3, encoded=False)[0]
    for name, x in outs.items():
        assert x.shape == (3, 24, 24) and (x.int() - outs["full"].int()).abs().float().mean() < 4.0, name


def test_decoding_on_the_device_matches_the_workers_pillow_decode(tmp_path):
    from PIL import Image as I

    buf = io.BytesIO()
    I.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    fields = {"jpg": buf.getvalue(), "cls": b"3"}
    cpu, label, _ = parse(fields, 20, 3, encoded=False)
    raw, _, _ = parse(fields, 20, 3, encoded=True)
    dev = decode_on(torch.device("cpu"), [raw], 20, 3)[0]
    assert label == 3 and dev.shape == cpu.shape
    assert (dev.int() - cpu.int()).abs().float().mean() < 2.0  # libjpeg-turbo both; rounding of the colour conversion


def test_pack_train_eval_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "cat" / "broken.png").write_bytes(b"not an image")
    proc = run_cli("cl-pack", "input=imgs", "out=sh", "image_size=16", "shard_size=8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipped 1 unreadable image" in proc.stderr + proc.stdout
    index = json.loads((tmp_path / "sh" / "index.json").read_text())
    assert index["classes"] == ["cat", "dog"] and sum(s["count"] for s in index["train"] + index["test"]) == 48
    n_test = sum(s["count"] for s in index["test"])
    assert n_test in (4, 5)  # test_fraction 0.1 of the 49 files, stratified (the broken one on either side)
    with Image.open(io.BytesIO(next(iter(_members(tmp_path / "sh" / "shard-000000.tar", ".jpg"))))) as img:
        assert min(img.size) == 16 and max(img.size) == 22  # the short side to image_size, the aspect kept
    # trainer.batch_size: 43 or 44 training samples (the default 256 is more than the set)
    run = ["dataset=shards", "dataset.source.path=sh", "dataset.image_size=16", "trainer.epochs=1",
           "trainer.batch_size=8", "hydra.run.dir=run"]
    proc = run_cli("cl-train", *run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("cl-eval", "checkpoint=run/checkpoints/last.pt", "hydra.run.dir=ev", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert result["n_test"] == n_test and result["n_train"] == 48 - n_test and 0 <= result["knn_top1"] <= 1
    proc = run_cli("cl-embed", "checkpoint=run/checkpoints/last.pt", "input=sh", "neighbours=2", "hydra.run.dir=em",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = (tmp_path / "em" / "index.csv").read_text().splitlines()[1:]
    assert len(rows) == 48 and np.load(tmp_path / "em" / "embeddings.npy").shape[0] == 48
    assert all(".tar#" in r and (",cat" in r or ",dog" in r) for r in rows)
    assert (tmp_path / "em" / "neighbours.png").stat().st_size > 0


def _members(tar: Path, suffix: str):
    import tarfile

    with tarfile.open(tar) as t:
        for m in t.getmembers():
            if m.name.endswith(suffix):
                yield t.extractfile(m).read()


def test_pack_resumes_after_a_stop_and_refuses_another_packs_folder(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "flat").mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "flat" / f"{i}.png")
    args = ["input=flat", "out=sh", "image_size=16", "shard_size=5", "format=png", "test_fraction=0"]
    assert run_cli("cl-pack", *args, cwd=tmp_path).returncode == 0
    whole = {p.name: p.read_bytes() for p in (tmp_path / "sh").glob("*.tar")}
    # a stop after two shards: the others gone, one cut off under its temporary name, no index yet
    for name in ("shard-000002.tar", "shard-000003.tar", "index.json"):
        (tmp_path / "sh" / name).unlink()
    (tmp_path / "sh" / ".shard-000002.tar.tmp").write_bytes(b"half a shard")
    proc = run_cli("cl-pack", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "sh").glob("*.tar")} == whole  # PNG: the same bytes again
    assert not list((tmp_path / "sh").glob(".*.tmp"))
    proc = run_cli("cl-pack", "input=flat", "out=sh", "image_size=8", cwd=tmp_path)  # other settings, same folder
    assert proc.returncode == 1 and "holds the shards of another pack" in error_lines(proc)[-1]
    write_shards(tmp_path / "theirs", 4, 2)
    proc = run_cli("cl-pack", "input=flat", "out=theirs", cwd=tmp_path)
    assert proc.returncode == 1 and "already holds shards" in error_lines(proc)[-1]


def test_pack_a_pairs_file_keeps_every_caption_and_holds_out_by_image(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "img").mkdir()
    rows = ["filepath\ttitle"]
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        rows += [f"img/{i}.jpg\ta photo number {i}", f"img/{i}.jpg\t第{i}张照片"]  # two captions, one in Chinese
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    proc = run_cli("cl-pack", "input=pairs.tsv", "out=sh", "image_size=16", "shard_size=4", "test_fraction=0.2",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((tmp_path / "sh" / "index.json").read_text())
    assert index["captions"] and sum(s["count"] for s in index["test"]) == 4  # 2 of 10 images, both captions each
    captions = {part: [t.decode() for s in index[part] for t in _members(tmp_path / "sh" / s["name"], ".txt")]
                for part in ("train", "test")}
    assert len(captions["train"]) == 16 and "第3张照片" in captions["train"] + captions["test"]
    held = {c.split()[-1] for c in captions["test"] if c.startswith("a photo")}
    assert all(f"第{i}张照片" not in captions["train"] for i in held)  # an image's captions all on one side


def test_clip_trains_on_the_captions_of_shards(tmp_path):
    write_shards(tmp_path / "cc", 32, 8, captions=True, labels=False)  # as img2dataset writes them: no .cls
    # the settings: a CPU-sized text tower and batch for 32 samples (the method's own defaults otherwise)
    proc = run_cli("cl-train", "method=clip", "dataset=shards", "dataset.source.path=cc", "dataset.image_size=12",
                   "trainer.epochs=1", "trainer.batch_size=8", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "captions from the shards' .txt files" in proc.stdout + proc.stderr


BAD = [
    (["dataset.source.path=nowhere/shard-{0000..0003}.tar"], "matches no shard file"),
    (["dataset.source.path=empty"], "a folder with no .tar shards"),
    (["dataset.source.path=nosizes"], "give dataset.source.num_samples=N"),
    (["dataset.source.path=noimages"], "have no image"),
    (["dataset.source.path=good", "dataset.decode=gpu"], "no CUDA device here"),
]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_shards")
    (root / "empty").mkdir()
    write_shards(root / "nosizes", 8, 4, sizes=False)
    (root / "noimages").mkdir()
    with wds.TarWriter(str(root / "noimages" / "a.tar")) as sink:
        sink.write({"__key__": "x", "txt": "only text"})
    (root / "noimages" / "sizes.json").write_text('{"a.tar": 1}')
    write_shards(root / "good", 16, 8)
    return root


@pytest.mark.parametrize("args, message", BAD)
def test_bad_shards_are_one_line(bad_inputs, args, message):
    proc = run_cli("cl-train", "dataset=shards", *args, "trainer.epochs=1", "trainer.batch_size=4", cwd=bad_inputs)
    lines = error_lines(proc)
    assert proc.returncode == 1 and len(lines) == 1 and message in lines[0], proc.stderr[-1500:]


def one_thread() -> dict:
    """A user's environment with the training on one thread: on a 2-core CPU the shards are then read
    in DataLoader workers (with both cores to its threads, the training process reads them itself)."""
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


def test_on_a_cpu_whose_cores_the_training_fills_shards_are_read_without_workers(shards64, monkeypatch):
    from contrastive_cli.train import stream_workers

    data = load_shards(str(shards64), image_size=12).train
    cpu = torch.device("cpu")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert stream_workers(2, data, cpu, 1) == 0 and stream_workers(2, data, torch.device("cuda"), 1) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert stream_workers(2, data, cpu, 1) == 2 and stream_workers(2, data, cpu, 2) == 0
    assert stream_workers(2, object(), cpu, 2) == 2  # an in-memory or folder dataset: as asked


def test_fewer_shards_than_workers_says_how_many(bad_inputs):
    proc = subprocess.run([str(BIN / "cl-train"), "dataset=shards", "dataset.source.path=good", "trainer.workers=4",
                           "trainer.epochs=1", "trainer.batch_size=4", "hydra.run.dir=run_few"], cwd=bad_inputs,
                          capture_output=True, text=True, timeout=600, env=one_thread())
    lines = error_lines(proc)
    assert proc.returncode == 1 and "so 4 are needed" in lines[-1] and "shard_size=4" in lines[-1], proc.stderr[-1500:]


def test_a_corrupt_shard_is_skipped_with_a_warning_and_all_corrupt_is_one_line(tmp_path):
    paths = write_shards(tmp_path, 32, 8)
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[: len(raw) // 2])  # truncated mid-sample
    data = load_shards(str(tmp_path), image_size=12, shuffle_buffer=4).train
    labels = [i for _, y in data.stream(4, seed=0, epoch=0, shuffle=False, drop_last=False) for i in y.tolist()]
    assert set(range(0, 8)) | set(range(16, 32)) <= set(labels) and len(labels) == len(set(labels))
    for p in paths:
        p.write_bytes(b"\0" * 100)
    with pytest.raises(UserError, match="not a readable tar shard|no readable sample"):
        data = load_shards(str(tmp_path), image_size=12).train
        list(data.stream(4, seed=0, epoch=0, workers=0))


# A training process that writes the labels (here: sample ids) of every step it takes, and stops itself
# with SIGTERM after `stop_at` steps (0: never): what the multi-process tests count.
RECORDER = r"""
import os, signal, sys
from contrastive_cli import cli, engine
out, stop_at = sys.argv[1], int(sys.argv[2])
sys.argv = ["cl-train", *sys.argv[3:]]
real = engine.optimizer_step
count = [0]
rank = os.environ.get("RANK", "0")
def step(model, x1, x2, y, *args, **kwargs):
    with open(os.path.join(out, f"ids-{rank}.txt"), "a") as f:
        f.write(" ".join(map(str, y.tolist())) + "\n")
    result = real(model, x1, x2, y, *args, **kwargs)
    count[0] += 1
    if count[0] == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return result
engine.optimizer_step = step
cli.train()
"""
# simclr on 16 px images, one epoch's worth of checks; the small encoder keeps a step at milliseconds
TINY = ["dataset=shards", "dataset.image_size=12", "trainer.batch_size=8", "encoder.width=8",
        "trainer.knn_monitor=false", "trainer.log_every=1", "dataset.source.shuffle_buffer=4"]


def recorded(folder: Path, rank: str = "0") -> list[list[int]]:
    path = folder / f"ids-{rank}.txt"
    return [[int(v) for v in line.split()] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_run_stopped_inside_an_epoch_resumes_without_seeing_a_sample_twice(shards64, tmp_path):
    (tmp_path / "log1").mkdir()
    (tmp_path / "log2").mkdir()
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    args = [*TINY, f"dataset.source.path={shards64}", "trainer.epochs=2", "trainer.workers=2", "hydra.run.dir=run"]
    first = subprocess.run([sys.executable, str(script), str(tmp_path / "log1"), "11", *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, env=one_thread())
    assert first.returncode == 143, first.stderr[-2000:]
    assert "read by the training process itself" not in first.stdout + first.stderr  # 2 workers, as asked
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "log2"), "0", "trainer.resume=run",
                           "hydra.run.dir=run"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=one_thread())
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = recorded(tmp_path / "log1"), recorded(tmp_path / "log2")
    assert len(before) == 11 and len(before) + len(after) == 16  # 8 steps per epoch, 2 epochs
    second = Counter(i for b in before[8:] + after[:5] for i in b)  # epoch 2: 3 steps before the stop, 5 after
    assert sorted(second) == list(range(64)) and set(second.values()) == {1}  # none twice, none skipped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_share_the_epoch_and_resume_it_together(shards64, tmp_path):
    """Two torchrun launches on this machine as two "nodes" (c10d rendezvous on localhost, one gloo
    process each): together they train on every sample once per epoch in the same number of steps;
    stopped by SIGTERM inside the second epoch, both resume it."""
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)

    def launch(log: str, stop: int, *extra: str):
        (tmp_path / log).mkdir(exist_ok=True)
        port = _free_port()
        procs = [subprocess.Popen(
            [str(BIN / "cl-torchrun"), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={n}",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test{port}",
             str(script), str(tmp_path / log), str(stop), *extra], cwd=tmp_path, env=cli_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
        return [(p.wait(timeout=600), p.stderr.read()) for p in procs]

    args = [*TINY, f"dataset.source.path={shards64}", "trainer.epochs=2", "trainer.workers=2", "hydra.run.dir=run"]
    results = launch("a", 6, *args)  # 4 steps per epoch (64 / (8 x 2)): stops after epoch 2's second step
    assert all(code != 0 for code, _ in results), results
    first = [recorded(tmp_path / "a", r) for r in ("0", "1")]
    assert [len(f) for f in first] == [6, 6]
    epoch1 = Counter(i for f in first for b in f[:4] for i in b)
    assert sorted(epoch1) == list(range(64)) and set(epoch1.values()) == {1}
    results = launch("b", 0, "trainer.resume=run", "hydra.run.dir=run")
    assert all(code == 0 for code, _ in results), [err[-1500:] for _, err in results]
    rest = [recorded(tmp_path / "b", r) for r in ("0", "1")]
    assert [len(r) for r in rest] == [2, 2]
    epoch2 = Counter(i for f, r in zip(first, rest, strict=True) for b in f[4:] + r for i in b)
    assert sorted(epoch2) == list(range(64)) and set(epoch2.values()) == {1}
    assert os.path.isfile(tmp_path / "run" / "checkpoints" / "last.pt")


def test_a_slurm_job_of_several_nodes_meets_at_its_first_node(tmp_path, monkeypatch):
    """cl-train trainer.devices=N inside a SLURM job of 2 nodes, one task each (Hydra's submitit launcher):
    each node's torchrun joins the rendezvous on the job's first node; one node alone stays standalone."""
    from contrastive_cli.cli import _rendezvous

    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho gpu-node07; echo gpu-node08\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242", "SLURM_NTASKS_PER_NODE": "1",
           "SLURM_JOB_NODELIST": "gpu-node[07-08]"}
    assert _rendezvous(env) == ["--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d",
                                "--rdzv_endpoint=gpu-node07:29742", "--rdzv_id=slurm4242"]
    assert _rendezvous({**env, "SLURM_NNODES": "1"}) == ["--standalone"]
    assert _rendezvous({}) == ["--standalone"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="first node is unknown"):
        _rendezvous(env)


def test_cl_packs_worker_pool_always_ends(tmp_path):
    # cl-pack's SIGTERM handler raises (a one-line exit); its pool's forked workers inherited it, and a
    # pool ended by terminate() could leave a worker holding the task queue's lock: the join then hung
    # (twice in one day's test runs, until the test's 600 s timeout; within 300 pools in a loop like this)
    code = ("import signal, sys\n"
            "from contrastive_cli.pack import _map\n"
            "def stop(signum, frame): raise SystemExit(143)\n"
            "signal.signal(signal.SIGTERM, stop)\n"
            "for _ in range(300):\n"
            "    assert sorted(_map(abs, [-1, -2, -3], 2)) == [1, 2, 3]\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr  # no worker died by the inherited handler
