"""recompute_majn.py (docs/evaluation.md#recomputing-majn).

The clustered Maj@N rule on saved files (empty boxes of old and new files vote as the reference's stored marker), the
--apply round trip, every file checked before any is written, one-line errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT
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


def _naive_pct(problems, as_stored: bool = True) -> float:
    """Maj@N % by the naive vote. as_stored: over what the reference stores (`extraction if extraction else marker`,
    so a formatted `""` votes as the marker); else over the saved strings as they are (pwopsd before the fix)."""
    right = 0
    for _, gold, samples in problems:
        formatted = [
            s["formatted"]
            if "formatted" in s
            else bool(s["predicted_answer"]) and s["predicted_answer"] != NO_BOXED_ANSWER
            for s in samples
        ]
        preds = [s["predicted_answer"] for s in samples]
        if as_stored:
            preds = [p if p else NO_BOXED_ANSWER for p in preds]
        right += naive_majority(preds, formatted, gold, naive_grade)
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


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--grading_workers", "-1"], "--grading_workers must be >= 1, got -1"),
     (["--grading_timeout", "0"], "--grading_timeout must be > 0 and <= 1e+06 seconds, got 0.0"),
     (["--grading_timeout", "-2"], "--grading_timeout must be > 0 and <= 1e+06 seconds, got -2.0"),
     (["--grading_timeout", "nan"], "--grading_timeout must be > 0 and <= 1e+06 seconds, got nan"),
     (["--grading_timeout", "inf"], "--grading_timeout must be > 0 and <= 1e+06 seconds, got inf"),
     (["--grading_timeout", "abc"], "argument --grading_timeout: invalid float value: 'abc' (see --help)"),
     (["--grader", "loose"], "argument --grader: invalid choice: 'loose' (choose from 'reference', 'strict') (see --help)"),
     (["--bogus"], "unrecognized arguments: --bogus (see --help)"),
     (["--apply", "--summary_file", "{tmp}"], "--summary_file {tmp} is a folder; give a file path (.json)"),
     (["--apply", "--summary_file", "{tmp}/r.json/s.json"],
      "--summary_file {tmp}/r.json/s.json: {tmp}/r.json is a file, not a folder; give another path")],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(flags: list[str], message: str, tmp_path, capsys) -> None:
    _write_result(tmp_path / "r.json")
    before = (tmp_path / "r.json").read_bytes()
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert recompute.main([str(tmp_path / "*.json"), *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"recompute_majn.py: error: {message.replace('{tmp}', str(tmp_path))}"]
    assert captured.out == "" and "Traceback" not in captured.err
    assert (tmp_path / "r.json").read_bytes() == before  # checked before anything is graded or written


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


# ----------------------------------------------------------------------------------------------------------------------
# Empty boxes: old files store "" (formatted), new files and the reference store the marker (formatted)

EMPTY = object()  # placeholder for an empty \boxed{} in the hand cases below


def _empty_box_problems(stored_empty: str) -> list:
    """Hand cases with empty boxes saved as `stored_empty` ("" = pwopsd before the fix, the marker = the reference).

    Reference rule: all empty boxes of a problem are ONE ordinary cluster (the marker is equivalent to itself),
    which can win and is then wrong; unformatted samples are INVALID, a separate cluster.
    """

    def samples(*groups: tuple[object, int]) -> list[dict]:
        out = []
        for pred, count in groups:
            if pred is EMPTY:
                out += [_sample(stored_empty, True)] * count
            elif pred is None:
                out += [_sample(None, False)] * count
            else:
                out += [_sample(pred, True)] * count
        return out

    return [
        # 6 empty boxes, then 6 correct: tie, the empty-box cluster was created first and wins -> wrong
        ("ground_truth", "5", samples((EMPTY, 6), ("5", 6))),
        # 6 correct, then 6 empty boxes: tie, {5} first -> right
        ("ground_truth", "5", samples(("5", 6), (EMPTY, 6))),
        # INVALID 4, empty boxes 4, {7, 7.0} 5: right (were the empty boxes INVALID, 8 would beat 5)
        ("ground_truth", "7", samples((None, 4), (EMPTY, 4), ("7", 3), ("7.0", 2))),
        # INVALID 3, empty boxes 5, {1/2, 0.5} 4: the empty boxes win -> wrong (one cluster each would give right)
        ("answer", "\\frac{1}{2}", samples((None, 3), ("0.5", 2), (EMPTY, 5), ("1/2", 2))),
    ]  # hand count: 2 of 4 right -> 50 %


def test_empty_boxes_vote_as_the_reference_s_marker_in_old_and_new_files(tmp_path, capsys) -> None:
    old_style, new_style = _empty_box_problems(""), _empty_box_problems(NO_BOXED_ANSWER)
    assert _naive_pct(old_style) == _naive_pct(new_style) == 50.0  # the hand count, by the naive reference vote
    assert _naive_pct(old_style, as_stored=False) == 100.0  # what clustering "" as saved gave: every "" a singleton
    _write_result(tmp_path / "a_old_seed0.json", problems=old_style, old_pct=100.0)
    _write_result(tmp_path / "b_new_seed0.json", problems=new_style, old_pct=100.0)
    summary = tmp_path / "s.json"
    assert recompute.main([str(tmp_path / "*.json"), "--apply", "--summary_file", str(summary)]) == 0
    out = capsys.readouterr().out.splitlines()
    a, b = tmp_path / "a_old_seed0.json", tmp_path / "b_new_seed0.json"
    assert f'{a}: Maj@N 100.00 -> 50.00 (2/4; 21 empty box(es) saved as "" voted as {NO_BOXED_ANSWER})' in out
    assert f"{b}: Maj@N 100.00 -> 50.00 (2/4)" in out
    for path in (a, b):
        data = json.loads(path.read_text())
        assert (data["majority_vote_at_n"], data["majority_vote_at_n_pct"]) == (2, 50.0)
        assert data["majority_vote_at_n_pct_old_buggy"] == 100.0
    assert json.loads(summary.read_text()) == [
        {"file": str(a), "old_pct": 100.0, "new_pct": 50.0},
        {"file": str(b), "old_pct": 100.0, "new_pct": 50.0},
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Every file is checked before any is written


def _bad_files(folder: Path) -> dict[str, str]:
    """Write one bad file per problem the check catches; returns {file name: expected message}."""
    gen = {"predicted_answer": "5", "formatted": True}
    contents = {
        "corrupt.json": ('{"results": [', "not valid JSON (JSONDecodeError: "),
        "latin1.json": (b'{"results": "\xff"}', "not valid JSON (UnicodeDecodeError: "),
        "foreign.json": ({"hello": "world"}, "not an evaluation result (no 'results' list)"),
        "list.json": ([1, 2], "not an evaluation result (no 'results' list)"),
        "no_problems.json": ({"results": []}, "'results' is empty: no problem to vote on"),
        "pct_string.json": (
            {"majority_vote_at_n_pct": "75%", "results": [{"answer": "5", "generations": [gen]}]},
            'majority_vote_at_n_pct is "75%", not a number (correct it, or remove the key)',
        ),
        "count_bool.json": (
            {"majority_vote_at_n": True, "results": [{"answer": "5", "generations": [gen]}]},
            "majority_vote_at_n is true, not a number (correct it, or remove the key)",
        ),
        "pct_nan.json": (
            '{"majority_vote_at_n_pct": NaN, "results": [{"answer": "5", "generations": [{"predicted_answer": "5"}]}]}',
            "majority_vote_at_n_pct is NaN, not a number (correct it, or remove the key)",
        ),
        "result_not_object.json": ({"results": [3]}, "results[0] is 3, not an object"),
        "nogt.json": ({"results": [{"generations": []}]}, "results[0] has none of ground_truth, answer, gt_answer"),
        "gt_null.json": (
            {"results": [{"ground_truth": None, "generations": [gen]}]},
            "results[0].ground_truth is null, not a string or number",
        ),
        "no_generations.json": ({"results": [{"answer": "5"}]}, "results[0] has no 'generations' list"),
        "empty_generations.json": (
            {"results": [{"answer": "5", "generations": [gen]}, {"answer": "5", "generations": []}]},
            "results[1].generations is empty: no sample to vote on",
        ),
        "sample_not_object.json": (
            {"results": [{"answer": "5", "generations": [gen, "5"]}]},
            'results[0].generations[1] is "5", not an object',
        ),
        "no_prediction.json": (
            {"results": [{"answer": "5", "generations": [{"full_generation": "x"}]}]},
            "results[0].generations[0] has no 'predicted_answer'",
        ),
        "prediction_number.json": (
            {"results": [{"answer": "5", "generations": [{"predicted_answer": 5}]}]},
            "results[0].generations[0].predicted_answer is 5, not a string",
        ),
        "formatted_string.json": (
            {"results": [{"answer": "5", "generations": [{"predicted_answer": "5", "formatted": "yes"}]}]},
            'results[0].generations[0].formatted is "yes", not true or false',
        ),
    }
    for name, (content, _) in contents.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
    (folder / "folder.json").mkdir()  # the pattern matches a folder
    expected = {name: message for name, (_, message) in contents.items()}
    expected["folder.json"] = "cannot read it (IsADirectoryError: "
    return expected


def test_every_file_is_checked_before_any_is_written(tmp_path) -> None:
    """The command line of the README, with good files before and after bad ones: the good ones are all recomputed
    and written, the summary lists them, each bad file gets one line and is left as it was, exit status 1."""
    _write_result(tmp_path / "a_good.json")
    _write_result(tmp_path / "z_good.json", problems=_empty_box_problems(""), old_pct=100.0)
    expected = _bad_files(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and "good" not in p.name}
    summary = tmp_path / "out" / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "eval" / "recompute_majn.py"), str(tmp_path / "*.json"), "--apply",
         "--summary_file", str(summary)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    errors = proc.stderr.splitlines()
    assert errors[-1] == f"recompute_majn.py: {len(expected)} of {len(expected) + 2} file(s) could not be processed"
    errors = errors[:-1]
    assert len(errors) == len(expected)
    for name, message in expected.items():
        line = next(e for e in errors if e.startswith(f"recompute_majn.py: error: {tmp_path / name}: "))
        assert line.removeprefix(f"recompute_majn.py: error: {tmp_path / name}: ").startswith(message), line
    assert json.loads((tmp_path / "a_good.json").read_text())["majority_vote_at_n_pct"] == _naive_pct(PROBLEMS) == 50
    z_good = json.loads((tmp_path / "z_good.json").read_text())
    assert z_good["majority_vote_at_n_pct"] == _naive_pct(_empty_box_problems("")) == 50.0
    assert json.loads(summary.read_text()) == [
        {"file": str(tmp_path / "a_good.json"), "old_pct": 75.0, "new_pct": 50.0},
        {"file": str(tmp_path / "z_good.json"), "old_pct": 100.0, "new_pct": 50.0},
    ]
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # bad files untouched
    assert list(tmp_path.glob("*.tmp.*")) == []
