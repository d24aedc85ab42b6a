r"""Tests for the benchmark package behind `bayesflow bench`."""

import ast
import copy
import dataclasses
import json
import math
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


EXACT = (
    "deterministic",
    "zuko-loop",
    "sample-model-loop",
    "loop",
    "vmap",
    "bmm",
    "limit",
    "torch-func",
)
STEPS = ("nelbo", "nelbo-grad", "nelbo-local", "nelbo-flipout")  # training only

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
                if bench.METHODS[method].noise in (Noise.FLAT, Noise.ZUKO, Noise.NONE)
                else "statistically"
            )
            assert r["detail"].startswith(f"checked {kind}"), r
            if bench.METHODS[method].oracle is not None:
                assert r["detail"].endswith("and exactly against bayesflow's loop"), r
    if method in EXACT:
        assert by["forward"]["status"] is Status.OK, by["forward"]
        train = Status.NOT_APPLICABLE if method == "sample-model-loop" else Status.OK
        assert by["train"]["status"] is train, by["train"]
    if method in STEPS:
        assert by["forward"]["status"] is Status.NOT_APPLICABLE, by["forward"]
        assert by["train"]["status"] is Status.OK, by["train"]
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


def test_a_peer_installed_but_broken_is_not_said_to_be_missing(monkeypatch, tmp_path):
    # Any ImportError read "not installed", its message dropped: a peer built for another
    # torch looked absent.
    (tmp_path / "pyro").mkdir()
    (tmp_path / "pyro" / "__init__.py").write_text("from torch import a_name_torch_lacks\n")
    for name in [m for m in sys.modules if m == "pyro" or m.startswith("pyro.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    records = _run(["mlp"], ["pyro"], modes=("forward",))
    assert {r["status"] for r in records} == {Status.UNSUPPORTED}
    assert all("a_name_torch_lacks" in r["detail"] for r in records)


def test_peers_not_installed(monkeypatch, tmp_path, capsys):
    for name in PEER_MODULES:  # an import of None raises ImportError
        monkeypatch.setitem(sys.modules, name, None)
    records = _run(["mlp"], list(PEERS))
    assert {r["status"] for r in records} == {Status.NOT_INSTALLED}
    assert all("bash scripts/peers.sh installs" in r["detail"] for r in records)
    assert all(r["median_ms"] is None for r in records)
    table = bench.format_table(records)
    assert (
        "posteriors: not installed (ModuleNotFoundError on import posteriors; bash scripts"
        in table
    )
    assert "is not installed (" not in table

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


def _own_noise(logvar_scale):
    # A method with its own noise (as a peer) whose log-variance gradients are scaled.
    def build(case, K, mode, fn, args, **options):
        step = _biased_build(1.0)(case, K, mode, fn, args, **options)

        def run(seed):
            losses, grads = step(seed)
            scaled = {
                k: logvar_scale * g if k.startswith("logvar:") else g for k, g in grads.items()
            }
            return losses, scaled

        return run

    return bench.Method("own", build, Noise.OWN, targets=None, kl=True)


@pytest.mark.parametrize("logvar_scale", [1.0, 0.0, 2.0])
def test_own_noise_log_variance_gradients_are_checked(logvar_scale):
    # A peer's gradients with respect to its standard-deviation parameter were not checked:
    # zeroed, they passed. Their expectation is small next to their spread, so their
    # squared norm is what catches them; at the default number of samples, as the CLI.
    (r,) = _run(
        ["mlp"], [], modes=("train",), extra={"own": _own_noise(logvar_scale)},
        check_samples=bench.checks.STATISTICAL_SAMPLES,
    )  # fmt: skip
    if logvar_scale == 1.0:
        assert r["status"] is Status.OK and r["detail"] == "checked statistically", r
    else:
        assert r["status"] is Status.WRONG, r
        assert "squared norm of the gradient of logvar:" in r["detail"], r


@pytest.mark.parametrize("peer", ["bayesian-torch", "posteriors", "pyro"])
def test_peers_std_gradients_reach_the_check(peer):
    # Each peer's gradient with respect to its own standard-deviation parameter comes taken
    # to the log-variance: zeroed, its training step is refused.
    pytest.importorskip(dict(zip(PEERS, PEER_MODULES, strict=False))[peer])
    base = bench.METHODS[peer]

    def build(case, K, mode, fn, args, **options):
        step = base.build(case, K, mode, fn, args, **options)

        def run(seed):
            losses, grads = step(seed)
            assert grads.keys() == bench.methods.bf_targets(case).keys()
            return losses, {k: 0 * g if k.startswith("logvar:") else g for k, g in grads.items()}

        return run

    zeroed = bench.Method("zeroed", build, Noise.OWN, targets=None, kl=True)
    records = _run(
        ["mlp"], [peer], modes=("train",), extra={"zeroed": zeroed},
        check_samples=bench.checks.STATISTICAL_SAMPLES,
    )  # fmt: skip
    by = {r["method"]: r for r in records}
    assert by[peer]["status"] is Status.OK, by[peer]
    assert by["zeroed"]["status"] is Status.WRONG, by["zeroed"]
    assert "squared norm of the gradient of logvar:" in by["zeroed"]["detail"]


def _nelbo_local(scale=1.0, offset=0.0):
    # nelbo-local's training step with its gradients scaled and its loss shifted.
    base = bench.METHODS["nelbo-local"]

    def build(case, K, mode, fn, args, **options):
        step = base.build(case, K, mode, fn, args, **options)

        def run(seed):
            loss, grads = step(seed)
            return loss + offset, {k: scale * g for k, g in grads.items()}

        return run

    return bench.Method("variant", build, Noise.LOCAL, targets=None, kl=True)


def _negated_local_trick(case, K, mode, fn, args, **options):
    # local-trick's outputs, on a posterior whose values are the same but whose gradients
    # are negated: only the gradients tell it from local-trick.
    g = torch.Generator()
    q = case.posterior

    def run(seed):
        flip = {k: 2 * v.detach() - v for k, v in q.mean.items()}
        flip_logvar = {k: 2 * v.detach() - v for k, v in q.logvar.items()}
        g.manual_seed(seed or 0)
        return bf.local_call(
            case.module, bf.Posterior(flip, flip_logvar), K, *args, fn=fn, generator=g
        )

    return run


LOCAL_VARIANTS = {
    "nelbo-local": (_nelbo_local(), "ok"),
    "gradients-negated": (_nelbo_local(scale=-1.0), "gradient of"),
    "gradients-doubled": (_nelbo_local(scale=2.0), "gradient of"),
    "loss-plus-0.05": (_nelbo_local(offset=0.05), "loss mean off"),
    "local-trick-negated": (
        bench.Method("variant", _negated_local_trick, Noise.LOCAL),
        "gradient of",
    ),
}


@pytest.mark.parametrize("variant", LOCAL_VARIANTS)
def test_local_noise_training_steps_are_checked_statistically(variant):
    method, expected = LOCAL_VARIANTS[variant]
    # The default number of samples of a check (128), as in `bayesflow bench`: 32 draws of
    # 4 samples each (two calls at K = 2), against as many of the loop's.
    (r,) = _run(
        ["mlp"], [], modes=("train",), extra={"variant": method},
        check_samples=bench.checks.STATISTICAL_SAMPLES,
    )  # fmt: skip
    if expected == "ok":
        assert r["status"] is Status.OK and r["detail"] == "checked statistically", r
        assert r["error"] <= 5.0
    else:
        assert r["status"] is Status.WRONG and r["median_ms"] is None, r
        assert r["detail"].startswith(expected), r


LOCAL = ("local-trick", "nelbo-local", "nelbo-flipout")


def _one_sample(name):
    # The method on one sample, its outputs (or training step) passed off as K: an unbiased
    # estimate, K times noisier.
    base = bench.METHODS[name]

    def build(case, K, mode, fn, args, **options):
        run = base.build(case, 1, mode, fn, args, **options)

        def one(seed):
            out = run(seed)
            return out if isinstance(out, tuple) else out.expand(K, *out.shape[1:])

        return one

    return dataclasses.replace(base, build=build)


def _late_samples_scaled(name):
    # The method with its samples past the 4th 3 times too large, as a bug in a later
    # chunk would make them.
    base = bench.METHODS[name]

    def build(case, K, mode, fn, args, **options):
        run = base.build(case, K, mode, fn, args, **options)

        def late(seed):
            out = run(seed)
            scale = torch.ones(K, *(1,) * (out.dim() - 1), dtype=out.dtype)
            scale[4:] = 3.0
            return scale * out

        return late

    return dataclasses.replace(base, build=build)


WRONG_LOCAL = {
    **{f"one-sample:{name}": _one_sample(name) for name in LOCAL},
    "late-samples:local-trick": _late_samples_scaled("local-trick"),
}


@pytest.mark.parametrize("variant", [*LOCAL, *WRONG_LOCAL])
def test_local_methods_are_checked_against_their_loop_at_the_timed_k(variant):
    # Checked statistically only, on steps of 4 samples built for them, both wrong methods
    # passed and were timed at K = 8. The loop on the same draws (vectorized=False), at the
    # K timed and with the object timed, tells them.
    method = WRONG_LOCAL.get(variant) or bench.METHODS[variant]
    (r,) = _run(
        ["mlp"], [], samples=(8,), modes=("train",), extra={variant: method},
        check_samples=bench.checks.STATISTICAL_SAMPLES,
    )  # fmt: skip
    if variant in LOCAL:
        assert r["status"] is Status.OK and r["median_ms"] is not None, r
        assert r["detail"] == "checked statistically, and exactly against bayesflow's loop", r
    else:
        assert r["status"] is Status.WRONG and r["median_ms"] is None, r
        assert r["detail"].endswith(", against bayesflow's loop (vectorized=False)"), r


def _wrong_at_one_sample(scale):
    # Its own noise, off by `scale` when built for one sample only (a special path, as a
    # plain call for K = 1 would be).
    def build(case, K, mode, fn, args, **options):
        return _biased_build(scale if K == 1 else 1.0)(case, K, mode, fn, args, **options)

    return build


@pytest.mark.parametrize("scale", [1.0, 1.25])
@pytest.mark.parametrize("mode", ["forward", "train"])
def test_statistical_checks_build_the_method_at_the_timed_k(mode, scale):
    # Built at max(K, 128) samples (forward) or at the 4 of a training step, a method
    # wrong at the K timed only passed; now it is called at K until it has as many.
    method = bench.Method("own", _wrong_at_one_sample(scale), Noise.OWN, targets=None)
    (r,) = _run(
        ["mlp"], [], samples=(1,), modes=(mode,), extra={"own": method},
        check_samples=bench.checks.STATISTICAL_SAMPLES,
    )  # fmt: skip
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


def test_tables_of_loaded_records_read_as_live_ones(records, tmp_path):
    # A record loaded from JSON holds the status as a plain string: the tables must show
    # it as they show the live enum member (a failed cell in capitals).
    live = [dict(r) for r in records]
    wrong = next(r for r in live if r["method"] == "vmap" and r["mode"] == "forward")
    wrong.update(status=Status.WRONG, median_ms=None, iqr_ms=None, detail="off by 1")
    bench.write_json(live, tmp_path / "r.json")
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert any(r["status"] == "wrong" and type(r["status"]) is str for r in loaded)
    for table in (bench.format_table, bench.markdown_table):
        assert "WRONG" in table(live)
        assert table(loaded) == table(live)


def test_ratios_and_tables_are_those_of_each_run():
    records = []
    for dtype in (torch.float32, torch.float64):  # two runs into one list
        methods = ["deterministic", "vmap", "bmm"]
        _run(["mlp"], methods, modes=("forward",), dtype=dtype, records=records)
    assert [r["dtype"] for r in records] == ["float32"] * 3 + ["float64"] * 3

    # The oracle: each record over the references of its own run.
    runs = {
        d: {r["method"]: r for r in records if r["dtype"] == d} for d in ("float32", "float64")
    }
    for r in records:
        mine = runs[r["dtype"]]
        assert r["ratio_to_bmm"] == r["median_ms"] / mine["bmm"]["median_ms"], r
        assert r["ratio_to_deterministic"] == r["median_ms"] / mine["deterministic"]["median_ms"]

    # One table per run, each dividing by its own run's bmm.
    tables = bench.format_table(records).split("\n\n")
    for dtype, table in zip(runs, tables, strict=True):
        assert table.startswith(f"mlp · forward · batch 4 · cpu {dtype} · ")
        vmap = next(line for line in table.splitlines() if line.startswith("  vmap "))
        # The ratio as shown (six characters: 1.23b, 12.3b, 123b), to its last digit.
        shown = vmap.split()[-1]
        assert shown.endswith("b"), vmap
        digits = shown[:-1].partition(".")[2]
        error = abs(float(shown[:-1]) - runs[dtype]["vmap"]["ratio_to_bmm"])
        assert error <= 0.5 * 10 ** -len(digits) + 1e-12, vmap
    markdown = bench.markdown_table(records)
    assert "mlp, batch 4, cpu float32," in markdown and "mlp, batch 4, cpu float64," in markdown
    assert markdown.count("| bmm |") == 2


def test_markdown_table(records, tmp_path):
    table = bench.markdown_table(records)
    assert "| method | fwd K=2 | train K=2 |" in table
    assert "| bmm | " in table and "(1.00b)" in table and "| n/a |" in table
    assert "in parentheses time / bmm (b)" in table

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


def test_deterministic_is_the_plain_module():
    case = bench.make_case("mlp", batch=4, dtype=torch.float64)
    module_before = {k: v.clone() for k, v in case.module.state_dict().items()}
    mean_before = {k: v.clone() for k, v in case.posterior.mean.items()}
    fn, args = case.fn, case.args

    forward = bench.METHODS["deterministic"].build(case, 3, "forward", fn, args)
    assert torch.equal(forward(0), case.module(*args).unsqueeze(0))  # one plain call

    step = bench.METHODS["deterministic"].build(case, 3, "train", fn, args)
    losses, grads = step(0)
    # The oracle: the loss of the module itself and its gradient, by autograd on a copy.
    net = copy.deepcopy(case.module)
    loss = (net(*args) - case.target).square().mean()
    loss.backward()
    assert torch.allclose(losses, loss.detach().unsqueeze(0), atol=1e-12)
    for name, p in net.named_parameters():
        assert torch.allclose(grads[f"mean:{name}"], p.grad, atol=1e-12), name

    # The step really stepped (on its own copy): the next loss is lower.
    again, _ = step(None)
    assert again < losses
    # The case is left as it was.
    for k, v in case.module.state_dict().items():
        assert torch.equal(v, module_before[k]), k
    for k, v in case.posterior.mean.items():
        assert torch.equal(v, mean_before[k]), k


def test_a_training_cell_whose_gradients_reach_nothing_is_wrong():
    # Detached samples (a regression of sample or vmap_call) raised torch's "does not
    # require grad" in the training cell: reported unsupported, and the run exited 0.
    def build(case, K, mode, fn, args, chunk_size=None):
        g = torch.Generator()

        def run(seed):
            if seed is not None:
                g.manual_seed(seed)
            params = bf.sample(case.posterior, K, generator=g)
            params = {k: v.detach() for k, v in params.items()}
            return bf.vmap_call(case.module, params, *args, fn=fn, fallback=False)

        return run

    method = bench.Method("detached", build, bench.Noise.FLAT, True)
    records = bench.run_bench(
        ["mlp"], [4], ["forward", "train"], [], extra={"detached": method}, progress=False,
        min_time=0.001, repeats=1, dtype=torch.float64,
    )  # fmt: skip
    status = {r["mode"]: r["status"] for r in records}
    assert status == {"forward": bench.Status.OK, "train": bench.Status.WRONG}


def test_records_carry_the_tables_ratios_to_the_plain_step():
    # The tables left d out for gradient-only training cells; the JSON and CSV records
    # still carried it.
    records = bench.run_bench(
        ["mlp"], [2], ["forward", "train"], ["deterministic", "vmap", "nelbo"],
        progress=False, min_time=0.001, repeats=1, dtype=torch.float64,
    )  # fmt: skip
    ratios = {(r["method"], r["mode"]): r["ratio_to_deterministic"] for r in records}
    assert ratios[("vmap", "train")] is None
    assert ratios[("nelbo", "train")] is not None and ratios[("vmap", "forward")] is not None


def test_deterministic_trains_what_the_posterior_covers():
    # The plain step trained every parameter, a last-layer posterior's frozen trunk too:
    # 8 Bayesian samples read 0.37x a "plain" step that did another model's work.
    case = bench.make_case("last-layer", batch=4, dtype=torch.float64)
    names = set(case.posterior.mean)
    step = bench.METHODS["deterministic"].build(case, 1, "train", case.fn, case.args)
    step(0)
    cells = [c.cell_contents for c in step.__closure__]
    net = next(c for c in cells if isinstance(c, torch.nn.Module))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step(None)
    after = net.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    assert changed == names and len(names) < len(after)


def test_deterministic_is_checked_against_the_mean_model(monkeypatch):
    def shifted(case, K, mode, fn, args, **options):
        net = copy.deepcopy(case.module)
        with torch.no_grad():
            next(net.parameters()).add_(0.1)
        return lambda seed: fn(net, *args).unsqueeze(0)

    method = bench.Method("shifted", shifted, Noise.NONE, False, None, uses_k=False)
    records = _run(["mlp"], [], modes=("forward",), extra={"shifted": method})
    assert [r["status"] for r in records] == [Status.WRONG]


def _assert_the_loop_nelbo(case, K, seed, loss, grads):
    r"""The oracle of a `nelbo` cell: the loop's negative ELBO on the same generator state,
    differentiated."""

    q = bf.Posterior(
        {k: v.detach().clone().requires_grad_() for k, v in case.posterior.mean.items()},
        {k: v.detach().clone().requires_grad_() for k, v in case.posterior.logvar.items()},
    )
    want = bf.loop_nelbo(
        case.module, q, *case.args,
        fn=lambda m, x: -(m(x) - case.target).square(),
        num_data=bench.methods.NUM_DATA, n=K, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    want.backward()
    assert torch.allclose(loss, want.detach(), atol=1e-12)
    for name in q.mean:
        assert torch.allclose(grads[f"mean:{name}"], q.mean[name].grad, atol=1e-12)
        assert torch.allclose(grads[f"logvar:{name}"], q.logvar[name].grad, atol=1e-12)


def test_nelbo_step_is_the_loop_nelbo_and_adam():
    case = bench.make_case("mlp", batch=4, dtype=torch.float64)
    before = {k: v.clone() for k, v in case.posterior.mean.items()}
    K, seed = 3, 5
    step = bench.METHODS["nelbo"].build(case, K, "train", case.fn, case.args)
    loss, grads = step(seed)

    _assert_the_loop_nelbo(case, K, seed, loss, grads)

    again, _ = step(None)  # Adam moved its own copy of the posterior
    assert not torch.equal(again, loss)
    for k, v in case.posterior.mean.items():
        assert torch.equal(v, before[k]), k


def test_nelbo_grad_is_the_loop_nelbo_and_its_gradients_without_a_step():
    case = bench.make_case("mlp", batch=4, dtype=torch.float64)
    K, seed = 3, 5
    step = bench.METHODS["nelbo-grad"].build(case, K, "train", case.fn, case.args)
    loss, grads = step(seed)
    _assert_the_loop_nelbo(case, K, seed, loss, grads)
    assert any(g.abs().max() > 0 for g in grads.values())

    step(None)  # no optimizer step: the same seed gives the same loss and gradients
    again, grads_again = step(seed)
    assert torch.equal(again, loss)
    for name, g in grads.items():
        assert torch.equal(grads_again[name], g), name
    assert not bench.methods.comparable("nelbo-grad", "train")  # gradients alone: no `d` ratio


@pytest.mark.parametrize("model", ["wide-mlp", "digits-cnn"])
def test_classifier_cases(model):
    case = bench.make_case(model, batch=3, dtype=torch.float64)
    assert case.batch == 3 and case.labels.shape == (3,)
    out = case.module(*case.args)
    # The loss is torch's cross-entropy; the log-likelihood its per-datum negative.
    ce = torch.nn.functional.cross_entropy(out, case.labels, reduction="none")
    assert torch.allclose(case.loglik(out), -ce, atol=1e-12)
    stacked = torch.stack([out, 2 * out])
    want = torch.stack([ce.mean(), torch.nn.functional.cross_entropy(2 * out, case.labels)])
    assert torch.allclose(case.loss(stacked), want, atol=1e-12)

    records = _run([model], ["deterministic", "loop", "vmap"], batch=3)
    assert {r["status"] for r in records} == {Status.OK}, records


def test_digits_cnn_is_notebook_05s():
    case = bench.make_case("digits-cnn")
    assert case.batch == 540
    kinds = [type(m).__name__ for m in case.module]
    assert kinds.count("Conv2d") == 2 and kinds.count("MaxPool2d") == 2
    assert kinds.count("Linear") == 2
    assert sum(p.numel() for p in case.module.parameters()) == 5_863  # as notebook 05 prints


def test_batch_sweep_and_loop_limit():
    records = _run(
        ["mlp"], ["deterministic", "loop", "vmap"], samples=(1, 2), modes=("forward",),
        batch=[3, 5], max_loop_samples=1,
    )  # fmt: skip
    cells = {(r["batch"], r["method"], r["samples"]) for r in records}
    for b in (3, 5):
        assert {(b, "vmap", 1), (b, "vmap", 2), (b, "loop", 1)} <= cells
        assert (b, "loop", 2) not in cells  # above the loops' limit
    det = [r for r in records if r["method"] == "deterministic" and r["batch"] == 3]
    assert len(det) == 2 and det[0]["median_ms"] == det[1]["median_ms"]  # measured once
    assert "independent of K" in det[1]["detail"]
    table = bench.format_table(records)
    assert "mlp · forward · batch 3" in table and "mlp · forward · batch 5" in table


def _record(method, K, ms, iqr=0.0, mode="forward", status=Status.OK, detail="checked exactly"):
    return {
        "model": "mlp", "method": method, "samples": K, "mode": mode, "batch": 64,
        "device": "cpu", "dtype": "float32", "threads": 1, "status": status, "detail": detail,
        "median_ms": ms if status is Status.OK else None, "iqr_ms": iqr,
    }  # fmt: skip


def test_table_words_follow_the_methods_that_ran():
    rs = [_record("loop", 8, 2.0), _record("vmap", 8, 1.0)]
    table = bench.format_table(rs)
    assert "speed-up over loop (x)" in table and "zuko-loop" not in table
    assert " 2.0x" in table
    assert "(d)" not in table and "(b)" not in table

    table = bench.format_table([_record("vmap", 8, 1.0), _record("deterministic", 8, 0.5)])
    assert "speed-up" not in table and "time / deterministic (d)" in table
    assert " 2.00d" in table

    md = bench.markdown_table(rs)
    assert "bmm" not in md and "time /" not in md.split("\n")[0]


def test_fastest_never_calls_a_slowdown_best():
    rs = [
        _record("zuko-loop", 32, 10.0),
        _record("loop", 32, 6.25),
        _record("vmap", 32, 12.5),
        _record("bmm", 32, 1.0),
    ]
    line = next(x for x in bench.format_table(rs).splitlines() if "fastest" in x)
    assert line.strip() == "fastest: K=32 loop 1.6x (best vectorized: vmap 0.8x)"


def test_noisy_cells_are_flagged():
    quiet = bench.format_table([_record("vmap", 8, 1.0, iqr=0.05)])
    assert "~" not in quiet
    noisy = bench.format_table([_record("vmap", 8, 1.0, iqr=0.5)])
    assert "1.00~" in noisy and "~ noisy" in noisy
    assert "1.00~" in bench.markdown_table([_record("vmap", 8, 1.0, iqr=0.5)])


def test_cost_table():
    rs = [
        _record("deterministic", 1, 0.5),
        _record("vmap", 1, 1.0),
        _record("deterministic", 1, 2.0, mode="train"),
        _record("nelbo", 1, 3.0, mode="train"),
        _record("nelbo-local", 1, None, mode="train", status=Status.NOT_APPLICABLE),
        _record("nelbo-flipout", 1, 5.0, mode="train", iqr=2.0),
    ]
    table = bench.cost_table(rs)
    row = table.splitlines()[2]
    assert row == (
        "| mlp | 64 | 0.50 | **2.00x** (1.00) | 2.00 | **1.50x** (3.00) | n/a "
        "| **2.50x** (5.00~) |"
    )
    assert "~ noisy" in table

    sweep = bench.SWEEPS["cost"]
    assert sweep["samples"] == [1]
    assert {"mlp", "wide-mlp", "digits-cnn", "lstm", "transformer"} == set(sweep["models"])
    assert set(bench.sweeps.COST) == set(sweep["methods"])


def test_flows_table():
    def flow(model, method, K, ms, **kwargs):
        return {**_record(method, K, ms, **kwargs), "model": model}

    rs = [
        # nsf: the loop limited to K = 8 (max_loop_samples), a noisy vmap at K = 32.
        flow("nsf", "deterministic", 8, 1.0),
        flow("nsf", "zuko-loop", 8, 80.0),
        flow("nsf", "vmap", 8, 10.0),
        flow("nsf", "deterministic", 32, 1.0),
        flow("nsf", "vmap", 32, 40.0, iqr=20.0),
        # maf: vmap out of memory at K = 32, where the loop ran; the loop unsupported at 8.
        flow("maf", "zuko-loop", 8, None, status=Status.UNSUPPORTED),
        flow("maf", "vmap", 8, 5.0),
        flow("maf", "zuko-loop", 32, 320.0),
        flow("maf", "vmap", 32, None, status=Status.OOM),
    ]
    table = bench.flows_table(rs, {"maf": "MAF", "nsf": "NSF"})
    # Each row is about its K: the speed-up divides the loop and vmap at that K only.
    assert table.splitlines()[2:] == [
        "| MAF | forward | 8 | not run | unsupported | 5.00 | - |",
        "| MAF | forward | 32 | not run | 320 | oom | - |",
        "| NSF | forward | 8 | 1.00 | 80.0 | 10.0 | 8.0x |",
        "| NSF | forward | 32 | 1.00 | not run | 40.0~ | - |",
    ]


@pytest.mark.parametrize("duration", [2e-6, 1e-4, 0.05])
def test_each_measurement_lasts_min_time_over_repeats(duration, monkeypatch):
    # A call of known duration on a fake clock, the one torch's Timer reads: the
    # calibration's arithmetic, not the speed of anything.
    import timeit

    now = [0.0]

    def call():
        now[0] += duration

    monkeypatch.setattr(timeit, "default_timer", lambda: now[0])
    min_time, repeats = 0.03, 3
    t = bench.measure.time_call(call, 1, torch.device("cpu"), min_time, repeats)
    assert t["median_ms"] == pytest.approx(duration * 1e3)
    budget = min_time / repeats
    if duration < budget:
        assert t["runs"] == repeats
        assert t["calls_per_run"] * duration == pytest.approx(budget, rel=0.05)
    else:  # single calls, about 2 * min_time of them
        assert t["calls_per_run"] == 1 and t["runs"] == 3


def _zero_logvar_gradients(case, K, mode, fn, args, **options):
    # vmap's training step with every log-variance gradient replaced by zeros.
    from bayesflow.bench.run import _wrap_mode

    vmap = bench.METHODS["vmap"]
    step = _wrap_mode(vmap, case, vmap.build(case, K, mode, fn, args, **options), mode)

    def run(seed):
        losses, grads = step(seed)
        return losses, {k: 0 * g if k.startswith("logvar:") else g for k, g in grads.items()}

    return run


def test_small_gradients_are_checked_on_their_own_scale():
    # The LSTM's log-variance gradients are all below 2e-4 (float32's tolerance): an
    # absolute bound would let zeros pass.
    method = bench.Method("zeroed", _zero_logvar_gradients, targets=None)
    records = _run(
        ["lstm"], ["vmap"], modes=("train",), dtype=torch.float32, extra={"zeroed": method}
    )
    by = {r["method"]: r for r in records}
    assert by["vmap"]["status"] is Status.OK, by["vmap"]  # float32 rounding passes
    assert by["zeroed"]["status"] is Status.WRONG, by["zeroed"]
    assert "(gradient of logvar:" in by["zeroed"]["detail"]


def test_a_model_without_a_sample_mode_reports_its_cells():
    records = _run(["mlp"], ["loop", "vmap"], modes=("sample",))
    assert [(r["method"], r["status"]) for r in records] == [
        ("loop", Status.NOT_APPLICABLE),
        ("vmap", Status.NOT_APPLICABLE),
    ]
    assert all(r["detail"] == "mlp has no sample mode" for r in records)
    assert "loop: n/a (mlp has no sample mode)" in bench.format_table(records)


@pytest.mark.parametrize("method", ["vmap", "local-trick", "torch-func"])
def test_chunk_size_reaches_the_vectorized_methods(method, monkeypatch):
    seen = []
    for owner, name in ((bf, "vmap_call"), (bf, "local_call"), (torch, "vmap")):
        original = getattr(owner, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs.get("chunk_size"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, spy)
    (r,) = _run(["mlp"], [method], modes=("forward",), chunk_size=2)
    assert r["status"] is Status.OK and r["chunk_size"] == 2, r
    assert 2 in seen, seen


def test_json_is_standard_and_keeps_why_a_check_failed(tmp_path):
    def one_sample(case, K, mode, fn, args, **options):
        return lambda seed: fn(case.module, *args).unsqueeze(0)  # one sample, not K

    method = bench.Method("one", one_sample)
    (r,) = _run(["mlp"], [], modes=("forward",), extra={"one": method})
    assert r["status"] is Status.WRONG and "shape (1, 4, 5) != (2, 4, 5)" in r["detail"], r

    bench.write_json([r], tmp_path / "r.json")

    def reject(constant):
        raise ValueError(f"not standard JSON: {constant}")

    (loaded,) = json.loads((tmp_path / "r.json").read_text(), parse_constant=reject)
    assert loaded["error"] is None and loaded["detail"] == r["detail"]


def _scaled_deterministic(scale):
    base = bench.METHODS["deterministic"]

    def build(case, K, mode, fn, args, **options):
        step = base.build(case, K, mode, fn, args, **options)

        def run(seed):
            losses, grads = step(seed)
            return losses, {k: scale * g for k, g in grads.items()}

        return run

    return bench.Method("scaled", build, Noise.NONE, targets=None, uses_k=False)


def test_the_plain_cnf_is_checked_to_its_adjoints_accuracy():
    # zuko's ODE adjoint is 1.3% off (bayesflow's loop agrees with a finite difference):
    # within the CNF's tolerance, and said so; a gradient 20% off is still wrong.
    records = _run(
        ["cnf"], ["deterministic"], modes=("train",), threads=1,
        extra={"scaled": _scaled_deterministic(1.2)},
    )  # fmt: skip
    by = {r["method"]: r for r in records}
    assert by["deterministic"]["status"] is Status.OK, by["deterministic"]
    assert "ODE adjoint" in by["deterministic"]["detail"]
    assert 1e-3 < by["deterministic"]["error"] < 5e-2
    assert by["scaled"]["status"] is Status.WRONG, by["scaled"]


def test_small_settings_of_the_slow_flows():
    full, small = (bench.make_case("cnf", batch=2, small=s) for s in (False, True))
    count = sum(p.numel() for p in small.module.parameters())
    assert count < sum(p.numel() for p in full.module.parameters())
    assert bench.make_case("mlp", batch=2, small=True).posterior.mean.keys() == (
        bench.make_case("mlp", batch=2).posterior.mean.keys()
    )
    (r,) = _run(["cnf"], ["deterministic"], modes=("forward",), small=True, threads=1)
    assert r["small"] is True and "small settings" in bench.format_table([r])
    (r,) = _run(["mlp"], ["deterministic"], modes=("forward",), small=True)
    assert r["small"] is False  # the same model either way


def _local_trick_variance(factor):
    # The local trick on a posterior whose variances are off by `factor`.
    def build(case, K, mode, fn, args, **options):
        g = torch.Generator()
        q = case.posterior
        wrong = bf.Posterior(q.mean, {k: v + math.log(factor) for k, v in q.logvar.items()})

        def run(seed):
            g.manual_seed(seed or 0)
            return bf.local_call(case.module, wrong, K, *args, fn=fn, generator=g)

        return run

    return bench.Method("variance", build, Noise.LOCAL)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_statistical_check_of_the_output_variance(factor, seed):
    (r,) = _run(
        ["mlp"], [], modes=("forward",), batch=16, seed=seed, extra={"v": _local_trick_variance(factor)},
        check_samples=bench.checks.STATISTICAL_SAMPLES,
    )  # fmt: skip
    if factor == 1.0:
        assert r["status"] is Status.OK, r
    else:
        assert r["status"] is Status.WRONG and "variances by" in r["detail"], r


def test_non_finite_values_of_the_loop_are_compared_too():
    # A non-finite value in the loop's gradient made the error NaN, which max() passed
    # over: a method that returned that gradient as zeros was "ok, checked exactly".
    from bayesflow.bench.checks import _compare

    ref = torch.tensor([1.0, -2.0, math.inf, 0.5])
    losses = (torch.ones(3), torch.ones(3))
    cases = {
        "zeros": (torch.zeros(4), False),
        "the same inf": (ref.clone(), True),
        "the same inf, a finite value off": (torch.tensor([1.0, -2.5, math.inf, 0.5]), False),
        "-inf for inf": (torch.tensor([1.0, -2.0, -math.inf, 0.5]), False),
    }
    for name, (got, ok) in cases.items():
        check = _compare([("loss", *losses, 2e-4), ("gradient", got, ref, 2e-4)])
        assert check.ok is ok, name
        if not ok:
            assert "gradient" in check.detail, name
    nan = torch.tensor([1.0, math.nan])
    assert not _compare([("loss", *losses, 2e-4), ("gradient", nan.clone(), nan, 2e-4)]).ok
    # And the other way round: finite numbers where the loop's are finite pass as before.
    assert _compare([("gradient", ref[:2] * (1 + 1e-5), ref[:2], 2e-4)]).ok


def test_the_markdown_bold_leaves_the_references_aside(records):
    # The bold of a column went to `deterministic` or `limit` where the text table's
    # `fastest` line named the fastest method that is not a reference.
    fast = copy.deepcopy(records)
    for r in fast:
        if r["method"] == "bmm" and r["status"] == Status.OK:
            r["median_ms"] = 1e-6  # a reference faster than everything
    table = bench.markdown_table(fast)
    bmm_rows = [line for line in table.splitlines() if line.startswith("| bmm |")]
    assert bmm_rows and all("**" not in line for line in bmm_rows)
    assert "**" in table  # each column's fastest method that is not a reference


def test_a_crash_of_an_own_method_is_an_error_not_a_limitation(monkeypatch, tmp_path, capsys):
    # Any exception read "unsupported" and the run exited 0: a regression that made vmap
    # crash on a model it ran passed a job that reads the exit status.
    def crashing(case, K, mode, fn, args, **options):
        raise AttributeError("'Tensor' object has no attribute 'no_such_attribute'")

    vmap = dataclasses.replace(bench.METHODS["vmap"], build=crashing)
    monkeypatch.setitem(bench.METHODS, "vmap", vmap)
    refused = dataclasses.replace(bench.METHODS["loop"], build=_refusing)
    monkeypatch.setitem(bench.METHODS, "loop", refused)
    # zuko's code crashing in zuko's loop: a limitation of zuko's, not bayesflow's crash.
    zuko_loop = dataclasses.replace(bench.METHODS["zuko-loop"], build=crashing)
    monkeypatch.setitem(bench.METHODS, "zuko-loop", zuko_loop)
    out = tmp_path / "r.json"
    argv = ["bench", "--models", "mlp", "--samples", "2", "--modes", "forward", "--batch", "4"]
    argv += ["--methods", "vmap", "loop", "zuko-loop", "--min-time", "0.001", "--repeats", "1"]
    assert main([*argv, "--json", str(out), "--no-progress"]) == 1
    statuses = {r["method"]: r["status"] for r in json.loads(out.read_text())}
    assert statuses == {"vmap": "error", "loop": "unsupported", "zuko-loop": "unsupported"}
    err = capsys.readouterr().err
    assert "bayesflow bench: vmap crashed on mlp forward K=2: AttributeError" in err
    assert "loop" not in err  # limitations, not crashes of bayesflow's: no error


def test_the_cpu_allocators_failure_is_out_of_memory(monkeypatch, tmp_path):
    # A K too large for the CPU's memory read "vmap: unsupported": the CPU allocator's
    # error is a RuntimeError that does not say "out of memory".
    def allocating(case, K, mode, fn, args, **options):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
            "allocate memory: you tried to allocate 1947600000000 bytes. Error code 12 "
            "(Cannot allocate memory)"
        )

    monkeypatch.setitem(
        bench.METHODS, "vmap", dataclasses.replace(bench.METHODS["vmap"], build=allocating)
    )
    out = tmp_path / "r.json"
    argv = ["bench", "--models", "mlp", "--samples", "2", "--modes", "forward", "--batch", "4"]
    argv += ["--methods", "vmap", "loop", "--min-time", "0.001", "--repeats", "1"]
    assert main([*argv, "--json", str(out), "--no-progress"]) == 0
    records = {r["method"]: r for r in json.loads(out.read_text())}
    assert records["vmap"]["status"] == "oom" and records["loop"]["status"] == "ok"
    assert records["vmap"]["detail"] == "out of memory at K=2"


def _refusing(case, K, mode, fn, args, **options):
    raise ValueError("loop_call: expected something this model is not")


def _bench(tmp_path, *extra, samples=("2",), modes=("forward",), status=0):
    out = tmp_path / "r.json"
    argv = ["bench", "--models", "mlp", "--samples", *samples, "--modes", *modes]
    argv += ["--batch", "4", "--min-time", "0.001", "--repeats", "1", *extra]
    assert main([*argv, "--json", str(out), "--no-progress"]) == status
    return json.loads(out.read_text())


def test_a_programming_error_that_vmap_call_wraps_is_an_error(monkeypatch, tmp_path, capsys):
    # vmap_call(fallback=False) raises a RuntimeError from what stopped vmap: a KeyError of
    # bayesflow's own read "unsupported", and the run exited 0.
    from bayesflow import _engine

    def broken(*args, **kwargs):
        raise KeyError("a bug in the vectorized path")

    monkeypatch.setattr(_engine, "_vectorized", broken)
    records = _bench(tmp_path, "--methods", "vmap", "loop", status=1)
    statuses = {r["method"]: r["status"] for r in records}
    assert statuses == {"vmap": "error", "loop": "ok"}
    assert "vmap crashed on mlp forward K=2: KeyError" in capsys.readouterr().err


def test_zukos_sample_model_loop_failing_is_zukos_limitation(monkeypatch, tmp_path):
    # sample-model-loop runs zuko's code only: its error read "error" and exit 1.
    import zuko.bayesian

    def broken(self, *args, **kwargs):
        raise AttributeError("zuko's sample_model failed")

    monkeypatch.setattr(zuko.bayesian.BayesianModel, "sample_model", broken)
    records = _bench(tmp_path, "--methods", "sample-model-loop", "loop")
    statuses = {r["method"]: r["status"] for r in records}
    assert statuses == {"sample-model-loop": "unsupported", "loop": "ok"}


def _checked_then(after):
    r"""A build of bayesflow's loop whose timed calls (no seed) return `after(result)`."""

    loop = bench.METHODS["loop"].build

    def build(case, K, mode, fn, args, **options):
        run = loop(case, K, mode, fn, args, **options)
        return lambda seed: run(seed) if seed is not None else after(run(seed))

    return build


def _raises(result):
    raise ValueError("the tenth call fails")


def _diverged(result):
    return result * math.nan  # the outputs, hence the loss


@pytest.mark.parametrize("after", [_raises, _diverged], ids=["raises", "diverges"])
def test_a_timed_call_that_fails_is_that_cells_failure(after, monkeypatch, tmp_path):
    # A timed call that raised aborted the whole run, with no table and no JSON (a float16
    # training step after the checked one); one that diverged was timed and read "ok".
    method = dataclasses.replace(bench.METHODS["loop"], build=_checked_then(after))
    monkeypatch.setitem(bench.METHODS, "loop", method)
    records = _bench(tmp_path, "--methods", "loop", "vmap", modes=("train",))
    statuses = {r["method"]: r["status"] for r in records}
    assert statuses == {"loop": "unsupported", "vmap": "ok"}
    loop = next(r for r in records if r["method"] == "loop")
    assert loop["median_ms"] is None
    assert ("ValueError: the tenth call fails" if after is _raises else "diverged") in loop[
        "detail"
    ]


def test_float16_training_steps_stay_finite(tmp_path):
    # Adam's eps of 1e-8 rounds to 0 in float16: the steps after the checked one divided
    # zero by zero, and the run died in the timing of nelbo.
    records = _bench(
        tmp_path, "--methods", "deterministic", "nelbo", "--dtype", "float16", modes=("train",)
    )
    assert {r["method"]: r["status"] for r in records} == {"deterministic": "ok", "nelbo": "ok"}


def test_max_loop_samples_bounds_the_peers_python_loops(tmp_path):
    # bayesian-torch's forward passes and Pyro's Predictive loop over the K samples in Python.
    argv = ["--methods", "loop", "bayesian-torch", "pyro", "vmap", "--max-loop-samples", "1"]
    records = _bench(tmp_path, *argv, samples=("1", "2"))
    above = {r["method"] for r in records if r["samples"] == 2}
    assert above == {"vmap"}
    assert {r["method"] for r in records if r["samples"] == 1} == {
        "loop",
        "bayesian-torch",
        "pyro",
        "vmap",
    }


def test_records_carry_their_runs_seed(tmp_path):
    # The tables keep runs apart by date and seed: the records must hold the seed.
    records = _bench(tmp_path, "--methods", "loop", "--seed", "3")
    assert records and {r["seed"] for r in records} == {3}
