r"""Tests for the benchmark package behind `bayesflow bench`."""

import ast
import json
import sys

from pathlib import Path

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


EXACT = ("zuko-loop", "sample-model-loop", "loop", "vmap", "bmm", "limit", "torch-func")

# vmap-compiled is vmap under torch.compile, whose cold compile alone takes half a minute:
# test_compile.py checks that against the loop, forward and training step.
METHODS = [m for m in bench.METHODS if m != "vmap-compiled"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_checked_before_it_is_timed(method):
    records = _run(["mlp"], [method])
    by = {r["mode"]: r for r in records}
    assert set(by) == {"forward", "train"}

    for r in records:
        assert r["status"] in (Status.OK, Status.NOT_APPLICABLE, Status.NOT_INSTALLED), r
        assert (r["median_ms"] is not None) == (r["status"] is Status.OK)
        if r["status"] is Status.OK:
            kind = (
                "exactly"
                if bench.METHODS[method].noise in (Noise.FLAT, Noise.ZUKO)
                else "statistically"
            )
            assert r["detail"] == f"checked {kind}", r
    if method in EXACT:
        assert by["forward"]["status"] is Status.OK, by["forward"]
        train = Status.NOT_APPLICABLE if method == "sample-model-loop" else Status.OK
        assert by["train"]["status"] is train, by["train"]
    if method == "pyro-vec":
        assert by["forward"]["status"] in (Status.NOT_APPLICABLE, Status.NOT_INSTALLED)


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
    records = _run([model], ["zuko-loop", "loop", "vmap"], batch=2)
    assert len(records) == 6
    for r in records:
        assert r["status"] is Status.OK and r["detail"] == "checked exactly", r

    (local,) = _run([model], ["local-trick"], batch=2, modes=("forward",))
    expected = {
        "lstm": Status.NOT_APPLICABLE,  # no linear layer
        "cnn": Status.OK,
        "last-layer": Status.OK,
        "transformer": Status.UNSUPPORTED,  # attention reads its weights directly
    }[model]
    assert local["status"] is expected, local


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


@pytest.fixture(scope="module")
def records():
    return _run(["mlp"], ["vmap", "sample-model-loop", "bmm"])


def test_status_in_json_and_csv(records, tmp_path):
    bench.write_json(records, tmp_path / "r.json")
    bench.write_csv(records, tmp_path / "r.csv")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert {r["status"] for r in loaded} == {"ok", "n/a"}
    assert all(Status(r["status"]).value == r["status"] for r in loaded)
    assert "Status." not in (tmp_path / "r.csv").read_text()
    ratios = {(r["method"], r["mode"]): r["ratio_to_bmm"] for r in loaded}
    assert ratios["bmm", "forward"] == 1.0 and ratios["vmap", "forward"] > 0
    assert ratios["sample-model-loop", "train"] is None


def test_markdown_table(records, tmp_path):
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
    root = Path(bf.__file__).parent
    for path in root.glob("*.py"):  # the core: everything but the bench package
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or "", *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("bench" in n.split(".") for n in names), (path.name, names)
