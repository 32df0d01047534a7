"""Command line of the diagnostic (`python code/diagnose.py {profile,viability} ...`).

Both commands read problems (problem, solution, answer) from `--data_file`, run the student (generation by vLLM or
transformers, `--backend`; the full-vocabulary logits always by transformers; the teacher is the same network with the
reference solution in its prompt), read each answer by `--answer_format`, append each finished problem to
`OUT_DIR/{command}.records.partial.jsonl` (a re-run skips those; other settings are refused unless `--no_resume`), and
write `OUT_DIR/{command}.json` (settings, records, summary) atomically, a CSV of the bins and PNG figures.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pwopsd.evaluation.extract import ANSWER_FORMATS
from pwopsd.io import ArgumentParser, UserError, atomic_write_json, run_main

PROG = "diagnose.py"

# Settings that do not change the records: a resumed run may change them.
_SUMMARY_ONLY = (
    "out_dir",
    "num_problems",
    "bins",
    "bootstrap",
    "no_resume",
    "no_plots",
    "grader_timeout",
    "command",
    "gpu_memory_utilization",
)
BACKENDS = ("auto", "vllm", "transformers")
"""`--backend`: what generates rollouts, spines and continuations (`core.resolve_backend`; logits: transformers)."""
# Settings added after the first records logs: a log without them was written with these values.
_LEGACY = {"answer_format": "boxed", "backend": "transformers", "hf_batching": "length"}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.partition("\n\n")[0])
    # the subcommands' parsers are one-line-error parsers too
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    common = ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="model folder or Hub id (student and teacher)")
    common.add_argument("--data_file", required=True, help=".jsonl/.json/.parquet/.csv with problem, solution, answer")
    common.add_argument(
        "--answer_column",
        default="answer",
        help="gold column; without it: after '####' (GSM8K) or the last \\boxed{} of the solution",
    )
    common.add_argument("--num_problems", type=int, default=20, help="the first N rows of --data_file")
    common.add_argument("--out_dir", required=True)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument(
        "--temperature", type=float, default=1.1, help="rollout sampling temperature and the T of q, p (launchers: 1.1)"
    )
    common.add_argument("--top_p", type=float, default=0.95)
    common.add_argument("--top_k", type=int, default=20, help="0 = off")
    common.add_argument("--max_completion_length", type=int, default=1024, help="rollout (spine) length in tokens")
    common.add_argument("--teacher_think", default="reference", choices=("reference", "match_student", "open_think"))
    common.add_argument("--grader", default="reference", choices=("reference", "strict"))
    common.add_argument(
        "--answer_format",
        default="boxed",
        choices=tuple(ANSWER_FORMATS),
        help="how a prediction's answer is read: the last \\boxed{} (the reference), or without a box the last number "
        "(models that never box); gold solutions always use the box",
    )
    common.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="generation of rollouts, spines and continuations: auto = vllm when installed and CUDA is available, "
        "else transformers (the logits always come from transformers)",
    )
    common.add_argument(
        "--hf_batching",
        default="length",
        choices=("length", "padded"),
        help="transformers backend: one unpadded generate call per prompt length (exact per row), or every row of a "
        "call left-padded into one (3-4x faster viability continuations on a CPU)",
    )
    common.add_argument(
        "--gpu_memory_utilization",
        type=float,
        default=0.5,
        help="vllm backend: vLLM's share of the GPU memory; the rest holds the transformers copy for the logits",
    )
    common.add_argument("--grader_timeout", type=float, default=5.0)
    common.add_argument("--bins", type=int, default=20, help="number of u-bins")
    common.add_argument("--bootstrap", type=int, default=1000, help="cluster-bootstrap resamples")
    common.add_argument("--device", default="auto")
    common.add_argument("--dtype", default="auto")
    common.add_argument("--no_resume", action="store_true", help="start over, ignoring the records log")
    common.add_argument("--no_plots", action="store_true")
    p = sub.add_parser("profile", parents=[common], help="teacher-student disagreement by relative position")
    p.add_argument("--rollouts", type=int, default=4, help="student rollouts per problem")
    p.add_argument("--jsd_token_clip", type=float, default=0.05, help="point-wise clip c of the clipped forward KL")
    v = sub.add_parser("viability", parents=[common], help="branch viability of the teacher's preferred tokens")
    v.add_argument("--spines", type=int, default=2, help="student rollouts per problem")
    v.add_argument("--prefixes", type=int, default=8, help="branch positions per spine, spread over u")
    v.add_argument("--alternatives", type=int, default=3, help="teacher's top tokens forced per prefix")
    v.add_argument("--continuation_tokens", type=int, default=512, help="student tokens after the forced one")
    v.add_argument("--continuation", default="sample", choices=("greedy", "sample"))
    return parser


def check(args: argparse.Namespace) -> None:
    positive = ["num_problems", "max_completion_length", "bins"]
    positive += (
        ["rollouts"] if args.command == "profile" else ["spines", "prefixes", "alternatives", "continuation_tokens"]
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0 (0 = no intervals), got {args.bootstrap}")
    if not args.temperature > 0:
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.grader_timeout <= 0:
        raise UserError(f"--grader_timeout must be > 0 seconds, got {args.grader_timeout}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise UserError(f"--gpu_memory_utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.command == "profile" and args.jsd_token_clip < 0:
        raise UserError(f"--jsd_token_clip must be >= 0 (0 = no clip), got {args.jsd_token_clip}")


def run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check(args)
    from pwopsd.diagnose import core

    problems = core.load_problems(args.data_file, args.num_problems, args.answer_column)
    core.check_model_path(args.model)
    from tqdm.auto import tqdm

    from pwopsd.diagnose import profile, viability
    from pwopsd.evaluation.workers import MathGrader

    module = profile if args.command == "profile" else viability
    out_dir = Path(args.out_dir)
    backend_name = core.resolve_backend(args.backend)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _SUMMARY_ONLY}
    settings["command"] = args.command
    settings["backend"] = backend_name  # the one used: a run is not resumed with another engine's samples
    log = core.PartialLog(
        out_dir / f"{args.command}.records.partial.jsonl", settings, resume=not args.no_resume, legacy=_LEGACY
    )
    todo = [p for p in problems if p.index not in log.done]
    if todo:  # the models are loaded only when a problem is left
        lm = core.load_model(args.model, args.device, args.dtype)
        backend: core.GenerationBackend = (
            core.VLLMBackend(args.model, args.dtype, args.gpu_memory_utilization, lm.eos_ids, args.seed)
            if backend_name == "vllm"
            else core.TransformersBackend(lm, args.hf_batching)
        )
        with MathGrader(args.grader, args.grader_timeout, num_workers=1) as grader:
            for problem in tqdm(todo, desc=f"{args.command} (problems)"):
                log.append(problem.index, module.run_problem(lm, backend, grader, problem, args))
    per_problem = [log.done[p.index] for p in problems]
    if args.command == "profile":
        records: Any = [r for recs in per_problem for r in recs]
        summary = profile.summarize(records, args.bins, args.bootstrap, args.seed)
        core.write_csv(
            out_dir / "profile_bins.csv",
            ["metric", "split", "bin", "u_lo", "u_hi", "n", "mean", "ci_lo", "ci_hi"],
            profile.bin_rows(summary),
        )
        if not args.no_plots:
            profile.plot(summary, out_dir / "profile.png")
    else:
        branches = [b for recs in per_problem for b in recs["branches"]]
        records = {"spines": [s for recs in per_problem for s in recs["spines"]], "branches": branches}
        summary = viability.summarize(branches, args.bins, args.bootstrap, args.seed)
        core.write_csv(
            out_dir / "viability_bins.csv",
            ["bin", "u_lo", "u_hi", "branches", "rate", "ci_lo", "ci_hi", "normalised_rate"],
            viability.bin_rows(summary),
        )
        if not args.no_plots:
            viability.plot(summary, branches, out_dir)
    settings = {
        **settings,
        "num_problems": args.num_problems,
        "bins": args.bins,
        "bootstrap": args.bootstrap,
        "gpu_memory_utilization": args.gpu_memory_utilization,
    }
    atomic_write_json(out_dir / f"{args.command}.json", {"settings": settings, "records": records, "summary": summary})
    report(args.command, summary, out_dir)
    return 0


def _fmt(x: Any) -> str:
    return "nan" if x is None else f"{x:.3f}"


def report(command: str, summary: dict[str, Any], out_dir: Path) -> None:
    """The headline numbers on stdout."""
    if command == "profile":
        print(
            f"profile: {summary['rollouts']} rollouts ({summary['correct_rollouts']} correct), {summary['tokens']} tokens"
        )
    else:
        print(
            f"viability: {summary['branches']} branches, {summary['positives']} viable, {summary['negatives']} not, "
            f"{summary['problems']} problems; {summary['ci']}"
        )
        print(f"{'predictor':18s} {'orientation':11s} {'AUROC':>6s}  95% CI")
        for name, e in summary["auroc"].items():
            print(
                f"{name:18s} {e['orientation'] or 'undefined':11s} {_fmt(e['auroc']):>6s}  [{_fmt(e['ci'][0])}, {_fmt(e['ci'][1])}]"
            )
        fit = summary["schedule_fit"]
        if "flags" in fit:
            print(f"derived schedule:  {fit['flags']}   (scale a = {fit['scale']:.3f})")
        else:
            print(f"derived schedule:  none ({fit['error']})")
        print(f"Moderate schedule: {summary['moderate']['flags']}")
    print(f"wrote {out_dir / (command + '.json')}")


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_main(lambda: run(argv), PROG)


if __name__ == "__main__":
    sys.exit(main())
