"""Judge an encoder: weighted k-NN, majority 5-NN, a linear probe and a t-SNE picture."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import UserError
from .features import extract_features

log = logging.getLogger(__name__)


@torch.no_grad()
def knn_predict(train_f: Tensor, train_y: Tensor, test_f: Tensor, num_classes: int, k: int = 200,
                temperature: float = 0.1, weighted: bool = True, chunk: int = 1024) -> Tensor:
    """k-NN on cosine similarity. Weighted: each neighbour votes exp(sim / T) (Wu et al. 2018, the
    usual SSL monitor); otherwise one vote each. Chunked so 10k x 60k never sits in memory at once."""
    k = min(k, len(train_f))
    train_f = F.normalize(train_f, dim=1)
    preds = []
    for start in range(0, len(test_f), chunk):
        sim = F.normalize(test_f[start : start + chunk], dim=1) @ train_f.t()  # chunk x N_train
        top_sim, top_idx = sim.topk(k, dim=1)
        # each row's largest similarity subtracted first: exp(sim / T) overflows float32 for T below
        # about 0.011, and every vote of a row scaled alike leaves its argmax where it was
        votes = ((top_sim - top_sim[:, :1]) / temperature).exp() if weighted else torch.ones_like(top_sim)
        scores = torch.zeros(len(sim), num_classes, device=sim.device)
        scores.scatter_add_(1, train_y[top_idx], votes)
        preds.append(scores.argmax(1))
    return torch.cat(preds)


def knn_top1(train_f, train_y, test_f, test_y, num_classes: int, k: int = 200, temperature: float = 0.1,
             weighted: bool = True) -> float:
    pred = knn_predict(train_f, train_y, test_f, num_classes, k, temperature, weighted)
    return float((pred == test_y).float().mean())


def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, max_iter: int = 1000,
                 seed: int = 0, device: torch.device | None = None, backend: str = "auto") -> float:
    """Logistic regression on frozen, standardized features: fit on train, score on test.
    scikit-learn for small feature sets and on the CPU (there it was faster: 60k x 256 Fashion-MNIST
    features took under a minute, torch L-BFGS about three); for large ones on CUDA (auto: over 4M
    numbers) the same objective in torch on the device, full-batch L-BFGS."""
    on_gpu = device is not None and device.type == "cuda"
    if backend == "torch" or (backend == "auto" and on_gpu and train_f.numel() > 4_000_000):
        return _linear_probe_torch(train_f, train_y, test_f, test_y, max_iter, seed, device or torch.device("cpu"))
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed))
    clf.fit(train_f.numpy(), train_y.numpy())
    return float(clf.score(test_f.numpy(), test_y.numpy()))


def _linear_probe_torch(train_f, train_y, test_f, test_y, max_iter: int, seed: int, device: torch.device) -> float:
    """sklearn's LogisticRegression(C=1) objective: mean cross-entropy + ||W||^2 / (2 n)."""
    torch.manual_seed(seed)
    x, y = train_f.to(device, torch.float32), train_y.to(device)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    clf = torch.nn.Linear(x.shape[1], n_cls).to(device)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + clf.weight.pow(2).sum() / (2 * len(x))
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = clf((test_f.to(device, torch.float32) - mean) / std).argmax(1)
    return float((pred == test_y.to(device)).float().mean())


def tsne_png(feats: Tensor, labels: Tensor, classes: list[str], path, samples: int = 2000, seed: int = 0,
             title: str = "") -> int:
    """t-SNE of up to `samples` points (a seeded subset), coloured by class, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    n = min(samples, len(feats))
    idx = np.random.default_rng(seed).permutation(len(feats))[:n]
    x, y = feats[idx].numpy(), labels[idx].numpy()
    xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (n - 1) / 3), random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in np.unique(y):
        m = y == c
        name = classes[c] if 0 <= c < len(classes) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(int(c) % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"t-SNE of {n} test embeddings")
    if len(np.unique(y)) <= 20:
        ax.legend(markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return n


def loss_png(history: list[dict], trace: list[dict], path, title: str = "", monitor: str = "knn_top1") -> None:
    """The run against steps: loss, lr, the collapse statistics and the online k-NN, one panel each.
    `trace` holds the reads inside epochs (every trainer.log_every steps), so one epoch is a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = trace or history  # a checkpoint from before the trace: one point per epoch
    steps = [p["step"] for p in points]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=110, sharex=True)
    (ax_loss, ax_lr), (ax_col, ax_knn) = axes
    ax_loss.plot(steps, [p["loss"] for p in points], lw=1, label="loss (synchronised reads)")
    ax_loss.plot([r["step"] for r in history], [r["loss"] for r in history], "o", ms=4, label="epoch mean")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(fontsize=8)
    ax_lr.plot(steps, [p["lr"] for p in points], color="tab:green", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_col.plot(steps, [p["emb_std"] for p in points], color="tab:purple", lw=1, label="emb_std")
    ax_col.set_ylabel("emb_std (collapsed: 0)", color="tab:purple")
    twin = ax_col.twinx()
    twin.plot(steps, [p["neg_cos"] for p in points], color="tab:red", lw=1, label="neg_cos")
    twin.set_ylabel("neg_cos (collapsed: 1)", color="tab:red")
    scored = [r for r in history if r.get(monitor) not in (None, "")]
    if scored:
        ax_knn.plot([r["step"] for r in scored], [float(r[monitor]) for r in scored], "o-", color="tab:orange", ms=4)
        best = max(scored, key=lambda r: float(r[monitor]))
        ax_knn.set_title(f"best {float(best[monitor]):.4f} at epoch {best['epoch']}", fontsize=9)
    else:
        ax_knn.text(0.5, 0.5, f"no online {'k-NN' if monitor == 'knn_top1' else monitor}\n(trainer.knn_every=N turns "
                    "it on)", ha="center", va="center",
                    transform=ax_knn.transAxes, color="gray")
    ax_knn.set_ylabel("online k-NN top-1 (k=200)" if monitor == "knn_top1" else f"online {monitor}")
    for ax in (ax_col, ax_knn):
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_evaluation(cfg, out_dir, overrides: list[str] | None = None) -> dict:
    """cl-eval: rebuild the encoder and data from the checkpoint's own config, then score it; with
    `dataset=OTHER`, score it on another dataset of the same channels (transfer). `overrides`: the
    command line's, recorded in eval.json."""
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    from . import checkpoint, files
    from .api import check_features, encoder_from_checkpoint
    from .config import build, move_data, run_settings, validate_eval
    from .data.folder import has_class_folders
    from .parts import resolve_device, unlabeled_message
    from .zeroshot import image_text_eval, is_image_text

    e, paths = validate_eval(cfg)
    ckpt_path, ckpt = checkpoint.for_use(cfg.checkpoint)
    train_cfg = OmegaConf.create(ckpt["config"])
    ds = train_cfg.dataset
    if paths.data_dir is not None:  # the data has moved since training
        move_data(train_cfg, paths.data_dir)
    if paths.image_root is not None and ds.name == "imagefolder":
        ds.source.root = paths.image_root
    target = ds
    if cfg.get("dataset") is not None:  # transfer: the encoder of one dataset judged on another
        target = cfg.dataset
        if target.channels != ds.channels:
            raise UserError(f"dataset={target.name}: has {target.channels} channel(s), but the encoder was trained on "
                            f"{ds.name} with {ds.channels}; choose a dataset with {ds.channels} channel(s)")
    method_name = train_cfg.method._target_.rsplit(".", 1)[-1]
    log.info("evaluating %s (epoch %d, step %d): %s trained on %s, evaluated on %s", ckpt_path, ckpt["epoch"],
             ckpt["step"], method_name, ds.name, target.name)
    if target.name == "imagefolder" and os.path.isdir(str(target.source.root)) and not has_class_folders(
            str(target.source.root)):  # said before decoding a whole folder
        raise UserError(unlabeled_message(target, "cl-eval has nothing to score against"))
    device = resolve_device(e.device)
    encoder = encoder_from_checkpoint(ckpt, ckpt_path)[0].to(device)
    try:
        splits = build(target.source, "dataset")
    except UserError as err:
        if target is not ds:
            raise
        where = "paths.image_root=<its folder now>" if ds.name == "imagefolder" else "paths.data_dir=<where it is now>"
        raise UserError(f"{err} (if the data has moved since training, give {where})") from None
    out = Path(out_dir)
    run = ckpt.get("run") or {}
    base = {"checkpoint": str(ckpt_path.resolve()), "dataset": target.name, "pretrained_on": ds.name,
            "transfer": target is not ds, "method": train_cfg.method._target_, "epoch": ckpt["epoch"]}
    # an untrained-encoder checkpoint (a floor) holds the image encoder alone: scored as any encoder
    text = (image_text_eval(ckpt, ckpt_path, splits, target, e, device)
            if is_image_text(train_cfg) and ckpt.get("model") else {})
    if not splits.labeled:
        if not text:
            raise UserError(unlabeled_message(target, "cl-eval has nothing to score against"))
        result = {**base, **text, "overrides": run.get("overrides", []), "eval_overrides": list(overrides or [])}
        with files.whole(out / "eval.json") as tmp:
            tmp[0].write_text(json.dumps(result, indent=2) + "\n")
        log.info("retrieval on %d held-out images / %d captions: image->text R@1/5/10 %.4f/%.4f/%.4f, text->image "
                 "%.4f/%.4f/%.4f; wrote %s", text["n_retrieval_images"], text["n_retrieval_captions"],
                 *[text[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)], out / "eval.json")
        return result
    tr_f, tr_y = extract_features(encoder, splits.eval_train, target.mean, target.std, device, e.batch_size,
                                  "train features")
    te_f, te_y = extract_features(encoder, splits.test, target.mean, target.std, device, e.batch_size, "test features")
    check_features(tr_f, ckpt_path, f"{target.name}'s training split")
    check_features(te_f, ckpt_path, f"{target.name}'s test split")
    classes = list(getattr(splits.test, "classes", []))
    n_cls = max(len(classes), int(max(tr_y.max(), te_y.max())) + 1)
    on_dev = [t.to(device) for t in (tr_f, tr_y, te_f, te_y)]  # k-NN as chunked matmuls on the device
    result = {
        **base, "n_train": len(tr_f), "n_test": len(te_f), "feature_dim": int(tr_f.shape[1]),
        "knn_top1": knn_top1(*on_dev, n_cls, e.knn_k, e.knn_temperature),
        "knn5_top1": knn_top1(*on_dev, n_cls, k=5, weighted=False),
        "linear_top1": linear_probe(tr_f, tr_y, te_f, te_y, e.linear_max_iter, e.seed, device, e.linear_backend),
        "overrides": run.get("overrides", []), "settings": run_settings(train_cfg, run.get("choices")),
        "eval_overrides": list(overrides or []), **text,
    }
    with files.whole(out / "eval.json", *[out / "tsne.png"] * (e.tsne_samples > 1)) as tmp:  # both or neither
        if e.tsne_samples > 1:
            n = min(e.tsne_samples, len(te_f))
            title = (f"t-SNE of {n} of {len(te_f)} {target.name} test features\n{method_name}"
                     f"{f' (trained on {ds.name})' if target is not ds else ''}, epoch {ckpt['epoch']}, "
                     f"k-NN top-1 {result['knn_top1']:.4f}")
            result["tsne_points"] = tsne_png(te_f, te_y, classes, tmp[1], e.tsne_samples, e.seed, title)
        tmp[0].write_text(json.dumps(result, indent=2) + "\n")
    log.info("k-NN top-1 (k=%d, T=%g) %.4f, 5-NN top-1 %.4f, linear top-1 %.4f on %d test images; wrote %s",
             e.knn_k, e.knn_temperature, result["knn_top1"], result["knn5_top1"], result["linear_top1"],
             result["n_test"], out / "eval.json")
    if "zeroshot_top1" in text:
        log.info("zero-shot top-1 %.4f, top-5 %.4f (%d prompt templates)", text["zeroshot_top1"],
                 text["zeroshot_top5"], text["zeroshot_templates"])
    if ckpt_path.parent.name == "checkpoints":  # a checkpoint in its run folder: that run's tracker too
        from .loggers import eval_to_tracker

        suffix = "" if target is ds else f"_{target.name}"
        eval_to_tracker(train_cfg, ckpt_path.parent.parent,
                        {f"{k}{suffix}": result[k] for k in ("knn_top1", "knn5_top1", "linear_top1")},
                        {f"tsne{suffix}": out / "tsne.png"}, int(ckpt["step"]))
    return result

