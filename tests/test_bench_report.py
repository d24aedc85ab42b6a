r"""The benchmark's tables, on hand-made records: what they print for each cell."""

import re

import pytest

from bayesflow import bench
from bayesflow.bench import Status

RUN = {
    "device": "cpu", "device_name": "x", "dtype": "float32", "threads": 1, "chunk_size": None,
    "small": False, "versions": {"bayesflow": "0"}, "date": "2026-12-05 08:00 UTC",
}  # fmt: skip


def _record(method, K, ms, status=Status.OK, mode="forward", detail="", **fields):
    return {
        **RUN, "model": "mlp", "method": method, "samples": K, "mode": mode, "batch": 64,
        "median_ms": ms if status is Status.OK else None, "iqr_ms": 0.0, "status": status,
        "detail": detail, **fields,
    }  # fmt: skip


def _row(table, method):
    return next(line for line in table.splitlines() if line.startswith(f"  {method} "))


def test_a_small_ratio_keeps_its_digits():
    rs = [
        _record("zuko-loop", 1, 0.2),
        _record("vmap", 1, 0.25),
        _record("pyro", 1, 6.0),
        _record("deterministic", 1, 0.06),
        _record("bmm", 1, 46.0),
    ]
    table = bench.format_table(rs)
    # 0.2 / 6.0 and 0.06 / 46.0: both read as zero with fixed decimals.
    assert "0.033x" in _row(table, "pyro")
    assert "0.0013b" in _row(table, "deterministic")
    assert _row(table, "vmap").split()[1:] == ["0.25", "0.8x", "4.17d", "0.0054b"]
    # The wider ratios widen all of the table's: each time and ratio ends where the header's
    # K does and where the other rows' do.
    lines = table.splitlines()[2:8]
    ends = [[m.end() for m in re.finditer(r"\S+", line)][1:] for line in lines]
    assert ends[0][0] == ends[1][-1] and all(e == ends[1] for e in ends[1:]), lines

    md = bench.markdown_table(rs)
    assert "| 0.06 (1.00d 0.0013b) |" in md
    assert "| 6.00 (100.00d 0.13b) |" in md


def test_training_cells_without_a_step_get_no_ratio_to_the_plain_step():
    # A training cell of vmap is the gradients alone; the plain module's takes an Adam
    # step too: their ratio flattered vmap (1.45d for 2.47x the same work on the MLP).
    rs = [
        _record("deterministic", 1, 0.5, mode="train"),
        _record("vmap", 1, 0.8, mode="train"),
        _record("nelbo", 1, 1.2, mode="train"),
        _record("deterministic", 1, 0.05),
        _record("vmap", 1, 0.2),
    ]
    table = bench.format_table(rs)
    train = next(b for b in table.split("\n\n") if "· train ·" in b)
    forward = next(b for b in table.split("\n\n") if "· forward ·" in b)
    assert _row(train, "vmap").split()[1:] == ["0.80"]
    assert _row(train, "nelbo").split()[1:] == ["1.20", "2.40d"]
    assert "4.00d" in _row(forward, "vmap")
    md = bench.markdown_table(rs)
    assert "| vmap | **0.20** (4.00d) | **0.80** |" in md and "| 1.20 (2.40d) |" in md


def test_each_failure_of_a_row_keeps_its_note():
    rs = [
        _record("zuko-loop", 1, 0.2),
        _record("zuko-loop", 8, 1.6),
        _record("zuko-loop", 32, 6.4),
        _record("vmap", 1, None, Status.WRONG, detail="max rel err 1e-2"),
        _record("vmap", 8, None, Status.OOM, detail="out of memory at K=8"),
        _record("vmap", 32, None, Status.OOM, detail="out of memory at K=8"),
    ]
    table = bench.format_table(rs)
    notes = [line.strip() for line in table.splitlines() if line.startswith("    ")]
    # In K order, each distinct status and detail once.
    assert notes == ["vmap: wrong (max rel err 1e-2)", "vmap: oom (out of memory at K=8)"]


@pytest.mark.parametrize("status", [Status.WRONG, Status.UNSUPPORTED])
def test_the_cost_table_shows_why_the_plain_module_has_no_ratio(status):
    rs = [
        _record("deterministic", 1, None, status, detail="boom"),
        _record("vmap", 1, 0.2),
        _record("deterministic", 1, 0.5, mode="train"),
        _record("nelbo", 1, 1.0, mode="train"),
        _record("nelbo-local", 1, None, Status.WRONG, mode="train"),
    ]
    row = bench.cost_table(rs).splitlines()[2]
    plain = "WRONG" if status is Status.WRONG else "unsupported"
    assert row == f"| mlp | 64 | {plain} | - | 0.50 | **2.00x** (1.00) | WRONG | - |"


def test_runs_that_differ_in_date_or_seed_are_not_merged():
    # Run B, on the same machine and versions two days later, timed vmap only.
    run_a = [_record("zuko-loop", 8, 2.0), _record("vmap", 8, 1.0)]
    run_b = [_record("vmap", 8, 4.0, date="2026-12-07 17:00 UTC")]
    table = bench.format_table(run_a + run_b)
    a, b = table.split("\n\n")
    assert a.startswith("mlp · forward · batch 64 · cpu float32 · 1 thread(s) · 2026-12-05")
    assert b.startswith("mlp · forward · batch 64 · cpu float32 · 1 thread(s) · 2026-12-07")
    assert _row(a, "vmap").split() == ["vmap", "1.00", "2.0x"]
    assert _row(b, "vmap").split() == ["vmap", "4.00"]  # no loop of its own run to divide
    md = bench.markdown_table(run_a + run_b)
    assert "mlp, batch 64, cpu float32, 1 thread(s), 2026-12-05 08:00 UTC: median ms" in md
    assert "| vmap | **1.00** |" in md and "| vmap | **4.00** |" in md

    seeds = [_record("vmap", 8, 1.0, seed=0), _record("vmap", 8, 3.0, seed=1)]
    tables = bench.format_table(seeds).split("\n\n")
    assert [t.splitlines()[0].rsplit(" · ", 1)[1] for t in tables] == ["seed 0", "seed 1"]

    cost = [
        _record("deterministic", 1, 0.5),
        _record("vmap", 1, 1.0),
        _record("deterministic", 1, 0.5, date="2026-12-07 17:00 UTC"),
        _record("vmap", 1, 2.0, date="2026-12-07 17:00 UTC"),
    ]
    rows = bench.cost_table(cost).splitlines()[2:]
    assert [row.split(" | ")[3] for row in rows] == ["**2.00x** (1.00)", "**4.00x** (2.00)"]
    assert "2026-12-07 17:00 UTC" in rows[1]


def test_flows_table_keeps_batch_sizes_apart():
    def flow(method, ms, batch):
        return {**_record(method, 32, ms), "model": "nsf", "batch": batch}

    rs = [flow("zuko-loop", 100.0, 256), flow("vmap", 40.0, 256)]
    rs += [flow("zuko-loop", 10.0, 16), flow("vmap", 8.0, 16)]
    tables = bench.flows_table(rs, {"nsf": "NSF"}).split("\n\n")
    assert tables[0] == "batch 256 · cpu float32 · 1 thread(s):"
    assert tables[1].splitlines()[2] == "| NSF | forward | 32 | not run | 100 | 40.0 | 2.5x |"
    assert tables[2] == "batch 16 · cpu float32 · 1 thread(s):"
    assert tables[3].splitlines()[2] == "| NSF | forward | 32 | not run | 10.0 | 8.00 | 1.2x |"
