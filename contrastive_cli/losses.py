"""Losses as pure functions on tensors: no state, no modules, testable without a model.
Each runs in fp32 with autocast switched off: under bf16 autocast a matmul would round cosine
similarities to about 2^-8 before the division by a small temperature."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def fp32(loss):
    """Run `loss` outside autocast, with its tensor arguments as float32."""

    def cast(a):
        if isinstance(a, (list, tuple)):  # the views of a multi-crop loss
            return type(a)(cast(t) for t in a)
        return a.float() if isinstance(a, Tensor) and a.is_floating_point() else a

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        first = next(a for a in args if isinstance(a, Tensor) or isinstance(a, (list, tuple)) and a)
        device = (first if isinstance(first, Tensor) else first[0]).device.type
        with torch.autocast(device, enabled=False):
            return loss(*[cast(a) for a in args], **kwargs)

    return wrapper


@fp32
def nt_xent(z1: Tensor, z2: Tensor, temperature: float, decoupled: bool = False) -> Tensor:
    """NT-Xent (SimCLR) over the 2N views: the positive of view i is view i+N (and of i+N, i);
    the other 2N-2 views are negatives; the sample itself is masked out.
    decoupled: DCL (Yeh et al. 2022, arXiv:2110.06848): the positive is left out of the
    denominator too, -s_ip / T + log sum_{k != i, p} exp(s_ik / T).

    z1, z2: N x D projections of the two views (normalized here).
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # 2N x D
    sim = z @ z.t() / temperature  # 2N x 2N
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    if not decoupled:
        return F.cross_entropy(sim, target)
    positive = sim.gather(1, target[:, None]).squeeze(1)
    negatives = sim.scatter(1, target[:, None], float("-inf"))
    return (negatives.logsumexp(1) - positive).mean()


@fp32
def moco_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Logits N x (1+K): column 0 is the positive q.k, columns 1..K the queue's negatives.
    q, k: N x D and queue: K x D, all L2-normalized."""
    l_pos = (q * k).sum(1, keepdim=True)  # N x 1
    l_neg = q @ queue.t()  # N x K
    return torch.cat([l_pos, l_neg], 1) / temperature


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """MoCo's InfoNCE: cross-entropy with the positive at index 0."""
    logits = moco_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@fp32
def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss 2 - 2 cos(p, z), averaged over the batch (z is the target, no gradient)."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()


def pairwise_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances N x M, with a floor inside the square root so gradients stay finite."""
    d2 = (a.unsqueeze(1) - b.unsqueeze(0)).pow(2).sum(-1)
    return d2.clamp_min(1e-12).sqrt()


@fp32
def contrastive_margin(e1: Tensor, e2: Tensor, same: Tensor, margin: float) -> Tensor:
    """Margin contrastive loss (Hadsell, Chopra & LeCun 2006) over all pairs (e1[i], e2[j]):
    y * d^2 + (1 - y) * max(0, m - d)^2 with y = same[i, j]. Positive and negative terms are each
    averaged over their own pairs and then added, so the N^2 - N negatives do not drown the N positives."""
    d = pairwise_distance(e1, e2)
    pos = d.pow(2)[same]
    neg = (margin - d).clamp_min(0).pow(2)[~same]
    zero = d.new_zeros(())
    return (pos.mean() if pos.numel() else zero) + (neg.mean() if neg.numel() else zero)


@fp32
def triplet(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float) -> Tensor:
    """Triplet loss max(0, d(a, p) - d(a, n) + m), averaged over the anchors."""
    d_ap = (anchor - positive).pow(2).sum(1).clamp_min(1e-12).sqrt()
    d_an = (anchor - negative).pow(2).sum(1).clamp_min(1e-12).sqrt()
    return (d_ap - d_an + margin).clamp_min(0).mean()


MINING = ("random", "hard", "semi_hard")


def mine_negatives(d_an: Tensor, d_ap: Tensor, valid: Tensor, strategy: str, margin: float,
                   generator: torch.Generator | None = None) -> Tensor:
    """Index of one negative per anchor among the candidates (columns of d_an, masked by `valid`).

    random: uniform over the valid negatives. hard: the closest one. semi_hard (FaceNet, Schroff et
    al. 2015): the closest negative farther than the positive, d(a,p) < d(a,n); where an anchor has
    none, the farthest negative (the fallback of TensorFlow Addons' semi-hard triplet loss)."""
    inf = torch.finfo(d_an.dtype).max
    if strategy == "random":
        scores = torch.rand(d_an.shape, generator=generator, device=d_an.device)
        return scores.masked_fill(~valid, -1.0).argmax(1)
    if strategy == "hard":
        return d_an.masked_fill(~valid, inf).argmin(1)
    if strategy == "semi_hard":
        outside = valid & (d_an > d_ap.unsqueeze(1))
        closest_outside = d_an.masked_fill(~outside, inf).argmin(1)
        farthest = d_an.masked_fill(~valid, -inf).argmax(1)
        return torch.where(outside.any(1), closest_outside, farthest)
    raise ValueError(f"mining={strategy}: choose from {', '.join(MINING)}")


@fp32
def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)), averaged over the batch (Chen & He 2021, eq. 1)."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def _off_diagonal(m: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, as a flat vector."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


@fp32
def barlow_twins(z1: Tensor, z2: Tensor, lambd: float = 5e-3, eps: float = 1e-5) -> Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1): sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, where C
    is the D x D cross-correlation of the two views' embeddings, each standardized over the batch
    (mean 0, biased std 1, as the paper's affine-free batch-norm does; eps as in BatchNorm1d)."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / (z1.var(0, unbiased=False) + eps).sqrt()
    b = (z2 - z2.mean(0)) / (z2.var(0, unbiased=False) + eps).sqrt()
    if 2 * n >= d:
        c = a.t() @ b / n
        return (1 - c.diagonal()).pow(2).sum() + lambd * _off_diagonal(c).pow(2).sum()
    # fewer samples than dimensions: sum_ij C_ij^2 = sum_kl (a a^T)_kl (b b^T)_kl / n^2 from the two N x N
    # Gram matrices, without the D x D matrix (the 8192-wide head's took most of its step on a CPU)
    diagonal = (a * b).sum(0) / n
    everything = ((a @ a.t()) * (b @ b.t())).sum() / n**2
    return (1 - diagonal).pow(2).sum() + lambd * (everything - diagonal.pow(2).sum())


@fp32
def vicreg(z1: Tensor, z2: Tensor, sim_weight: float = 25.0, var_weight: float = 25.0, cov_weight: float = 1.0,
           eps: float = 1e-4) -> Tensor:
    """VICReg (Bardes et al. 2022, eqs. 1-6): invariance (mean squared distance between the views),
    variance (hinge max(0, 1 - sqrt(Var + eps)) per dimension, averaged, for each view) and covariance
    (sum of squared off-diagonal covariances / D, for each view), weighted 25 / 25 / 1."""
    n, d = z1.shape
    invariance = F.mse_loss(z1, z2)
    variance = covariance = z1.new_zeros(())
    for z in (z1, z2):
        z = z - z.mean(0)
        variance = variance + F.relu(1 - (z.var(0) + eps).sqrt()).mean() / 2
        covariance = covariance + _off_diagonal(z.t() @ z / (n - 1)).pow(2).sum() / d
    return sim_weight * invariance + var_weight * variance + cov_weight * covariance


@fp32
def batch_info_nce(q: Tensor, k: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """InfoNCE of each query against all keys of the batch (MoCo v3, Chen et al. 2021, Alg. 1):
    the positive of query i is key offset + i (offset = rank x local batch when the keys are
    gathered from every rank); scaled by 2T as in the paper. q, k are normalized here."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.t() / temperature
    target = torch.arange(len(q), device=q.device) + offset
    return F.cross_entropy(logits, target) * (2 * temperature)


@fp32
def nearest_neighbour(z: Tensor, support: Tensor) -> Tensor:
    """NNCLR's NN(z, Q): for each row of z, the most cosine-similar row of the support set Q
    (rows of Q are normalized). In fp32: bf16 autocast would round the cosines near 1 to steps of
    2^-8, where many rows of a support set tie."""
    return support[(F.normalize(z, dim=1) @ support.t()).argmax(1)]


@fp32
def nnclr(nn_z: Tensor, p: Tensor, temperature: float, offset: int = 0) -> Tensor:
    """NNCLR (Dwibedi et al. 2021, eq. 2): -log exp(NN(z_i) . p_i / T) / sum_k exp(NN(z_i) . p_k / T),
    the nearest neighbours of one view against the predictions of the other (rows at offset + i are
    the positives when p is gathered from every rank), cosine similarities."""
    nn_z, p = F.normalize(nn_z, dim=1), F.normalize(p, dim=1)
    logits = nn_z @ p.t() / temperature
    return F.cross_entropy(logits, torch.arange(len(nn_z), device=nn_z.device) + offset)


@fp32
def supcon(z: Tensor, labels: Tensor, temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss L_out (Khosla et al. 2020, eq. 2) over M views z (M x D) with
    `labels` (M): for anchor i, the mean over its positives p (same label, p != i) of
    -log exp(s_ip / T) / sum_{a != i} exp(s_ia / T), averaged over the anchors that have a positive."""
    z = F.normalize(z, dim=1)
    sim = z @ z.t() / temperature
    itself = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim - sim.masked_fill(itself, float("-inf")).logsumexp(1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~itself
    count = positives.sum(1)
    has = count > 0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1)[has] / count[has])
    return per_anchor.mean()


@fp32
def dino_loss(student: list[Tensor], teacher: list[Tensor], center: Tensor, student_temp: float,
              teacher_temp: float) -> Tensor:
    """DINO (Caron et al. 2021, alg. 1): -sum softmax((t - c) / T_t) * log_softmax(s / T_s), averaged over
    the batch and over every pair (teacher view i, student view j != i). student: the logits (N x K) of
    every view, the global ones first; teacher: those of the global views; center: K (no gradient)."""
    targets = [F.softmax((t.detach() - center) / teacher_temp, dim=1) for t in teacher]
    logp = [F.log_softmax(s / student_temp, dim=1) for s in student]
    terms = [-(q * logp[j]).sum(1).mean() for i, q in enumerate(targets) for j in range(len(logp)) if j != i]
    return torch.stack(terms).mean()


@torch.no_grad()
@fp32
def sinkhorn(scores: Tensor, eps: float = 0.05, iters: int = 3) -> Tensor:
    """SwAV's codes (Caron et al. 2020, sec. 3.1 and appendix A.1): Sinkhorn-Knopp on exp(scores / eps),
    alternately giving each of the K prototypes 1/K of the mass and each of the B samples 1/B; rows
    are returned summing to 1 (the last step is the samples'). scores: B x K similarities in [-1, 1]
    (so exp(1 / eps) stays finite in fp32). Under DDP the prototype sums and B run over every rank."""
    from .distributed import all_reduce_sum, rank_and_world

    q = torch.exp(scores.float() / eps).t()  # K x B
    k, b = q.shape[0], q.shape[1] * rank_and_world()[1]
    q /= all_reduce_sum(q.sum())
    for _ in range(iters):
        q /= all_reduce_sum(q.sum(1, keepdim=True)) * k  # each prototype: 1/K
        q /= q.sum(0, keepdim=True) * b  # each sample: 1/B
    return (q * b).t()


@fp32
def swav_loss(scores: list[Tensor], codes: list[Tensor], temperature: float) -> Tensor:
    """SwAV's swapped prediction: for the codes q_i of each global view i, the cross-entropy
    -sum q_i log softmax(p_j / T) with the prototype scores p_j of every other view j, averaged over
    j, the batch and i. scores: every view's B x K scores, the global views first."""
    total = []
    for i, q in enumerate(codes):
        terms = [-(q * F.log_softmax(p / temperature, dim=1)).sum(1).mean() for j, p in enumerate(scores) if j != i]
        total.append(torch.stack(terms).mean())
    return torch.stack(total).mean()


@fp32
def cpc_info_nce(pred: Tensor, keys: Tensor, target: Tensor) -> Tensor:
    """CPC's InfoNCE (van den Oord et al. 2018, eq. 4): each prediction (M x D) scored by dot product
    against every key (P x D: the patch features of all positions of all images); the positive of
    prediction m is key target[m]. log P - this loss is the bound on I(x; c) the paper names."""
    return F.cross_entropy(pred @ keys.t(), target)


@fp32
def clip_loss(image: Tensor, text: Tensor, image_all: Tensor, text_all: Tensor, logit_scale: Tensor,
              offset: int = 0) -> Tensor:
    """CLIP (Radford et al. 2021): the mean of the image->text and text->image cross-entropies over
    cosine similarities times exp(logit_scale). image, text: this process's n rows; *_all: the rows
    of every process (the same tensors with one process), so row i's caption sits at offset + i
    (open_clip's "local loss": each process scores its own rows against the global batch)."""
    image, text = F.normalize(image, dim=1), F.normalize(text, dim=1)
    image_all, text_all = F.normalize(image_all, dim=1), F.normalize(text_all, dim=1)
    scale = logit_scale.exp()
    target = torch.arange(len(image), device=image.device) + offset
    return (F.cross_entropy(scale * image @ text_all.t(), target)
            + F.cross_entropy(scale * text @ image_all.t(), target)) / 2


@fp32
def siglip_loss(image: Tensor, text_all: Tensor, logit_scale: Tensor, logit_bias: Tensor, offset: int = 0) -> Tensor:
    """SigLIP (Zhai et al. 2023): every (image, caption) pair is a binary question, +1 for an image's
    own caption (column offset + i) and -1 for every other, -log sigmoid(label * (exp(t) cos + b))
    summed over the columns and averaged over this process's n images."""
    image, text_all = F.normalize(image, dim=1), F.normalize(text_all, dim=1)
    logits = logit_scale.exp() * image @ text_all.t() + logit_bias
    labels = -torch.ones_like(logits)
    labels[torch.arange(len(image), device=image.device), torch.arange(len(image), device=image.device) + offset] = 1
    return -F.logsigmoid(labels * logits).sum() / len(image)
