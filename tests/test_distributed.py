"""DDP on the CPU with gloo: 2 processes with batch B equal 1 process with batch 2B."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import error_lines, run_cli
from torch import nn

from contrastive_cli.distributed import cleanup, gather
from contrastive_cli.methods.moco import MoCo
from contrastive_cli.methods.simclr import SimCLR

B, D_IN = 4, 6


class Flat(nn.Module):
    """A batch-norm-free encoder: with BN, per-rank statistics would differ from the 2B batch's."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_IN, 5)
        self.feature_dim = 5

    def forward(self, x):
        return torch.tanh(self.fc(x.flatten(1)))


def make_simclr():
    torch.manual_seed(0)
    model = SimCLR(Flat(), temperature=0.3, proj_hidden_dim=8, proj_dim=4)
    model.projector = nn.Linear(5, 4)  # BN-free head, as above
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2 * B, D_IN, generator=g), torch.randn(2 * B, D_IN, generator=g)


def worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x1, x2 = data()
        mine = slice(rank * B, (rank + 1) * B)  # rank r holds its part of the global batch
        model = nn.parallel.DistributedDataParallel(make_simclr())
        out_step = model(x1[mine], x2[mine], None)
        out_step.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}

        torch.manual_seed(0)
        moco = MoCo(Flat(), queue_size=16, proj_hidden_dim=8, proj_dim=4, bn_splits=1)
        keys = moco._keys(x1[mine])  # shuffled across ranks, then put back in order
        moco._enqueue(gather(keys))
        torch.save({"loss": out_step.loss.detach(), "grads": grads, "keys": keys, "queue": moco.queue.clone()},
                   f"{out}/rank{rank}.pt")
    finally:
        cleanup()  # barrier first: tearing gloo down under the other rank aborted it about one run in five


def run_two_ranks(target, tmp_path) -> list[dict]:
    """Run `target(rank, 2, init, out)` in two spawned processes; what each rank saved."""
    ctx = mp.get_context("spawn")  # fork can deadlock with gloo threads
    procs = [ctx.Process(target=target, args=(r, 2, f"file://{tmp_path}/rendezvous", str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_two_processes_equal_one_process_with_the_double_batch(tmp_path):
    ranks = run_two_ranks(worker, tmp_path)

    x1, x2 = data()
    single = make_simclr()
    loss = single.training_step(x1, x2, None).loss
    loss.backward()
    for r in ranks:
        assert torch.allclose(r["loss"], loss.detach(), atol=1e-6)  # every rank sees the global loss
        for name, p in single.named_parameters():
            assert torch.allclose(r["grads"][name], p.grad, atol=1e-5), name  # DDP-averaged == 2B gradient

    torch.manual_seed(0)
    moco = MoCo(Flat(), queue_size=16, proj_hidden_dim=8, proj_dim=4, bn_splits=1)
    expected = F.normalize(moco.key_projector(moco.key_encoder(x1)), dim=1)
    got = torch.cat([r["keys"] for r in ranks])
    assert torch.allclose(got, expected, atol=1e-6)  # shuffle-BN across ranks returns keys in order
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])  # both ranks enqueue the global keys
    assert torch.allclose(ranks[0]["queue"][: 2 * B], expected, atol=1e-6)


def test_two_process_run_writes_one_checkpoint(tmp_path):
    proc = run_cli("cl-train", "trainer.devices=2", "trainer.epochs=1", "trainer.batch_size=64", "encoder.width=8",
                   "trainer.knn_monitor=false", cwd=tmp_path)
    assert proc.returncode == 0, error_lines(proc)[-5:]
    runs = list(tmp_path.glob("outputs/train/*/*"))
    assert len(runs) == 1
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == ["epoch_0001.pt", "last.pt"]
    rows = (runs[0] / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("1,10,")  # one epoch of 1347 // 128 global steps, written once


# Barlow Twins, VICReg and SupCon: their losses are not means over samples (a correlation, a variance,
# a covariance, a softmax over all views), so per-rank losses would be wrong; each must see the global batch.
def make_global_batch_methods():
    from contrastive_cli.methods.barlow_twins import BarlowTwins
    from contrastive_cli.methods.supcon import SupCon
    from contrastive_cli.methods.vicreg import VICReg

    made = {}
    for name, cls in (("barlow_twins", BarlowTwins), ("vicreg", VICReg), ("supcon", SupCon)):
        torch.manual_seed(0)
        model = cls(Flat(), proj_hidden_dim=8, proj_dim=4)
        model.projector = nn.Linear(5, 4)  # BN-free head: per-rank BN statistics would differ from the 2B batch's
        made[name] = model
    return made


LABELS = torch.tensor([0, 1, 2, 0, 1, 1, 2, 0])  # 2B labels; a class spans both ranks


def global_batch_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x1, x2 = data()
        mine = slice(rank * B, (rank + 1) * B)
        result = {}
        for name, method in make_global_batch_methods().items():
            model = nn.parallel.DistributedDataParallel(method)
            loss = model(x1[mine], x2[mine], LABELS[mine]).loss
            loss.backward()
            result[name] = {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in method.named_parameters()}}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        cleanup()


def test_barlow_twins_vicreg_supcon_two_processes_equal_one_process(tmp_path):
    ranks = run_two_ranks(global_batch_worker, tmp_path)
    x1, x2 = data()
    for name, single in make_global_batch_methods().items():
        loss = single.training_step(x1, x2, LABELS).loss
        loss.backward()
        for r in ranks:
            assert torch.allclose(r[name]["loss"], loss.detach(), atol=1e-5), name
            for pname, p in single.named_parameters():
                assert p.grad.abs().sum() > 0, (name, pname)
                assert torch.allclose(r[name]["grads"][pname], p.grad, atol=1e-5, rtol=1e-4), (name, pname)
