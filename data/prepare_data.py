"""Rebuild the bundled data files from the raw copies in ../shared/data (see data/SOURCES.md).

`python data/prepare_data.py [--src ../shared/data]`. Each benchmark becomes one JSONL with the original keys and
content unchanged, plus the id field the evaluator reads (docs/evaluation.md#benchmarks): `id` (math500: the row index; aime24: the
original `id`) or `problem_idx` (aime25, hmmt25: 1..30 in file order). GSM8K train becomes `problem`/`solution`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:  # not str.splitlines(): rows may hold U+2028
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{path.relative_to(HERE.parent)}: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=HERE.parent.parent / "shared" / "data")
    src = parser.parse_args().src

    math500 = read_jsonl(src / "math500" / "test.jsonl")
    write_jsonl(HERE / "math500.jsonl", [{"id": i, **r} for i, r in enumerate(math500)])
    write_jsonl(HERE / "aime24.jsonl", read_jsonl(src / "aime2024" / "test.jsonl"))
    numbered = {}
    for name, sub in (("aime25", "aime2025"), ("hmmt25", "hmmt_feb_2025")):
        rows = read_jsonl(src / sub / "derived_test.jsonl")
        numbered[name] = [{"problem_idx": i, **r} for i, r in enumerate(rows, start=1)]
        write_jsonl(HERE / f"{name}.jsonl", numbered[name])
    # The reference reads hmmt25 from a local parquet (HMMT25_PARQUET_PATH, default ./data/hmmt25_clean/train.parquet).
    hmmt = numbered["hmmt25"]
    (HERE / "hmmt25_clean").mkdir(exist_ok=True)
    table = pa.table({k: [r[k] for r in hmmt] for k in ("problem_idx", "problem", "answer")})
    pq.write_table(table, HERE / "hmmt25_clean" / "train.parquet")
    print(f"data/hmmt25_clean/train.parquet: {table.num_rows} rows")
    gsm8k = read_jsonl(src / "gsm8k" / "train.jsonl")
    write_jsonl(HERE / "gsm8k_train.jsonl", [{"problem": r["question"], "solution": r["answer"]} for r in gsm8k])


if __name__ == "__main__":
    main()
