"""The `capscale` command line: one command, a subcommand per job, above the three packages.

capacity jobs (formats, gmse, compare) are here; training jobs in `commands_train`, analysis jobs in
`commands_analysis`. Every job is also a plain Python function: a subcommand reads its options, calls it and
prints what it returns.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings

from capscale.capacity import InputError, compare, gmse, load_plugin, registry
from capscale.capacity.gmse import DEFAULT_SAMPLES, MAX_ROW_LENGTH, MAX_SAMPLES

from . import commands_analysis, commands_decisions, commands_train
from .options import whole
from .output import emit_json, print_records


def _format_row(entry) -> dict:
    """A registry entry as `capscale formats` lists it: its example's parameters with their defaults and its bits."""
    from capscale.capacity import parse
    from capscale.capacity.formats import format_value
    try:
        fmt = parse(entry.example)
        params = ", ".join(f"{k}={format_value(v)}" for p in fmt.parts for k, v in p.defaults.items())
        bits = f"{fmt.bits_per_value:g}"
    except InputError as err:  # a plugin whose example no longer builds: listed, with why
        params, bits = f"(example does not build: {err})", ""
    return {"name": entry.name, "example": entry.example, "bits": bits, "parameters (defaults)": params,
            "description": entry.description}


def add_formats_command(sub) -> None:
    p = sub.add_parser("formats", help="list the registered formats",
                       description="List the format registry: spec name, example, its bits per value (scales "
                                   "included), its parameters with their defaults, one-line description.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=lambda args: emit_json("formats", [_format_row(e) for e in registry()]) if args.json else
                   print_records([_format_row(e) for e in registry()]))


def _gmse_command(args) -> None:
    if args.bias:
        from capscale.capacity.gmse import error_split
        if args.exact:
            raise InputError("--bias is measured by Monte Carlo: drop --exact")
        rows = [error_split(s, samples=args.samples, seed=args.seed).as_json() for s in args.specs]
        emit_json("gmse", rows, 0.95) if args.json else print_records(rows, floatfmt=".6g")
        return
    results = [gmse(s, samples=args.samples, seed=args.seed, exact=args.exact, row_length=args.row_length)
               for s in args.specs]
    if args.json:
        emit_json("gmse", [{k: r.as_json()[k] for k in ("spec", "gmse", "stderr", "bits_per_value", "rho", "method")}
                           for r in results], 0.95)
    else:
        print_records([{k: v for k, v in r.as_json().items() if k != "shape"} for r in results], floatfmt=".6g")


def add_gmse_command(sub) -> None:
    p = sub.add_parser("gmse", help="Gaussian MSE, bits/value and rho of formats",
                       description="Gaussian MSE of each format spec: Monte Carlo on N(0,1) tensors of shape "
                                   "64x1024 by default, or exact (closed form) for scalar grids with --exact.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="format specs, e.g. int4 'int4(group=128)' 2:4+int4")
    p.add_argument("--exact", action="store_true", help="closed-form GMSE (elementwise scalar grids, sparsity)")
    p.add_argument("--samples", type=whole(2, MAX_SAMPLES), default=DEFAULT_SAMPLES,
                   help="Monte Carlo sample count (default: %(default)s, at most 2^30)")
    p.add_argument("--seed", type=whole(0), default=0, help="Monte Carlo seed (default: %(default)s)")
    p.add_argument("--row-length", type=whole(1, MAX_ROW_LENGTH), default=None, metavar="N",
                   help="measure on rows of N values (a model's input width, at most 2^20): per-row scales see N values")
    p.add_argument("--bias", action="store_true",
                   help="split the GMSE into squared bias E[(E[Q(x)|x] - x)^2] and rounding variance (two roundings "
                        "of each value): nearest rounding is all bias, stochastic rounding (rounding=stochastic) should "
                        "be all variance, which is what a gradient format needs")
    p.add_argument("--json", action="store_true", help="print one JSON object (results: one record per spec; gmse "
                                                       "as value, se and 95%% ci)")
    p.set_defaults(func=_gmse_command)


def _compare_command(args) -> None:
    table = compare(args.specs, samples=args.samples, seed=args.seed)
    if args.json:
        emit_json("compare", table.to_dict("records"), 0.95)
    else:
        print(table.to_string(index=False))


def add_compare_command(sub) -> None:
    p = sub.add_parser("compare", help="compare formats: bits, GMSE, rho, rho per bit, rate-distortion bound",
                       description="Table of formats sorted by capacity: bits/value (scales and metadata "
                                   "included), GMSE (exact where available), rho, rho per bit, and the Shannon "
                                   "bound 2^(-2R) at the same bits.")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("--samples", type=whole(2, MAX_SAMPLES), default=DEFAULT_SAMPLES, help="Monte Carlo sample count "
                                                                                         "(default: %(default)s, at most 2^30)")
    p.add_argument("--seed", type=whole(0), default=0, help="Monte Carlo seed (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object (results: one record per spec)")
    p.set_defaults(func=_compare_command)


def _shipped_files() -> list[str]:
    from capscale import data
    root = data.path()
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix != ".pyc" and p.name != "__init__.py" and "__pycache__" not in p.parts)


def _data_command(args) -> None:
    from capscale import data
    files = _shipped_files()
    if args.action == "list":
        print_records([{"name": name, "bytes": data.path(*name.split("/")).stat().st_size} for name in files])
        return
    if not args.name:
        raise InputError("data path: give NAME, one of the names `capscale data list` prints")
    if args.name not in files:
        close = difflib.get_close_matches(args.name, files, n=3) or [f for f in files if f.endswith(args.name)][:3]
        raise InputError(f"no shipped file {args.name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                              "; `capscale data list` names them"))
    print(data.path(*args.name.split("/")))


def add_data_command(sub) -> None:
    p = sub.add_parser("data", help="the files shipped inside the package: list them, or print one's path",
                       description="The studies, sweep files, published runs and reference tables installed with "
                                   "capscale, by name, from any directory: `capscale data list`; `capscale data path "
                                   "study.toml` prints where it is, e.g. to copy it: cp \"$(capscale data path "
                                   "study.toml)\" .")
    p.add_argument("action", choices=("list", "path"))
    p.add_argument("name", nargs="?", help="a name from `capscale data list` (for `path`)")
    p.set_defaults(func=_data_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capscale", description="Capacity of compressed number formats: Gaussian MSE, training over formats, "
                                     "scaling-law fits and reports. `capscale demo` runs the whole study.")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first: your own formats (it registers them, or specs name its Component "
                             "classes as MODULE:Class). Nothing else ever imports code named in a spec or a table")
    from capscale.capacity.provenance import package_version
    parser.add_argument("--version", action="version", version=f"capscale {package_version('capscale')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_formats_command, add_gmse_command, add_compare_command, add_data_command, *commands_train.ADDERS,
                *commands_analysis.ADDERS, *commands_decisions.ADDERS):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from capscale.analysis.names import FitWarning
    warnings.filterwarnings("ignore", category=FitWarning)  # each command prints a fit's warnings its own way
    try:
        for module in args.plugin:
            load_plugin(module)
        args.func(args)
    except InputError as err:
        print(f"capscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError) as err:  # a folder or file the
        # user cannot write or read (read-only, removed under us): where and why, in one line
        print(f"capscale {args.command}: error: {err.filename or ''}: {err.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capscale: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stdout = open(os.devnull, "w")
    return 0
