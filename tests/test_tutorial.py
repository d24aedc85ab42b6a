r"""Short versions of the tutorial's two experiments, trained through the vectorized ELBO."""

import importlib.util
import pathlib

import pytest
import torch

import bayesflow as bf

from bayesflow.datasets import two_moons

PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "tutorial.py"


@pytest.fixture(scope="module")
def tutorial():
    spec = importlib.util.spec_from_file_location("tutorial", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_sort(tutorial):
    bnet, history = tutorial.sort_experiment(
        epochs=2,
        steps=48,
        k=4,
        generator=torch.Generator(torch.get_default_device()).manual_seed(0),
    )

    assert len(history) == 2 and history[0].shape == (48,)
    start, end = history[0][:4].mean(), history[-1][-16:].mean()
    assert end < 0.6 * start

    x = torch.randn(64, 5)
    y = x.sort(dim=-1).values
    kw = dict(fn=tutorial.sort_ll, num_data=tutorial.NUM_DATA, n=4)
    vec = bf.nelbo(
        bnet.base,
        bnet.posterior,
        x,
        y,
        generator=torch.Generator(torch.get_default_device()).manual_seed(1),
        **kw,
    )
    loop = bf.loop_nelbo(
        bnet.base,
        bnet.posterior,
        x,
        y,
        generator=torch.Generator(torch.get_default_device()).manual_seed(1),
        **kw,
    )
    assert torch.allclose(vec, loop, atol=1e-10)


def test_moons(tutorial):
    bflow, history = tutorial.moons_experiment(
        epochs=3,
        points=512,
        k=4,
        generator=torch.Generator(torch.get_default_device()).manual_seed(0),
    )

    assert len(history) == 3 and history[0].shape == (8,)
    start, end = history[0][:2].mean(), history[-1].mean()
    assert end < start - 0.3

    x, label = two_moons(64)
    c = label.unsqueeze(-1)
    kw = dict(fn=tutorial.flow_ll, num_data=tutorial.NUM_DATA, n=4)
    vec = bf.nelbo(
        bflow.base,
        bflow.posterior,
        c,
        x,
        generator=torch.Generator(torch.get_default_device()).manual_seed(1),
        **kw,
    )
    loop = bf.loop_nelbo(
        bflow.base,
        bflow.posterior,
        c,
        x,
        generator=torch.Generator(torch.get_default_device()).manual_seed(1),
        **kw,
    )
    assert torch.allclose(vec, loop, atol=1e-10)
    # the sampled parameters changed the loss
    mean = -tutorial.flow_ll(bflow.mean_model(), c, x).mean() + bflow.kl_divergence() / 1e6
    assert not torch.allclose(vec, mean, atol=1e-10)


def test_main_quick(tutorial, capsys):
    assert tutorial.main(["--quick", "--experiment", "moons", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "two moons NSF: 2 epochs over 1024 points" in out
    assert "(1) " in out and "±" in out


def test_two_moons():
    x, label = two_moons(
        2000, generator=torch.Generator(torch.get_default_device()).manual_seed(0)
    )
    y, _ = two_moons(2000, generator=torch.Generator(torch.get_default_device()).manual_seed(0))

    assert x.shape == (2000, 2) and label.shape == (2000,)
    assert torch.equal(x, y)
    assert set(label.tolist()) == {0.0, 1.0}

    # without noise, each point lies on its unit circle
    x, label = two_moons(500, sigma=0.0)
    centre = torch.stack((0.5 - label, 0.25 - label / 2), dim=-1)
    assert torch.allclose((x + centre).norm(dim=-1), torch.ones(500))

    with pytest.raises(ValueError, match="two_moons: expected n to be a positive int"):
        two_moons(0)
    with pytest.raises(TypeError, match="two_moons: expected n"):
        two_moons(2.0)
    with pytest.raises(ValueError, match="two_moons: expected a finite sigma >= 0"):
        two_moons(4, sigma=-1.0)
    with pytest.raises(TypeError, match="two_moons: expected generator"):
        two_moons(4, generator=0)
