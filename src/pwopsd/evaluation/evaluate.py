"""Evaluate a causal LM on math benchmarks: N samples per problem, Pass@N / Avg@N / Maj@N (SPEC §7).

    python eval/evaluate_math.py --base_model outputs/NAME_merged --dataset math500 --val_n 12 --enable_thinking \\
        --seed 0 --output_file eval_results/NAME_38k_seed0.json

Flags and JSON keys are the reference's (SPEC §7.1, §7.9), plus `--backend {auto,vllm,hf}`, `--data_file`,
`--trust_remote_code`, `--grader {reference,strict}`, `--no_resume`, `--grading_timeout`, `--grading_workers`.

* Data (SPEC §7.3): the reference's hub datasets; offline, or when the hub cannot be reached, the bundled copies in
  `data/` (same problems, ids and counts) with a one-line notice. `--data_file` reads a local .jsonl/.json/.parquet/.csv.
* Generation (SPEC §7.4): vLLM (one engine, every prompt submitted at once, `SamplingParams(n=val_n, seed=...)`) or
  transformers (`--backend hf`: the same sampling chain, seeded per problem, the N samples of a problem in one batch).
* Grading (SPEC §7.5–7.8): `math_grader` (cached, parallel, hard time limit per comparison).
* Resumable: every finished problem is appended to `<output_file>.partial.jsonl`; a re-run with the same settings
  resumes from it (`--no_resume` starts over). The final JSON is written to a temporary file and renamed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pwopsd.evaluation.grader import DEFAULT_TIMEOUT_S, GRADERS, NO_BOXED_ANSWER, MathGrader, extract_boxed_answer
from pwopsd.evaluation.metrics import aggregate_metrics, pass_at_k_table
from pwopsd.io import DATA_DIR, REPO_ROOT, UserError, atomic_write_json, first_line, run_main

logger = logging.getLogger("evaluate_math")

PROMPT_SUFFIX = "\n\nPlease reason step by step, and put your final answer within \\boxed{}."
PARTIAL_SUFFIX = ".partial.jsonl"
PARTIAL_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------------------
# Benchmarks (SPEC §7.3)


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark comes from and how its rows map to (problem_id, problem, ground truth)."""

    hub_id: str | None  # None: read from a parquet file (hmmt25)
    split: str
    id_key: str | None  # None: the row index
    bundled: str  # file in data/ used offline
    answer_from_solution: bool = False  # a missing `answer` is the last boxed answer of `solution`
    parquet_env: str | None = None
    parquet_default: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "math500": Benchmark("HuggingFaceH4/MATH-500", "test", None, "math500.jsonl", answer_from_solution=True),
    "aime24": Benchmark("HuggingFaceH4/aime_2024", "train", "id", "aime24.jsonl"),
    "aime25": Benchmark("yentinglin/aime_2025", "train", "problem_idx", "aime25.jsonl"),
    "hmmt25": Benchmark(
        None,
        "train",
        "problem_idx",
        "hmmt25.jsonl",
        parquet_env="HMMT25_PARQUET_PATH",
        parquet_default="./data/hmmt25_clean/train.parquet",
    ),
}
UNSOURCED = ("amo-bench", "minerva", "amc23")  # accepted by the reference, no pinned source (SPEC §12 #13)


@dataclass(frozen=True)
class Problem:
    problem_id: Any
    problem: str
    ground_truth: str


def rows_to_problems(rows: Sequence[dict[str, Any]], benchmark: Benchmark | None, source: str) -> list[Problem]:
    """Map raw rows to problems: `problem`, `answer` (str), id from the benchmark's id column or the row index."""
    if not rows:
        raise UserError(f"{source} has no rows")
    columns = set(rows[0])
    if "problem" not in columns:
        raise UserError(f"{source} has no 'problem' column (columns: {', '.join(sorted(columns))})")
    from_solution = benchmark is None or benchmark.answer_from_solution
    if "answer" not in columns and not (from_solution and "solution" in columns):
        raise UserError(f"{source} has no 'answer' column (columns: {', '.join(sorted(columns))})")
    if benchmark is not None:
        id_key = benchmark.id_key
        if id_key is not None and id_key not in columns:
            raise UserError(f"{source} has no '{id_key}' column, the problem id of this benchmark")
    else:  # a custom benchmark: the first id-like column, else the row index
        id_key = next((k for k in ("id", "problem_idx", "problem_id") if k in columns), None)
    problems = []
    for index, row in enumerate(rows):
        answer = row.get("answer")
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
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.suffix not in builders:
        raise UserError(f"--data_file {path}: unsupported type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
    if not path.is_file():
        raise UserError(f"--data_file {path} does not exist")
    datasets.disable_progress_bars()
    try:
        return list(datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train"))
    except Exception as e:
        raise UserError(f"cannot read {path}: {type(e).__name__}: {first_line(e)}") from e


def _hub_unavailable() -> str | None:
    """Why the hub cannot be used now (offline mode, or its host does not answer within 5 s), else None."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
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
        logger.warning("notice: %s; using the bundled %s for %s", reason, bundled.relative_to(REPO_ROOT), benchmark.hub_id)
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


# ----------------------------------------------------------------------------------------------------------------------
# Command line (SPEC §7.1)


@dataclass
class EvalArguments:
    base_model: str = field(metadata={"help": "Model folder or hub id (merged model)."})
    dataset: str = field(metadata={"help": f"Benchmark: {', '.join(BENCHMARKS)} (any name with --data_file)."})
    output_file: str = field(metadata={"help": "Result JSON (SPEC §7.9)."})
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

    def __post_init__(self) -> None:
        if self.top_p is None:
            self.top_p = 0.95 if self.enable_thinking else 0.8
        if self.max_model_len is None:
            self.max_model_len = 40960 if self.enable_thinking else 32768
        checks = [
            (self.val_n >= 1, f"--val_n must be >= 1, got {self.val_n}"),
            (self.temperature >= 0, f"--temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 0, f"--top_k must be -1 (off) or >= 0, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"--min_p must be in [0, 1], got {self.min_p}"),
            (self.max_new_tokens >= 1, f"--max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.num_samples is None or self.num_samples >= 1, f"--num_samples must be >= 1, got {self.num_samples}"),
            (self.seed is None or self.seed >= 0, f"--seed must be >= 0, got {self.seed}"),
            (self.grading_timeout > 0, f"--grading_timeout must be > 0, got {self.grading_timeout}"),
            (
                self.grading_workers is None or self.grading_workers >= 1,
                f"--grading_workers must be >= 1, got {self.grading_workers}",
            ),
            (self.hf_batch_size >= 1, f"--hf_batch_size must be >= 1, got {self.hf_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        assert self.grader in GRADERS


def parse_args(argv: Sequence[str] | None) -> EvalArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EvalArguments, description=__doc__.split("\n\n")[0])
    (args,) = parser.parse_args_into_dataclasses(args=list(argv) if argv is not None else None)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and backends (SPEC §7.2, §7.4)


def build_prompt(tokenizer: Any, problem: str, enable_thinking: bool) -> str:
    """`{problem}` + PROMPT_SUFFIX as one user message, through the chat template, generation prompt added."""
    messages = [{"role": "user", "content": problem + PROMPT_SUFFIX}]
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )


def vllm_installed() -> bool:
    return "vllm" in sys.modules or importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    """auto: vLLM when it is installed and CUDA is available, else transformers."""
    if name != "auto":
        return name
    if not vllm_installed():
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


def problem_seed(seed: int, index: int) -> int:
    """A per-problem seed for the transformers backend: independent of batch composition, so runs resume exactly."""
    digest = hashlib.blake2b(f"pwopsd-eval:{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class VLLMBackend:
    """One vLLM engine (SPEC §7.2); every prompt is submitted at once and problems are yielded as they finish."""

    def __init__(self, args: EvalArguments) -> None:
        from vllm import LLM, SamplingParams

        engine_kwargs: dict[str, Any] = dict(
            model=args.base_model,
            trust_remote_code=args.trust_remote_code,
            tensor_parallel_size=args.tensor_parallel_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len,
            distributed_executor_backend="mp",
            enforce_eager=True,
            dtype="auto",
        )
        if args.checkpoint_dir:
            engine_kwargs.update(enable_lora=True, max_lora_rank=64)
        self.llm = LLM(**engine_kwargs)
        sampling: dict[str, Any] = dict(
            n=args.val_n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            presence_penalty=args.presence_penalty,
            max_tokens=args.max_new_tokens,
        )
        if args.seed is not None:
            sampling["seed"] = args.seed
        self.sampling_params = SamplingParams(**sampling)
        self.lora_request = None
        if args.checkpoint_dir:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, args.checkpoint_dir)

    def generate(self, prompts: Sequence[str], indices: Sequence[int]) -> Iterator[tuple[int, list[str]]]:
        """Yield (problem index, N texts in generation order) as requests finish."""
        from tqdm.auto import tqdm

        # Same requests as LLM.generate (which is enqueue + this loop), but finished problems come out one by one.
        request_ids = self.llm.enqueue(list(prompts), self.sampling_params, lora_request=self.lora_request, use_tqdm=False)
        # enqueue returns vLLM's internal ids, "{id}-{8 random chars}"; finished outputs carry the plain {id}
        index_of = {request_id.split("-", 1)[0]: index for request_id, index in zip(request_ids, indices)}
        engine = self.llm.llm_engine
        with tqdm(total=len(request_ids), desc="generating (vLLM)") as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        samples = sorted(output.outputs, key=lambda c: c.index)  # generation order
                        bar.update(1)
                        yield index_of[output.request_id], [c.text for c in samples]


class PresencePenaltyLogitsProcessor:
    """vLLM's presence penalty: subtract `penalty` from the logits of every token already generated (not the prompt)."""

    def __init__(self, penalty: float, prompt_length: int) -> None:
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated, True)
        return scores - self.penalty * seen.to(scores.dtype)


def sampling_processors(args: EvalArguments, prompt_length: int) -> list[Any]:
    """vLLM's sampling chain as transformers logits processors: presence penalty, temperature, min-p, top-k, top-p.

    Temperature 0 (greedy): only the penalty; vLLM takes the argmax of the penalised logits, which the warpers would
    not change."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    processors: list[Any] = []
    if args.presence_penalty:
        processors.append(PresencePenaltyLogitsProcessor(args.presence_penalty, prompt_length))
    if args.temperature == 0:
        return processors
    if args.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(args.temperature))
    if args.min_p > 0:
        processors.append(MinPLogitsWarper(args.min_p))
    if args.top_k > 0:
        processors.append(TopKLogitsWarper(args.top_k))
    assert args.top_p is not None
    if args.top_p < 1.0:
        processors.append(TopPLogitsWarper(args.top_p))
    return processors


class RowSampler:
    """The last logits processor of the transformers backend: draws each row's next token from the row's own
    `torch.Generator` and keeps only that token, so greedy decoding emits it. A row's samples therefore depend only on
    its seed (problem, sample), never on which rows share its batch, and batched runs resume exactly."""

    def __init__(self, generators: list[Any]) -> None:
        self.generators = generators

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        # Inverse-CDF draw, batched over rows: token i is picked when cdf[i-1] <= u * total < cdf[i], i.e. with
        # probability p_i; masked tokens (p = 0) can never be picked. One uniform per row from the row's generator.
        cdf = torch.softmax(scores.float(), dim=-1).cumsum_(dim=-1)
        u = torch.stack([torch.rand((), generator=g, dtype=cdf.dtype) for g in self.generators])
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=cdf.shape[1] - 1)
        keep = torch.full_like(scores, float("-inf"))
        return keep.scatter_(1, picks, 0.0)


def row_generators(seed: int | None, index: int, val_n: int) -> list[Any]:
    """One generator per sample of problem `index`: seeded from (seed, index, sample), or from OS entropy if unseeded."""
    import torch

    generators = []
    for sample in range(val_n):
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:
            g.manual_seed((problem_seed(seed, index) + sample) % 2**63)
        generators.append(g)
    return generators


class HFBackend:
    """transformers generation with the vLLM sampling chain; whole problems (N samples each) are batched together,
    up to --hf_batch_size sequences per call, prompts left-padded."""

    def __init__(self, args: EvalArguments, tokenizer: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.args = args
        self.tokenizer = tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                args.base_model, dtype="auto", trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load --base_model {args.base_model}: {first_line(e)}") from e
        if args.checkpoint_dir:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.checkpoint_dir)
        self.model = model.to(self.device).eval()
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        if tokenizer.pad_token_id is None:  # batched prompts are left-padded; the pad positions are masked out
            tokenizer.pad_token_id = self.pad_id

    def _decode(self, ids: list[int]) -> str:
        for position, token in enumerate(ids):
            if token in self.eos_ids:
                ids = ids[:position]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, prompts: Sequence[str], indices: Sequence[int]) -> Iterator[tuple[int, list[str]]]:
        import torch
        from tqdm.auto import tqdm
        from transformers import GenerationConfig, LogitsProcessorList

        args = self.args
        greedy = args.temperature == 0
        rows_per_problem = 1 if greedy else args.val_n
        per_call = max(1, args.hf_batch_size // rows_per_problem)
        # Fixed groups of problem indices, so a resumed run batches the remaining problems as the first run did.
        groups: dict[int, list[tuple[str, int]]] = {}
        for prompt, index in zip(prompts, indices):
            groups.setdefault(index // per_call, []).append((prompt, index))
        with tqdm(total=len(prompts), desc="generating (transformers)") as bar:
            for group in groups.values():
                texts_in, group_indices = zip(*group)
                inputs = self.tokenizer(list(texts_in), return_tensors="pt", padding=True, padding_side="left")
                prompt_length = inputs["input_ids"].shape[1]
                assert args.max_model_len is not None
                budget = min(args.max_new_tokens, args.max_model_len - prompt_length)
                if budget < 1:
                    raise UserError(f"problems {list(group_indices)}: the prompt ({prompt_length} tokens) does not "
                                    "fit --max_model_len")
                inputs = {k: v.repeat_interleave(rows_per_problem, dim=0).to(self.device) for k, v in inputs.items()}
                config = GenerationConfig(  # greedy over processed scores: sampling happens in RowSampler
                    do_sample=False,
                    max_new_tokens=budget,
                    eos_token_id=self.eos_ids,
                    pad_token_id=self.pad_id,
                )
                processors = sampling_processors(args, prompt_length)
                if not greedy:
                    generators = [g for i in group_indices for g in row_generators(args.seed, i, args.val_n)]
                    processors.append(RowSampler(generators))
                with torch.inference_mode():
                    output = self.model.generate(
                        **inputs, generation_config=config, logits_processor=LogitsProcessorList(processors)
                    )
                texts = [self._decode(row[prompt_length:].tolist()) for row in output]
                for k, index in enumerate(group_indices):
                    mine = texts[k * rows_per_problem : (k + 1) * rows_per_problem]
                    yield index, mine * args.val_n if greedy else mine
                    bar.update(1)


# ----------------------------------------------------------------------------------------------------------------------
# Resumable partial results


def run_settings(args: EvalArguments, backend: str) -> dict[str, Any]:
    """What a resumed run must share with the partial file it resumes."""
    keys = (
        "base_model", "checkpoint_dir", "dataset", "data_file", "val_n", "temperature", "top_p", "top_k", "min_p",
        "presence_penalty", "enable_thinking", "max_new_tokens", "max_model_len", "seed",
    )  # fmt: skip
    return {"backend": backend, **{k: getattr(args, k) for k in keys}}


class PartialLog:
    """`<output>.partial.jsonl`: a header line with the run settings, then one line per finished problem."""

    def __init__(self, path: Path, settings: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.done: dict[int, dict[str, Any]] = {}
        if path.exists() and not resume:
            path.unlink()
        if path.exists():
            self._load(settings)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_line({"pwopsd_partial": PARTIAL_FORMAT, "settings": settings}, mode="w")

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
        if not records or records[0].get("pwopsd_partial") != PARTIAL_FORMAT:
            raise UserError(f"{self.path} is not a partial result file; delete it or pass --no_resume")
        saved = records[0]["settings"]
        changed = [k for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k)]
        if changed:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise UserError(f"{self.path} was written with other settings ({diff}); pass --no_resume to start over")
        for record in records[1:]:
            self.done[record["index"]] = record
        logger.info("resuming: %d problem(s) already generated in %s", len(self.done), self.path)

    def _write_line(self, obj: dict[str, Any], mode: str = "a") -> None:
        with self.path.open(mode, encoding="utf-8") as f:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, index: int, problem_id: Any, generations: list[str]) -> None:
        record = {"index": index, "problem_id": problem_id, "generations": generations}
        self._write_line(record)
        self.done[index] = record


# ----------------------------------------------------------------------------------------------------------------------
# Results (SPEC §7.8, §7.9)


def build_result(
    args: EvalArguments,
    problems: Sequence[Problem],
    generations: Sequence[list[str]],
    grader: MathGrader,
    backend: str,
    data_source: str,
) -> dict[str, Any]:
    """Grade every problem and assemble the output JSON (SPEC §7.9 keys, then pwopsd's extras)."""
    predictions = [[extract_boxed_answer(text) for text in texts] for texts in generations]
    formatted = [[p is not None for p in preds] for preds in predictions]
    graded = grader.grade_problems(
        [(preds, flags, p.ground_truth) for preds, flags, p in zip(predictions, formatted, problems)]
    )
    results = []
    for problem, texts, preds, flags, grade in zip(problems, generations, predictions, formatted, graded):
        samples = [
            {
                "predicted_answer": NO_BOXED_ANSWER if pred is None else pred,
                "full_generation": text,
                "correct": correct,
                "formatted": ok,
            }
            for text, pred, ok, correct in zip(texts, preds, flags, grade.correct)
        ]
        num_correct = sum(grade.correct)
        results.append(
            {
                "problem_id": problem.problem_id,
                "problem": problem.problem,
                "ground_truth": problem.ground_truth,
                "val_n": args.val_n,
                "generations": samples,
                "num_correct": num_correct,
                "pass_at_n": num_correct > 0,
                "majority_vote_correct": grade.majority.correct,
                **samples[0],  # legacy first-sample copies
            }
        )
    metrics = aggregate_metrics(
        [r["num_correct"] for r in results],
        [r["majority_vote_correct"] for r in results],
        [sum(flags) for flags in formatted],
        args.val_n,
    )
    return {
        "base_model": args.base_model,
        "dataset": args.dataset,
        "enable_thinking": args.enable_thinking,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "presence_penalty": args.presence_penalty,
        "max_new_tokens": args.max_new_tokens,
        "val_n": args.val_n,
        "seed": args.seed,
        **metrics,
        "pass_at_k": pass_at_k_table([r["num_correct"] for r in results], args.val_n),
        "backend": backend,
        "grader": args.grader,
        "math_verify_version": importlib.metadata.version("math-verify"),
        "grading_timeouts": grader.timeouts,
        "checkpoint_dir": args.checkpoint_dir,
        "tensor_parallel_size": args.tensor_parallel_size,
        "max_model_len": args.max_model_len,
        "data_source": data_source,
        "results": results,
    }


# ----------------------------------------------------------------------------------------------------------------------


def evaluate(args: EvalArguments) -> dict[str, Any]:
    """Generate (resuming from the partial file), grade, and write `args.output_file` atomically."""
    from transformers import AutoTokenizer

    problems, data_source = load_benchmark(args.dataset, args.data_file)
    if args.num_samples is not None:
        problems = problems[: args.num_samples]
    backend = resolve_backend(args.backend)
    if backend == "vllm" and not vllm_installed():
        raise UserError("--backend vllm: vLLM is not installed (pip install 'pwopsd[gpu]'); or use --backend hf")
    output = Path(args.output_file)
    partial = PartialLog(output.with_name(output.name + PARTIAL_SUFFIX), run_settings(args, backend), args.resume)
    for index, record in partial.done.items():
        if index >= len(problems) or record["problem_id"] != problems[index].problem_id:
            raise UserError(f"{partial.path} does not match the problems of --dataset {args.dataset}; pass --no_resume")

    with MathGrader(args.grader, args.grading_timeout, args.grading_workers) as grader:  # warms up meanwhile
        todo = [i for i in range(len(problems)) if i not in partial.done]
        if todo:
            try:
                tokenizer = AutoTokenizer.from_pretrained(args.base_model, trust_remote_code=args.trust_remote_code)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot load the tokenizer of --base_model {args.base_model}: {first_line(e)}") from e
            if not tokenizer.chat_template:
                raise UserError(f"the tokenizer of {args.base_model} has no chat template")
            prompts = [build_prompt(tokenizer, problems[i].problem, args.enable_thinking) for i in todo]
            engine = VLLMBackend(args) if backend == "vllm" else HFBackend(args, tokenizer)
            for index, texts in engine.generate(prompts, todo):
                partial.add(index, problems[index].problem_id, texts)
        generations = [partial.done[i]["generations"] for i in range(len(problems))]
        result = build_result(args, problems, generations, grader, backend, data_source)
    atomic_write_json(output, result)
    partial.path.unlink()
    return result


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
