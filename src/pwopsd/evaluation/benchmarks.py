"""The benchmark registry and the code that loads a benchmark's problems.

`BENCHMARKS` is the one list of benchmarks: the evaluator, the result validator, the summary tables and the launchers
(through `python -m pwopsd list benchmarks`) all read it. The benchmarks are MATH-500 (500 problems, hub test split),
AIME 2024 and AIME 2025 (30 each, hub), and HMMT Feb 2025 (30, local parquet at `HMMT25_PARQUET_PATH`), each with its
id and answer columns and a bundled offline copy in `data/` (see docs/evaluation.md#benchmarks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pwopsd.evaluation.extract import extract_boxed_answer
from pwopsd.io import DATA_DIR, DATASET_BUILDERS, REPO_ROOT, UserError, first_line

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark comes from and how its rows map to (problem_id, problem, ground truth)."""

    name: str
    num_problems: int
    hub_id: str | None  # None: read from a parquet file (hmmt25)
    split: str
    id_key: str | None  # None: the row index
    bundled: str  # file in data/ used offline
    answer_key: str = "answer"
    answer_from_solution: bool = False  # a missing `answer` is the last boxed answer of `solution`
    parquet_env: str | None = None
    parquet_default: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("math500", 500, "HuggingFaceH4/MATH-500", "test", None, "math500.jsonl", answer_from_solution=True),
        Benchmark("aime24", 30, "HuggingFaceH4/aime_2024", "train", "id", "aime24.jsonl"),
        Benchmark("aime25", 30, "yentinglin/aime_2025", "train", "problem_idx", "aime25.jsonl"),
        Benchmark(
            "hmmt25",
            30,
            None,
            "train",
            "problem_idx",
            "hmmt25.jsonl",
            parquet_env="HMMT25_PARQUET_PATH",
            parquet_default="./data/hmmt25_clean/train.parquet",
        ),
    )
}
# Accepted by the reference's --dataset but without a pinned source: they need --data_file.
UNSOURCED = ("amo-bench", "minerva", "amc23")


@dataclass(frozen=True)
class Problem:
    problem_id: Any
    problem: str
    ground_truth: str


def rows_to_problems(rows: Sequence[dict[str, Any]], benchmark: Benchmark | None, source: str) -> list[Problem]:
    """Map raw rows to problems: `problem`, the answer (str), id from the benchmark's id column or the row index."""
    if not rows:
        raise UserError(f"{source} has no rows")
    columns = set(rows[0])
    if "problem" not in columns:
        raise UserError(f"{source} has no 'problem' column (columns: {', '.join(sorted(columns))})")
    answer_key = "answer" if benchmark is None else benchmark.answer_key
    from_solution = benchmark is None or benchmark.answer_from_solution
    if answer_key not in columns and not (from_solution and "solution" in columns):
        raise UserError(f"{source} has no '{answer_key}' column (columns: {', '.join(sorted(columns))})")
    if benchmark is not None:
        id_key = benchmark.id_key
        if id_key is not None and id_key not in columns:
            raise UserError(f"{source} has no '{id_key}' column, the problem id of this benchmark")
    else:  # a custom benchmark: the first id-like column, else the row index
        id_key = next((k for k in ("id", "problem_idx", "problem_id") if k in columns), None)
    problems = []
    for index, row in enumerate(rows):
        answer = row.get(answer_key)
        if answer is None and from_solution:
            answer = extract_boxed_answer(row.get("solution") or "")
        if answer is None:
            raise UserError(f"{source} row {index} has no answer")
        problems.append(Problem(index if id_key is None else row[id_key], str(row["problem"]), str(answer)))
    return problems


def load_local_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.json/.parquet/.csv file, read with `datasets`."""
    import datasets

    path = Path(path)
    if path.suffix not in DATASET_BUILDERS:
        raise UserError(f"--data_file {path}: unsupported type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
    if not path.is_file():
        raise UserError(f"--data_file {path} does not exist")
    size = path.stat().st_size
    if size == 0 or (path.suffix != ".parquet" and size < 65536 and not path.read_bytes().strip()):
        # caught here: `datasets` reports an empty file as a bare StopIteration
        raise UserError(f"--data_file {path} is empty; pass a file with one problem per row")
    datasets.disable_progress_bars()
    try:
        return list(datasets.load_dataset(DATASET_BUILDERS[path.suffix], data_files=str(path), split="train"))
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {first_line(e)}") from e


def _hub_unavailable() -> str | None:
    """Why the hub cannot be used now (offline mode, or its host does not answer within 5 s), else None."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return "offline mode"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as e:
        return f"{url.hostname} unreachable: {type(e).__name__}"
    return None


def load_benchmark(name: str, data_file: str | None = None) -> tuple[list[Problem], str]:
    """The problems of benchmark `name` and a description of where they came from."""
    benchmark = BENCHMARKS.get(name)
    if data_file:
        return rows_to_problems(load_local_rows(data_file), benchmark, str(data_file)), str(data_file)
    if name in UNSOURCED:
        raise UserError(f"--dataset {name} has no pinned source yet; pass its problems with --data_file FILE")
    if benchmark is None:
        raise UserError(f"unknown --dataset {name!r}; choose one of {', '.join(BENCHMARKS)} or pass --data_file")
    bundled = DATA_DIR / benchmark.bundled
    if benchmark.hub_id is None:  # hmmt25: a local parquet file
        assert benchmark.parquet_env and benchmark.parquet_default
        explicit = os.environ.get(benchmark.parquet_env)
        path = Path(explicit or benchmark.parquet_default)
        if path.is_file():
            return rows_to_problems(load_local_rows(path), benchmark, str(path)), str(path)
        if explicit:
            raise UserError(f"{benchmark.parquet_env}={explicit} does not exist; fix the path or unset it")
        logger.warning("notice: %s not found; using the bundled %s", path, bundled.relative_to(REPO_ROOT))
    elif reason := _hub_unavailable():
        logger.warning(
            "notice: %s; using the bundled %s for %s", reason, bundled.relative_to(REPO_ROOT), benchmark.hub_id
        )
    else:
        import datasets

        try:
            rows = list(datasets.load_dataset(benchmark.hub_id, split=benchmark.split))
        except Exception as e:
            logger.warning(
                "notice: cannot load %s from the hub (%s); using the bundled %s",
                benchmark.hub_id,
                type(e).__name__,
                bundled.relative_to(REPO_ROOT),
            )
        else:
            source = f"hf://{benchmark.hub_id}/{benchmark.split}"
            return rows_to_problems(rows, benchmark, source), source
    return rows_to_problems(load_local_rows(bundled), benchmark, str(bundled)), str(bundled.relative_to(REPO_ROOT))
