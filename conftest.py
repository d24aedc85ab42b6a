r"""Test options and defaults: float64 on the CPU unless told otherwise."""

import contextlib

import pytest
import torch
import zuko

import bayesflow


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu", help="the torch device of the tests")
    parser.addoption("--dtype", default="float64", help="the default torch dtype of the tests")


@pytest.fixture(autouse=True)
def _torch_defaults(request: pytest.FixtureRequest):
    dtype = getattr(torch, request.config.getoption("--dtype"))
    device = torch.device(request.config.getoption("--device"))

    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)

    # On the CPU, no device context: it is a torch function mode, under which torch's
    # layers never take their fast paths (fused attention, nested tensors), which the
    # loop must then be compared with.
    with device if device.type != "cpu" else contextlib.nullcontext():
        yield

    torch.set_default_dtype(old_dtype)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def gen(device: torch.device):
    r"""Returns `gen(seed)`: a fresh generator on the test device, seeded."""

    return lambda seed=0: torch.Generator(device).manual_seed(seed)


@pytest.fixture
def one_thread():
    r"""Runs a test on one thread: tiny matrix products are far slower with two threads on
    a busy two-core machine."""

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_caches():
    r"""Runs a test with every cache of bayesflow empty, and empties them afterwards."""

    bayesflow.clear_caches()
    yield
    bayesflow.clear_caches()


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace: dict) -> None:
    doctest_namespace.update(torch=torch, zuko=zuko, bayesflow=bayesflow, bf=bayesflow)
