"""SimSiam, Barlow Twins, VICReg, MoCo v3, NNCLR and SupCon: each loss equals its formula on a
hand-checked example and a plain loop over pairs on random tensors; each method keeps its paper's
invariants (stop-gradient, fixed predictor lr, support set, labels)."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_data import files_only_integrity, write_stl10  # noqa: F401 (a fixture)

from contrastive_cli import losses as L
from contrastive_cli.encoders import SmallCNN
from contrastive_cli.errors import UserError
from contrastive_cli.methods.nnclr import NNCLR
from contrastive_cli.methods.simsiam import SimSiam
from contrastive_cli.methods.supcon import SupCon
from contrastive_cli.optim import lr_factors, param_groups

N, D = 6, 5


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def dot(a, b):
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def cos(a, b):
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


# ----------------------------------------------------------------------------------- SimSiam

def test_negative_cosine_hand_checked_and_loop():
    p, z = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert L.negative_cosine(p, z).item() == pytest.approx(-0.5)  # cosines 1 and 0
    p, z = rand(N, D), rand(N, D, seed=1)
    assert L.negative_cosine(p, z).item() == pytest.approx(-sum(cos(p[i], z[i]) for i in range(N)) / N, abs=1e-5)


def test_simsiam_stops_the_gradient_through_the_target_branch():
    p, z = rand(N, D).requires_grad_(), rand(N, D, seed=1).requires_grad_()
    L.negative_cosine(p, z).backward()
    assert z.grad is None and p.grad.abs().sum() > 0


def test_simsiam_predictor_keeps_the_base_lr_while_the_rest_follows_the_schedule():
    model = SimSiam(SmallCNN(1, 4), proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=4)
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factors(opt, lambda step: 0.5 ** step))
    for _ in range(3):
        opt.step()
        sched.step()
    predictor = {id(p) for p in model.predictor.parameters()}
    for g in opt.param_groups:
        in_predictor = {id(p) in predictor for p in g["params"]}
        assert len(in_predictor) == 1  # a group is all predictor or none of it
        assert g["lr"] == pytest.approx(0.1 if in_predictor == {True} else 0.1 * 0.5 ** 3)
    off = SimSiam(SmallCNN(1, 4), proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=4, fix_pred_lr=False)
    assert len(param_groups(off, 1e-4)) == 2 and not any("fixed_lr" in g for g in param_groups(off, 1e-4))


# ------------------------------------------------------------------------------ Barlow Twins

def standardized(z, eps):
    n, d = z.shape
    cols = []
    for j in range(d):
        col = [float(z[b, j]) for b in range(n)]
        m = sum(col) / n
        v = sum((c - m) ** 2 for c in col) / n  # biased, as batch-norm
        cols.append([(c - m) / math.sqrt(v + eps) for c in col])
    return [[cols[j][b] for j in range(d)] for b in range(n)]


def barlow_loop(z1, z2, lambd, eps=1e-5):
    a, b = standardized(z1, eps), standardized(z2, eps)
    n, d = z1.shape
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[k][i] * b[k][j] for k in range(n)) / n
            loss += (1 - c) ** 2 if i == j else lambd * c**2
    return loss


def test_barlow_twins_hand_checked_and_loop():
    # standardized, z1 = [[1, 1], [-1, -1]] and z2 = [[1, -1], [-1, 1]] give C = [[1, -1], [1, -1]]:
    # (1 - 1)^2 + (1 + 1)^2 on the diagonal, lambda * (1 + 1) off it
    z1, z2 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert L.barlow_twins(z1, z2, lambd=0.5, eps=0.0).item() == pytest.approx(4 + 0.5 * 2)
    z1, z2 = rand(N, D), rand(N, D, seed=1)
    assert L.barlow_twins(z1, z2, 5e-3).item() == pytest.approx(barlow_loop(z1, z2, 5e-3), rel=1e-5)
    assert L.barlow_twins(z1, z1, 5e-3).item() < L.barlow_twins(z1, z2, 5e-3).item()


def test_barlow_twins_with_fewer_samples_than_dimensions_is_the_same_formula():
    # 2N < D: the sum of squared correlations comes from the N x N Gram matrices; value and gradients are
    # those of the D x D cross-correlation matrix
    z1, z2 = rand(4, 16).requires_grad_(), rand(4, 16, seed=1)
    loss = L.barlow_twins(z1, z2, 5e-3)
    assert loss.item() == pytest.approx(barlow_loop(z1.detach(), z2, 5e-3), rel=1e-5)
    loss.backward()
    ref = z1.detach().clone().requires_grad_()
    a = (ref - ref.mean(0)) / (ref.var(0, unbiased=False) + 1e-5).sqrt()
    b = (z2 - z2.mean(0)) / (z2.var(0, unbiased=False) + 1e-5).sqrt()
    c = a.t() @ b / 4
    eye = torch.eye(16, dtype=torch.bool)
    ((1 - c[eye]).pow(2).sum() + 5e-3 * c[~eye].pow(2).sum()).backward()
    torch.testing.assert_close(z1.grad, ref.grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------ VICReg

def vicreg_loop(z1, z2, sim=25.0, var=25.0, cov=1.0, eps=1e-4):
    n, d = z1.shape
    inv = sum((float(z1[b, j]) - float(z2[b, j])) ** 2 for b in range(n) for j in range(d)) / (n * d)
    v_term = c_term = 0.0
    for z in (z1, z2):
        means = [sum(float(z[b, j]) for b in range(n)) / n for j in range(d)]
        for j in range(d):
            std = math.sqrt(sum((float(z[b, j]) - means[j]) ** 2 for b in range(n)) / (n - 1) + eps)
            v_term += max(0.0, 1 - std) / d / 2
        for i in range(d):
            for j in range(d):
                if i != j:
                    c = sum((float(z[b, i]) - means[i]) * (float(z[b, j]) - means[j]) for b in range(n)) / (n - 1)
                    c_term += c**2 / d
    return sim * inv + var * v_term + cov * c_term


def test_vicreg_hand_checked_and_loop():
    # z1 = [[1, 1], [-1, -1]], z2 = [[0, 1], [0, -1]]: invariance mean((1,0,1,0)^2) = 0.5; variance: only
    # z2's first dimension (std sqrt(0 + 1e-4) = 0.01) is under 1: (1 - 0.01) / 2 dims / 2 views;
    # covariance: z1's off-diagonal covariances are 2, (2^2 + 2^2) / 2 dims = 4; z2's are 0
    z1, z2 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    assert L.vicreg(z1, z2).item() == pytest.approx(25 * 0.5 + 25 * 0.99 / 4 + 4.0)
    z1, z2 = rand(N, D), rand(N, D, seed=1)
    assert L.vicreg(z1, z2).item() == pytest.approx(vicreg_loop(z1, z2), rel=1e-5)
    assert L.vicreg(z1, z2, 2.0, 3.0, 0.5).item() == pytest.approx(vicreg_loop(z1, z2, 2.0, 3.0, 0.5), rel=1e-5)


# ----------------------------------------------------------------------------------- MoCo v3

def info_nce_loop(q, k, t, offset=0):
    total = 0.0
    for i in range(len(q)):
        logits = [cos(q[i], k[j]) / t for j in range(len(k))]
        total += -logits[offset + i] + math.log(sum(math.exp(s) for s in logits))
    return total / len(q)


def test_moco_v3_loss_hand_checked_and_loop():
    eye = torch.eye(2)  # T = 1: each row's logits are (1, 0): -log(e / (e + 1)), times 2T
    assert L.batch_info_nce(eye, eye, 1.0).item() == pytest.approx(2 * math.log(1 + math.exp(-1)))
    q, k = rand(N, D), rand(2 * N, D, seed=1)  # keys of two ranks; this rank's positives at N..2N-1
    for offset in (0, N):
        got = L.batch_info_nce(q, k, 0.2, offset).item()
        assert got == pytest.approx(2 * 0.2 * info_nce_loop(q, k, 0.2, offset), rel=1e-5)


# ------------------------------------------------------------------------------------- NNCLR

def test_nearest_neighbour_comes_from_the_support_set():
    support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    got = L.nearest_neighbour(torch.tensor([[2.0, 0.5], [-1.0, -0.2], [0.1, 3.0]]), support)
    assert torch.equal(got, support[[0, 2, 1]])


def test_nnclr_loss_hand_checked_and_loop():
    eye = torch.eye(2)  # T = 0.5: logits (2, 0): -log(e^2 / (e^2 + 1))
    assert L.nnclr(eye, eye, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))
    support = F.normalize(rand(20, D, seed=2), dim=1)
    z, p = rand(N, D), rand(2 * N, D, seed=1)
    nn_z = L.nearest_neighbour(z, support)
    for i in range(N):  # the neighbour by a plain search
        best = max(range(20), key=lambda j: cos(z[i], support[j]))
        assert torch.equal(nn_z[i], support[best])
    for offset in (0, N):
        assert L.nnclr(nn_z, p, 0.2, offset).item() == pytest.approx(info_nce_loop(nn_z, p, 0.2, offset), rel=1e-5)


def test_nnclr_step_uses_the_support_set_then_enqueues_normalized_view1_embeddings():
    torch.manual_seed(0)
    model = NNCLR(SmallCNN(1, 4), queue_size=10, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16)
    before = model.queue.clone()
    x = torch.randn(4, 1, 16, 16)
    out = model.training_step(x, x.flip(-1), torch.full((4,), -1))
    out.loss.backward()
    assert torch.allclose(model.queue[:4], F.normalize(out.z1.detach(), dim=1), atol=1e-6)
    assert torch.equal(model.queue[4:], before[4:]) and model.queue_ptr.item() == 4
    # the loss is the formula on the support set as it was before the step
    p1, p2 = model.predictor(torch.cat([out.z1, out.z2])).chunk(2)
    expected = (L.nnclr(L.nearest_neighbour(out.z1, before), p2, 0.2)
                + L.nnclr(L.nearest_neighbour(out.z2, before), p1, 0.2)) / 2
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    for _ in range(2):  # 4 + 8 keys wrap around a queue of 10
        model.training_step(x, x.flip(-1), torch.full((4,), -1))
    assert model.queue_ptr.item() == 2
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(10), atol=1e-5)


# ------------------------------------------------------------------------------------ SupCon

def supcon_loop(z, labels, t):
    m, total, anchors = len(z), 0.0, 0
    for i in range(m):
        denom = sum(math.exp(cos(z[i], z[a]) / t) for a in range(m) if a != i)
        pos = [p for p in range(m) if p != i and labels[p] == labels[i]]
        if pos:
            total += sum(-math.log(math.exp(cos(z[i], z[p]) / t) / denom) for p in pos) / len(pos)
            anchors += 1
    return total / anchors


def test_supcon_hand_checked_and_loop():
    # views (1,0), (1,0), (0,1), (0,1), labels 0 0 1 1, T = 1: each anchor has one positive at
    # similarity 1 and two negatives at 0: -log(e / (e + 2))
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert L.supcon(z, torch.tensor([0, 0, 1, 1]), 1.0).item() == pytest.approx(math.log(math.e + 2) - 1)
    z, labels = rand(2 * N, D), torch.tensor([0, 1, 2, 0, 1, 1, 0, 1, 2, 0, 1, 1])
    assert L.supcon(z, labels, 0.1).item() == pytest.approx(supcon_loop(z, labels, 0.1), rel=1e-5)


def test_supcon_with_one_label_per_image_is_nt_xent():
    z1, z2 = rand(N, D), rand(N, D, seed=1)
    got = L.supcon(torch.cat([z1, z2]), torch.arange(N).repeat(2), 0.3)
    assert got.item() == pytest.approx(L.nt_xent(z1, z2, 0.3).item(), abs=1e-6)


def test_supcon_refuses_unlabeled_images_in_one_line():
    model = SupCon(SmallCNN(1, 4), proj_hidden_dim=16, proj_dim=8)
    assert model.needs_labels
    x = torch.randn(4, 1, 16, 16)
    with pytest.raises(UserError, match="^method=supcon needs labels, but this training split has unlabeled images$"):
        model.training_step(x, x, torch.tensor([0, -1, 1, 1]))
    assert torch.isfinite(model.training_step(x, x.flip(-1), torch.tensor([0, 1, 0, 1])).loss)


@pytest.mark.parametrize("loss", [L.negative_cosine, L.barlow_twins, L.vicreg])
def test_new_losses_run_in_fp32_under_autocast(loss):
    z1, z2 = rand(N, D).bfloat16(), rand(N, D, seed=1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(z1, z2)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(loss(z1.float(), z2.float()).item(), rel=1e-6)


def test_supcon_refuses_an_unlabeled_training_split_before_training(tmp_path, files_only_integrity):  # noqa: F811
    from conftest import compose_cfg

    from contrastive_cli.train import runtime_check

    write_stl10(tmp_path, n_train=2, n_test=2, n_unlabeled=6)  # STL-10 pretrains on its unlabeled split
    cfg = compose_cfg("train", cfg_overrides(tmp_path))
    with pytest.raises(UserError) as err:
        runtime_check(cfg)
    assert str(err.value) == ("method SupCon needs labels, but dataset stl10's training split has unlabeled images; "
                              "use a labeled split")
    runtime_check(compose_cfg("train", [*cfg_overrides(tmp_path), "dataset.source.train_split=train"]))


def cfg_overrides(root):
    return ["method=supcon", "dataset=stl10", f"paths.data_dir={root}", "dataset.source.download=false",
            "trainer.batch_size=2"]
