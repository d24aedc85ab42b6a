r"""Tests for the benchmark package behind `bayesflow bench`."""

import json
import sys

import pytest
import torch

import bayesflow as bf

from bayesflow import bench
from bayesflow.bench import Status
from bayesflow.bench.methods import Noise
from bayesflow.cli import main

PEERS = ("bayesian-torch", "posteriors", "pyro", "pyro-vec")
PEER_MODULES = ("bayesian_torch", "posteriors", "pyro")
TINY = dict(
    batch=4, dtype=torch.float64, min_time=0.001, repeats=1, check_samples=32, progress=False
)


def _run(models, methods, samples=(2,), modes=("forward", "train"), **options):
    return bench.run_bench(models, samples, modes, methods, **{**TINY, **options})


# torch.compile's own warnings (see test_compile.py).
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)
def test_every_method_is_checked_before_it_is_timed():
    records = _run(["mlp"], list(bench.METHODS))
    by = {(r["method"], r["mode"]): r for r in records}
    assert len(by) == 2 * len(bench.METHODS)

    for (method, _), r in by.items():
        assert r["status"] in (Status.OK, Status.NOT_APPLICABLE, Status.NOT_INSTALLED), r
        assert (r["median_ms"] is not None) == (r["status"] is Status.OK)
        if r["status"] is Status.OK:
            kind = (
                "statistically"
                if bench.METHODS[method].noise in (Noise.LOCAL, Noise.OWN)
                else "exactly"
            )
            assert r["detail"] == f"checked {kind}", r
    for method in ("zuko-loop", "loop", "vmap", "vmap-compiled", "bmm", "limit", "torch-func"):
        for mode in ("forward", "train"):
            assert by[method, mode]["status"] is Status.OK, by[method, mode]
    assert by["sample-model-loop", "train"]["status"] is Status.NOT_APPLICABLE
    assert by["pyro-vec", "forward"]["status"] in (Status.NOT_APPLICABLE, Status.NOT_INSTALLED)


@pytest.mark.parametrize("model", ["mlp", "last-layer", "nsf"])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_bmm_and_limit_match_the_loop(model, mode):
    case = bench.make_case(model, batch=4, dtype=torch.float64)
    K, seed = 3, 7
    fn, args = case.fn, case.args
    q = case.posterior
    params = bf.sample(q, K, generator=torch.Generator().manual_seed(seed))
    targets = bench.methods.bf_targets(case)

    with torch.set_grad_enabled(mode == "train"):
        ref = bf.loop_call(case.module, params, *args, fn=fn)
        bmm = bench.METHODS["bmm"].build(case, K, mode, fn, args)(seed)
        limit = bench.METHODS["limit"].build(case, K, mode, fn, args)
        got = limit(seed)

    assert not torch.allclose(ref[0], ref[1])  # the sampled parameters were used
    if mode == "forward":
        assert torch.allclose(bmm, ref, atol=1e-10)
        assert torch.allclose(got, ref, atol=1e-10)
        assert torch.equal(limit(None), got)  # pre-drawn: no new draw when timed
        return

    losses = case.loss(ref)
    want = torch.autograd.grad(losses.mean(), list(targets.values()))
    have = torch.autograd.grad(case.loss(bmm).mean(), list(targets.values()))
    got_losses, got_grads = got
    assert torch.allclose(got_losses, losses.detach(), atol=1e-10)
    for name, w, h in zip(targets, want, have, strict=True):
        assert torch.allclose(h, w, atol=1e-10), name
        assert torch.allclose(got_grads[name], w, atol=1e-10), name
    again_losses, _ = limit(None)  # the retained graph allows more steps
    assert torch.equal(again_losses, got_losses)


def test_bmm_is_not_applicable_elsewhere():
    records = _run(["cnn", "naf"], ["bmm", "limit"], modes=("forward",))
    assert {r["status"] for r in records} == {Status.NOT_APPLICABLE}


@pytest.mark.parametrize("model", ["lstm", "cnn", "last-layer", "transformer"])
def test_architectures(model):
    records = _run([model], ["zuko-loop", "loop", "vmap", "local-trick"], batch=2)
    by = {(r["method"], r["mode"]): r for r in records}
    for method in ("zuko-loop", "loop", "vmap"):
        for mode in ("forward", "train"):
            assert by[method, mode]["status"] is Status.OK, by[method, mode]
            assert by[method, mode]["detail"] == "checked exactly"
    local = {by["local-trick", m]["status"] for m in ("forward", "train")}
    expected = {
        "lstm": Status.NOT_APPLICABLE,  # no linear layer
        "cnn": Status.OK,
        "last-layer": Status.OK,
        "transformer": Status.UNSUPPORTED,  # attention reads its weights directly
    }[model]
    assert local == {expected}


def test_last_layer_is_bayesian_in_its_last_layer_only():
    case = bench.make_case("last-layer", batch=2)
    assert set(case.posterior.mean) == {"12.weight", "12.bias"}
    assert {k.replace("-", ".") for k in case.zuko.means} == set(case.posterior.mean)


def test_model_samples():
    records = _run(
        ["mlp", "last-layer"], ["loop"], samples=(1,), modes=("forward",),
        model_samples={"last-layer": [1, 3]},
    )  # fmt: skip
    assert sorted((r["model"], r["samples"]) for r in records) == [
        ("last-layer", 1),
        ("last-layer", 3),
        ("mlp", 1),
    ]


def test_peers_not_installed(monkeypatch, tmp_path, capsys):
    for name in PEER_MODULES:  # an import of None raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    records = _run(["mlp"], list(PEERS))
    assert {r["status"] for r in records} == {Status.NOT_INSTALLED}
    assert all("is not installed" in r["detail"] and r["median_ms"] is None for r in records)
    assert "not installed" in bench.format_table(records)

    out = tmp_path / "r.json"
    argv = ["bench", "--models", "mlp", "--samples", "1", "--modes", "forward", "--batch", "4"]
    argv += ["--methods", "vmap", *PEERS, "--min-time", "0.001", "--repeats", "1"]
    assert main([*argv, "--json", str(out), "--no-progress"]) == 0
    statuses = {r["method"]: r["status"] for r in json.loads(out.read_text())}
    assert statuses == {"vmap": "ok", **{p: "not installed" for p in PEERS}}
    capsys.readouterr()


def _biased_build(scale):
    # Its own noise, off by a factor: a statistical check must catch it.
    def build(case, K, mode, fn, args, **options):
        g = torch.Generator()

        def run(seed):
            params = bf.sample(case.posterior, K, generator=g.manual_seed(seed or 0))
            out = bf.vmap_call(case.module, params, *args, fn=fn)
            if mode != "train":
                return scale * out
            losses = case.loss(scale * out) + bf.kl_divergence(case.posterior) / 1e6
            targets = bench.methods.bf_targets(case)
            grads = torch.autograd.grad(losses.mean(), list(targets.values()))
            return losses.detach(), dict(zip(targets, grads, strict=True))

        return run

    return build


@pytest.mark.parametrize("scale", [1.0, 1.25])
def test_statistical_check(scale):
    method = bench.Method("own", _biased_build(scale), Noise.OWN, targets=None)
    records = _run(["mlp"], [], extra={"own": method})
    for r in records:
        if scale == 1.0:
            assert r["status"] is Status.OK and r["detail"] == "checked statistically", r
        else:
            assert r["status"] is Status.WRONG and r["median_ms"] is None, r


def test_status_in_json_and_csv(tmp_path):
    records = _run(["mlp"], ["vmap", "sample-model-loop", "bmm"])
    bench.write_json(records, tmp_path / "r.json")
    bench.write_csv(records, tmp_path / "r.csv")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert {r["status"] for r in loaded} == {"ok", "n/a"}
    assert all(Status(r["status"]).value == r["status"] for r in loaded)
    assert "Status." not in (tmp_path / "r.csv").read_text()
    ratios = {(r["method"], r["mode"]): r["ratio_to_bmm"] for r in loaded}
    assert ratios["bmm", "forward"] == 1.0 and ratios["vmap", "forward"] > 0
    assert ratios["sample-model-loop", "train"] is None


def test_markdown_table(tmp_path):
    records = _run(["mlp"], ["vmap", "bmm", "sample-model-loop"])
    table = bench.markdown_table(records)
    assert "| method | fwd K=2 | train K=2 |" in table
    assert "| bmm | " in table and "(1.00)" in table and "| n/a |" in table

    page = tmp_path / "page.md"
    page.write_text("a\n<!-- t:start -->\nold\n<!-- t:end -->\nb\n")
    bench.replace_section(str(page), "t", table)
    text = page.read_text()
    assert text.startswith("a\n<!-- t:start -->\nmlp, batch 4")
    assert text.endswith("|\n<!-- t:end -->\nb\n")
    assert "old" not in text
    with pytest.raises(ValueError, match="replace_section: expected"):
        bench.replace_section(str(page), "other", table)


def test_the_core_does_not_import_the_bench():
    import subprocess

    code = "import bayesflow, sys; sys.exit('bayesflow.bench' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
