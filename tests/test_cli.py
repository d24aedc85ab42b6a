r"""Tests for the `bayesflow bench` command line."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import bayesflow as bf

from bayesflow import bench
from bayesflow.cli import main

KEYS = {
    "model",
    "method",
    "samples",
    "mode",
    "median_ms",
    "iqr_ms",
    "peak_mem_mb",
    "status",
    "detail",
    "device",
    "dtype",
    "threads",
    "versions",
    "batch",
}


def _wrong_build(case, K, mode, fn, args, **options):
    # The vectorized path, off by 1%: a method that must be caught before it is timed.
    def run(seed):
        device = next(iter(case.posterior.mean.values())).device  # the case's, not the tests'
        g = torch.Generator(device).manual_seed(seed) if seed is not None else None
        params = bf.sample(case.posterior, K, generator=g)
        return 1.01 * bf.vmap_call(case.module, params, *args, fn=fn)

    return run


def _broken_build(case, K, mode, fn, args, **options):
    def run(seed):
        raise NotImplementedError("cannot batch this")

    return run


def test_quick(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    code = main(
        [
            "bench",
            "--quick",
            "--threads",
            "1",
            "--json",
            str(out_json),
            "--csv",
            str(out_csv),
            "--plot",
            str(out_png),
        ]
    )
    assert code == 0

    records = json.loads(out_json.read_text())
    assert records
    for r in records:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["status"] in ("ok", "unsupported", "n/a", "not installed"), r
        assert (r["median_ms"] is not None) == (r["status"] == "ok")
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["iqr_ms"] >= 0
            assert r["detail"].startswith("checked")

    seen = {(r["model"], r["mode"], r["method"]) for r in records}
    for model in ("mlp", "nsf"):
        for mode in ("forward", "train"):
            for method in ("zuko-loop", "loop", "vmap"):
                assert (model, mode, method) in seen
    assert ("nsf", "sample", "vmap") in seen
    mlp_sample = [r for r in records if r["model"] == "mlp" and r["mode"] == "sample"]
    assert mlp_sample and all(r["status"] == "n/a" for r in mlp_sample)  # none for an MLP

    ok = {(r["model"], r["mode"], r["method"]) for r in records if r["status"] == "ok"}
    assert ("mlp", "forward", "vmap") in ok
    assert ("mlp", "forward", "bmm") in ok
    assert ("mlp", "train", "limit") in ok
    assert ("nsf", "forward", "bmm") in ok
    assert ("mlp", "train", "zuko-loop") in ok
    assert ("nsf", "forward", "vmap") in ok

    assert out_png.stat().st_size > 1000
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert {"model", "method", "samples", "mode", "median_ms", "torch_version"} <= set(rows[0])

    table = capsys.readouterr().out
    assert "mlp · forward" in table and "K=4" in table and "vmap" in table


def test_wrong_method_is_not_timed():
    wrong = bench.Method("wrong", _wrong_build)
    broken = bench.Method("broken", _broken_build)
    records = bench.run_bench(
        models=["mlp"],
        samples=[2],
        modes=["forward", "train"],
        methods=["loop"],
        batch=8,
        min_time=0.005,
        repeats=3,
        progress=False,
        extra={"wrong": wrong, "broken": broken},
    )
    by = {(r["method"], r["mode"]): r for r in records}

    for mode in ("forward", "train"):
        assert by["loop", mode]["status"] == "ok"
        assert by["wrong", mode]["status"] == "wrong", by["wrong", mode]["detail"]
        assert by["wrong", mode]["median_ms"] is None
        assert by["broken", mode]["status"] == "unsupported"
        assert by["broken", mode]["detail"].startswith("NotImplementedError")
        assert by["broken", mode]["median_ms"] is None

    assert "WRONG" in bench.format_table(records)


def test_wrong_method_fails_the_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bench.METHODS, "vmap", bench.Method("vmap", _wrong_build))
    out = tmp_path / "r.json"
    argv = ["bench", "--quick", "--models", "mlp", "--modes", "forward", "--methods", "loop"]
    code = main([*argv, "vmap", "--json", str(out), "--no-progress", "--threads", "1"])
    assert code == 1

    records = json.loads(out.read_text())
    vmap = [r for r in records if r["method"] == "vmap"]
    assert vmap and all(r["status"] == "wrong" and r["median_ms"] is None for r in vmap)
    assert "gave wrong numbers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--models", "resnet"],
        ["--modes", "backward"],
        ["--methods", "magic"],
        ["--samples", "-1"],
        ["--samples", "0"],
        ["--samples", "many"],
        ["--batch", "0"],
        ["--threads", "-2"],
        ["--dtype", "int8"],
        ["--sweep", "no-such-sweep"],
        ["--seed", "99999999999999999999999"],
        ["--seed", "many"],
    ],
    ids=lambda a: " ".join(a),
)
def test_bad_input(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "expected" in err or "invalid choice" in err
    # The bench's usage, wherever the error was found (after a sweep was merged too: the
    # top-level usage line said nothing of the bench's options).
    assert "usage: bayesflow bench" in err and "bayesflow bench: error:" in err


def test_no_command(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "bayesflow", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "--samples" in result.stdout and "--quick" in result.stdout


def test_sweep_file_sets_dtype_and_seed(tmp_path, capsys):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(
        json.dumps(
            {
                "models": ["mlp"],
                "samples": [2],
                "modes": ["forward"],
                "methods": ["loop", "vmap"],
                "dtype": "float64",
                "seed": 3,
                "min_time": 0.01,
                "repeats": 1,
            }
        )
    )
    out = tmp_path / "out.json"

    assert main(["bench", "--sweep", str(sweep), "--json", str(out), "--no-progress"]) == 0
    records = json.loads(out.read_text())
    assert {r["dtype"] for r in records} == {"float64"}
    assert {r["status"] for r in records} == {"ok"}

    # the command line wins over the file
    assert (
        main(
            [
                "bench",
                "--sweep",
                str(sweep),
                "--dtype",
                "float32",
                "--json",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    assert {r["dtype"] for r in json.loads(out.read_text())} == {"float32"}


def _interrupting_build(case, K, mode, fn, args, **options):
    raise KeyboardInterrupt


def test_interrupt_keeps_the_cells_done(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(bench.METHODS, "vmap", bench.Method("vmap", _interrupting_build))
    out = tmp_path / "r.json"
    argv = ["bench", "--quick", "--models", "mlp", "--modes", "forward", "--samples", "1"]
    code = main([*argv, "--methods", "loop", "vmap", "--json", str(out), "--no-progress"])
    assert code == 130

    records = json.loads(out.read_text())
    assert [(r["method"], r["status"]) for r in records] == [("loop", "ok")]
    assert "interrupted" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bayesflow {bf.__version__} (torch {torch.__version__}, zuko ")


@pytest.mark.parametrize("option", ["--json", "--csv", "--markdown", "--plot"])
def test_bad_output_path_fails_before_the_sweep(option, monkeypatch, tmp_path, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(bench, "run_bench", never)
    # An existing file the run could not write (after the sweep), as os.access says (a
    # root user may write a read-only file: its answer stands in).
    locked = tmp_path / "locked.out"
    locked.write_text("")
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and str(p) != str(locked))
    cases = [(tmp_path / "no" / "such" / "r.out", "no folder"), (tmp_path, "it is a folder")]
    cases.append((locked, "the file is not writable"))
    for path, why in cases:
        with pytest.raises(SystemExit) as info:
            main(["bench", "--quick", option, str(path), "--no-progress"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"{option}: expected a file path that can be written, got" in err and why in err


def test_options_that_leave_no_cell_are_refused(capsys):
    # Loops only, every K above --max-loop-samples: 0 cells, exit 0, and nothing written.
    argv = ["bench", "--models", "mlp", "--modes", "forward", "--methods", "loop", "zuko-loop"]
    argv += ["--samples", "8", "32", "--max-loop-samples", "4", "--no-progress"]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "expected at least one cell to run, got none" in capsys.readouterr().err


def test_two_outputs_to_one_file_fail_before_the_sweep(monkeypatch, tmp_path, capsys):
    # --json X --csv X ran the sweep, then the CSV replaced the JSON without a word.
    def never(*args, **kwargs):
        raise AssertionError("the sweep ran")

    monkeypatch.setattr(bench, "run_bench", never)
    path = str(tmp_path / "r.out")
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", "--json", path, "--csv", path, "--no-progress"])
    assert info.value.code == 2
    assert "--csv: expected a file of its own, got" in capsys.readouterr().err


def test_batch_sweep_and_loop_limit_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["bench", "--models", "mlp", "--modes", "forward", "--samples", "1", "2"]
    argv += ["--methods", "loop", "vmap", "--batch", "3", "5", "--max-loop-samples", "1"]
    argv += ["--min-time", "0.001", "--repeats", "1", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    cells = {(r["batch"], r["method"], r["samples"]) for r in json.loads(out.read_text())}
    assert cells == {(b, m, k) for b in (3, 5) for m, k in (("loop", 1), ("vmap", 1), ("vmap", 2))}
    table = capsys.readouterr().out
    assert "batch 3" in table and "batch 5" in table
    assert "speed-up over loop (x)" in table


@pytest.mark.parametrize(
    "argv", [["--batch", "4", "0"], ["--max-loop-samples", "0"]], ids=lambda a: " ".join(a)
)
def test_bad_batch_and_loop_limit(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", *argv])
    assert info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


def _never(*args, **kwargs):
    raise AssertionError("the sweep ran")


@pytest.mark.parametrize(
    "sweep, key",
    [
        ({"repeats": 0}, "repeats"),
        ({"threads": 0}, "threads"),
        ({"device": "tpu"}, "device"),
        ({"min_time": "0.1"}, "min_time"),
        ({"min_time": -1}, "min_time"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"seed": 2**64}, "seed"),
        ({"small": "yes"}, "small"),
        ({"models": "mlp"}, "models"),
        ({"samples": [1, "many"]}, "samples"),
        ({"samples": [0]}, "samples"),
        ({"batch": -4}, "batch"),
        ({"modle": ["mlp"], "sampels": [2]}, "modle"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else v,
)
def test_bad_sweep_file_fails_before_the_sweep(sweep, key, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "run_bench", _never)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    with pytest.raises(SystemExit) as info:
        main(["bench", "--sweep", str(path), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--sweep: expected" in err and repr(key) in err and str(path) in err, err


@pytest.mark.parametrize(
    "model_samples",
    [{"mlp": "abc"}, {"mlp": [0]}, {"mlp": [2, 1.5]}, {"mlp": []}, {"resnet": [2]}, [2]],
    ids=json.dumps,
)
@pytest.mark.parametrize("argv", [[], ["--samples", "2"]], ids=["alone", "under --samples"])
def test_bad_model_samples_names_the_file_and_key(
    model_samples, argv, monkeypatch, tmp_path, capsys
):
    # It was reported as a `--samples` error naming neither, and dropped unchecked when
    # `--samples` was given.
    monkeypatch.setattr(bench, "run_bench", _never)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"model_samples": model_samples}))
    with pytest.raises(SystemExit) as info:
        main(["bench", "--models", "mlp", *argv, "--sweep", str(path), "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--sweep: expected" in err and "'model_samples'" in err and str(path) in err, err


def _bench_help(monkeypatch, capsys) -> dict[str, str]:
    r"""The help text of every `bayesflow bench` option, by option, unwrapped."""

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside hyphenated names
    with pytest.raises(SystemExit) as info:
        main(["bench", "--help"])
    assert info.value.code == 0
    options = capsys.readouterr().out.split("options:")[1]
    blocks = re.split(r"\n  (?=-)", options)
    return {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks if b.strip()}


@pytest.mark.parametrize("quick", [False, True], ids=["plain", "quick"])
def test_help_states_the_defaults(quick, monkeypatch, capsys):
    helps = _bench_help(monkeypatch, capsys)
    seen = {}

    def spy(models, samples, modes, methods, *, options, **kwargs):
        seen.update(models=models, samples=samples, modes=modes, methods=methods)
        seen.update({"min-time": options.min_time, "repeats": options.repeats})
        return []

    monkeypatch.setattr(bench, "run_bench", spy)
    assert main(["bench", "--no-progress", *(["--quick"] if quick else [])]) == 0
    capsys.readouterr()

    for option, value in seen.items():
        text = helps[f"--{option}"]
        match = re.search(r"\(default: ([^;)]*)(?:; --quick: ([^)]*))?\)", text)
        assert match is not None, text
        stated = match[1] if not quick or match[2] is None else match[2]
        got = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        assert stated == got, (option, text)


def test_help_says_what_device_and_chunk_size_do(monkeypatch, capsys):
    helps = _bench_help(monkeypatch, capsys)
    assert "auto: " in helps["--device"] and "cuda if torch sees a GPU" in helps["--device"]
    assert "without it: " in helps["--chunk-size"]


@pytest.mark.parametrize(
    "argv, sweep, option",
    [
        (["--samples", ","], None, "--samples"),
        (["--batch", ","], None, "--batch"),
        ([], {"samples": []}, "--samples"),
        ([], {"batch": []}, "--batch"),
        ([], {"model_samples": {"mlp": []}}, "--sweep"),
        (["--min-time", "inf"], None, "--min-time"),
        (["--csv", ""], None, "--csv"),
        (["--plot", "r.txt"], None, "--plot"),
    ],
    ids=["samples ,", "batch ,", "sweep samples []", "sweep batch []", "model_samples []",
         "min-time inf", "empty csv path", "plot r.txt"],
)  # fmt: skip
def test_empty_or_unusable_values_fail_before_the_sweep(
    argv, sweep, option, monkeypatch, tmp_path, capsys
):
    # These ran 0 cells and exited 0, wrote nothing, or failed after the whole sweep (a
    # traceback, exit 1: "wrong numbers").
    monkeypatch.setattr(bench, "run_bench", _never)
    monkeypatch.chdir(tmp_path)
    if sweep is not None:
        (tmp_path / "sweep.json").write_text(json.dumps({"models": ["mlp"], **sweep}))
        argv = [*argv, "--sweep", "sweep.json"]
    with pytest.raises(SystemExit) as info:
        main(["bench", *argv, "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{option}: expected" in err, err


def test_plot_without_matplotlib_fails_before_the_sweep(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "run_bench", _never)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of None fails
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", "--plot", str(tmp_path / "r.png"), "--no-progress"])
    assert info.value.code == 2
    assert "--plot: expected matplotlib" in capsys.readouterr().err


def test_quick_takes_the_small_settings(monkeypatch, capsys):
    seen = {}

    def spy(*args, options, **kwargs):
        seen["small"] = options.small
        return []

    monkeypatch.setattr(bench, "run_bench", spy)
    assert main(["bench", "--quick", "--no-progress"]) == 0
    assert seen == {"small": True}
    assert main(["bench", "--models", "mlp", "--no-progress"]) == 0
    assert seen == {"small": False}
    capsys.readouterr()
