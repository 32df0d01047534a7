"""Evaluate a causal LM on math benchmarks: N samples per problem, Pass@N / Avg@N / Maj@N.

    python eval/evaluate_math.py --base_model outputs/NAME_merged --dataset math500 --val_n 12 --enable_thinking \\
        --seed 0 --output_file eval_results/NAME_38k_seed0.json

The evaluator generates N samples per problem, extracts the last `\\boxed{}` (`--answer_format boxed`, the reference's
rule; `boxed_or_last_number` falls back to the last number for models that never box), grades it with math-verify and
reports Pass@N, Avg@N and clustered Maj@N (docs/evaluation.md). Flags and JSON keys are the reference's
(docs/evaluation.md#command-line, docs/evaluation.md#output-json), plus `--backend {auto,vllm,hf}`, `--data_file`,
`--trust_remote_code`, `--grader {reference,strict}`, `--no_resume`, `--grading_timeout`, `--grading_workers`,
`--sample_seeds {engine,independent}`, `--dtype {auto,bfloat16,float16,float32}` (transformers backend),
`--answer_format {boxed,boxed_or_last_number}`.

* Data (`benchmarks.py`): the reference's hub datasets; offline, or when the hub cannot be reached, the bundled copies
  in `data/` (same problems, ids and counts) with a one-line notice. `--data_file` reads a local
  .jsonl/.json/.parquet/.csv.
* Generation (`generate.py`): vLLM (one engine, every prompt submitted at once, `SamplingParams(n=val_n, seed=...)`) or
  transformers (`--backend hf`: the same sampling chain, seeded per sample, the N samples of a problem in one batch
  without padding, in the dtype `--dtype` resolves to: `pwopsd.device.compute_dtype`).
* Grading: `math_grader` (cached, parallel, hard time limit per comparison): the last brace-balanced box, math-verify
  equivalence, the clustered majority vote (docs/evaluation.md#extraction to docs/evaluation.md#metrics).
* Resumable: every finished problem is appended to `<output_file>.partial.jsonl` (created with the first finished
  problem, so a run that fails to start leaves nothing behind); a re-run with the same settings resumes from it
  (`--no_resume` starts over). The settings include the answer format and the compute dtype the samples were
  generated in; a log written before they were recorded counts as `boxed` and as `--dtype auto` (the defaults). The
  final JSON is written to a temporary file and renamed.
* Bad input is one line and exit status 2, found before the model loads where it can be: flags, the output path,
  the adapter folder, the data file, the partial file's lines, a full disk (the partial file is kept).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pwopsd.device import DTYPE_CHOICES
from pwopsd.evaluation.benchmarks import BENCHMARKS, Problem, load_benchmark
from pwopsd.evaluation.extract import ANSWER_FORMATS, extract_answer, stored_answer
from pwopsd.evaluation.generate import (
    SAMPLE_SEED_RULES,
    HFBackend,
    VLLMBackend,
    build_prompt,
    resolve_backend,
    vllm_installed,
)
from pwopsd.evaluation.grade import GRADERS
from pwopsd.evaluation.metrics import aggregate_metrics, pass_at_k_table
from pwopsd.evaluation.vote import ProblemGrade
from pwopsd.evaluation.workers import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, MathGrader
from pwopsd.io import OneLineErrors, UserError, atomic_write_json, first_line, run_main

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial.jsonl"
PARTIAL_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------------------
# Command line (docs/evaluation.md#command-line)


@dataclass
class EvalArguments:
    base_model: str = field(metadata={"help": "Model folder or hub id (merged model)."})
    dataset: str = field(metadata={"help": f"Benchmark: {', '.join(BENCHMARKS)} (any name with --data_file)."})
    output_file: str = field(metadata={"help": "Result JSON (keys: docs/evaluation.md#output-json)."})
    val_n: int = field(default=6, metadata={"help": "Samples per problem (N)."})
    temperature: float = 1.0
    top_p: float | None = field(default=None, metadata={"help": "Default 0.95 with --enable_thinking, else 0.8."})
    top_k: int = field(default=-1, metadata={"help": "-1: no top-k."})
    min_p: float = 0.0
    presence_penalty: float = 0.0
    enable_thinking: bool = field(default=False, metadata={"help": "Render the prompt with enable_thinking=True."})
    max_new_tokens: int = 38912
    tensor_parallel_size: int = 1
    seed: int | None = field(default=None, metadata={"help": "Sampling seed; unset = unseeded."})
    checkpoint_dir: str | None = field(default=None, metadata={"help": "Optional LoRA adapter (rank <= 64)."})
    num_samples: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems."})
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = field(default=None, metadata={"help": "Default 40960 with thinking, else 32768."})
    backend: Literal["auto", "vllm", "hf"] = field(
        default="auto", metadata={"help": "auto: vLLM when it is installed and CUDA is available, else transformers."}
    )
    data_file: str | None = field(default=None, metadata={"help": "Local .jsonl/.json/.parquet/.csv with problems."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Off by default (the reference always sets it)."})
    grader: Literal["reference", "strict"] = field(default="reference", metadata={"help": "See math_grader.py."})
    resume: bool = field(default=True, metadata={"help": "Resume from <output_file>.partial.jsonl."})
    grading_timeout: float = field(default=DEFAULT_TIMEOUT_S, metadata={"help": "Hard limit per comparison (s)."})
    grading_workers: int | None = field(default=None, metadata={"help": "Grading processes (default: cores, max 8)."})
    hf_batch_size: int = field(
        default=64,
        metadata={"help": "transformers backend: sequences per generate call (whole problems of val_n samples each)."},
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = field(
        default="auto",
        metadata={
            "help": "transformers backend: the compute dtype. auto: the checkpoint's when the device computes it "
            "natively, else float32 (a bf16 checkpoint on a CPU without native bf16 runs ~6x faster in float32). "
            "vLLM always uses its own auto."
        },
    )
    answer_format: Literal["boxed", "boxed_or_last_number"] = field(
        default="boxed",
        metadata={
            "help": "How a sample's answer is read. boxed: the last \\boxed{} (the reference's rule). "
            "boxed_or_last_number: the last \\boxed{}, else the last number of the text, for small models that "
            "answer 'So the answer is 14.' and never box (a sample then counts as formatted when it has either)."
        },
    )
    sample_seeds: Literal["engine", "independent"] = field(
        default="engine",
        metadata={
            "help": "engine: sample j of every problem is seeded --seed + j (vLLM's n>1 rule; seeds S and S+1 share "
            "val_n - 1 streams). independent: a hashed seed per (seed, problem, sample); needs --seed."
        },
    )

    def __post_init__(self) -> None:
        if self.top_p is None:
            self.top_p = 0.95 if self.enable_thinking else 0.8
        if self.max_model_len is None:
            self.max_model_len = 40960 if self.enable_thinking else 32768
        checks = [
            (self.val_n >= 1, f"--val_n must be >= 1, got {self.val_n}"),
            (0 <= self.temperature <= 2, f"--temperature must be in [0, 2], got {self.temperature}"),
            (
                math.isfinite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                f"--presence_penalty must be in [-2, 2] (vLLM's range), got {self.presence_penalty}",
            ),
            (0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 0, f"--top_k must be -1 (off) or >= 0, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"--min_p must be in [0, 1], got {self.min_p}"),
            (self.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.num_samples is None or self.num_samples >= 1, f"--num_samples must be >= 1, got {self.num_samples}"),
            (self.seed is None or self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (
                0 < self.grading_timeout <= MAX_TIMEOUT_S,  # False for nan too
                f"--grading_timeout must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}, got {self.grading_timeout}",
            ),
            (
                self.grading_workers is None or self.grading_workers >= 1,
                f"--grading_workers must be >= 1, got {self.grading_workers}",
            ),
            (self.hf_batch_size >= 1, f"--hf_batch_size must be >= 1, got {self.hf_batch_size}"),
            (
                self.dtype in DTYPE_CHOICES,
                f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}",
            ),
            (
                self.answer_format in ANSWER_FORMATS,
                f"--answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {self.answer_format!r}",
            ),
            (
                self.sample_seeds in SAMPLE_SEED_RULES,
                f"--sample_seeds must be one of {', '.join(SAMPLE_SEED_RULES)}, got {self.sample_seeds!r}",
            ),
            (
                self.sample_seeds != "independent" or self.seed is not None,
                "--sample_seeds independent needs --seed S (unseeded samples are already independent)",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        assert self.grader in GRADERS


def parse_args(argv: Sequence[str] | None) -> EvalArguments:
    """Parse the command line; every argparse complaint (unknown flag, bad value, missing flag) is a UserError."""
    from transformers import HfArgumentParser

    class Parser(OneLineErrors, HfArgumentParser):
        """transformers' dataclass parser with one-line errors."""

    parser = Parser(EvalArguments, description=__doc__.split("\n\n")[0])
    args, unknown = parser.parse_args_into_dataclasses(
        args=list(argv) if argv is not None else None, return_remaining_strings=True
    )
    if unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)} (see --help)")
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Resumable partial results


def generation_dtype(requested: str, args: EvalArguments, backend: str) -> str:
    """The dtype the samples are generated in, by name: with the transformers backend what `requested` (a --dtype
    value) resolves to on this machine for --base_model (`HFBackend`'s rule, so `auto` reads float32 on a CPU without
    native bf16 and bfloat16 on a recent GPU); with vLLM always "auto", vLLM's own choice (it ignores --dtype).

    Recorded resolved, not as the flag: the same flag on another machine can give another dtype, and other samples."""
    if backend != "hf":
        return "auto"
    import torch

    from pwopsd.device import checkpoint_dtype, compute_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    checkpoint = checkpoint_dtype(args.base_model, trust_remote_code=args.trust_remote_code)
    return str(compute_dtype(requested, device, checkpoint)).removeprefix("torch.")


def run_settings(args: EvalArguments, backend: str) -> dict[str, Any]:
    """What a resumed run must share with the partial file it resumes: everything that changes the samples or the
    answers read from them (the answer format is applied at grading, but a log is one run: mixing is refused)."""
    keys = (
        "base_model", "checkpoint_dir", "dataset", "data_file", "val_n", "temperature", "top_p", "top_k", "min_p",
        "presence_penalty", "enable_thinking", "max_new_tokens", "max_model_len", "seed",
    )  # fmt: skip
    return {
        "backend": backend,
        **{k: getattr(args, k) for k in keys},
        "sample_seed_rule": args.sample_seeds,
        "dtype": generation_dtype(args.dtype, args, backend),
        "answer_format": args.answer_format,
    }


def legacy_settings(args: EvalArguments, backend: str) -> dict[str, Any]:
    """Values of the settings a partial log written before they were recorded holds implicitly: the defaults of the
    time. `answer_format`: boxed, the only rule then. `dtype`: what `--dtype auto` (the default) resolves to here, so
    the default command resumes such a log and an explicit other dtype is refused (never a silent mix of dtypes)."""
    return {"answer_format": "boxed", "dtype": generation_dtype("auto", args, backend)}


class PartialLog:
    """`<output>.partial.jsonl`: a header line with the run settings, then one line per finished problem.

    The file is created with the first finished problem, not before: a run that fails before it (a bad model, a bad
    adapter) leaves no file that would make the corrected command refuse to start."""

    def __init__(
        self, path: Path, settings: dict[str, Any], resume: bool, legacy: dict[str, Any] | None = None
    ) -> None:
        """`legacy`: the value of each setting that a header written before the setting was recorded lacks."""
        self.path = path
        self.settings = settings
        self.legacy = dict(legacy or {})
        self.done: dict[int, dict[str, Any]] = {}
        if path.exists() and not resume:
            path.unlink()
        if path.exists():
            self._load(settings)

    def _load(self, settings: dict[str, Any]) -> None:
        with self.path.open("rb") as f:
            data = f.read()
        good_end = 0
        lines = data.split(b"\n")
        records = []
        for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: after the last newline (a partial write)
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{self.path} line {number} is corrupt; delete the file or pass --no_resume") from e
            good_end += len(line) + 1
        if good_end != len(data):  # a write cut short by a kill: drop it
            with self.path.open("r+b") as f:
                f.truncate(good_end)
        header = records[0] if records else None
        if (
            not isinstance(header, dict)
            or header.get("pwopsd_partial") != PARTIAL_FORMAT
            or not isinstance(header.get("settings"), dict)
        ):
            raise UserError(f"{self.path} is not a partial result file; delete it or pass --no_resume")
        saved = dict(header["settings"])
        if saved.get("backend") == "vllm":  # written before the rule was recorded: vLLM always used the engine rule
            saved.setdefault("sample_seed_rule", "engine")
        for key, value in self.legacy.items():
            saved.setdefault(key, value)
        changed = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if changed and len(records) == 1:  # no problem in it (a run that failed to start): nothing to lose
            logger.info("replacing %s: it holds no problem and was written with other settings", self.path)
            self.path.unlink()
            return
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise UserError(f"{self.path} was written with other settings ({diff}); pass --no_resume to start over")
        for number, record in enumerate(records[1:], start=2):
            self._check_record(record, number, settings["val_n"])
            self.done[record["index"]] = record
        logger.info("resuming: %d problem(s) already generated in %s", len(self.done), self.path)

    def _check_record(self, record: Any, number: int, val_n: int) -> None:
        """A problem line must be `{index, problem_id, generations: [val_n texts]}`; anything else is refused with its
        line number (it was edited or written by another tool: regenerating silently would hide that)."""
        where = f"{self.path} line {number}"
        fix = "delete the line (that problem is generated again) or pass --no_resume"
        if not isinstance(record, dict):
            raise UserError(f"{where} is a JSON {type(record).__name__}, not a problem record; {fix}")
        index = record.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise UserError(f"{where} has no valid 'index' (got {index!r}); {fix}")
        if "problem_id" not in record:
            raise UserError(f"{where} has no 'problem_id'; {fix}")
        generations = record.get("generations")
        if not isinstance(generations, list) or not all(isinstance(g, str) for g in generations):
            raise UserError(f"{where} has no 'generations' list of texts; {fix}")
        if len(generations) != val_n:
            raise UserError(
                f"{where} holds {len(generations)} generation(s) for problem index {index}, but --val_n is {val_n}; "
                f"{fix}"
            )

    def _write_line(self, obj: dict[str, Any], mode: str = "a") -> None:
        try:
            with self.path.open(mode, encoding="utf-8") as f:
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk, a quota: what is already in the file stays (a cut line is dropped later)
            raise UserError(
                f"cannot write {self.path}: {e.strerror or first_line(e)}; the {len(self.done)} problem(s) already in "
                "it are kept: free space and re-run the same command to resume"
            ) from e

    def add(self, index: int, problem_id: Any, generations: list[str]) -> None:
        """Append a finished problem (the header first, if the file does not exist yet)."""
        if not self.path.exists():
            self._write_line({"pwopsd_partial": PARTIAL_FORMAT, "settings": self.settings}, mode="w")
        record = {"index": index, "problem_id": problem_id, "generations": generations}
        self._write_line(record)
        self.done[index] = record


# ----------------------------------------------------------------------------------------------------------------------
# Results: the keys of docs/evaluation.md#output-json, then pwopsd's extras


def build_result(
    args: EvalArguments,
    problems: Sequence[Problem],
    generations: Sequence[list[str]],
    grader: MathGrader,
    backend: str,
    data_source: str,
    dtype: str,
) -> dict[str, Any]:
    """Grade every problem and assemble the output JSON: run settings, metrics, pwopsd's extras, per-problem results.

    The answers are read with --answer_format (`extract.extract_answer`); a sample is formatted when its rule found
    an answer (a box; with boxed_or_last_number also a number)."""
    predictions = [[extract_answer(text, args.answer_format) for text in texts] for texts in generations]
    formatted = [[p is not None for p in preds] for preds in predictions]
    graded = grader.grade_problems(
        [(preds, flags, p.ground_truth) for preds, flags, p in zip(predictions, formatted, problems)]
    )
    results = [
        problem_entry(problem, sample_entries(texts, preds, flags, grade.correct), grade, args.val_n)
        for problem, texts, preds, flags, grade in zip(problems, generations, predictions, formatted, graded)
    ]
    num_correct = [r["num_correct"] for r in results]
    metrics = aggregate_metrics(
        num_correct, [r["majority_vote_correct"] for r in results], [sum(flags) for flags in formatted], args.val_n
    )
    return {
        **result_settings(args),
        **metrics,
        "pass_at_k": pass_at_k_table(num_correct, args.val_n),
        **result_provenance(args, grader, backend, data_source, dtype),
        "results": results,
    }


def sample_entries(
    texts: Sequence[str], predictions: Sequence[str | None], formatted: Sequence[bool], correct: Sequence[bool]
) -> list[dict[str, Any]]:
    """One entry per sample, in generation order: the stored answer (`stored_answer`: the extracted answer, or
    `[No boxed answer found]` without one or for an empty box), the text, its grade and whether it had an answer."""
    return [
        {
            "predicted_answer": stored_answer(pred),
            "full_generation": text,
            "correct": ok,
            "formatted": has_box,
        }
        for text, pred, has_box, ok in zip(texts, predictions, formatted, correct)
    ]


def problem_entry(problem: Problem, samples: list[dict[str, Any]], grade: ProblemGrade, val_n: int) -> dict[str, Any]:
    """A problem's entry of `results`: the problem, its samples, Pass@N and Maj@N, and the first sample's keys."""
    num_correct = sum(grade.correct)
    return {
        "problem_id": problem.problem_id,
        "problem": problem.problem,
        "ground_truth": problem.ground_truth,
        "val_n": val_n,
        "generations": samples,
        "num_correct": num_correct,
        "pass_at_n": num_correct > 0,
        "majority_vote_correct": grade.majority.correct,
        **samples[0],  # legacy first-sample copies
    }


def result_settings(args: EvalArguments) -> dict[str, Any]:
    """The run settings that open the result JSON, in the reference's key order."""
    keys = (
        "base_model", "dataset", "enable_thinking", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
        "max_new_tokens", "val_n", "seed",
    )  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def result_provenance(
    args: EvalArguments, grader: MathGrader, backend: str, data_source: str, dtype: str
) -> dict[str, Any]:
    """pwopsd's extras after the metrics: how the samples were generated and graded, where the problems came from.

    `dtype` is the compute dtype of the samples (`generation_dtype`); `answer_format` the extraction rule. A file
    without them (older pwopsd, the reference) was read with the boxed rule."""
    return {
        "backend": backend,
        "dtype": dtype,
        "sample_seed_rule": args.sample_seeds,
        "grader": args.grader,
        "answer_format": args.answer_format,
        "math_verify_version": importlib.metadata.version("math-verify"),
        "grading_timeouts": grader.timeouts,
        "checkpoint_dir": args.checkpoint_dir,
        "tensor_parallel_size": args.tensor_parallel_size,
        "max_model_len": args.max_model_len,
        "data_source": data_source,
    }


# ----------------------------------------------------------------------------------------------------------------------


def evaluate(args: EvalArguments) -> dict[str, Any]:
    """Generate (resuming from the partial file), grade, and write `args.output_file` atomically."""
    output = Path(args.output_file)
    check_output_path(output)  # before anything slow: a bad path used to surface only after the whole generation
    if args.checkpoint_dir:
        check_adapter(args.checkpoint_dir)
    problems, data_source = load_problems(args)
    backend = choose_backend(args)
    partial = open_partial_log(args, output, problems, backend)
    with MathGrader(args.grader, args.grading_timeout, args.grading_workers) as grader:  # warms up meanwhile
        generate_missing(args, problems, partial, backend)
        generations = [partial.done[i]["generations"] for i in range(len(problems))]
        result = build_result(args, problems, generations, grader, backend, data_source, partial.settings["dtype"])
    try:
        atomic_write_json(output, result)
    except OSError as e:
        raise UserError(
            f"cannot write --output_file {output}: {e.strerror or first_line(e)}; the generations are kept in "
            f"{partial.path}: free space and re-run the same command (only grading runs again)"
        ) from e
    partial.path.unlink(missing_ok=True)
    return result


def check_output_path(output: Path) -> None:
    """The result file and its partial log must be writable files: checked with a probe file in their folder."""
    partial = output.with_name(output.name + PARTIAL_SUFFIX)
    for path in (output, partial):
        if path.is_dir():
            raise UserError(f"--output_file: {path} is a directory; pass a file name, e.g. {path / 'result.json'}")
    blocker = next((parent for parent in output.parents if parent.exists() and not parent.is_dir()), None)
    if blocker is not None:
        raise UserError(f"--output_file {output}: {blocker} is a file, not a folder; pass a path in a folder")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.probe-"):
            pass
    except OSError as e:
        raise UserError(
            f"--output_file {output}: cannot write in {output.parent} ({e.strerror or first_line(e)}); "
            "pass a path in a writable folder"
        ) from e


def check_adapter(checkpoint_dir: str) -> None:
    """--checkpoint_dir must be a LoRA adapter folder of rank <= 64 (vLLM's max_lora_rank); checked before loading."""
    folder = Path(checkpoint_dir)
    config = folder / "adapter_config.json"
    if not folder.is_dir():
        raise UserError(f"--checkpoint_dir {checkpoint_dir} is not a folder; pass a LoRA adapter folder")
    if not config.is_file():
        raise UserError(
            f"--checkpoint_dir {checkpoint_dir} has no adapter_config.json, so it is not a LoRA adapter "
            "(a merged model goes to --base_model)"
        )
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--checkpoint_dir: cannot read {config}: {first_line(e)}") from e
    if not isinstance(settings, dict) or "peft_type" not in settings:
        raise UserError(f"--checkpoint_dir: {config} has no 'peft_type', so it is not a PEFT adapter configuration")
    rank = settings.get("r")
    if isinstance(rank, int) and rank > 64:
        raise UserError(f"--checkpoint_dir {checkpoint_dir}: LoRA rank {rank} > 64, the most vLLM is started with")


def load_problems(args: EvalArguments) -> tuple[list[Problem], str]:
    """The benchmark's problems (the first --num_samples of them) and where they came from."""
    problems, data_source = load_benchmark(args.dataset, args.data_file)
    if args.num_samples is not None:
        problems = problems[: args.num_samples]
    return problems, data_source


def choose_backend(args: EvalArguments) -> str:
    """The generation backend to use: "vllm" or "hf"."""
    backend = resolve_backend(args.backend)
    if backend == "vllm" and not vllm_installed():
        raise UserError("--backend vllm: vLLM is not installed (pip install 'pwopsd[gpu]'); or use --backend hf")
    return backend


def open_partial_log(args: EvalArguments, output: Path, problems: Sequence[Problem], backend: str) -> PartialLog:
    """The partial log next to `output`, checked against the problems it claims to have finished."""
    partial = PartialLog(
        output.with_name(output.name + PARTIAL_SUFFIX),
        run_settings(args, backend),
        args.resume,
        legacy=legacy_settings(args, backend),
    )
    for index, record in partial.done.items():
        if index >= len(problems) or record["problem_id"] != problems[index].problem_id:
            raise UserError(f"{partial.path} does not match the problems of --dataset {args.dataset}; pass --no_resume")
    return partial


def generate_missing(args: EvalArguments, problems: Sequence[Problem], partial: PartialLog, backend: str) -> None:
    """Generate the problems the partial log does not hold yet, appending each to it as it finishes."""
    todo = [i for i in range(len(problems)) if i not in partial.done]
    if not todo:
        return
    tokenizer = load_tokenizer(args)
    prompts = [build_prompt(tokenizer, problems[i].problem, args.enable_thinking) for i in todo]
    if backend == "vllm":
        engine: VLLMBackend | HFBackend = VLLMBackend(args)
        if args.dtype != "auto":
            logger.info("--dtype %s applies to --backend hf only; vLLM loads with dtype='auto'", args.dtype)
    else:
        engine = HFBackend(args, tokenizer)
        logger.info("%s", engine.description)
        loaded = str(engine.dtype).removeprefix("torch.")
        if loaded != partial.settings["dtype"]:  # generation_dtype must follow HFBackend's rule
            raise RuntimeError(
                f"the model was loaded in {loaded}, but the partial log records {partial.settings['dtype']}"
            )
    for index, texts in engine.generate(prompts, todo):
        partial.add(index, problems[index].problem_id, texts)


def load_tokenizer(args: EvalArguments) -> Any:
    """The tokenizer of --base_model; it must have a chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(args.base_model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of --base_model {args.base_model}: {first_line(e)}") from e
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {args.base_model} has no chat template")
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    def run() -> int:
        args = parse_args(argv)
        report(evaluate(args), args.output_file)
        return 0

    return run_main(run, "evaluate_math.py")


def report(result: dict[str, Any], output_file: str) -> None:
    """Log the headline numbers of a finished evaluation."""
    n = result["val_n"]
    logger.info(
        "%s: Pass@%d %.2f | Avg@%d %.2f | Maj@%d %.2f | format %.2f%% | %d problems -> %s",
        result["dataset"], n, result["pass_at_n_pct"], n, result["average_at_n_pct"], n,
        result["majority_vote_at_n_pct"], result["format_rate"], result["num_problems"], output_file,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
