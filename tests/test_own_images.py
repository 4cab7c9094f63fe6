"""Your own images: a flat folder trains without labels, cl-embed writes features, an index and
neighbours, cl-export writes files that load without this package, load_encoder serves notebooks."""

import csv
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, error_lines, run_cli
from PIL import Image

from contrastive_cli import load_encoder
from contrastive_cli.embed import run_embed
from contrastive_cli.errors import UserError
from contrastive_cli.train import run_training

MODES = [("RGB", (9, 7, 3)), ("L", (12, 12)), ("RGBA", (8, 10, 4)), ("RGB", (30, 20, 3)), ("P", (6, 6))]


def write_images(folder, n: int, seed: int = 0, classes=None) -> list:
    """n images of mixed modes and sizes; with classes, spread over class sub-folders (and one deeper)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        sub = folder / classes[i % len(classes)] / ("deeper" if i == 3 else "") if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        mode, shape = MODES[i % len(MODES)]
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        img = Image.fromarray(arr, mode="L").convert("P") if mode == "P" else Image.fromarray(arr, mode=mode)
        path = sub / f"img{i}.{'gif' if mode == 'P' else 'png'}"
        img.save(path)
        paths.append(path)
    return paths


def add_bad_files(folder) -> None:
    good = next(folder.rglob("*.png")).read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])  # truncated: listed in one warning
    (folder / "notes.txt").write_text("not an image")  # not an image extension: ignored


# ---------------------------------------------------------------------------------- training, cl-eval

def test_a_flat_folder_trains_without_labels_and_cl_eval_points_to_cl_embed(tmp_path, caplog):
    write_images(tmp_path / "flat", 10)
    add_bad_files(tmp_path / "flat")
    cfg = compose_cfg("train", ["dataset=imagefolder", f"dataset.source.root={tmp_path / 'flat'}",
                                "dataset.image_size=16", "trainer.batch_size=4", "trainer.epochs=1", "encoder.width=8",
                                "method.proj_hidden_dim=32", "method.proj_dim=16", "trainer.knn_every=1",
                                "trainer.progress=none"])
    with caplog.at_level("WARNING"):
        summary = run_training(cfg, tmp_path / "run")
    assert summary["steps"] == 10 // 4 and "knn_top1" not in summary and "knn_best" not in summary
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("skipped 1 unreadable image file(s): ") and "cut.png" in w for w in warnings)
    (line,) = [w for w in warnings if "no labels" in w]
    assert "the k-NN monitor is off" in line and "cl-embed checkpoint=" in line
    proc = run_cli("cl-eval", f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'last.pt'}", cwd=tmp_path)
    assert proc.returncode == 1
    (err,) = error_lines(proc)
    assert err.startswith(f"cl-eval: error: dataset imagefolder at {tmp_path / 'flat'} has no labels") and "cl-embed" in err


# ----------------------------------------------------------------------------------------------- cl-embed

def test_cl_embed_folder_index_neighbours_and_equality_with_load_encoder(tmp_path, digits_ckpt):
    write_images(tmp_path / "imgs", 12, classes=["cats", "dogs"])
    add_bad_files(tmp_path / "imgs")
    out = tmp_path / "out"
    proc = run_cli("cl-embed", f"checkpoint={digits_ckpt}", f"input={tmp_path / 'imgs'}", "neighbours=3",
                   "num_queries=4", f"hydra.run.dir={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "WARNING" in ln and "unreadable" in ln]
    assert len(said) == 1 and "skipped 1 unreadable image file(s): " in said[0] and "cut.png" in said[0]
    emb = np.load(out / "embeddings.npy")
    with open(out / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert emb.dtype == np.float32 and emb.shape == (12, 64)  # small_cnn width 8: 8 * 8 features
    assert [int(r["row"]) for r in rows] == list(range(12))
    assert {r["label"] for r in rows} == {"cats", "dogs"}
    assert all(r["path"].endswith(("png", "gif")) and "cut.png" not in r["path"] for r in rows)
    assert all((r["label"] == "cats") == ("/cats/" in r["path"]) for r in rows)

    encoder, preprocess = load_encoder(digits_ckpt)
    with torch.no_grad():
        expected = encoder(preprocess([Image.open(r["path"]) for r in rows])).numpy()
    np.testing.assert_allclose(emb, expected, atol=1e-5)

    png = Image.open(out / "neighbours.png")
    assert png.format == "PNG" and png.size == (round(1.6 * 4 * 100), round(1.75 * 4 * 100))
    with open(out / "neighbours.csv") as f:
        hits = list(csv.DictReader(f))
    assert len(hits) == 4 * 3
    unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    for h in hits:  # the listed neighbours are the exact top 3 by cosine, the query excluded
        q = int(h["query_row"])
        sims = unit @ unit[q]
        sims[q] = -np.inf
        assert int(h["row"]) == np.argsort(-sims, kind="stable")[int(h["rank"]) - 1]
        assert float(h["cosine"]) == pytest.approx(sims[int(h["row"])], abs=1e-4)


def embed_cfg(ckpt, source, *extra):
    return compose_cfg("embed", [f"checkpoint={ckpt}", f"input={source}", *extra])


def test_cl_embed_normalize_queries_and_a_named_dataset(tmp_path, digits_ckpt):
    paths = write_images(tmp_path / "flat", 6)
    result = run_embed(embed_cfg(digits_ckpt, tmp_path / "flat", "normalize=true", "neighbours=2",
                                 f"queries=[{paths[4]}]"), tmp_path / "a")
    emb = np.load(tmp_path / "a" / "embeddings.npy")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with open(tmp_path / "a" / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(r["label"] == "" for r in rows)  # a flat folder has no labels
    assert result["neighbours"]["queries"] == [[r["path"] for r in rows].index(str(paths[4]))]

    result = run_embed(embed_cfg(digits_ckpt, "digits"), tmp_path / "b")
    assert result["n"] == 1797  # every image: the 1,347 training ones, then the 450 test ones
    with open(tmp_path / "b" / "index.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["path"] == "digits:train:0" and rows[-1]["path"] == "digits:test:449"
    assert {r["label"] for r in rows} == {str(d) for d in range(10)}


def test_cl_embed_one_line_errors(tmp_path, digits_ckpt):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("no image")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    cases = [(tmp_path / "empty", "has no image files"), (tmp_path / "text", "has no image files"),
             (tmp_path / "broken", "none of its 1 image files could be read"),
             ("nowhere", re.escape("input=nowhere: not a folder, nor a dataset (cifar10, cifar100, digits, fashion_mnist"))]
    for source, message in cases:
        with pytest.raises(UserError, match=message):
            run_embed(embed_cfg(digits_ckpt, source), tmp_path / "out")
    with pytest.raises(UserError, match="is not one of the images of input="):
        write_images(tmp_path / "two", 2)
        run_embed(embed_cfg(digits_ckpt, tmp_path / "two", "neighbours=1", "queries=[elsewhere.png]"), tmp_path / "o")
    proc = run_cli("cl-embed", f"checkpoint={digits_ckpt}", cwd=tmp_path)
    assert proc.returncode == 1 and error_lines(proc) == [
        "cl-embed: error: input: missing; give input=<value>"]
    proc = run_cli("cl-embed", f"checkpoint={digits_ckpt}", f"input={tmp_path / 'two'}", "queries=[img0.png]",
                   cwd=tmp_path)  # queries without neighbours would be ignored: refused
    assert proc.returncode == 1 and error_lines(proc) == [
        "cl-embed: error: queries=['img0.png']: given with neighbours=0, which finds no neighbours; add neighbours=K (e.g. 8)"]


def test_cl_embed_says_when_it_finds_fewer_neighbours_than_asked(tmp_path, digits_ckpt, caplog):
    write_images(tmp_path / "three", 3)
    with caplog.at_level("WARNING"):
        result = run_embed(embed_cfg(digits_ckpt, tmp_path / "three", "neighbours=1000"), tmp_path / "o")
    assert result["neighbours"]["k"] == 2
    assert "neighbours=1000: the input has 3 readable images, so each query gets the other 2" in caplog.text


# ---------------------------------------------------------------------------------------------- cl-export

READER = textwrap.dedent('''
    import json, sys
    import numpy as np
    import torch
    fmt, path, x_path = sys.argv[1:4]
    x = torch.from_numpy(np.load(x_path))
    meta = json.load(open(path + ".json"))
    if fmt == "state_dict":
        import torchvision
        from torch import nn
        tv = meta["torchvision"]
        model = getattr(torchvision.models, tv["arch"])(weights=None)
        if tv["small_stem"]:
            model.conv1 = nn.Conv2d(tv["in_channels"], 64, 3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        model.fc = nn.Identity()
        model.load_state_dict(torch.load(path, weights_only=True))
        with torch.no_grad():
            out = model.eval()(x).numpy()
    elif fmt == "torchscript":
        with torch.no_grad():
            out = torch.jit.load(path)(x).numpy()
    else:
        import onnxruntime
        out = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    assert not any(m.startswith("contrastive_cli") for m in sys.modules), "imported contrastive_cli"
    np.save(x_path + ".out.npy", out)
''')


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("resnet") / "run"
    run_training(compose_cfg("train", ["encoder=resnet18", "dataset.image_size=8", "trainer.epochs=1",
                                       "trainer.batch_size=256", "method.proj_hidden_dim=32", "method.proj_dim=16",
                                       "trainer.knn_monitor=false", "trainer.progress=none"]), run)
    return run / "checkpoints" / "last.pt"


@pytest.mark.parametrize("fmt, tol", [("state_dict", 1e-5), ("torchscript", 1e-5), ("onnx", 1e-4)])
def test_each_export_loads_without_this_package_and_matches(tmp_path, resnet_ckpt, fmt, tol):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="the ONNX check needs onnxruntime (the onnx extra)")
    out = tmp_path / f"enc.{fmt}"
    proc = run_cli("cl-export", f"checkpoint={resnet_ckpt}", f"format={fmt}", f"out={out}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, f"{out.name}.json"]  # nothing else written
    meta = json.loads((tmp_path / f"{out.name}.json").read_text())
    assert (meta["input_size"], meta["channels"], meta["feature_dim"]) == (8, 1, 512)
    assert meta["mean"] == [0.2] and meta["std"] == [0.33] and meta["format"] == fmt
    encoder, preprocess = load_encoder(resnet_ckpt)
    x = preprocess(torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "reader.py").write_text(READER)
    subprocess.run([sys.executable, str(tmp_path / "reader.py"), fmt, str(out), str(tmp_path / "x.npy")], check=True)
    with torch.no_grad():
        expected = encoder(x).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "x.npy.out.npy"), expected, atol=tol)


def test_export_that_fails_its_check_leaves_no_file(tmp_path, digits_ckpt, monkeypatch):
    from contrastive_cli import export

    monkeypatch.setattr(export, "_read_features", lambda fmt, path, x, rebuild, name="images": torch.zeros(len(x), 64))
    out = tmp_path / "enc.pt"
    with pytest.raises(UserError, match=r"^format=torchscript: the written file's features differ"):
        export.run_export(compose_cfg("export", [f"checkpoint={digits_ckpt}", "format=torchscript", f"out={out}"]))
    assert list(tmp_path.iterdir()) == []
    proc = run_cli("cl-export", f"checkpoint={digits_ckpt}", "format=pickle", cwd=tmp_path)
    assert proc.returncode == 1 and error_lines(proc) == [
        "cl-export: error: format=pickle: choose from state_dict, torchscript, onnx"]


def test_default_export_goes_next_to_the_run_not_among_its_checkpoints(tmp_path, digits_ckpt):
    from contrastive_cli.export import run_export

    meta = run_export(compose_cfg("export", [f"checkpoint={digits_ckpt}", "format=state_dict"]))
    assert meta["file"] == str(digits_ckpt.parent.parent / "export" / "last.pt")
    assert "torchvision" not in meta  # small_cnn: loads into contrastive_cli.encoders.SmallCNN, as meta names


# ----------------------------------------------------------------------------------------- load_encoder

def test_load_encoder_preprocess_accepts_pil_numpy_and_uint8_tensors(tmp_path, digits_ckpt):
    encoder, preprocess = load_encoder(digits_ckpt)
    assert not encoder.training and preprocess.size == 16 and preprocess.channels == 1
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8))
    as_tensor = torch.from_numpy(np.asarray(rgb)).permute(2, 0, 1)
    a, b, c = preprocess(rgb), preprocess([rgb]), preprocess(as_tensor)
    assert a.shape == (1, 1, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(a, c)
    grey = np.asarray(rgb.convert("L").resize((16, 16), Image.BILINEAR))
    assert torch.equal(preprocess(grey), a)  # an H x W uint8 array at the right size: no resampling
    assert torch.allclose(a * 0.33 + 0.2, torch.from_numpy(grey).float()[None, None] / 255, atol=1e-6)
    with pytest.raises(UserError, match="must be uint8"):
        preprocess(torch.rand(1, 1, 16, 16))
    with torch.no_grad():
        assert encoder(a).shape == (1, 64)


def test_the_readme_python_snippet_runs_as_printed(digits_ckpt, tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_encoder" in b)
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save("a.jpg")
    Image.fromarray(np.full((20, 20), 200, np.uint8)).save("b.png")
    exec(block.replace("outputs/train/<date>/<time>/checkpoints/last.pt", str(digits_ckpt)), {})
    assert capsys.readouterr().out.strip() == "(2, 64)"  # encoder.width=8: 8 x 8 features
