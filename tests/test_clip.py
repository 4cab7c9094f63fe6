"""CLIP and SigLIP: the losses by hand and against open_clip, two processes against one, the pairs
reader, the zero-shot and retrieval metrics on a case whose answers are known, and the commands."""

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import error_lines, run_cli
from test_distributed import Flat, run_two_ranks

from contrastive_cli.data.pairs import load_pairs
from contrastive_cli.distributed import cleanup
from contrastive_cli.errors import UserError
from contrastive_cli.losses import clip_loss, siglip_loss
from contrastive_cli.methods.clip import CLIP, MAX_LOGIT_SCALE, SigLIP
from contrastive_cli.text import TextTransformer
from contrastive_cli.zeroshot import retrieval_scores, zeroshot_scores

# ------------------------------------------------------------------------------------------- losses


def test_clip_loss_hand_checked():
    # images a=(1,0), b=(0,1); captions ta=(1,0), tb=(0.6,0.8); scale exp(0) = 1
    img, txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    e, log = math.exp, math.log
    i2t = (-1 + log(e(1) + e(0.6))) + (-0.8 + log(e(0) + e(0.8)))  # rows of the image x caption cosines
    t2i = (-1 + log(e(1) + e(0))) + (-0.8 + log(e(0.6) + e(0.8)))  # rows of its transpose
    expected = (i2t / 2 + t2i / 2) / 2
    assert clip_loss(img, txt, img, txt, torch.tensor(0.0)).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.4489, abs=1e-4)  # by hand: ((0.5130 + 0.3711) / 2 + (0.3133 + 0.5982) / 2) / 2


def test_siglip_loss_hand_checked():
    img, txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t, b = math.log(2.0), -1.0  # logits = 2 cos - 1: [[1, 0.2], [-1, 0.6]]

    def nls(z):
        return math.log(1 + math.exp(-z))  # -log sigmoid(z)

    expected = (nls(1) + nls(-0.2) + nls(1) + nls(0.6)) / 2  # own captions +1, the others -1
    got = siglip_loss(img, txt, torch.tensor(t), torch.tensor(b)).item()
    assert got == pytest.approx(expected, abs=1e-6)


def test_losses_equal_open_clip():
    loss_mod = pytest.importorskip("open_clip.loss")
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    scale, bias = torch.tensor(math.log(1 / 0.07)), torch.tensor(-10.0)
    ni, nt = F.normalize(img, dim=1), F.normalize(txt, dim=1)  # open_clip's losses take normalized features
    ours = clip_loss(img, txt, img, txt, scale)
    theirs = loss_mod.ClipLoss()(ni, nt, scale.exp())
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    scale = torch.tensor(math.log(10.0))
    ours = siglip_loss(img, txt, scale, bias)
    theirs = loss_mod.SigLipLoss()(ni, nt, scale.exp(), bias)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)


# ---------------------------------------------------------------------- two processes against one

B, D_IN = 4, 6
CAPTIONS = ["a red cat", "a blue dog", "two green birds", "one fish", "a tall tree", "an old car", "雨中的猫", "sun"]


def make_method(name: str):
    torch.manual_seed(0)
    text = TextTransformer(width=16, layers=1, heads=2, embed_dim=4, context_length=24)
    method = (CLIP if name == "clip" else SigLIP)(Flat(), text, embed_dim=4)
    method.captions, method.by_class = method.tokenize(CAPTIONS).int(), False
    return method


def image_text_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(1)
        x, keys = torch.randn(2 * B, D_IN, generator=g), torch.arange(2 * B)
        mine = slice(rank * B, (rank + 1) * B)
        saved = {}
        for name in ("clip", "siglip"):
            model = torch.nn.parallel.DistributedDataParallel(make_method(name))
            loss = model(x[mine], x[mine], keys[mine]).loss
            loss.backward()
            saved[name] = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()}}
        torch.save(saved, f"{out}/rank{rank}.pt")
    finally:
        cleanup()


def test_two_processes_equal_one_process_with_the_double_batch(tmp_path):
    ranks = run_two_ranks(image_text_worker, tmp_path)
    g = torch.Generator().manual_seed(1)
    x, keys = torch.randn(2 * B, D_IN, generator=g), torch.arange(2 * B)
    for name in ("clip", "siglip"):
        single = make_method(name)
        loss = single.training_step(x, x, keys).loss
        loss.backward()
        # each rank's own rows against the global batch: the mean of the two ranks' losses is the global loss
        assert (ranks[0][name]["loss"] + ranks[1][name]["loss"]).item() / 2 == pytest.approx(loss.item(), rel=1e-5)
        for n, p in single.named_parameters():
            for r in ranks:  # DDP's averaged gradient is the gradient of the global loss
                assert torch.allclose(r[name]["grads"][n], p.grad, atol=1e-6 * float(p.grad.abs().max())), (name, n)


def test_logit_scale_clamped_after_a_step_and_captions_looked_up_by_keys():
    method = make_method("clip")
    assert method.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        method.logit_scale.fill_(10.0)
    method.on_step_end(0.5)
    assert method.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)  # exp(scale) <= 100
    assert torch.equal(method.caption_tokens(torch.tensor([6, 0])), method.tokenize([CAPTIONS[6], CAPTIONS[0]]))
    siglip = make_method("siglip")
    assert siglip.logit_scale.exp().item() == pytest.approx(10.0) and siglip.logit_bias.item() == -10.0


# ------------------------------------------------------------------------------------------- metrics


def test_zeroshot_and_retrieval_on_a_hand_made_case():
    # 4 images on the axes; class embeddings: classes 0 and 1 on axes 0 and 1; class 2 between 2 and 3
    img = torch.eye(4)
    cls = F.normalize(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0.9]]), dim=1)
    y = torch.tensor([0, 1, 2, 1])  # image 3 is "class 1" but sits nearest class 2: a miss at top-1
    z = zeroshot_scores(img, cls, y)
    assert z == {"zeroshot_top1": 0.75, "zeroshot_top5": 1.0}
    # 5 captions x 4 images, the dot products given directly (no ties); captions 0 and 4 are image 0's
    txt = torch.tensor([[0.2, 0.1, 0.9, 0.0],    # caption 0: image 2 first (miss), then its own
                        [0.0, 0.8, 0.1, 0.2],    # caption 1: its own first
                        [0.7, 0.0, 0.15, 0.1],   # caption 2 (image 2's): image 0 first, then its own
                        [0.1, 0.2, 0.0, 0.9],    # caption 3: its own first
                        [0.6, 0.3, 0.2, 0.0]])   # caption 4 (image 0's): its own first
    r = retrieval_scores(torch.eye(4), txt, torch.tensor([0, 1, 2, 3, 0]), ks=(1, 2, 3))
    # image->text, down each column: image 0 ranks caption 2 then 4 (its own); image 2 ranks captions 0 and
    # 4 (both image 0's) before its own caption 2; images 1 and 3 find theirs first
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == (0.5, 0.75, 1.0)
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"]) == (0.6, 1.0, 1.0)


# ---------------------------------------------------------------------------------------- the pairs file


def write_images(folder, n: int, seed: int = 0):
    """n digits-like PNG files (class k: a bar at row 2k) named img{i}.png; their classes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = []
    for i in range(n):
        k = i % 4
        arr = (rng.random((16, 16, 3)) * 60).astype(np.uint8)
        arr[4 * k : 4 * k + 3] = 250
        Image.fromarray(arr).save(folder / f"img{i}.png")
        classes.append(k)
    return classes


NAMES = ["top bar", "second bar", "third bar", "bottom bar"]
CHINESE = ["顶部的横条", "第二条横线", "第三条横线", "底部的横条"]


def test_pairs_reader_several_captions_unreadable_files_and_the_split_by_image(tmp_path, caplog):
    classes = write_images(tmp_path / "im", 20)
    (tmp_path / "im" / "broken.png").write_bytes(b"not an image")
    rows = [("filepath", "title")]
    for i, k in enumerate(classes):
        rows += [(f"im/img{i}.png", f"a {NAMES[k]}"), (f"im/img{i}.png", f"picture with the {NAMES[k]}")]
    rows += [("im/broken.png", "never read"), ("im/img0.png", "   ")]
    (tmp_path / "pairs.tsv").write_text("\n".join("\t".join(r) for r in rows) + "\n")
    with caplog.at_level("WARNING"):
        splits = load_pairs(str(tmp_path / "pairs.tsv"), image_size=16, test_fraction=0.25, seed=0)
    assert "broken.png" in caplog.text and "1 unreadable" in caplog.text
    assert "1 row(s)" in caplog.text and "empty caption" in caplog.text
    train, held = splits.train, splits.held_out
    assert train.n_images == 15 and held.n_images == 5 and len(train.images) == 20  # images split, 20 readable
    assert len(train) == 30 and len(held) == 10  # each image with both its captions
    # no image on both sides: compare the decoded pixels
    tr = {bytes(x.numpy()) for x, _ in train.distinct()}
    assert len(tr) == 15 and not tr & {bytes(x.numpy()) for x, _ in held.distinct()}
    # a row's image is its caption's: class k's bar row is bright
    for i in range(len(held)):
        x, key = held[i]
        k = NAMES.index(next(n for n in NAMES if n in held.captions[key]))
        assert x[0, 4 * k].float().mean() > 200
    assert splits.test is None and not splits.labeled


def test_pairs_beyond_cache_gb_are_read_from_the_disk_cache(tmp_path, caplog):
    classes = write_images(tmp_path / "im", 12)
    (tmp_path / "im" / "broken.png").write_bytes(b"not an image")
    rows = [f"im/img{i}.png\ta {NAMES[k]}" for i, k in enumerate(classes)] + ["im/broken.png\tnever read"]
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    path, small = str(tmp_path / "pairs.tsv"), 8 * 3 * 16 * 16 / 2**30  # room for 8 of the 12 images
    memory = load_pairs(path, image_size=16, test_fraction=0.25)
    with caplog.at_level("INFO"):
        mapped = load_pairs(path, image_size=16, test_fraction=0.25, cache_gb=small)
    assert "written" in caplog.text and "broken.png" in caplog.text
    cache = list((tmp_path / ".contrastive_cli_cache").glob("*.u8"))  # beside the pairs file
    assert len(cache) == 1 and str(cache[0]) in open("/proc/self/maps").read()  # read through the map
    assert mapped.train.images is mapped.held_out.images and len(mapped.train.images) == 12  # one map, no copy
    for a, b in ((memory.train, mapped.train), (memory.held_out, mapped.held_out)):
        assert a.captions == b.captions and a.n_images == b.n_images
        assert all(torch.equal(a[i][0], b[i][0]) for i in range(len(a)))
        assert torch.equal(a.take(torch.arange(len(a)))[0], b.take(torch.arange(len(b)))[0])
    caplog.clear()
    with caplog.at_level("INFO"):  # the next run reads the cache without decoding
        again = load_pairs(path, image_size=16, test_fraction=0.25, cache_gb=small)
    assert "read without decoding" in caplog.text and torch.equal(again.train[3][0], memory.train[3][0])
    with pytest.raises(UserError) as err:
        load_pairs(path, image_size=16, cache_gb=small, cache_dir=None)
    assert "dataset.source.cache_dir=null" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        if not os.access(tmp_path / "ro", os.W_OK):  # root writes anywhere: nothing to refuse there
            with pytest.raises(UserError, match="no disk cache for .*pairs.tsv .*give dataset.source.cache_dir=DIR"):
                load_pairs(path, image_size=16, cache_gb=small, cache_dir=str(tmp_path / "ro" / "c"))
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_pairs_reader_csv_and_jsonl_and_other_columns(tmp_path):
    write_images(tmp_path, 4)
    (tmp_path / "p.csv").write_text("image,text\n" + "".join(f"img{i}.png,\"a, {NAMES[i]}\"\n" for i in range(4)))
    s = load_pairs(str(tmp_path / "p.csv"), image_key="image", caption_key="text", image_size=8, test_fraction=0)
    assert s.train.captions == [f"a, {n}" for n in NAMES] and s.held_out is None  # quoted commas kept
    lines = [json.dumps({"filepath": str(tmp_path / f"img{i}.png"), "title": CHINESE[i]}, ensure_ascii=False)
             for i in range(4)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = load_pairs(str(tmp_path / "p.jsonl"), image_size=8, test_fraction=0.5)
    assert sorted(s.train.captions + s.held_out.captions) == sorted(CHINESE)  # absolute paths, UTF-8 kept


@pytest.mark.parametrize(("content", "kwargs", "expected"), [
    (None, {}, "no such file"),
    ("", {}, "has no rows"),
    ("path\tcaption\nimg0.png\thi\n", {}, "dataset.source.image_key=filepath: no such column in"),
    ('{"filepath": "img0.png", "title": 7}\n', {"suffix": ".jsonl"}, "holds int values (7), not text"),
    ("filepath\ttitle\nmissing.png\thi\n", {}, "none of its 1 image files could be read"),
    ("filepath\ttitle\nimg0.png\thi\n", {"suffix": ".txt"}, "a pairs file is .csv (comma), .tsv (tab) or .jsonl"),
    (b"filepath\ttitle\nimg0.png\t\xff\xfe\n", {}, "not valid UTF-8"),
])
def test_pairs_reader_bad_input_is_one_line(tmp_path, content, kwargs, expected):
    write_images(tmp_path, 1)
    path = tmp_path / f"p{kwargs.get('suffix', '.tsv')}"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as err:
        load_pairs(str(path), image_size=8, test_fraction=0)
    assert expected in str(err.value) and "\n" not in str(err.value)
    if "no such column" in expected:
        assert "found: path, caption" in str(err.value)  # the columns there are


# -------------------------------------------------------------------------------------- the commands


def pairs_file(tmp_path, captions: list[str], n: int = 64):
    classes = write_images(tmp_path / "im", n)
    lines = [json.dumps({"filepath": f"im/img{i}.png", "title": captions[k]}, ensure_ascii=False)
             for i, k in enumerate(classes)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "pairs.jsonl"


@pytest.mark.parametrize(("method", "captions"), [("clip", NAMES), ("siglip", CHINESE)])
def test_train_on_a_pairs_file_then_eval_retrieval(tmp_path, method, captions):
    path = pairs_file(tmp_path, captions)
    # small images and a short run: the point is the path from a pairs file to retrieval scores
    # trainer.knn_every=2: the online monitor of a pairs run (retrieval on the held-out pairs) is under test
    proc = run_cli("cl-train", f"method={method}", "dataset=pairs", f"dataset.source.path={path}",
                   "dataset.image_size=16", "dataset.source.test_fraction=0.25", "trainer.batch_size=16",
                   "trainer.epochs=4", "encoder.width=8", "trainer.knn_every=2", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    history = torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert [r["retrieval_r1"] is not None for r in history] == [False, True, False, True]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    best = max(r["retrieval_r1"] for r in history if r["retrieval_r1"] is not None)
    assert summary["retrieval_r1_best"] == pytest.approx(best) and "knn_top1" not in summary
    assert summary["retrieval_r1_best_epoch"] in (2, 4) and (tmp_path / "run/checkpoints/best.pt").exists()
    assert summary["i2t_r1"] >= 0 and summary["t2i_r10"] >= summary["t2i_r1"]  # the end-of-training scores
    assert "k-NN monitor is off" not in proc.stdout + proc.stderr
    proc = run_cli("cl-eval", "checkpoint=run/checkpoints/best.pt", "hydra.run.dir=ev", cwd=tmp_path)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    result = json.loads((tmp_path / "ev/eval.json").read_text())
    # cl-eval of best.pt scores what the monitor kept it by
    assert (result["i2t_r1"] + result["t2i_r1"]) / 2 == pytest.approx(summary["retrieval_r1_best"], abs=1e-3)
    assert result["n_retrieval_images"] == 16 and result["n_retrieval_captions"] == 16
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0.0 <= result[key] <= 1.0
    assert result["t2i_r10"] >= result["t2i_r5"] >= result["t2i_r1"]
    assert "text->image R@1/5/10" in proc.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["dataset.captions=none"], "method=clip needs captions: dataset digits has none"),
    (["text_encoder.tokenizer=words"], "text_encoder.tokenizer=words: choose from bytes, clip_bpe"),
    (["text_encoder.width=30", "text_encoder.heads=4"], "text_encoder.width=30: must be a multiple of"),
    (["dataset=pairs"], "dataset.source.path: missing"),
    (["dataset=pairs", "dataset.source.path=nowhere.tsv"], "dataset.source.path=nowhere.tsv: no such file"),
    (["method.eval_templates=nowhere.txt"], "method.eval_templates=nowhere.txt: no such file"),
])
def test_bad_image_text_settings_are_one_line(tmp_path, args, expected):
    proc = run_cli("cl-train", "method=clip", *args, "trainer.epochs=1", cwd=tmp_path)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], lines[-3:]


@pytest.fixture(scope="module")
def digits_clip(tmp_path_factory):
    """CLIP on digits with templated captions, small and short: what cl-eval of such a checkpoint reads."""
    cwd = tmp_path_factory.mktemp("digits_clip")
    proc = run_cli("cl-train", "method=clip", "trainer.epochs=3", "encoder.width=8", "trainer.knn_every=3",
                   "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    assert "learns from the labels of dataset digits through text" in proc.stdout
    return cwd


def test_eval_of_a_templated_run_gives_zero_shot_and_the_image_towers_scores(digits_clip):
    summary = json.loads((digits_clip / "run/summary.json").read_text())
    assert summary["zeroshot_top1_best_epoch"] == 3 and (digits_clip / "run/checkpoints/best.pt").exists()
    header = (digits_clip / "run/metrics.csv").read_text().splitlines()[0]
    assert header.endswith("zeroshot_top1")  # the online monitor of an image-text run
    proc = run_cli("cl-eval", "checkpoint=run/checkpoints/best.pt", "eval.tsne_samples=0", "hydra.run.dir=ev",
                   cwd=digits_clip)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    result = json.loads((digits_clip / "ev/eval.json").read_text())
    assert result["zeroshot_top1"] == pytest.approx(summary["zeroshot_top1_best"], abs=1e-3)
    assert result["zeroshot_top5"] >= result["zeroshot_top1"] and result["zeroshot_templates"] == 6
    assert {"knn_top1", "knn5_top1", "linear_top1"} <= set(result)
    assert "zero-shot top-1 / top-5" in proc.stdout


@pytest.mark.parametrize(("content", "key", "expected"), [
    ("a photo\n", "templates", "eval.templates=f.txt: template 'a photo' has no {} for the class name"),
    ("\n\n", "templates", "eval.templates=f.txt: has no templates"),
    ("zero\none\n", "classnames", "eval.classnames=f.txt: names 2 classes; dataset digits has 10"),
])
def test_bad_prompt_files_are_one_line(digits_clip, content, key, expected):
    (digits_clip / "f.txt").write_text(content)
    proc = run_cli("cl-eval", "checkpoint=run/checkpoints/last.pt", f"eval.{key}=f.txt", cwd=digits_clip)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and expected in lines[0], lines


@pytest.fixture(scope="module")
def digits_index(digits_clip):
    proc = run_cli("cl-embed", "checkpoint=run/checkpoints/last.pt", "input=digits", "hydra.run.dir=emb", cwd=digits_clip)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    return digits_clip / "emb"


def test_load_clip_gives_both_towers_in_one_normalized_space(digits_clip, digits_ckpt):
    from contrastive_cli import load_clip

    model = load_clip(digits_clip / "run/checkpoints/last.pt")
    text = model.encode_text(["a photo of a 3.", "一只猫"])
    image = model.encode_image(np.zeros((2, 32, 32, 1), dtype=np.uint8))  # N x H x W x C, as numpy holds images
    assert text.shape == image.shape == (2, 128)  # method.embed_dim
    assert torch.allclose(text.norm(dim=1), torch.ones(2)) and torch.allclose(image.norm(dim=1), torch.ones(2))
    with pytest.raises(UserError, match="a SimCLR checkpoint has no text tower; load_clip and cl-search need"):
        load_clip(digits_ckpt)


def test_cl_search_top_k_equals_a_brute_force_loop(digits_clip, digits_index):
    from contrastive_cli import load_clip

    queries = ["a photo of a 3.", "a 7."]
    proc = run_cli("cl-search", "checkpoint=run/checkpoints/last.pt", f"index={digits_index}",
                   f"text=[{', '.join(queries)}]", "k=5", "hydra.run.dir=search", cwd=digits_clip)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    assert (digits_clip / "search/search.png").stat().st_size > 10_000
    rows = list(csv.DictReader(open(digits_clip / "search/search.csv")))
    assert len(rows) == 10
    model = load_clip(digits_clip / "run/checkpoints/last.pt")
    images = np.load(digits_index / "image_text_embeddings.npy")
    index = [r["path"] for r in csv.DictReader(open(digits_index / "index.csv"))]
    for q in queries:
        t = model.encode_text([q])[0].numpy()
        scores = [(float(t @ (v / np.linalg.norm(v))), i) for i, v in enumerate(images)]  # one row at a time
        best = sorted(scores, reverse=True)[:5]
        got = [r for r in rows if r["query"] == q]
        assert [int(r["row"]) for r in got] == [i for _, i in best]
        assert [r["path"] for r in got] == [index[i] for _, i in best]
        assert [float(r["cosine"]) for r in got] == pytest.approx([s for s, _ in best], abs=1e-4)


def test_cl_search_bad_input_is_one_line(digits_clip, digits_index, digits_ckpt, tmp_path):
    other = run_cli("cl-embed", f"checkpoint={digits_ckpt}", "input=digits", "hydra.run.dir=emb_simclr", cwd=tmp_path)
    assert other.returncode == 0
    cases = [
        ([f"index={tmp_path}", "text=a 3"], "not a cl-embed output folder (no embed.json)"),
        ([f"index={tmp_path / 'emb_simclr'}", "text=a 3"], "made by the checkpoint"),
        ([f"index={digits_index}", "text=' '"], "a query is empty"),
        ([f"index={digits_index}"], "text: give a query"),
        ([f"index={digits_index}", "image=nothing.png"], "image=nothing.png: not a readable image"),
    ]
    for args, expected in cases:
        proc = run_cli("cl-search", "checkpoint=run/checkpoints/last.pt", *args, cwd=digits_clip)
        lines = error_lines(proc)
        assert proc.returncode != 0 and len(lines) == 1 and expected in lines[0], (args, lines)
    proc = run_cli("cl-search", f"checkpoint={digits_ckpt}", f"index={digits_index}", "text=a 3", cwd=tmp_path)
    assert proc.returncode != 0 and "has no text tower" in error_lines(proc)[-1]


@pytest.mark.parametrize("fmt", ["state_dict", "torchscript", "onnx"])
def test_export_writes_both_towers_and_they_give_load_clips_embeddings(digits_clip, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    from contrastive_cli import load_clip

    out = digits_clip / f"ex_{fmt}" / {"state_dict": "m.pt", "torchscript": "m.torchscript.pt", "onnx": "m.onnx"}[fmt]
    proc = run_cli("cl-export", "checkpoint=run/checkpoints/last.pt", f"format={fmt}", f"out={out}", cwd=digits_clip)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    text_file = meta["text"]["file"]
    assert meta["text"]["tokenizer"] == "bytes" and meta["text"]["context_length"] == 64
    assert meta["text"]["lowercase"] is True  # the config group's default: a caller of the file must lowercase too
    model = load_clip(digits_clip / "run/checkpoints/last.pt")
    captions = ["a photo of a 3.", "雨中的猫"]
    tokens = model.tokenize(captions)
    expected = model.encode_text(captions)
    if fmt == "torchscript":
        got = torch.jit.load(text_file)(tokens)
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(text_file, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["features"], {"tokens": tokens.numpy()})[0])
    else:
        from contrastive_cli.zeroshot import TextTower

        tower = TextTower(model.method)
        tower.load_state_dict(torch.load(text_file, weights_only=True))
        got = tower(tokens)
    assert torch.allclose(got, expected, atol=1e-5)  # the exported text tower is load_clip's, at full length


def test_templates_put_the_given_class_names_into_the_given_templates(tmp_path):
    from omegaconf import OmegaConf

    from contrastive_cli.data import TensorImages

    (tmp_path / "names.txt").write_text("零\n一\n二\n", encoding="utf-8")
    (tmp_path / "templates.txt").write_text("一张{}的照片。\n{}。\n", encoding="utf-8")
    torch.manual_seed(0)
    text = TextTransformer(width=16, layers=1, heads=2, embed_dim=4)
    method = CLIP(Flat(), text, embed_dim=4, templates=str(tmp_path / "templates.txt"),
                  classnames=str(tmp_path / "names.txt"))
    train = TensorImages(torch.zeros(6, 1, 2, 3, dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2]), ["0", "1", "2"])
    method.use_data(train, OmegaConf.create({"name": "digits", "captions": "templates"}))
    torch.manual_seed(1)
    tokens = method.caption_tokens(torch.tensor([2, 2, 2, 2, 2, 2, 2, 2]))
    assert {tuple(t.tolist()) for t in tokens} == {tuple(r) for r in method.tokenize(["一张二的照片。", "二。"]).tolist()}
    (tmp_path / "names.txt").write_text("零\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"method.classnames=.*names.txt: names 1 classes; dataset digits has 3"):
        method.use_data(train, OmegaConf.create({"name": "digits", "captions": "templates"}))


def test_a_runs_own_zero_shot_prompts_in_its_own_language(tmp_path, caplog):
    from omegaconf import OmegaConf

    from contrastive_cli.captions import EVAL_TEMPLATES
    from contrastive_cli.zeroshot import run_prompts

    (tmp_path / "names.txt").write_text("零\n一\n", encoding="utf-8")
    (tmp_path / "train.txt").write_text("一张{}的照片。\n", encoding="utf-8")
    (tmp_path / "eval.txt").write_text("{}的图片。\n{}。\n", encoding="utf-8")

    def prompts(same_data=True, **method):
        return run_prompts(OmegaConf.create(method), ["zero", "one"], same_data)[:2]

    assert prompts() == (["zero", "one"], list(EVAL_TEMPLATES))  # built-in templates: the held-out English list
    names = str(tmp_path / "names.txt")
    assert prompts(classnames=names, templates=str(tmp_path / "train.txt")) == (["零", "一"], ["一张{}的照片。"])
    both = prompts(classnames=names, templates=str(tmp_path / "train.txt"), eval_templates=str(tmp_path / "eval.txt"))
    assert both == (["零", "一"], ["{}的图片。", "{}。"])
    # cl-eval on another dataset: that dataset's names, the run's prompts (their language)
    assert prompts(False, classnames=names, eval_templates=str(tmp_path / "eval.txt"))[0] == ["zero", "one"]
    with caplog.at_level("WARNING"):  # a checkpoint whose prompt file has gone: scored without it
        assert prompts(classnames=str(tmp_path / "gone.txt")) == (["zero", "one"], list(EVAL_TEMPLATES))
    assert "method.classnames=" in caplog.text and "no longer there" in caplog.text


# ------------------------------------------------------------------------------ open_clip's towers

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """A small open_clip configuration and a weights file of it (random, seeded), as a download would give."""
    open_clip = pytest.importorskip("open_clip")
    root = tmp_path_factory.mktemp("open_clip")
    (root / "tiny-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(root / "tiny-clip.json"))
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-clip")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))
    torch.save(model.state_dict(), root / "weights.pt")
    return root, model


def test_open_clip_towers_start_from_the_weights_file(tiny_open_clip):
    root, reference = tiny_open_clip
    method = CLIP(None, None, towers="open_clip", model="tiny-clip", pretrained=str(root / "weights.pt"),
                  model_config=str(root / "tiny-clip.json")).eval()
    reference.eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = method.tokenize(["a photo of a cat.", "a dog"])
    with torch.no_grad():
        assert torch.allclose(method.embed_image(x), reference.encode_image(x), atol=1e-6)
        assert torch.allclose(method.embed_text(tokens), reference.encode_text(tokens), atol=1e-6)
    assert method.logit_scale.exp().item() == pytest.approx(50.0, rel=1e-5)  # the model's own scale
    assert tokens.shape == (2, 77)  # CLIP's tokenizer at the model's context length


def test_fine_tune_open_clip_towers_on_pairs_then_eval(tiny_open_clip, tmp_path):
    root, _ = tiny_open_clip
    path = pairs_file(tmp_path, NAMES, n=32)
    towers = ["method.towers=open_clip", "method.model=tiny-clip", f"method.model_config={root / 'tiny-clip.json'}",
              f"method.pretrained={root / 'weights.pt'}"]
    args = ["method=clip", "dataset=pairs", f"dataset.source.path={path}", "dataset.source.test_fraction=0.25",
            "trainer.batch_size=8", "trainer.epochs=2", *towers]
    proc = run_cli("cl-train", *args, "dataset.image_size=16", cwd=tmp_path)
    assert proc.returncode != 0 and error_lines(proc) == [
        "cl-train: error: dataset.image_size=16: open_clip tiny-clip takes 32 px images; set dataset.image_size=32"]
    proc = run_cli("cl-train", *args, "dataset.image_size=32", "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    (root / "weights.pt").rename(root / "moved.pt")  # evaluation needs the checkpoint alone
    try:
        proc = run_cli("cl-eval", "checkpoint=run/checkpoints/last.pt", "hydra.run.dir=ev", cwd=tmp_path)
    finally:
        (root / "moved.pt").rename(root / "weights.pt")
    assert proc.returncode == 0, error_lines(proc)[-5:]
    assert "i2t_r1" in json.loads((tmp_path / "ev/eval.json").read_text())
    proc = run_cli("cl-train", *args[:-1], "method.pretrained=nowhere.pt", cwd=tmp_path)
    assert error_lines(proc)[-1].startswith("cl-train: error: method.pretrained=nowhere.pt: not a file; give a local")


def test_the_readme_load_clip_snippet_runs_as_printed(digits_clip, monkeypatch, capsys):
    import re
    from pathlib import Path

    from PIL import Image

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "load_clip" in b)
    monkeypatch.chdir(digits_clip)
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save("cat.jpg")
    exec(block.replace("outputs/train/<date>/<time>/checkpoints/last.pt", "run/checkpoints/last.pt"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([1, 2])"
