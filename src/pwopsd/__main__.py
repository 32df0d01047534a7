"""`python -m pwopsd`: the method and benchmark registries, printed for the bash launchers.

    python -m pwopsd list methods          one name per line, in registry order (pwopsd.losses.METHODS)
    python -m pwopsd list benchmarks       one name per line, in registry order (pwopsd.evaluation.benchmarks.BENCHMARKS)
    python -m pwopsd method-args METHOD    the extra training flags the launchers pass for METHOD, one per line
    python -m pwopsd launcher-config       all of the above in one call, one tab-separated record per line:
                                           "methods NAME...", "benchmarks NAME...", "method-args METHOD ARG..."

The launchers read `launcher-config` once per run (launchers/common.sh, pw_load_registries), so the registries are
the one list of methods, per-method flags and benchmarks. Every printed field is non-empty and holds no tab or
newline, so bash splits it safely with `IFS=$'\\t' read -r -a` or `mapfile -t`. Bad input: one line on stderr, exit 2.
Only the registry a subcommand prints is imported (`methods` imports torch; `benchmarks` does not).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pwopsd.io import UserError, run_main

PROG = "python -m pwopsd"
USAGE = f"usage: {PROG} {{list methods|list benchmarks|method-args METHOD|launcher-config}}"


def _method_names() -> list[str]:
    from pwopsd.losses import METHODS

    return list(METHODS)


def _benchmark_names() -> list[str]:
    from pwopsd.evaluation.benchmarks import BENCHMARKS

    return list(BENCHMARKS)


def _method_args() -> dict[str, tuple[str, ...]]:
    from pwopsd.losses import METHODS

    return {name: tuple(method.launcher_args) for name, method in METHODS.items()}


def _checked(fields: Sequence[str], what: str) -> list[str]:
    """The fields, refused when one could not travel through bash word splitting intact."""
    for field in fields:
        if not field or any(c in field for c in "\t\n\r"):
            raise UserError(f"{what}: {field!r} is empty or holds a tab or newline; the launchers cannot read it")
    return list(fields)


def _names(fields: Sequence[str], what: str) -> list[str]:
    """Registry names go into space-separated bash lists: no whitespace at all."""
    for field in _checked(fields, what):
        if any(c.isspace() for c in field):
            raise UserError(f"{what}: {field!r} holds whitespace; the launchers cannot read it")
    return list(fields)


def _lines(fields: Sequence[str]) -> str:
    return "".join(f"{field}\n" for field in fields)


def render(argv: Sequence[str]) -> str:
    """The text `python -m pwopsd ARGV...` prints; UserError for a bad command line."""
    match list(argv):
        case ["list", "methods"]:
            return _lines(_names(_method_names(), "method name"))
        case ["list", "benchmarks"]:
            return _lines(_names(_benchmark_names(), "benchmark name"))
        case ["list", kind]:
            raise UserError(f"unknown list {kind!r}; expected methods or benchmarks")
        case ["method-args", method]:
            table = _method_args()
            if method not in table:
                raise UserError(f"unknown method {method!r}; expected one of: {', '.join(table)}")
            return _lines(_checked(table[method], f"launcher argument of {method}"))
        case ["launcher-config"]:
            table = _method_args()
            records = [["methods", *_names(list(table), "method name")]]
            records.append(["benchmarks", *_names(_benchmark_names(), "benchmark name")])
            for method, args in table.items():
                records.append(["method-args", method, *_checked(args, f"launcher argument of {method}")])
            return "".join("\t".join(record) + "\n" for record in records)
        case [command, *_] if command in ("list", "method-args", "launcher-config"):
            raise UserError(f"wrong arguments for {command!r}; {USAGE}")
        case [command, *_]:
            raise UserError(f"unknown command {command!r}; {USAGE}")
        case []:
            raise UserError(f"no command; {USAGE}")
    raise AssertionError("unreachable")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0

    def run() -> int:
        sys.stdout.write(render(args))
        return 0

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
