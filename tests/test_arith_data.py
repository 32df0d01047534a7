"""data/arith.jsonl: deterministic generator, answers that follow from each row's own numbers, bundled = generated."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from conftest import REPO_ROOT

GENERATOR = REPO_ROOT / "data" / "make_arith.py"
BUNDLED = REPO_ROOT / "data" / "arith.jsonl"
# The two operations of each template, written out independently of the generator.
OPS = {"+": lambda x, y: x + y, "−": lambda x, y: x - y, "×": lambda x, y: x * y, "÷": lambda x, y: x / y}


def _generate(tmp_path, name: str, *args: str) -> bytes:
    out = tmp_path / name
    proc = subprocess.run([sys.executable, str(GENERATOR), "--out", str(out), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


def test_generator_is_deterministic_and_seeded(tmp_path) -> None:
    first, second = _generate(tmp_path, "a.jsonl", "--seed", "3"), _generate(tmp_path, "b.jsonl", "--seed", "3")
    assert first == second
    assert _generate(tmp_path, "c.jsonl", "--seed", "4") != first


def test_bundled_file_is_the_generators_output(tmp_path) -> None:
    assert _generate(tmp_path, "arith.jsonl") == BUNDLED.read_bytes()


def test_every_answer_is_the_arithmetic_of_its_own_numbers() -> None:
    rows = [json.loads(line) for line in BUNDLED.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 200 and [r["id"] for r in rows] == list(range(200))
    steps = {1: 0, 2: 0}
    for r in rows:
        assert {"problem", "solution", "answer", "id"} <= r.keys()
        nums = r["numbers"]
        # The problem states the numbers in order (and no other number).
        stated = [int(x) for x in re.findall(r"\d+", r["problem"])]
        assert stated == nums, r
        # Replay the solution's steps: each "x op y = z" must be true, chain on, and use the row's numbers in order.
        eqs = re.findall(r"(\d+) ([+−×÷]) (\d+) = (\d+)\.", r["solution"])
        assert len(eqs) == len(nums) - 1, r
        value = nums[0]
        for (x, op, y, z), n in zip(eqs, nums[1:]):
            assert int(x) == value and int(y) == n, r
            exact = OPS[op](int(x), int(y))
            assert exact == int(z) and int(z) >= 0, r  # exact division, no negative counts
            value = int(z)
        assert r["answer"] == str(value) and r["solution"].endswith(f"The answer is \\boxed{{{value}}}."), r
        steps[len(eqs)] += 1
    assert steps == {1: 100, 2: 100}


def test_generator_rejects_bad_rows(tmp_path) -> None:
    proc = subprocess.run([sys.executable, str(GENERATOR), "--rows", "0", "--out", str(tmp_path / "x.jsonl")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip() == "make_arith.py: error: --rows must be >= 1, got 0"
    assert not (tmp_path / "x.jsonl").exists()
