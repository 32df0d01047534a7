"""What both diagnostics share: problems, the model, token ids, per-token teacher/student quantities, seeding, the
resume log and atomic figure writes.

Everything works on token ids: prompts are tokenized once (as the collator does: the chat template's text, then
`add_special_tokens=True`), completions and forced branches are lists of ids appended to them, never decoded and
re-tokenized, so the teacher and the student read exactly the tokens the student sampled.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from pwopsd.evaluation.extract import extract_boxed_answer
from pwopsd.evaluation.generate import vllm_installed  # one rule for both tools
from pwopsd.io import DATASET_BUILDERS, UserError, first_line
from pwopsd.losses import gkd_element_terms, gkd_token_loss


@dataclass(frozen=True)
class DiagProblem:
    """One row of the data file: its index in the file, the problem, the reference solution and the gold answer."""

    index: int
    problem: str
    solution: str
    answer: str


def gold_answer(row: dict[str, Any], answer_column: str) -> str | None:
    """The row's gold answer: its `answer_column`, else the text after the last `####` of the solution (GSM8K), else
    the last `\\boxed{}` of the solution (MATH); None when there is none."""
    value = row.get(answer_column)
    if value is not None and str(value).strip():
        return str(value).strip()
    solution = str(row.get("solution") or "")
    if "####" in solution:
        tail = solution.rsplit("####", 1)[1].strip()
        if tail:
            return tail.replace(",", "")  # GSM8K writes 1,000 in a few golds; the grader compares numbers
    return extract_boxed_answer(solution) or None


def load_problems(path: str, num_problems: int, answer_column: str = "answer") -> list[DiagProblem]:
    """The first `num_problems` rows of a .jsonl/.json/.parquet/.csv file with `problem` and `solution` columns."""
    p = Path(path)
    if p.suffix not in DATASET_BUILDERS:
        raise UserError(f"--data_file {path}: unsupported type {p.suffix!r}; use .jsonl, .json, .parquet or .csv")
    if not p.is_file():
        raise UserError(f"--data_file {path} does not exist; pass a file with problem, solution (and answer) columns")
    if p.suffix == ".jsonl":  # read directly: fast, and a bad line is named
        rows = []
        with p.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if len(rows) >= num_problems:
                    break
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise UserError(f"--data_file {path} line {number} is not JSON: {first_line(e)}") from None
    else:
        from pwopsd.evaluation.benchmarks import load_local_rows

        rows = load_local_rows(p)[:num_problems]
    if not rows:
        raise UserError(f"--data_file {path} has no rows")
    problems = []
    for index, row in enumerate(rows):
        for column in ("problem", "solution"):
            if not isinstance(row, dict) or not str(row.get(column) or "").strip():
                raise UserError(
                    f"--data_file {path} row {index} has no '{column}' (the diagnostic needs problem and solution)"
                )
        answer = gold_answer(row, answer_column)
        if answer is None:
            raise UserError(
                f"--data_file {path} row {index} has no answer: no '{answer_column}' column, no '####' line and no "
                f"\\boxed{{}} in its solution; add an '{answer_column}' column"
            )
        problems.append(DiagProblem(index, str(row["problem"]), str(row["solution"]), answer))
    return problems


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    eos_ids: list[int]
    pad_id: int
    device: torch.device


def check_model_path(path: str) -> None:
    """Refuse, before any work, a local --model path that cannot be a model (a file, or a folder without config.json)."""
    local = Path(path)
    if not local.exists() and (local.is_absolute() or path.startswith(".") or path.count("/") != 1):
        raise UserError(f"--model {path} does not exist; pass a saved model folder or a Hub id (owner/name)")
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"--model {path} is not a model folder (no config.json); pass a saved model or a Hub id")


def load_model(path: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """The model and tokenizer (transformers backend), in eval mode, or a one-line error naming --model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pwopsd.device import checkpoint_dtype, compute_dtype
    from pwopsd.rollouts import eos_token_ids

    check_model_path(path)
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    # `auto`: the checkpoint's dtype when `dev` computes it natively, else float32 (a bf16 model on an AVX2-only CPU)
    torch_dtype = compute_dtype(dtype, dev, checkpoint_dtype(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {path} is not a model: {first_line(e)}") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"--model {path}: its tokenizer has no chat template (the prompts need one)")
    model = model.to(dev).eval()
    eos = list(dict.fromkeys(eos_token_ids(model, tokenizer)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return LoadedModel(model, tokenizer, eos, pad, dev)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt, as the training collator makes them (`add_special_tokens=True`)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def forced_branch_ids(prompt: Sequence[int], spine: Sequence[int], position: int, alternative: int) -> list[int]:
    """The ids the student continues from: prompt + the spine's first `position` tokens + the forced alternative."""
    if not 0 <= position < len(spine):
        raise ValueError(f"position {position} is outside the spine (length {len(spine)})")
    return [*map(int, prompt), *map(int, spine[:position]), int(alternative)]


def cut_at_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first EOS id."""
    out: list[int] = []
    eos = set(eos_ids)
    for t in ids:
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def completion_text(tokenizer: Any, ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    """The text of completion ids before the first EOS, special tokens skipped (what the evaluator grades)."""
    ids = cut_at_eos(ids, eos_ids)
    if ids and ids[-1] in set(eos_ids):
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=True)


def seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from `parts` (stable across runs and Python versions, unlike `hash`)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class Sampling:
    """How the student samples: temperature (0 = greedy), top-p, top-k (0 = off)."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0


def row_seeds(seed: int, n: int) -> list[int]:
    """The seed of each of `n` rows of one generation call: `seed_for(seed, i)` for row i (both backends)."""
    return [seed_for(seed, i) for i in range(n)]


HF_BATCHING = ("length", "padded")
"""`--hf_batching` of the transformers backend: `length` = one unpadded `generate` call per prompt length (a row's
sample depends only on its ids and seed); `padded` = every row of a call left-padded into one `generate` call (on a
CPU a decode step of 12 rows costs about what one of 3 rows does, so viability's continuations run 3-4x faster; a
row's logits can then differ in the last bits with the padding its batch-mates impose)."""


@torch.no_grad()
def generate_seeded(
    lm: LoadedModel,
    inputs: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling,
    seeds: Sequence[int],
    batching: str = "length",
) -> list[list[int]]:
    """Continue each row of `inputs` by the student (transformers); new ids cut at EOS.

    Each row samples from its own CPU `torch.Generator` seeded with `seeds[i]` (the evaluator's `RowSampler` after
    temperature, top-k and top-p), so a row's draws never depend on the other rows of the call; temperature 0 is
    greedy. `batching` (HF_BATCHING): rows of equal length share one unpadded call, or all rows share one left-padded
    call (attention mask 0 on the pads; transformers derives the position ids from the mask).
    """
    from transformers import (
        GenerationConfig,
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from pwopsd.evaluation.generate import RowSampler

    if len(seeds) != len(inputs):
        raise ValueError("generate_seeded() takes one seed per row")
    if batching not in HF_BATCHING:
        raise ValueError(f"unknown batching {batching!r}; choose one of {', '.join(HF_BATCHING)}")
    greedy = sampling.temperature == 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=lm.eos_ids, pad_token_id=lm.pad_id
    )
    out: list[list[int] | None] = [None] * len(inputs)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(inputs):
        groups.setdefault(0 if batching == "padded" else len(row), []).append(i)
    for rows in groups.values():
        width = max(len(inputs[i]) for i in rows)
        padded = [[lm.pad_id] * (width - len(inputs[i])) + list(map(int, inputs[i])) for i in rows]
        ids = torch.tensor(padded, dtype=torch.long, device=lm.device)
        mask = torch.tensor([[0] * (width - len(inputs[i])) + [1] * len(inputs[i]) for i in rows], device=lm.device)
        processors: list[Any] = []
        if not greedy:
            if sampling.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                processors.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(sampling.top_p))
            generators = [torch.Generator().manual_seed(int(seeds[i])) for i in rows]
            processors.append(RowSampler(generators))
        gen = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList(processors),
        )
        for i, row in zip(rows, gen):
            out[i] = cut_at_eos(row[width:].tolist(), lm.eos_ids)
    return [r for r in out if r is not None]


def generate(
    lm: LoadedModel,
    inputs: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: Sampling,
    seed: int,
    batching: str = "length",
) -> list[list[int]]:
    """Continue each row of `inputs` (any lengths) by the student; new ids cut at EOS; row i seeded by
    `row_seeds(seed, ...)[i]` (see `generate_seeded`)."""
    return generate_seeded(lm, inputs, max_new_tokens, sampling, row_seeds(seed, len(inputs)), batching)


class GenerationBackend(Protocol):
    """What the diagnostics need from a generator: continue rows of token ids; new ids cut at the first EOS."""

    name: str

    def generate(
        self, inputs: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling, seed: int
    ) -> list[list[int]]: ...


class TransformersBackend:
    """Generation by the same transformers model that computes the logits (`generate`, `batching` of HF_BATCHING)."""

    name = "transformers"

    def __init__(self, lm: LoadedModel, batching: str = "length") -> None:
        self.lm = lm
        self.batching = batching

    def generate(
        self, inputs: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling, seed: int
    ) -> list[list[int]]:
        return generate(self.lm, inputs, max_new_tokens, sampling, seed, self.batching)


class VLLMBackend:
    """Generation by a vLLM engine on the same checkpoint, from token ids (no re-tokenization).

    One `LLM.generate` call per `generate`: row i is the request `{"prompt_token_ids": row}` with its own
    `SamplingParams(n=1, seed=row_seeds(seed, ...)[i])`, so, as with transformers, a row's sample depends on its ids
    and seed only. vLLM returns only top-k logprobs, so the full-vocabulary teacher/student logits still come from the
    transformers copy; `gpu_memory_utilization` is vLLM's share of the GPU and leaves the rest to that copy.
    """

    name = "vllm"

    def __init__(self, model: str, dtype: str, gpu_memory_utilization: float, eos_ids: Sequence[int], seed: int):
        from vllm import LLM, SamplingParams

        self._params = SamplingParams
        self.eos_ids = [int(t) for t in eos_ids]
        self.llm = LLM(
            model=model,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            enforce_eager=True,  # as the evaluator: no graph capture at start-up, for a few short calls
        )

    def sampling_params(self, max_new_tokens: int, sampling: Sampling, seed: int) -> Any:
        """vLLM's parameters for one row: top_k -1 and top_p 1 are vLLM's "off"; temperature 0 is greedy."""
        greedy = sampling.temperature == 0
        return self._params(
            n=1,
            temperature=sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=-1 if greedy or sampling.top_k <= 0 else sampling.top_k,
            max_tokens=max_new_tokens,
            seed=seed,
            stop_token_ids=list(self.eos_ids),
            detokenize=False,  # only the ids are used
        )

    def generate(
        self, inputs: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling, seed: int
    ) -> list[list[int]]:
        if not inputs:
            return []
        prompts = [{"prompt_token_ids": [int(t) for t in row]} for row in inputs]
        params = [self.sampling_params(max_new_tokens, sampling, s) for s in row_seeds(seed, len(inputs))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._ids(o.outputs[0]) for o in outputs]

    def _ids(self, completion: Any) -> list[int]:
        """The completion's ids cut at EOS; a request stopped by a stop id that vLLM left out gets it back, so a
        finished branch ends with its EOS under both backends."""
        ids = [int(t) for t in completion.token_ids]
        if getattr(completion, "finish_reason", None) == "stop" and not (ids and ids[-1] in self.eos_ids):
            reason = getattr(completion, "stop_reason", None)
            ids.append(int(reason) if isinstance(reason, int) else self.eos_ids[0])
        return cut_at_eos(ids, self.eos_ids)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_backend(name: str) -> str:
    """auto = vllm when vLLM is installed and CUDA is available, else transformers; vllm without either is an error."""
    if name == "auto":
        return "vllm" if vllm_installed() and cuda_available() else "transformers"
    if name == "vllm" and not vllm_installed():
        raise UserError(
            "--backend vllm: vLLM is not installed; pip install vllm (CUDA only) or pass --backend transformers"
        )
    if name == "vllm" and not cuda_available():
        raise UserError("--backend vllm needs a CUDA GPU (none is visible); pass --backend transformers")
    return name


@torch.no_grad()
def completion_logits(lm: LoadedModel, prompt: Sequence[int], completion: Sequence[int]) -> torch.Tensor:
    """[L, V] float32 logits at the L positions that predict the completion tokens, from one pass on
    [prompt | completion] (only the last L + 1 positions' logits are computed)."""
    ids = torch.tensor([[*prompt, *completion]], dtype=torch.long, device=lm.device)
    n = len(completion)
    logits = lm.model(input_ids=ids, logits_to_keep=n + 1).logits[0, :-1]
    return logits.float()


TOKEN_METRICS = (
    "kl_forward",
    "kl_forward_clipped",
    "kl_reverse",
    "teacher_entropy",
    "student_entropy",
    "top1_agree",
    "logq_token",
    "logp_token",
    "negative_clipped",
)
"""Per-token quantities of the profile (teacher q, student p, both at the loss temperature)."""


def token_stats(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, ids: torch.Tensor, temperature: float, clip: float
) -> dict[str, torch.Tensor]:
    """Per-token teacher/student quantities on [L, V] logits and the L sampled ids, each [L] float32.

    q = softmax(z_T / T), p = softmax(z_S / T). kl_forward = Σ_v q (log q - log p) (the loss at β = 0 without clip);
    kl_forward_clipped = Σ_v min(q (log q - log p), c), the training loss term at `--jsd_token_clip c`
    (`pwopsd.losses.gkd_token_loss`; c = 0: no clip); kl_reverse = Σ_v p (log p - log q); entropies in nats;
    top1_agree = argmax q == argmax p; log q / log p of the sampled token; negative_clipped = the clipped term < 0.
    """
    lq = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    lp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    clipped = gkd_token_loss(lp, lq, beta=0.0, clip=clip)
    ids = ids.to(lq.device).long().unsqueeze(-1)
    return {
        "kl_forward": gkd_element_terms(lp, lq, 0.0).sum(-1),
        "kl_forward_clipped": clipped,
        "kl_reverse": gkd_element_terms(lp, lq, 1.0).sum(-1),
        "teacher_entropy": torch.special.entr(lq.exp()).sum(-1),
        "student_entropy": torch.special.entr(lp.exp()).sum(-1),
        "top1_agree": (lq.argmax(-1) == lp.argmax(-1)).float(),
        "logq_token": lq.gather(-1, ids).squeeze(-1),
        "logp_token": lp.gather(-1, ids).squeeze(-1),
        "negative_clipped": (clipped < 0).float(),
    }


def relative_positions(n: int) -> np.ndarray:
    """u_k = (k - 1/2) / L for k = 1..L: the position-weight coordinate of `pwopsd.losses.position_weights`."""
    return (np.arange(1, n + 1) - 0.5) / max(n, 1)


class PartialLog:
    """Finished problems, one JSON line each after a header line holding the settings; appended and fsynced, so an
    interrupted run resumes with the problems it had finished and a re-run with other settings is refused."""

    def __init__(
        self, path: Path, settings: dict[str, Any], resume: bool, legacy: dict[str, Any] | None = None
    ) -> None:
        self.path = path
        self.legacy = legacy or {}  # settings added later: a log written before them holds these values
        self.settings = settings
        self.done: dict[int, Any] = {}
        self._fresh = not (path.exists() and resume)  # the old log is replaced only when a new problem is done
        if not self._fresh:
            self._load(settings)

    def _load(self, settings: dict[str, Any]) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        try:
            header = {**self.legacy, **json.loads(lines[0])["header"]}
        except (IndexError, KeyError, TypeError, json.JSONDecodeError):
            raise UserError(f"{self.path} is not a records log of this tool; delete it or pass --no_resume") from None
        diff = sorted(k for k in set(header) | set(settings) if header.get(k) != settings.get(k))
        if diff:
            what = ", ".join(f"{k}: {header.get(k)!r} -> {settings.get(k)!r}" for k in diff[:3])
            raise UserError(
                f"{self.path} was written with other settings ({what}); pass --no_resume or another --out_dir"
            )
        good = 1
        for number, line in enumerate(lines[1:], 2):
            try:
                entry = json.loads(line)
                if not line.endswith("\n"):
                    raise ValueError("unterminated")
            except ValueError:
                if number == len(lines):  # the last line of a killed run: drop it
                    break
                raise UserError(f"{self.path} line {number} is corrupt; delete the file or pass --no_resume") from None
            self.done[int(entry["problem_index"])] = entry["records"]
            good = number
        if good < len(lines):
            tmp = self.path.with_name(self.path.name + f".tmp.{os.getpid()}")
            tmp.write_text("".join(lines[:good]), encoding="utf-8")
            os.replace(tmp, self.path)

    def append(self, problem_index: int, records: Any) -> None:
        if self._fresh:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + f".tmp.{os.getpid()}")
            tmp.write_text(json.dumps({"header": self.settings}) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)
            self._fresh = False
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"problem_index": problem_index, "records": records}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[problem_index] = records


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically (`pwopsd.evaluation.plots.save_figure`), tight at 110 dpi."""
    from pwopsd.evaluation.plots import save_figure as save_png

    save_png(fig, path, dpi=110, bbox_inches="tight")


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A small CSV, written atomically."""
    import csv
    import io

    from pwopsd.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else f"{v:.6g}" if isinstance(v, float) else v for v in row] for row in rows])
    atomic_write_text(path, buf.getvalue())


def jsonable(x: Any) -> Any:
    """NaN → None, NumPy scalars/arrays → Python numbers/lists (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
