"""Evaluation helpers: the linear probe's two back ends, k-NN voting."""

import torch


def test_linear_probe_torch_backend_matches_sklearn():
    from contrastive_cli.evaluate import linear_probe

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 2
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 16, generator=g) * 1.5
    args = (x[:300], y[:300], x[300:], y[300:])
    sk, th = linear_probe(*args, backend="sklearn"), linear_probe(*args, backend="torch")
    assert sk > 0.8 and abs(sk - th) <= 0.03


def test_knn_weighted_vote_and_majority():
    from contrastive_cli.evaluate import knn_predict

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    test = torch.tensor([[0.2, 1.0], [1.0, 0.05]])
    assert knn_predict(train, labels, test, 2, k=1).tolist() == [1, 0]
    # k=3, one vote each: class 0 has two of three neighbours for both test points
    assert knn_predict(train, labels, test, 2, k=3, weighted=False).tolist() == [0, 0]
    # weighted with a small temperature: the closest neighbour's exp(sim / T) dominates
    assert knn_predict(train, labels, test, 2, k=3, temperature=0.05).tolist() == [1, 0]


def test_weighted_knn_does_not_overflow_at_small_temperatures():
    from contrastive_cli.evaluate import knn_predict

    # exp(sim / T) is inf in float32 for both classes at T=0.005; the nearest (class 1) must still win
    test = torch.tensor([[1.0, 0.0]])
    near = torch.tensor([[1.0, 0.0]])
    almost = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.2]]), dim=1)  # cos 0.98
    train, labels = torch.cat([almost, near]), torch.tensor([0, 0, 1])
    assert torch.isinf((almost @ test.t() / 0.005).exp()).all()
    assert knn_predict(train, labels, test, 2, k=3, temperature=0.005).tolist() == [1]
    assert knn_predict(train, labels, test, 2, k=3, temperature=0.5).tolist() == [0]  # two close votes beat one
