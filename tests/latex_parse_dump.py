"""Parse LaTeX strings with math-verify and print a canonical dump (helper of tests/test_math_grader.py).

`python tests/latex_parse_dump.py [--fast] < strings.json > dump.json`

For each input string: what latex2sympy2 returns or raises for it (as math-verify calls it), and what
`math_verify.parse("$…$", fallback_mode="no_fallback")` returns. `--fast` first installs the grading workers' parser
(`pwopsd.evaluation.grade.install_fast_parsing`). Each mode runs in its own process, so neither sees the other's caches.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any


def canonical(value: Any) -> Any:
    """A JSON-able image of a parse result: type, `srepr`, latex2sympy2's unsorted set/And arguments, children."""
    import sympy

    if isinstance(value, (list, tuple)) and not isinstance(value, sympy.Basic):
        return [canonical(v) for v in value]
    if isinstance(value, str):
        return ["str", value]
    out: list[Any] = [type(value).__name__, sympy.srepr(value)]
    unsorted = getattr(value, "_unsorted_args", None)
    if unsorted is not None:
        out.append(canonical(list(unsorted)))
    if isinstance(value, sympy.Basic):
        out.append([canonical(a) for a in value.args])
    return out


def dump(strings: list[str]) -> dict[str, list[Any]]:
    from latex2sympy2_extended import latex2sympy2
    from math_verify import parse
    from math_verify.parser import should_treat_as_complex

    results = {}
    for text in strings:
        try:  # latex2sympy2 as math-verify's parse_latex_cached calls it (a fresh lookup: the patched class if any)
            direct = canonical(
                latex2sympy2.latex2sympy(
                    text, is_real=not should_treat_as_complex(text), convert_degrees=False, normalization_config=None
                )
            )
        except Exception as e:
            direct = ["raises", type(e).__name__, str(e)]
        wrapped = text if "$" in text else f"${text}$"
        results[text] = [direct, canonical(parse(wrapped, fallback_mode="no_fallback", parsing_timeout=None))]
    return results


def main() -> int:
    logging.disable(logging.CRITICAL)
    if "--fast" in sys.argv[1:]:
        from pwopsd.evaluation.grade import install_fast_parsing

        install_fast_parsing()
    json.dump(dump(json.load(sys.stdin)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
