"""Generate `data/arith.jsonl`: seeded one- and two-step arithmetic word problems with worked solutions.

    python data/make_arith.py [--seed 0] [--rows 200] [--out data/arith.jsonl]

Why: the bundled benchmarks (MATH-500, AIME, HMMT) are far beyond SmolLM2-135M-Instruct (about 0% solved), so the
offline demo's table cannot move and the diagnostic has no correct rollouts to compare. These problems use single
digits and one or two steps, the easiest set that still needs a worked answer. Measured: SmolLM2-135M-Instruct still
solves about 0% of them under the evaluator's \\boxed{} grading (it rarely writes \\boxed{}): bench/RESULTS.md.

Each row: `problem`, `solution` (one line per step, ending in `The answer is \\boxed{N}.`), `answer` (the integer as
a string), `id` (the row index), plus `kind` (the template) and `numbers` (the operands as drawn) so that the answer can
be recomputed from the row alone. The output depends only on --seed and --rows (random.Random(seed), fixed template
and name lists), and is written with sorted keys and "\\n" line ends, so the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from pwopsd.io import UserError, atomic_write_text, run_main

NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lucy", "Omar", "Mia", "Jack", "Nora", "Ravi", "Emma")
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "stamps", "shells")
CONTAINERS = ("boxes", "bags", "packs", "jars", "baskets")

KINDS = ("add", "mul_sub", "sub", "add_sub", "mul", "mul_add", "add", "sub_add", "sub", "add_div", "mul", "mul_mul")
"""The template cycle: half one-step (a op b), half two-step ((a op b) op c), so the set spans easy and harder rows."""

SUFFIX = " Answer with just \\boxed{the number}."
"""Appended to every problem: the 135M model rarely writes \\boxed{} from the evaluator's instruction alone."""


def answer_of(kind: str, a: int, b: int, c: int = 0) -> int:
    """The arithmetic of a template (the one rule the test recomputes independently)."""
    if kind == "add":
        return a + b
    if kind == "sub":
        return a - b
    if kind == "mul":
        return a * b
    if kind == "mul_sub":
        return a * b - c
    if kind == "mul_add":
        return a * b + c
    if kind == "add_sub":
        return a + b - c
    if kind == "sub_add":
        return a - b + c
    if kind == "add_div":
        return (a + b) // c
    if kind == "mul_mul":
        return a * b * c
    raise ValueError(kind)


def draw(rng: random.Random, kind: str) -> tuple[int, ...]:
    """Numbers for a template: single digits (the 135M model fails on larger ones), exact division, results >= 0."""
    if kind == "add":
        return rng.randint(1, 9), rng.randint(1, 9)
    if kind == "sub":
        a = rng.randint(3, 9)
        return a, rng.randint(1, a - 1)
    if kind == "mul":
        return rng.randint(2, 5), rng.randint(2, 5)
    if kind in ("mul_sub", "mul_add"):
        a, b = rng.randint(2, 4), rng.randint(2, 4)
        return a, b, rng.randint(1, a * b - 1) if kind == "mul_sub" else rng.randint(1, 9)
    if kind == "add_sub":
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return a, b, rng.randint(1, a + b - 1)
    if kind == "sub_add":
        a = rng.randint(3, 9)
        return a, rng.randint(1, a - 1), rng.randint(1, 9)
    if kind == "add_div":
        c, q = rng.randint(2, 3), rng.randint(2, 4)
        a = rng.randint(1, c * q - 1)
        return a, c * q - a, c
    if kind == "mul_mul":
        return rng.randint(2, 3), rng.randint(2, 3), rng.randint(2, 3)
    raise ValueError(kind)


def render(kind: str, nums: tuple[int, ...], name: str, item: str, box: str) -> tuple[str, str]:
    """(problem, worked solution) of a template; the solution's steps are the template's operations."""
    a, b, c = (*nums, 0)[:3]
    r = answer_of(kind, *nums)
    if kind == "add":
        p = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        s = f"{a} + {b} = {r}."
    elif kind == "sub":
        p = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        s = f"{a} − {b} = {r}."
    elif kind == "mul":
        p = f"{name} has {a} {box} with {b} {item} in each. How many {item} does {name} have?"
        s = f"{a} × {b} = {r}."
    elif kind == "mul_sub":
        p = f"{name} has {a} {box} with {b} {item} in each. {name} gives away {c} {item}. How many {item} are left?"
        s = f"{a} × {b} = {a * b}. {a * b} − {c} = {r}."
    elif kind == "mul_add":
        p = f"{name} buys {a} {box} of {b} {item} and finds {c} more {item}. How many {item} does {name} have now?"
        s = f"{a} × {b} = {a * b}. {a * b} + {c} = {r}."
    elif kind == "add_sub":
        p = f"{name} has {a} {item} and gets {b} more. Then {name} loses {c} {item}. How many {item} are left?"
        s = f"{a} + {b} = {a + b}. {a + b} − {c} = {r}."
    elif kind == "sub_add":
        p = f"{name} has {a} {item} and gives {b} to a friend. Then {name} buys {c} more. How many {item} now?"
        s = f"{a} − {b} = {a - b}. {a - b} + {c} = {r}."
    elif kind == "add_div":
        p = (
            f"{name} has {a} red {item} and {b} blue {item}. {name} shares all of them equally among {c} friends. "
            f"How many {item} does each friend get?"
        )
        s = f"{a} + {b} = {a + b}. {a + b} ÷ {c} = {r}."
    else:  # mul_mul
        p = f"A shop has {a} shelves. Each shelf holds {b} {box}, and each of them has {c} {item}. How many {item}?"
        s = f"{a} × {b} = {a * b}. {a * b} × {c} = {r}."
    return p + SUFFIX, f"{s} The answer is \\boxed{{{r}}}."


def generate(seed: int, rows: int) -> list[dict]:
    """The rows, in order; templates cycle (KINDS), so the first N rows mix one- and two-step problems."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        kind = KINDS[i % len(KINDS)]
        nums = draw(rng, kind)
        name, item, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
        problem, solution = render(kind, nums, name, item, box)
        answer = str(answer_of(kind, *nums))
        out.append(
            {"id": i, "kind": kind, "numbers": list(nums), "problem": problem, "solution": solution, "answer": answer}
        )
    return out


def to_jsonl(rows: list[dict]) -> str:
    """Canonical text: one sorted-key JSON object per line (ASCII escapes, so bytes do not depend on the locale)."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make_arith.py", description=__doc__.partition("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--out", default=str(Path(__file__).with_name("arith.jsonl")))
    args = parser.parse_args(argv)

    def run() -> int:
        if args.rows < 1:
            raise UserError(f"--rows must be >= 1, got {args.rows}")
        atomic_write_text(args.out, to_jsonl(generate(args.seed, args.rows)))
        print(f"wrote {args.rows} rows to {args.out}")
        return 0

    return run_main(run, "make_arith.py")


if __name__ == "__main__":
    sys.exit(main())
