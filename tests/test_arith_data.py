"""data/arith.jsonl: deterministic generator, answers that follow from each row's own numbers, bundled = generated."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

from conftest import REPO_ROOT

GENERATOR = REPO_ROOT / "data" / "make_arith.py"
BUNDLED = REPO_ROOT / "data" / "arith.jsonl"
# The arithmetic and the written operator of each kind, written out independently of the generator.
OPS = {"add": ("+", lambda x, y: x + y), "sub": ("-", lambda x, y: x - y), "mul": ("×", lambda x, y: x * y)}
# The operand ranges of each kind, as the docstring promises them: every (a, b) a row may hold.
ALLOWED = {
    "add": {(a, b) for a in range(1, 10) for b in range(1, 10)},
    "sub": {(a, b) for a in range(3, 10) for b in range(1, a)},
    "mul": {(a, b) for a in range(2, 6) for b in range(2, 6)},
}


def _generate(tmp_path, name: str, *args: str) -> bytes:
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def _rows() -> list[dict]:
    return [json.loads(line) for line in BUNDLED.read_text(encoding="utf-8").splitlines()]


def test_generator_is_deterministic_and_seeded(tmp_path) -> None:
    first, second = _generate(tmp_path, "a.jsonl", "--seed", "3"), _generate(tmp_path, "b.jsonl", "--seed", "3")
    assert first == second
    assert _generate(tmp_path, "c.jsonl", "--seed", "4") != first
    assert len(_generate(tmp_path, "d.jsonl", "--rows", "7").splitlines()) == 7


def test_bundled_file_is_the_generators_output(tmp_path) -> None:
    assert _generate(tmp_path, "arith.jsonl") == BUNDLED.read_bytes()
    assert BUNDLED.read_bytes().isascii() and b"\r" not in BUNDLED.read_bytes()


def test_bundled_file_follows_a_naive_replay_of_the_draws() -> None:
    """The operands are random.Random(0)'s draws in the documented order and ranges (kinds cycle add, sub, mul)."""
    rng = random.Random(0)
    for i, row in enumerate(_rows()):
        kind = ("add", "sub", "mul")[i % 3]
        if kind == "add":
            expected = [rng.randint(1, 9), rng.randint(1, 9)]
        elif kind == "sub":
            a = rng.randint(3, 9)
            expected = [a, rng.randint(1, a - 1)]
        else:
            expected = [rng.randint(2, 5), rng.randint(2, 5)]
        assert (row["kind"], row["numbers"]) == (kind, expected), row


def test_every_answer_is_the_arithmetic_of_its_own_numbers() -> None:
    rows = _rows()
    assert len(rows) == 200 and [r["id"] for r in rows] == list(range(200))
    kinds = {"add": 0, "sub": 0, "mul": 0}
    for r in rows:
        assert set(r) == {"answer", "id", "kind", "numbers", "problem", "solution"}, r
        a, b = r["numbers"]
        symbol, op = OPS[r["kind"]]
        assert (a, b) in ALLOWED[r["kind"]], r
        value = op(a, b)
        assert value >= 1 and r["answer"] == str(value), r
        # The problem is the bare expression, exactly; the solution works it and boxes the answer.
        assert r["problem"] == f"What is {a} {symbol} {b}?", r
        assert r["solution"] == f"{a} {symbol} {b} = {value}. The answer is \\boxed{{{value}}}.", r
        assert re.fullmatch(r"What is \d [+\-×] \d\?", r["problem"]), r
        kinds[r["kind"]] += 1
    assert kinds == {"add": 67, "sub": 67, "mul": 66}
    assert {r["kind"] for r in rows[:3]} == {"add", "sub", "mul"}  # any prefix mixes the kinds


def test_the_evaluator_reads_the_bundled_answers() -> None:
    """Loaded as `--data_file data/arith.jsonl`: the ground truth is the `answer` column, the id the row's id."""
    from pwopsd.evaluation.benchmarks import load_benchmark

    problems, _ = load_benchmark("arith", str(BUNDLED))
    rows = _rows()
    assert [(p.problem_id, p.problem, p.ground_truth) for p in problems] == [
        (r["id"], r["problem"], r["answer"]) for r in rows
    ]


def test_generator_rejects_bad_rows(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(GENERATOR), "--rows", "0", "--out", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == "make_arith.py: error: --rows must be >= 1, got 0"
    assert not (tmp_path / "x.jsonl").exists()
