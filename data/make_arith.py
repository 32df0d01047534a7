"""Generate `data/arith.jsonl`: seeded single-digit one-step expressions ("What is 7 + 5?") with worked solutions.

    python data/make_arith.py [--seed 0] [--rows 200] [--out data/arith.jsonl]

Why: the paper's diagnostic compares correct and wrong rollouts, and the demo compares the base and trained models,
so the bundled set must be one that SmolLM2-135M-Instruct solves some of the time but not always (labels are
informative only near 20-80%). The bundled benchmarks (MATH-500, AIME, HMMT) are about 0%. Measured with
SmolLM2-135M-Instruct (float32, temperature 0.6, top-p 0.95, 4 samples per problem): the former word problems scored
about 1% under \\boxed{} grading (the model almost never writes \\boxed{}; it ends "So the final answer is 14.") and
12-22% with the last number of the text as the answer; these bare expressions, with the evaluator's prompt suffix and
96 new tokens, about 36% (add 33%, sub 29%, mul 46%). At the demo's settings (temperature 1.0, top-p 0.95, the first
16 rows, 4 samples each): Avg@4 23%, Pass@4 69%, Maj@4 19%, and not one sample boxed its answer.

Grade them with the evaluator's `--answer_format boxed_or_last_number` (the last \\boxed{}, else the last number of
the text; `pwopsd.evaluation.extract`), and `code/diagnose.py profile` with the same flag: under the reference's
boxed rule nearly every sample is unanswered.

Each row: `problem` ("What is a op b?"), `solution` ("a op b = r. The answer is \\boxed{r}."), `answer` (r as a string),
`id` (the row index), plus `kind` (add, sub, mul: the template) and `numbers` ([a, b] as drawn) so that the answer can
be recomputed from the row alone. The kinds cycle add, sub, mul, so any prefix of the file mixes the three. Numbers:
add a, b in 1..9; sub a in 3..9, b in 1..a-1 (results >= 1); mul a, b in 2..5. The output depends only on --seed and
--rows (random.Random(seed), fixed template list), and is written with sorted keys, ASCII escapes and "\\n" line ends,
so the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from pwopsd.io import UserError, atomic_write_text, run_main

KINDS = ("add", "sub", "mul")
"""The template cycle: row i has kind KINDS[i % 3]."""

SYMBOLS = {"add": "+", "sub": "-", "mul": "×"}
"""The operator as written in the problem and the solution (ASCII minus; × for the product)."""


def answer_of(kind: str, a: int, b: int) -> int:
    """The arithmetic of a template (the one rule the test recomputes independently)."""
    if kind == "add":
        return a + b
    if kind == "sub":
        return a - b
    if kind == "mul":
        return a * b
    raise ValueError(kind)


def draw(rng: random.Random, kind: str) -> tuple[int, int]:
    """Operands of a template: single digits (the 135M model fails on larger ones), a positive difference."""
    if kind == "add":
        return rng.randint(1, 9), rng.randint(1, 9)
    if kind == "sub":
        a = rng.randint(3, 9)
        return a, rng.randint(1, a - 1)
    if kind == "mul":
        return rng.randint(2, 5), rng.randint(2, 5)
    raise ValueError(kind)


def render(kind: str, a: int, b: int) -> tuple[str, str]:
    """(problem, worked solution) of a template."""
    expression = f"{a} {SYMBOLS[kind]} {b}"
    r = answer_of(kind, a, b)
    return f"What is {expression}?", f"{expression} = {r}. The answer is \\boxed{{{r}}}."


def generate(seed: int, rows: int) -> list[dict]:
    """The rows, in order; the kinds cycle (KINDS)."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        kind = KINDS[i % len(KINDS)]
        a, b = draw(rng, kind)
        problem, solution = render(kind, a, b)
        answer = str(answer_of(kind, a, b))
        out.append(
            {"id": i, "kind": kind, "numbers": [a, b], "problem": problem, "solution": solution, "answer": answer}
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
