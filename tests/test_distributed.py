r"""Data-parallel training (gloo, CPU): a BayesianModel in DistributedDataParallel, and the
functional API with the posterior's gradients averaged by hand."""

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import zuko

from torch.nn.parallel import DistributedDataParallel

import bayesflow as bf

WORLD = 2
K = 4
NUM_DATA = 1000
TIMEOUT = 120.0


def mse(net, x, y):
    return -(net(x) - y).square().mean(dim=-1)


def _setup():
    r"""The model and the whole data set, identical in every process."""

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bnet = bf.BayesianModel(zuko.nn.MLP(3, 2, hidden_features=(8,)), init_logvar=-3.0)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    return bnet, x, y


def _grads(bnet):
    return {f"means.{k}": p.grad.clone() for k, p in bnet.means.items()} | {
        f"logvars.{k}": p.grad.clone() for k, p in bnet.logvars.items()
    }


def _bridge_step(rank, bnet, x, y, shard):
    # The base's own copies of Bayesian parameters are swapped out, hence unused.
    ddp = DistributedDataParallel(bnet, find_unused_parameters=True)
    # the same posterior samples everywhere
    generator = torch.Generator(torch.get_default_device()).manual_seed(1)
    ll = ddp(x[shard], y[shard], n=K, fn=mse, generator=generator)
    loss = bnet.kl_divergence() / NUM_DATA - ll.mean()
    loss.backward()  # gradients are averaged over the processes
    return loss


def _functional_step(rank, bnet, x, y, shard):
    # DistributedDataParallel cannot average a posterior's gradients: refused, and the
    # refusal of a BayesianModel is not bypassed by the wrapper.
    net, q = bnet.base, bnet.posterior
    refusals = []
    nelbo = lambda m: bf.nelbo(m, q, x, y, fn=mse, num_data=1, n=1)
    for module, call in [
        (DistributedDataParallel(net), nelbo),
        (torch.nn.DataParallel(DistributedDataParallel(net)), nelbo),  # nested
        (torch.compile(DistributedDataParallel(net)), nelbo),  # compiled
        (DistributedDataParallel(bnet, find_unused_parameters=True), bf.init),
    ]:
        try:
            call(module)
        except TypeError as err:
            refusals.append(str(err))
    generator = torch.Generator(torch.get_default_device()).manual_seed(1)
    loss = bf.nelbo(
        net, q, x[shard], y[shard], fn=mse, num_data=NUM_DATA, n=K, generator=generator
    )
    loss.backward()
    for t in [*q.mean.values(), *q.logvar.values()]:  # as docs/training.md does
        dist.all_reduce(t.grad)
        t.grad.div_(WORLD)
    return loss, refusals


def _worker(rank, rendezvous, path, functional):
    # A file to meet at, not a TCP port: a free port found beforehand may be taken by
    # another process before the workers bind it.
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        bnet, x, y = _setup()
        shard = slice(rank * 8, (rank + 1) * 8)
        refusals = []
        if functional:
            loss, refusals = _functional_step(rank, bnet, x, y, shard)
        else:
            loss = _bridge_step(rank, bnet, x, y, shard)
        if rank == 0:
            saved = {"loss": loss.detach(), "grads": _grads(bnet), "refusals": refusals}
            torch.save(saved, path)
        # Neither process tears gloo down while the other still talks to it.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done and saved: leave without the interpreter's teardown, where gloo's threads now and
    # then abort the process ("terminate called without an active exception", SIGABRT).
    os._exit(0)


@pytest.mark.parametrize("functional", [False, True], ids=["bridge-in-ddp", "functional"])
def test_ddp_gradients_match_one_process(tmp_path, functional):
    path = tmp_path / "rank0.pt"
    context = mp.start_processes(
        _worker,
        args=(str(tmp_path / "rendezvous"), str(path), functional),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )

    deadline = time.monotonic() + TIMEOUT
    try:
        while not context.join(timeout=1.0):
            assert time.monotonic() < deadline, f"the {WORLD} processes did not end in time"
    finally:
        for p in context.processes:
            if p.is_alive():
                p.terminate()

    result = torch.load(path)

    # one process, the union of the shards, the same samples, the vectorized objective
    dtype = torch.get_default_dtype()
    try:
        bnet, x, y = _setup()
        loss = bf.nelbo(
            bnet.base, bnet.posterior, x, y,
            fn=mse, num_data=NUM_DATA, n=K, generator=torch.Generator(torch.get_default_device()).manual_seed(1),
        )  # fmt: skip
        loss.backward()
        grads = _grads(bnet)
    finally:
        torch.set_default_dtype(dtype)

    assert grads.keys() == result["grads"].keys()
    for name, g in grads.items():
        assert torch.allclose(result["grads"][name], g, atol=1e-12), name
        assert g.abs().sum() > 0
    # each process saw half the data: its own loss differs from the union's
    assert not torch.allclose(result["loss"], loss.detach())
    if functional:
        nelbo, nested, compiled, init = result["refusals"]
        assert nelbo.startswith("nelbo: expected the module itself, got a Distributed")
        assert "all_reduce" in nelbo and nested == compiled == nelbo
        assert init.startswith("init: expected the module the posterior is over, got a ")
        assert "BayesianModel (wrapped in DistributedDataParallel)" in init
