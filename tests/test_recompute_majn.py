"""recompute_majn.py (docs/evaluation.md#recomputing-majn).

The clustered Maj@N rule on saved files, the --apply round trip, bad files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_math_grader import naive_grade, naive_majority

from pwopsd.evaluation import recompute
from pwopsd.evaluation.extract import NO_BOXED_ANSWER


def _sample(pred: str | None, formatted: bool | None = None) -> dict:
    sample = {"predicted_answer": NO_BOXED_ANSWER if pred is None else pred, "full_generation": "...", "correct": False}
    if formatted is not None:
        sample["formatted"] = formatted
    return sample


# Each problem: (ground-truth key, gold, samples). Hand-computed Maj@N under the clustered rule in the comment.
PROBLEMS = [
    # INVALID 11 > 1: wrong (upstream: right)
    ("ground_truth", "5", [_sample("5", True)] + [_sample(None, False)] * 11),
    ("ground_truth", "\\frac12", [_sample("0.5", True), _sample("2", True), _sample("1/2", True)]),  # {0.5, 1/2}: right
    ("answer", "3", [_sample("4", True), _sample("3", True)]),  # tie: earliest (4): wrong; gt from `answer`
    # no flags: "" and the marker are INVALID; 7 x2 vs INVALID x2 -> tie -> {7} was created first: right
    ("gt_answer", "7", [_sample("7"), _sample(NO_BOXED_ANSWER), _sample("7"), _sample("")]),
]  # hand count: 2 of 4 right -> 50 %; the old (buggy) value stored below is 75 %


def _write_result(path: Path, problems=PROBLEMS, old_pct: float = 75.0) -> None:
    results = [{key: gold, "generations": samples} for key, gold, samples in problems]
    path.write_text(json.dumps({"dataset": "math500", "val_n": 12, "majority_vote_at_n": 3,
                                "majority_vote_at_n_pct": old_pct, "results": results}))  # fmt: skip


def _naive_pct(problems) -> float:
    right = 0
    for _, gold, samples in problems:
        formatted = [
            s["formatted"]
            if "formatted" in s
            else bool(s["predicted_answer"]) and s["predicted_answer"] != NO_BOXED_ANSWER
            for s in samples
        ]
        right += naive_majority([s["predicted_answer"] for s in samples], formatted, gold, naive_grade)
    return 100.0 * right / len(problems)


def test_dry_run_reports_and_changes_nothing(tmp_path, capsys) -> None:
    path = tmp_path / "qwen3_4b_base_pwopsd_38k_seed0.json"
    _write_result(path)
    before = path.read_bytes()
    assert _naive_pct(PROBLEMS) == 50.0  # the hand count
    assert recompute.main([str(tmp_path / "*.json"), "--summary_file", str(tmp_path / "s.json")]) == 0
    assert f"{path}: Maj@N 75.00 -> 50.00 (2/4)" in capsys.readouterr().out
    assert path.read_bytes() == before and not (tmp_path / "s.json").exists()


def test_apply_round_trip_keeps_the_first_old_values(tmp_path, capsys) -> None:
    a, b = tmp_path / "a_38k_seed0.json", tmp_path / "b_38k_seed1.json"
    _write_result(a)
    _write_result(b, problems=PROBLEMS[1:3], old_pct=100.0)  # 1 of 2 right
    summary = tmp_path / "summary" / "majn_recomputed_summary.json"
    assert recompute.main([str(tmp_path / "*.json"), "--apply", "--summary_file", str(summary)]) == 0
    data = json.loads(a.read_text())
    assert (data["majority_vote_at_n"], data["majority_vote_at_n_pct"]) == (2, 50.0)
    assert (data["majority_vote_at_n_old_buggy"], data["majority_vote_at_n_pct_old_buggy"]) == (3, 75.0)
    assert data["majority_vote_at_n_method"] == "cluster-all-with-INVALID-marker (recomputed offline)"
    assert data["results"] == json.loads(json.dumps([{k: g, "generations": s} for k, g, s in PROBLEMS]))
    assert json.loads(b.read_text())["majority_vote_at_n_pct"] == _naive_pct(PROBLEMS[1:3]) == 50.0
    assert json.loads(summary.read_text()) == [
        {"file": str(a), "old_pct": 75.0, "new_pct": 50.0},
        {"file": str(b), "old_pct": 100.0, "new_pct": 50.0},
    ]
    # a second --apply is safe: the original (buggy) values stay under *_old_buggy
    assert recompute.main([str(a), "--apply", "--summary_file", str(summary)]) == 0
    again = json.loads(a.read_text())
    assert (again["majority_vote_at_n_old_buggy"], again["majority_vote_at_n_pct_old_buggy"]) == (3, 75.0)
    assert again["majority_vote_at_n_pct"] == 50.0
    assert list(tmp_path.glob("*.tmp.*")) == []


def test_relative_pattern_is_taken_from_the_repository_root(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(recompute, "REPO_ROOT", tmp_path)
    (tmp_path / "eval_results").mkdir()
    _write_result(tmp_path / "eval_results" / "qwen3_4b_base_opsd_38k_seed0.json")
    _write_result(tmp_path / "eval_results" / "dsr1_l8b_opsd_38k_seed0.json")
    monkeypatch.chdir(tmp_path / "eval_results")  # the working directory does not matter
    assert recompute.main(["--summary_file", str(tmp_path / "s.json")]) == 0  # default pattern
    out = capsys.readouterr().out
    assert "eval_results/qwen3_4b_base_opsd_38k_seed0.json: Maj@N 75.00 -> 50.00" in out and "dsr1" not in out


def test_bad_files_get_one_line_each_and_a_failing_exit(tmp_path, capsys) -> None:
    _write_result(tmp_path / "good.json")
    (tmp_path / "corrupt.json").write_text('{"results": [')
    (tmp_path / "foreign.json").write_text(json.dumps({"hello": "world"}))
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    (tmp_path / "nogt.json").write_text(json.dumps({"results": [{"generations": []}]}))
    assert recompute.main([str(tmp_path / "*.json"), "--apply", "--summary_file", str(tmp_path / "s.json")]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("recompute_majn.py: error:")]
    assert len(errors) == 4
    assert any("corrupt.json: not valid JSON" in e for e in errors)
    assert any("foreign.json: not an evaluation result" in e for e in errors)
    assert any("list.json: not an evaluation result" in e for e in errors)
    assert any("nogt.json: results[0] has none of ground_truth, answer, gt_answer" in e for e in errors)
    assert "good.json: Maj@N 75.00 -> 50.00" in captured.out  # the good file was still processed and applied
    assert json.loads((tmp_path / "good.json").read_text())["majority_vote_at_n_pct"] == 50.0
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--grading_workers", "-1"], "--grading_workers must be >= 1, got -1"),
     (["--grading_timeout", "0"], "--grading_timeout must be > 0, got 0.0")],
)  # fmt: skip
def test_bad_grading_flags_are_one_line_errors(flags: list[str], message: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        recompute.main([str(tmp_path / "*.json"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and message in err[-1] and "Traceback" not in "".join(err)


def test_no_matching_file(tmp_path, capsys) -> None:
    assert recompute.main([str(tmp_path / "*.json")]) == 1
    assert "no file matches" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("sample", "expected"),
    [({"predicted_answer": "5"}, True), ({"predicted_answer": ""}, False), ({"predicted_answer": NO_BOXED_ANSWER}, False),
     ({"predicted_answer": None}, False), ({"predicted_answer": "", "formatted": True}, True),
     ({"predicted_answer": "5", "formatted": False}, False)],
)  # fmt: skip
def test_formatted_status(sample: dict, expected: bool) -> None:
    assert recompute.is_formatted(sample) is expected
