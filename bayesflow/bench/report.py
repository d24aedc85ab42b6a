r"""The benchmark's output: plain-text and markdown tables, JSON, CSV and a plot."""

from __future__ import annotations

__all__ = [
    "NOISY",
    "cost_table",
    "flows_table",
    "format_table",
    "markdown_table",
    "plot",
    "replace_section",
    "write_csv",
    "write_json",
]

import csv
import json
import math

from typing import Any

from .methods import METHODS, REFERENCES, VECTORIZED, comparable
from .status import Status

Record = dict[str, Any]

# Keyed by value: records loaded from JSON hold the plain string, whose hash is not the
# enum member's.
_SHORT = {Status.WRONG.value: "WRONG", Status.ERROR.value: "ERROR"}
_ABSENT = (Status.NOT_APPLICABLE, Status.NOT_INSTALLED)


#: A cell is noisy, and marked `~`, when its interquartile range exceeds this share of its
#: median: re-measure it on a quieter machine before reading much into it.
NOISY = 0.2


def _short(status: Any) -> str:
    r"""What a table shows for a status: in capitals where it is a failure."""

    return _SHORT.get(str(status), str(status))


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _ok(r: Record | None) -> bool:
    return r is not None and r["status"] == Status.OK


def _noisy(r: Record) -> bool:
    iqr = r.get("iqr_ms")
    return iqr is not None and r["median_ms"] > 0 and iqr > NOISY * r["median_ms"]


def _ms(r: Record) -> str:
    return _fmt_ms(r["median_ms"]) + ("~" if _noisy(r) else "")


#: The fields of a record that tell its run from another: the tables compare and divide
#: the times of one run only, whatever a list of records holds. Two runs of the same
#: settings and versions still differ in their date or seed.
_RUN = ("device", "device_name", "dtype", "threads", "chunk_size", "small", "date", "seed")


def _run_of(r: Record) -> tuple:
    versions = r.get("versions") or {}
    return (*(r.get(k) for k in _RUN), *sorted(versions.items()))


def _describe(r: Record, stamp: bool = False) -> str:
    r"""The run of a record in words; with its date and seed if `stamp`."""

    chunk = r.get("chunk_size")
    return (
        f"{r['device']} {r['dtype']} · {r['threads']} thread(s)"
        + (f" · chunk size {chunk}" if chunk is not None else "")
        + (" · small settings" if r.get("small") else "")
        + _stamp(r, stamp, " · ")
    )


def _stamp(r: Record, stamp: bool, sep: str) -> str:
    parts = [str(r["date"])] if stamp and r.get("date") else []
    if stamp and r.get("seed") is not None:
        parts.append(f"seed {r['seed']}")
    return "".join(sep + part for part in parts)


def _several(records: list[Record]) -> bool:
    return len({_run_of(r) for r in records}) > 1


def _groups(records: list[Record]) -> dict[tuple[str, str, Any, tuple], list[Record]]:
    groups: dict[tuple[str, str, Any, tuple], list[Record]] = {}
    for r in records:
        groups.setdefault((r["model"], r["mode"], r.get("batch"), _run_of(r)), []).append(r)
    return groups


def _loop_baseline(rs: list[Record]) -> str | None:
    r"""The loop the speed-ups are taken over: zuko's, else bayesflow's, if either ran."""

    for name in ("zuko-loop", "loop"):
        if any(r["method"] == name and _ok(r) for r in rs):
            return name
    return None


def _has(rs: list[Record], name: str) -> bool:
    return any(r["method"] == name and _ok(r) for r in rs)


def _legend(loop: str | None, det: bool, bmm: bool) -> str:
    parts = ["median ms"]
    if loop:
        parts.append(f"speed-up over {loop} (x)")
    if det:
        parts.append("time / deterministic (d)")
    if bmm:
        parts.append("time / bmm (b)")
    return ", ".join(parts)


def format_table(records: list[Record]) -> str:
    r"""Formats records as plain-text tables, one per model, mode, batch size and run (device,
    dtype, threads, chunk size, versions, date and seed; the last two shown where the records
    hold several runs).

    Each cell shows the median time in ms, then, where those methods ran: the speed-up
    over `zuko-loop` (`x`, higher is better; over bayesflow's `loop` when zuko's did not
    run), the time relative to `deterministic` (`d`: 1.00 is the plain module, one plain
    forward or one Adam step on the parameters the posterior covers: the cost of being
    Bayesian; in training, only for the cells that take a step too, `nelbo` and its
    estimators: the other methods' training cells are gradients alone) and relative to `bmm` (`b`:
    1.00 is the hand-written batched GEMMs with their own draw; `limit`, the same GEMMs
    on pre-drawn weights, shows what the draw costs). A cell whose interquartile range
    exceeds :data:`NOISY` of its median is marked `~`.
    """

    lines = []
    any_noisy = False
    several = _several(records)
    for (model, mode, _, _), rs in _groups(records).items():
        ks = sorted({r["samples"] for r in rs})
        methods = list(dict.fromkeys(r["method"] for r in rs))
        by = {(r["method"], r["samples"]): r for r in rs}
        first = rs[0]
        loop, det, bmm = _loop_baseline(rs), _has(rs, "deterministic"), _has(rs, "bmm")

        # A cell is its status, or its time and ratios (empty where a reference did not run).
        rows: list[tuple[str, list[str | list[str]]]] = []
        notes: list[str] = []
        for m in methods:
            mine = [by[(m, k)] for k in ks if (m, k) in by]
            # One note per status and detail, in K order: a later `oom` must not hide why
            # an earlier cell was wrong.
            notes.extend(dict.fromkeys(_note(m, r) for r in mine if not _ok(r)))
            if all(r["status"] in _ABSENT for r in mine):
                continue
            cells: list[str | list[str]] = []
            for k in ks:
                r = by.get((m, k))
                if r is None or not _ok(r):
                    cells.append("" if r is None else _short(r["status"]))
                    continue
                any_noisy |= _noisy(r)
                cell = [_ms(r)]
                for name, kind in ((loop, "x"), ("deterministic" if det else None, "d")):
                    if name is None:
                        continue
                    base = by.get((name, k))
                    if not _ok(base) or (kind == "d" and not comparable(m, mode)):
                        cell.append("")
                    elif kind == "x":
                        cell.append(_ratio(base["median_ms"] / r["median_ms"], "x", 1))
                    else:
                        cell.append(_ratio(r["median_ms"] / base["median_ms"], "d", 2))
                if bmm:
                    b = by.get(("bmm", k))
                    cell.append(_ratio(r["median_ms"] / b["median_ms"], "b", 2) if _ok(b) else "")
                cells.append(cell)
            rows.append((m, cells))
        # Six characters a ratio, unless one far below one needs more (0.0013b): then all
        # of the table's, so that its columns stay aligned.
        texts = [t for _, cs in rows for c in cs if isinstance(c, list) for t in c[1:]]
        field = max([6, *map(len, texts)])
        width = 9 + (field + 1) * (bool(loop) + det + bmm)

        lines.append(f"{model} · {mode} · batch {first['batch']} · {_describe(first, several)}")
        lines.append("  " + _legend(loop, det, bmm))
        lines.append(f"  {'method':<18}" + "".join(f"{'K=' + str(k):>{width}}" for k in ks))
        for m, cells in rows:
            line = f"  {m:<18}"
            for c in cells:
                if isinstance(c, list):
                    c = f"{c[0]:>8}" + "".join(f" {t:>{field}}" for t in c[1:])
                line += f"{c:>{width}}"
            lines.append(line)
        fastest = _fastest(by, ks, loop)
        if fastest:
            lines.append(f"  fastest: {fastest}")
        for note in notes:
            lines.append(f"    {note}")
        lines.append("")
    if any_noisy:
        lines.append(f"~ noisy: the interquartile range exceeds {NOISY:.0%} of the median")

    return "\n".join(lines).rstrip() + "\n"


def _fmt_ratio(value: float, decimals: int) -> str:
    # With fixed decimals, a ratio below 10^-decimals would read as zero: two significant
    # digits keep it (0.033, 0.0013, 1.2e-05).
    if 0 < value < 10**-decimals:
        return f"{value:.2g}"
    return f"{value:.{decimals}f}"


def _ratio(value: float, suffix: str, decimals: int) -> str:
    # Six characters, whatever the size: 1.23d, 12.3d, 1234d; more only for a ratio far
    # below one (0.0013b).
    for d in range(decimals, -1, -1):
        text = _fmt_ratio(value, d) + suffix
        if len(text) <= 6:
            break
    return text


def _note(method: str, r: Record) -> str:
    return (
        f"{method}: {r['status']} ({r['detail']})" if r["detail"] else f"{method}: {r['status']}"
    )


def _fastest(by: dict[tuple[str, int], Record], ks: list[int], loop: str | None) -> str:
    r"""Per K, the fastest method that is not a reference, with its speed-up over the loop;
    and the best vectorized method where it is slower than that."""

    parts = []
    for k in ks:
        rs = [r for (m, kk), r in by.items() if kk == k and _ok(r) and m not in REFERENCES]
        if not rs:
            continue
        best = min(rs, key=lambda r: r["median_ms"])
        base = by.get((loop, k)) if loop else None

        def x(r: Record, base: Record | None = base) -> str:
            return f" {_fmt_ratio(base['median_ms'] / r['median_ms'], 1)}x" if _ok(base) else ""

        part = f"K={k} {best['method']}{x(best)}"
        vectorized = [r for r in rs if r["method"] in VECTORIZED]
        if vectorized and best["method"] not in VECTORIZED:
            v = min(vectorized, key=lambda r: r["median_ms"])
            part += f" (best vectorized: {v['method']}{x(v)})"
        parts.append(part)
    return " · ".join(parts)


def markdown_table(records: list[Record]) -> str:
    r"""Formats records as one markdown table per model, batch size and run: a row per method, a
    column per mode and K, each cell the median ms and, in parentheses, the time relative
    to `deterministic` (`d`) and to `bmm` (`b`) of the same column where those ran; the
    fastest of each column that is not a reference (`deterministic`, `bmm`, `limit`, as in
    the text table's `fastest` line) in bold, a noisy cell (see :data:`NOISY`) marked `~`."""

    out = []
    groups: dict[tuple[str, Any, tuple], list[Record]] = {}
    for r in records:
        groups.setdefault((r["model"], r.get("batch"), _run_of(r)), []).append(r)
    several = _several(records)
    for (model, _, _), rs in groups.items():
        cols = list(dict.fromkeys((r["mode"], r["samples"]) for r in rs))
        cols.sort(key=lambda c: (["forward", "train", "sample"].index(c[0]), c[1]))
        methods = list(dict.fromkeys(r["method"] for r in rs))
        by = {(r["method"], r["mode"], r["samples"]): r for r in rs}
        best = {}
        for mode, k in cols:
            ok = [
                by[m, mode, k]
                for m in methods
                if m not in REFERENCES and _ok(by.get((m, mode, k)))
            ]
            if ok:
                best[mode, k] = min(r["median_ms"] for r in ok)
        refs = [(n, s) for n, s in (("deterministic", "d"), ("bmm", "b")) if _has(rs, n)]

        first = rs[0]
        ratios = ", ".join(f"time / {n} ({s})" for n, s in refs)
        chunk = first.get("chunk_size")
        out.append(
            f"{model}, batch {first['batch']}, {first['device']} {first['dtype']}, "
            f"{first['threads']} thread(s)"
            + (f", chunk size {chunk}" if chunk is not None else "")
            + (", small settings" if first.get("small") else "")
            + _stamp(first, several, ", ")
            + ": median ms"
            + (f"; in parentheses {ratios}" if refs else "")
            + "\n"
        )
        short = {"forward": "fwd", "train": "train", "sample": "sample"}
        out.append("| method | " + " | ".join(f"{short[m]} K={k}" for m, k in cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for m in methods:
            cells = []
            for mode, k in cols:
                r = by.get((m, mode, k))
                if r is None:
                    cells.append("")
                elif not _ok(r):
                    cells.append(_short(r["status"]))
                else:
                    cell = _ms(r)
                    if r["median_ms"] == best.get((mode, k)):
                        cell = f"**{cell}**"
                    parts = []
                    for name, sym in refs:
                        b = by.get((name, mode, k))
                        if _ok(b) and (sym != "d" or comparable(m, mode)):
                            ratio = r["median_ms"] / b["median_ms"]
                            parts.append(f"{_fmt_ratio(ratio, 2)}{sym}")
                    if parts:
                        cell += f" ({' '.join(parts)})"
                    cells.append(cell)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    if any(_ok(r) and _noisy(r) for r in records):
        out.append(f"~ noisy: the interquartile range exceeds {NOISY:.0%} of the median.\n")
    return "\n".join(out)


def cost_table(records: list[Record]) -> str:
    r"""Formats the cost of being Bayesian as one markdown table, a row per model, batch and run:
    K = 1 against the plain module (`deterministic`), the forward (`vmap`) over a plain
    forward and the training steps (`nelbo`, `nelbo-local`, `nelbo-flipout`) over a plain
    Adam step, each ratio with its median in ms."""

    groups: dict[tuple[str, Any, tuple], dict[tuple[str, str], Record]] = {}
    for r in records:
        if r["samples"] == 1:
            key = (r["model"], r.get("batch"), _run_of(r))
            groups.setdefault(key, {})[r["method"], r["mode"]] = r
    several = len({run for _, _, run in groups}) > 1

    rows = [
        "| model | batch | plain forward (ms) | vmap K=1 / plain | plain Adam step (ms) "
        "| nelbo K=1 / plain | local / plain | Flipout / plain |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, batch, _), by in groups.items():
        # Runs of other devices, dtypes, threads or dates: each row says which it is.
        label = f"{model} ({_describe(next(iter(by.values())), True)})" if several else model
        cells = [label, str(batch)]
        for mode, methods in (
            ("forward", ["vmap"]),
            ("train", ["nelbo", "nelbo-local", "nelbo-flipout"]),
        ):
            det = by.get(("deterministic", mode))
            cells.append("-" if det is None else _ms(det) if _ok(det) else _short(det["status"]))
            for method in methods:
                r = by.get((method, mode))
                if _ok(r) and _ok(det):
                    ratio = _fmt_ratio(r["median_ms"] / det["median_ms"], 2)
                    cells.append(f"**{ratio}x** ({_ms(r)})")
                elif r is None or _ok(r):  # nothing to divide by: the plain column says why
                    cells.append("-")
                else:
                    cells.append(_short(r["status"]))
        rows.append("| " + " | ".join(cells) + " |")
    if any(_ok(r) and _noisy(r) for r in records):
        rows.append("")
        rows.append(f"~ noisy: the interquartile range exceeds {NOISY:.0%} of the median.")
    return "\n".join(rows) + "\n"


def flows_table(records: list[Record], names: dict[str, str] | None = None) -> str:
    r"""Formats one markdown row per flow, mode and K: the plain flow, zuko's loop and
    `vmap_call` in ms, and the speed-up of `vmap_call` over the loop at that K
    (docs/flows.md); one table per batch size and run, each captioned where there are
    several.

    A cell that has no time says why: its status (`oom`, `unsupported`, ...), or `not run`
    where the sweep left it out (a loop above `max_loop_samples`); the speed-up is `-`
    unless both ran at that K.

    Arguments:
        records: The records of the `flows` (or `flows-sample`) sweep.
        names: Display names of the models, in the order of the rows; all models, in the
            order of the records, if :py:`None`.
    """

    groups: dict[tuple[Any, tuple], list[Record]] = {}
    for r in records:
        groups.setdefault((r.get("batch"), _run_of(r)), []).append(r)
    several = _several(records)
    tables = []
    for (batch, _), rs in groups.items():
        by = {(r["model"], r["mode"], r["samples"], r["method"]): r for r in rs}
        models = names or {m: m for m in dict.fromkeys(r["model"] for r in rs)}
        modes = list(dict.fromkeys(r["mode"] for r in rs))
        ks = sorted({r["samples"] for r in rs})
        # One batch size and run: a caption only where the records hold several.
        rows = [f"batch {batch} · {_describe(rs[0], several)}:", ""] if len(groups) > 1 else []
        rows += [
            "| flow | mode | K | plain flow (ms) | zuko `reparameterize()` loop (ms) "
            "| `vmap_call` (ms) | speed-up |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for model, name in models.items():
            for mode in modes:
                for k in ks:
                    det, loop, vmap = (
                        by.get((model, mode, k, m)) for m in ("deterministic", "zuko-loop", "vmap")
                    )
                    if loop is None and vmap is None:
                        continue
                    cells = [_flow_cell(r) for r in (det, loop, vmap)]
                    ok = _ok(loop) and _ok(vmap)
                    speedup = (
                        f"{_fmt_ratio(loop['median_ms'] / vmap['median_ms'], 1)}x" if ok else "-"
                    )
                    rows.append(
                        f"| {name} | {mode} | {k} | " + " | ".join(cells) + f" | {speedup} |"
                    )
        tables.append("\n".join(rows) + "\n")
    return "\n".join(tables)


def _flow_cell(r: Record | None) -> str:
    if r is None:
        return "not run"
    return _ms(r) if _ok(r) else _short(r["status"])


def replace_section(path: str, name: str, text: str) -> None:
    r"""Replaces what lies between the lines `<!-- name:start -->` and `<!-- name:end -->`
    of a file with `text`."""

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    with open(path) as f:
        content = f.read()
    if start not in content or end not in content:
        raise ValueError(f"replace_section: expected {start} and {end} in {path}")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{start}\n{text.strip()}\n{end}{tail}")


def _plain(record: Record) -> Record:
    return {k: str(v) if isinstance(v, Status) else v for k, v in record.items()}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def write_json(records: list[Record], path: str) -> None:
    r"""Writes records as a JSON list, standard JSON: a non-finite number (the error of a
    check that failed on shapes or non-finite values, which its detail says) as null."""

    with open(path, "w") as f:
        json.dump([_finite(_plain(r)) for r in records], f, indent=1, allow_nan=False)
        f.write("\n")


def _flat(record: Record) -> Record:
    out = {k: v for k, v in _plain(record).items() if k != "versions"}
    for k, v in record.get("versions", {}).items():
        out[f"{k}_version"] = v
    return out


def write_csv(records: list[Record], path: str) -> None:
    r"""Writes records as CSV, one row per record."""

    rows = [_flat(r) for r in records]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot(records: list[Record], path: str) -> None:
    r"""Plots time against K (log-log) and the speed-up over `zuko-loop` (or `loop`), per
    model, mode, batch size and run."""

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = _groups(records)
    names = list(METHODS)
    fig, axes = plt.subplots(
        len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False, dpi=64
    )
    batches = {key[2] for key in groups}
    runs = {key[3] for key in groups}
    for row, ((model, mode, batch, _), rs) in zip(axes, groups.items(), strict=True):
        loop = _loop_baseline(rs)
        zuko_ms = {r["samples"]: r["median_ms"] for r in rs if r["method"] == loop and _ok(r)}
        title = f"{model} · {mode}" + (f" · batch {batch}" if len(batches) > 1 else "")
        title += f" · {_describe(rs[0], True)}" if len(runs) > 1 else ""
        for m in dict.fromkeys(r["method"] for r in rs):
            pts = sorted((r["samples"], r["median_ms"]) for r in rs if r["method"] == m and _ok(r))
            if not pts:
                continue
            ks, ms = zip(*pts, strict=True)
            style = "--" if m.endswith("loop") else "-"
            color = f"C{names.index(m) % 10}" if m in names else None
            row[0].plot(ks, ms, style, marker="o", ms=4, color=color, label=m)
            sp = [(k, zuko_ms[k] / t) for k, t in pts if k in zuko_ms]
            if sp:
                row[1].plot(*zip(*sp, strict=True), style, marker="o", ms=4, color=color)
        row[0].set(
            xscale="log",
            yscale="log",
            xlabel="K (samples)",
            ylabel="median ms",
            title=title,
        )
        row[1].set(
            xscale="log",
            xlabel="K (samples)",
            ylabel=f"speed-up over {loop or 'the loop'}",
            title=title,
        )
        row[1].axhline(1.0, color="gray", lw=0.8)
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        if row[0].lines:
            row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
