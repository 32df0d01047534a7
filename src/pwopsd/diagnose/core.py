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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pwopsd.evaluation.extract import extract_boxed_answer
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

    from pwopsd.rollouts import eos_token_ids

    check_model_path(path)
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UserError(f"--dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--model {path} is not a model: {first_line(e)}") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(f"--model {path}: its tokenizer has no chat template (the prompts need one)")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
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


@torch.no_grad()
def generate(
    lm: LoadedModel, inputs: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling, seed: int
) -> list[list[int]]:
    """Continue each row of `inputs` (all of the same length: no padding) by the student; new ids cut at EOS.

    `torch.manual_seed(seed)` right before the call makes a row's continuation a function of (seed, batch).
    """
    from transformers import GenerationConfig

    if len({len(r) for r in inputs}) != 1:
        raise ValueError("generate() takes rows of one length (no padding)")
    ids = torch.tensor([list(r) for r in inputs], dtype=torch.long, device=lm.device)
    greedy = sampling.temperature == 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy or sampling.top_k <= 0 else sampling.top_k,
        eos_token_id=lm.eos_ids,
        pad_token_id=lm.pad_id,
    )
    torch.manual_seed(seed)
    out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return [cut_at_eos(row[ids.shape[1] :].tolist(), lm.eos_ids) for row in out]


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

    def __init__(self, path: Path, settings: dict[str, Any], resume: bool) -> None:
        self.path = path
        self.settings = settings
        self.done: dict[int, Any] = {}
        self._fresh = not (path.exists() and resume)  # the old log is replaced only when a new problem is done
        if not self._fresh:
            self._load(settings)

    def _load(self, settings: dict[str, Any]) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        try:
            header = json.loads(lines[0])["header"]
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
