r"""The benchmark's output: plain-text and markdown tables, JSON, CSV and a plot."""

from __future__ import annotations

__all__ = ["format_table", "markdown_table", "plot", "replace_section", "write_csv", "write_json"]

import csv
import json

from typing import Any

from .methods import METHODS, VECTORIZED
from .status import Status

Record = dict[str, Any]

_SHORT = {Status.WRONG: "WRONG"}
_ABSENT = (Status.NOT_APPLICABLE, Status.NOT_INSTALLED)


def _fmt_ms(ms: float) -> str:
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def _ok(r: Record | None) -> bool:
    return r is not None and r["status"] == Status.OK


def _groups(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r["model"], r["mode"]), []).append(r)
    return groups


def format_table(records: list[Record]) -> str:
    r"""Formats records as plain-text tables, one per model and mode.

    Each cell shows the median time in ms, the speed-up over `zuko-loop` (`x`, higher is
    better) and the time relative to `bmm` (`b`: 1.00 is the hand-written batched GEMMs
    with their own draw; `limit`, the same GEMMs on pre-drawn weights, shows what the draw
    costs).
    """

    lines = []
    for (model, mode), rs in _groups(records).items():
        ks = sorted({r["samples"] for r in rs})
        methods = list(dict.fromkeys(r["method"] for r in rs))
        by = {(r["method"], r["samples"]): r for r in rs}
        first = rs[0]
        has_bmm = any(r["method"] == "bmm" and _ok(r) for r in rs)

        lines.append(
            f"{model} · {mode} · batch {first['batch']} · {first['device']} {first['dtype']} · "
            f"{first['threads']} thread(s)"
        )
        lines.append(
            "  median ms, speed-up over zuko-loop (x)" + (", time / bmm (b)" if has_bmm else "")
        )
        width = 22 if has_bmm else 16
        lines.append(f"  {'method':<18}" + "".join(f"{'K=' + str(k):>{width}}" for k in ks))
        notes: list[str] = []
        for m in methods:
            mine = [by[(m, k)] for k in ks if (m, k) in by]
            if all(r["status"] in _ABSENT for r in mine):
                notes.append(f"{m}: {mine[0]['status']} ({mine[0]['detail']})")
                continue
            cells = []
            status_note = None
            for k in ks:
                r = by.get((m, k))
                if r is None:
                    cells.append(f"{'':>{width}}")
                    continue
                if not _ok(r):
                    short = _SHORT.get(r["status"], str(r["status"]))
                    cells.append(f"{short:>{width}}")
                    status_note = f"{m}: {r['status']} ({r['detail']})"
                    continue
                cell = _fmt_ms(r["median_ms"])
                z = by.get(("zuko-loop", k))
                if _ok(z):
                    cell += f" {z['median_ms'] / r['median_ms']:5.1f}x"
                b = by.get(("bmm", k))
                if has_bmm:
                    cell += f" {r['median_ms'] / b['median_ms']:5.2f}b" if _ok(b) else " " * 7
                cells.append(f"{cell:>{width}}")
            lines.append(f"  {m:<18}" + "".join(cells))
            if status_note:
                notes.append(status_note)
        best = _best_vectorized(by, ks, has_bmm)
        if best:
            lines.append(f"  best vectorized: {best}")
        for note in notes:
            lines.append(f"    {note}")
        lines.append("")

    return "\n".join(lines).rstrip() + "\n"


def _best_vectorized(by: dict[tuple[str, int], Record], ks: list[int], bmm: bool) -> str:
    parts = []
    for k in ks:
        rs = [by[m, k] for m in VECTORIZED if _ok(by.get((m, k)))]
        z = by.get(("zuko-loop", k))
        if not rs or not _ok(z):
            continue
        r = min(rs, key=lambda r: r["median_ms"])
        part = f"K={k} {r['method']} {z['median_ms'] / r['median_ms']:.1f}x"
        b = by.get(("bmm", k))
        if bmm and _ok(b):
            part += f" {r['median_ms'] / b['median_ms']:.2f}b"
        parts.append(part)
    return " · ".join(parts)


def markdown_table(records: list[Record]) -> str:
    r"""Formats records as one markdown table per model: a row per method, a column per
    mode and K, each cell the median ms and, in parentheses, the time relative to `bmm`
    of the same column; the fastest of each column in bold."""

    out = []
    models = dict.fromkeys(r["model"] for r in records)
    for model in models:
        rs = [r for r in records if r["model"] == model]
        cols = list(dict.fromkeys((r["mode"], r["samples"]) for r in rs))
        cols.sort(key=lambda c: (["forward", "train", "sample"].index(c[0]), c[1]))
        methods = list(dict.fromkeys(r["method"] for r in rs))
        by = {(r["method"], r["mode"], r["samples"]): r for r in rs}
        best = {}
        for mode, k in cols:
            ok = [by[m, mode, k] for m in methods if _ok(by.get((m, mode, k)))]
            if ok:
                best[mode, k] = min(r["median_ms"] for r in ok)

        first = rs[0]
        out.append(
            f"{model}, batch {first['batch']}, {first['device']} {first['dtype']}, "
            f"{first['threads']} thread(s): median ms (time / bmm)\n"
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
                    cells.append(_SHORT.get(r["status"], str(r["status"])))
                else:
                    cell = _fmt_ms(r["median_ms"])
                    if r["median_ms"] == best.get((mode, k)):
                        cell = f"**{cell}**"
                    b = by.get(("bmm", mode, k))
                    if _ok(b):
                        cell += f" ({r['median_ms'] / b['median_ms']:.2f})"
                    cells.append(cell)
            out.append(f"| {m} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


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


def write_json(records: list[Record], path: str) -> None:
    r"""Writes records as a JSON list."""

    with open(path, "w") as f:
        json.dump([_plain(r) for r in records], f, indent=1)
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
    r"""Plots time against K (log-log) and the speed-up over `zuko-loop`, per model and mode."""

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = _groups(records)
    names = list(METHODS)
    fig, axes = plt.subplots(
        len(groups), 2, figsize=(10, 3.2 * len(groups)), squeeze=False, dpi=64
    )
    for row, ((model, mode), rs) in zip(axes, groups.items(), strict=True):
        zuko_ms = {
            r["samples"]: r["median_ms"] for r in rs if r["method"] == "zuko-loop" and _ok(r)
        }
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
            title=f"{model} · {mode}",
        )
        row[1].set(
            xscale="log",
            xlabel="K (samples)",
            ylabel="speed-up over zuko-loop",
            title=f"{model} · {mode}",
        )
        row[1].axhline(1.0, color="gray", lw=0.8)
        for ax in row:
            ax.grid(True, which="both", alpha=0.3)
        if row[0].lines:
            row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
