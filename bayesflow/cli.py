r"""The `bayesflow` command line: `bayesflow bench`, loop against vmap."""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import math
import os
import platform
import sys
import time

from collections.abc import Sequence
from typing import Any

DTYPES = ("float32", "float64", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")

#: Timed measurements per cell, unless `--quick` or a sweep says otherwise.
REPEATS = 7

#: The keys of a sweep (see :mod:`bayesflow.bench.sweeps`).
SWEEP_KEYS = (
    "models",
    "samples",
    "modes",
    "methods",
    "batch",
    "device",
    "dtype",
    "threads",
    "chunk_size",
    "min_time",
    "repeats",
    "seed",
    "model_samples",
    "max_loop_samples",
    "small",
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


#: The seeds torch takes, with room for the offsets the checks add.
SEEDS = range(-(2**63), 2**63)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value not in SEEDS:
        raise argparse.ArgumentTypeError(
            f"expected an integer from -2**63 to 2**63 - 1, got {value}"
        )
    return value


def _split(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


class _Version(argparse.Action):
    r"""Prints the versions of bayesflow, torch and zuko, then exits."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        import torch
        import zuko

        import bayesflow

        sys.stdout.write(
            f"bayesflow {bayesflow.__version__} (torch {torch.__version__}, zuko "
            f"{zuko.__version__}, Python {platform.python_version()})\n"
        )
        parser.exit()


def _writable(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    r"""Fails before any work if `path` cannot be written (a missing folder, a folder)."""

    folder = os.path.dirname(os.path.abspath(path))
    if not path:
        why = "an empty path"
    elif os.path.isdir(path):
        why = "it is a folder"
    elif not os.path.isdir(folder):
        why = f"no folder {folder}"
    elif not os.access(folder, os.W_OK):
        why = f"{folder} is not writable"
    elif os.path.exists(path) and not os.access(path, os.W_OK):
        why = "the file is not writable"
    elif option == "--plot" and _plot_format(path) is not None:
        why = _plot_format(path)
    else:
        return
    parser.error(f"{option}: expected a file path that can be written, got {path!r} ({why})")


def _plot_format(path: str) -> str | None:
    r"""Why matplotlib cannot write a figure to `path`, or :py:`None` if it can."""

    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None  # said by the check of matplotlib itself
    formats = Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix in formats:
        return None
    return f"matplotlib writes {', '.join(sorted(formats))}, by the file's suffix"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    r"""Shows defaults, except the absent ones (whose help says what happens instead)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    from .bench import DEFAULTS, METHODS, MODELS, MODES, SWEEPS

    quick = SWEEPS["quick"]

    def default(key: str, value: Any = None) -> str:
        # `(default: ...; --quick: ...)`, from the values that `_resolve` merges.
        def words(v: Any) -> str:
            return " ".join(map(str, v)) if isinstance(v, list) else str(v)

        value = DEFAULTS[key] if value is None else value
        if quick.get(key, value) == value:
            return f"(default: {words(value)})"
        return f"(default: {words(value)}; --quick: {words(quick[key])})"

    parser = argparse.ArgumentParser(
        prog="bayesflow",
        description="bayesflow: Bayesian neural networks and flows, many samples in one pass.",
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser(
        "bench",
        help="time loops against vmap on K posterior samples",
        description=(
            "Checks every method against a loop on the same posterior samples, then times "
            "it. Cells show the median ms, the speed-up over zuko's reparameterize() loop "
            "(x; over bayesflow's loop when zuko-loop is not run), the time relative to the "
            "plain module (d: deterministic, one plain forward or one Adam step on the "
            "posterior's parameters; in training, for the nelbo cells only, the others' "
            "being gradients alone) and the "
            "time relative to hand-written batched GEMMs with their own draw (b: bmm, for "
            "MLPs and flows' hyper-networks; limit is the same GEMMs on pre-drawn weights); "
            "~ marks a noisy cell. Peer libraries that are not installed are reported so. "
            "Lists take spaces or commas: --samples 1 8 32 or --samples 1,8,32. An option "
            "left out takes its value from --sweep, else from --quick, else its default."
        ),
        formatter_class=_HelpFormatter,
    )
    bench.add_argument(
        "--models",
        nargs="+",
        metavar="MODEL",
        help=f"from {', '.join(MODELS)} {default('models')}",
    )
    bench.add_argument(
        "--samples",
        nargs="+",
        metavar="K",
        help=f"numbers of posterior samples {default('samples')}",
    )
    bench.add_argument(
        "--modes", nargs="+", metavar="MODE", help=f"from {', '.join(MODES)} {default('modes')}"
    )
    bench.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"from {', '.join(METHODS)} {default('methods')}",
    )
    bench.add_argument(
        "--batch",
        nargs="+",
        metavar="B",
        help="batch size, or several for a batch sweep "
        f"(default: per model; --quick: {quick['batch']})",
    )
    bench.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where to run; auto: the sweep's device if it names one, else cuda if torch "
        "sees a GPU, else cpu",
    )
    bench.add_argument("--dtype", choices=DTYPES, help="floating point type (default: float32)")
    bench.add_argument("--threads", type=_positive_int, help="CPU threads (default: 1)")
    bench.add_argument(
        "--chunk-size",
        type=_positive_int,
        help="samples per vectorized chunk (without it: vmap_call's own chunks, all K at "
        "once on a GPU and what fits the last-level cache on a CPU; torch-func all K at once)",
    )
    bench.add_argument(
        "--min-time",
        type=_positive_float,
        help=f"seconds of timing per cell {default('min_time')}",
    )
    bench.add_argument(
        "--repeats",
        type=_positive_int,
        help=f"timed measurements per cell {default('repeats', REPEATS)}",
    )
    bench.add_argument("--seed", type=_seed, help="seed of models, inputs and checks (default: 0)")
    bench.add_argument(
        "--max-loop-samples",
        type=_positive_int,
        metavar="K",
        help="run the Python loops over samples (loop, zuko-loop, sample-model-loop, "
        "bayesian-torch, pyro) only up to this K (default: no limit)",
    )
    bench.add_argument("--sweep", help=f"a named sweep ({', '.join(SWEEPS)}) or a JSON file")
    bench.add_argument("--json", metavar="PATH", help="write the records as JSON")
    bench.add_argument("--csv", metavar="PATH", help="write the records as CSV")
    bench.add_argument("--markdown", metavar="PATH", help="write markdown tables (per model)")
    bench.add_argument("--plot", metavar="PATH.png", help="plot time and speed-up against K")
    bench.add_argument("--quick", action="store_true", help="a tiny run, for a smoke test")
    bench.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    # The errors found after parsing (a sweep merged with the options) are the bench's:
    # its usage line, not the top-level one.
    bench.set_defaults(command_parser=bench)
    return parser


def _check_sweep(parser: argparse.ArgumentParser, sweep: Any, path: str) -> dict[str, Any]:
    r"""Checks the values of a sweep file as the command line checks its options, naming the
    file and the key, also where an option overrides the key (`--samples` drops
    `model_samples`); the names of models, modes and methods, and empty lists of K and batch
    sizes, are checked after the merge, as the command line's are."""

    def fail(key: str, what: str, value: Any) -> None:
        parser.error(f"--sweep: expected {what} for {key!r} in {path}, got {value!r}")

    if not isinstance(sweep, dict):
        parser.error(f"--sweep: expected a JSON object in {path}, got {type(sweep).__name__}")
    unknown = [k for k in sweep if k not in SWEEP_KEYS]
    if unknown:
        parser.error(
            f"--sweep: expected keys from {', '.join(SWEEP_KEYS)} in {path}, "
            f"got {', '.join(map(repr, unknown))}"
        )

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key, value in sweep.items():
        if key in ("threads", "chunk_size", "max_loop_samples", "repeats"):
            optional = key != "repeats"  # null: torch's threads, no chunks, no limit
            if not (integer(value) and value >= 1) and not (optional and value is None):
                fail(key, "a positive integer" + (" or null" if optional else ""), value)
        elif key == "min_time":
            if not (integer(value) or isinstance(value, float)) or not 0 < value < math.inf:
                fail(key, "a positive number", value)
        elif key == "seed":
            if not integer(value) or value not in SEEDS:
                fail(key, "an integer from -2**63 to 2**63 - 1", value)
        elif key == "device":
            if value not in DEVICES:
                fail(key, f"one of {', '.join(DEVICES)}", value)
        elif key == "small":
            if not isinstance(value, bool):
                fail(key, "true or false", value)
        elif key in ("models", "modes", "methods"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                fail(key, "a list of names", value)
        elif key in ("samples", "batch"):
            values = value if isinstance(value, list) else [value]
            if not (key == "batch" and value is None) and not all(
                integer(v) and v >= 1 for v in values
            ):
                fail(key, "a positive integer or a list of them", value)
        elif key == "dtype":
            if value not in DTYPES:
                fail(key, f"one of {', '.join(DTYPES)}", value)
        elif key == "model_samples":
            from .bench import MODELS

            if not isinstance(value, dict):
                fail(key, "an object that maps model names to numbers of samples", value)
            for model, ks in value.items():
                if model not in MODELS:
                    fail(key, f"model names from {', '.join(MODELS)}", model)
                values = ks if isinstance(ks, list) else [ks]
                if not values or not all(integer(k) and k >= 1 for k in values):
                    parser.error(
                        f"--sweep: expected a positive integer or a non-empty list of them "
                        f"for {model!r} in 'model_samples' in {path}, got {ks!r}"
                    )
    return sweep


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    r"""Merges defaults, `--quick`, `--sweep` and explicit options, in that order."""

    from .bench import DEFAULTS, METHODS, MODELS, MODES, SWEEPS

    config: dict[str, Any] = dict(DEFAULTS)
    config["repeats"] = REPEATS
    if args.quick:
        config.update(SWEEPS["quick"])
    if args.sweep is not None:
        if args.sweep in SWEEPS:
            config.update(SWEEPS[args.sweep])
        else:
            try:
                with open(args.sweep) as f:
                    sweep = json.load(f)
            except (OSError, ValueError) as e:
                parser.error(
                    f"--sweep: expected one of {', '.join(SWEEPS)} or a JSON file, "
                    f"got {args.sweep!r} ({e})"
                )
            config.update(_check_sweep(parser, sweep, args.sweep))

    for key in ("models", "modes", "methods", "samples", "batch"):
        value = _split(getattr(args, key))
        if value is not None:
            config[key] = value
            if key == "samples":  # the command line wins over a sweep's per-model K
                config.pop("model_samples", None)
    for key in ("threads", "chunk_size", "min_time", "repeats", "max_loop_samples"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    if args.device != "auto" or "device" not in config:
        config["device"] = args.device

    for key, known in (("models", MODELS), ("modes", MODES), ("methods", METHODS)):
        values = [str(v).lower() for v in config[key]]
        unknown = [v for v in values if v not in known]
        if unknown or not values:
            got = ", ".join(unknown) or "none"
            parser.error(f"--{key}: expected names from {', '.join(known)}, got {got}")
        config[key] = list(dict.fromkeys(values))
    config["methods"] = [m for m in METHODS if m in config["methods"]]  # table order

    def positive(ks: Any, option: str) -> list[int]:
        samples = []
        for k in ks if isinstance(ks, list) else [ks]:
            try:
                samples.append(_positive_int(str(k)))
            except argparse.ArgumentTypeError as e:
                parser.error(f"{option}: {e}")
        return sorted(set(samples))

    config["samples"] = positive(config["samples"], "--samples")
    if not config["samples"]:
        parser.error(
            "--samples: expected at least one positive integer K (or a sweep's), got none"
        )
    limit = config.get("max_loop_samples")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        parser.error(f"--max-loop-samples: expected a positive integer, got {limit!r}")
    if config.get("batch") is not None:
        batches = []
        for b in config["batch"] if isinstance(config["batch"], list) else [config["batch"]]:
            try:
                batches.append(_positive_int(str(b)))
            except argparse.ArgumentTypeError as e:
                parser.error(f"--batch: {e}")
        if not batches:
            parser.error(
                "--batch: expected at least one positive integer (or a sweep's), got none"
            )
        config["batch"] = batches[0] if len(batches) == 1 else list(dict.fromkeys(batches))
    # A sweep file's `model_samples` was checked as the file was read (`_check_sweep`).
    per_model = config.get("model_samples") or {}
    config["model_samples"] = {
        m: positive(ks, f"--sweep: model_samples[{m!r}]")
        for m, ks in per_model.items()
        if m in config["models"]
    }

    import torch

    if config["device"] == "auto":
        config["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    if config["device"] == "cuda" and not torch.cuda.is_available():
        parser.error("--device: expected an available device, got cuda (torch sees no GPU)")
    dtype = args.dtype or config.get("dtype", "float32")
    if dtype not in DTYPES:
        parser.error(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    config["dtype"] = getattr(torch, dtype)
    config["seed"] = config.get("seed", 0) if args.seed is None else args.seed

    return config


def main(argv: list[str] | None = None) -> int:
    r"""Runs the `bayesflow` command line.

    Arguments:
        argv: The arguments, without the program name; `sys.argv[1:]` if :py:`None`.

    Returns:
        The exit status: 0 if every method ran and was checked correct or was reported as
        unsupported, not applicable or not installed; 1 if a method gave wrong numbers, or
        one of bayesflow's own methods crashed on a programming error (`error`:
        AttributeError, KeyError, ...: a bug, not a limitation); 2 for bad arguments; 130 if
        interrupted (the cells done so far are reported).
    """

    parser = _parser()
    args = parser.parse_args(argv)

    if args.command == "bench":
        return _bench(args.command_parser, args)

    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


def _bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    config = _resolve(parser, args)
    given: dict[str, str] = {}
    for option in ("json", "csv", "markdown", "plot"):
        if getattr(args, option) is not None:
            path = getattr(args, option)
            _writable(parser, f"--{option}", path)
            same = given.get(os.path.realpath(path))
            if same is not None:
                parser.error(
                    f"--{option}: expected a file of its own, got {path!r}, the file of "
                    f"--{same} too (one would overwrite the other)"
                )
            given[os.path.realpath(path)] = option
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError as e:
            parser.error(
                f"--plot: expected matplotlib, which `pip install bayesflow[bench]` installs "
                f"({type(e).__name__}: {e})"
            )

    from . import bench

    options = bench.Options(
        batch=config.get("batch"),
        device=config["device"],
        dtype=config["dtype"],
        threads=config.get("threads"),
        chunk_size=config.get("chunk_size"),
        min_time=config["min_time"],
        repeats=config["repeats"],
        seed=config["seed"],
        model_samples=config["model_samples"],
        max_loop_samples=config.get("max_loop_samples"),
        small=config.get("small", False),
    )
    from .bench.methods import LOOPS

    limit = options.max_loop_samples
    if not any(
        limit is None or name not in LOOPS or K <= limit
        for model in config["models"]
        for K in options.model_samples.get(model, config["samples"])
        for name in config["methods"]
    ):
        parser.error(
            "expected at least one cell to run, got none: --max-loop-samples "
            f"{limit} leaves out the loops at every K of the run"
        )
    start = time.perf_counter()
    records: list[dict[str, Any]] = []
    interrupted = False
    try:
        bench.run_bench(
            config["models"],
            config["samples"],
            config["modes"],
            config["methods"],
            options=options,
            progress=not args.no_progress,
            records=records,
        )
    except KeyboardInterrupt:  # keep what was measured
        interrupted = True
        sys.stderr.write("\nbayesflow bench: interrupted; reporting the cells done so far\n")
    elapsed = time.perf_counter() - start

    sys.stdout.write(bench.format_table(records))
    sys.stdout.write(f"({len(records)} cells in {elapsed:.0f} s)\n")

    if args.json:
        bench.write_json(records, args.json)
    if args.csv:
        bench.write_csv(records, args.csv)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(bench.markdown_table(records))
    if args.plot and records:
        bench.plot(records, args.plot)

    wrong = [r for r in records if r["status"] == bench.Status.WRONG]
    for r in wrong:
        sys.stderr.write(
            f"bayesflow bench: {r['method']} gave wrong numbers on {r['model']} {r['mode']} "
            f"K={r['samples']}: {r['detail']}\n"
        )
    crashed = [r for r in records if r["status"] == bench.Status.ERROR]
    for r in crashed:
        sys.stderr.write(
            f"bayesflow bench: {r['method']} crashed on {r['model']} {r['mode']} "
            f"K={r['samples']}: {r['detail']}\n"
        )
    wrong += crashed

    if interrupted:
        return 130
    return 1 if wrong else 0
