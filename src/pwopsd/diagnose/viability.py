"""`diagnose viability`: are the teacher's preferred tokens viable continuations, and where along the rollout?

Per problem the student samples `--spines` rollouts (spines). At `--prefixes` positions spread over each spine (the
token at u_i = (i + 1/2)/K, i = 0..K-1, i.e. index floor(u_i · L)) the teacher's `--alternatives` most likely next
tokens are forced, one branch each, right after the student prompt + the spine's first tokens (on ids: see
`core.forced_branch_ids`); the student continues for `--continuation_tokens` tokens (greedy or sampled; the branches of
a spine in one generation call, row i seeded by `core.row_seeds(seed_for(seed, problem, "branch", spine))[i]`), and
the branch is viable when the answer of spine prefix + alternative + continuation (its final `\\boxed{}`; under
`--answer_format boxed_or_last_number`, without a box, its last number) is graded correct against the gold by the
project's grader. Predictors of viability are scored by AUROC with a cluster-bootstrap interval over problems; the
viability rate by u gives a position-weight schedule.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pwopsd.diagnose import core, stats
from pwopsd.evaluation.extract import extract_answer
from pwopsd.prompts import student_prompt_text, teacher_prompt_text

PREDICTORS = (
    "u",
    "position",
    "rank",
    "is_spine_token",
    "teacher_prob",
    "student_prob",
    "log_ratio",
    "teacher_entropy",
    "student_entropy",
    "kl_forward",
    "kl_reverse",
)
"""Branch features scored by AUROC (log_ratio = log q(alt) - log p(alt); KLs and entropies at the prefix)."""


def prefix_positions(length: int, prefixes: int) -> list[int]:
    """Distinct token indices floor(((i + 1/2)/K) · L), i = 0..K-1, of a spine of L tokens (fewer when L < K)."""
    return sorted({min(int(((i + 0.5) / prefixes) * length), length - 1) for i in range(prefixes)})


def label(grader: Any, text: str, gold: str, answer_format: str = "boxed") -> tuple[str | None, bool]:
    """(the answer of a branch's text under `answer_format`, whether the grader says it equals the gold)."""
    predicted = extract_answer(text, answer_format)
    return predicted, bool(grader.grade(predicted, gold))


def run_problem(
    lm: core.LoadedModel,
    backend: core.GenerationBackend,
    grader: Any,
    problem: core.DiagProblem,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The spines and branch records of one problem. `backend` samples the spines and the continuations (those of one
    spine in one call); the teacher/student logits come from the transformers model `lm`."""
    tok = lm.tokenizer
    s_prompt = core.prompt_ids(tok, student_prompt_text(tok, problem.problem))
    t_prompt = core.prompt_ids(
        tok, teacher_prompt_text(tok, problem.problem, problem.solution, think_mode=args.teacher_think)
    )
    sampling = core.Sampling(args.temperature, args.top_p, args.top_k)
    cont_sampling = core.Sampling(0.0) if args.continuation == "greedy" else sampling
    spines = backend.generate(
        [s_prompt] * args.spines,
        args.max_completion_length,
        sampling,
        core.seed_for(args.seed, problem.index, "spine"),
    )
    spine_records, branches = [], []
    eos = set(lm.eos_ids)
    for j, spine in enumerate(spines):
        text = core.completion_text(tok, spine, lm.eos_ids)
        predicted, correct = label(grader, text, problem.answer, args.answer_format)
        spine_records.append(
            {"problem_index": problem.index, "spine": j, "ids": spine, "predicted": predicted, "correct": correct}
        )
        if not spine:
            continue
        lq = F.log_softmax(core.completion_logits(lm, t_prompt, spine) / args.temperature, dim=-1)
        lp = F.log_softmax(core.completion_logits(lm, s_prompt, spine) / args.temperature, dim=-1)
        n = len(spine)
        prefixes = []  # (position, its alternatives, the quantities at the prefix)
        for k in prefix_positions(n, args.prefixes):
            q, p = lq[k], lp[k]
            alts = q.topk(min(args.alternatives, q.numel())).indices.tolist()
            at_prefix = {
                "teacher_entropy": float(torch.special.entr(q.exp()).sum()),
                "student_entropy": float(torch.special.entr(p.exp()).sum()),
                "kl_forward": float((q.exp() * (q - p)).sum()),
                "kl_reverse": float((p.exp() * (p - q)).sum()),
            }
            prefixes.append((k, alts, at_prefix))
        inputs = [core.forced_branch_ids(s_prompt, spine, k, a) for k, alts, _ in prefixes for a in alts]
        conts = iter(
            backend.generate(
                inputs,
                args.continuation_tokens,
                cont_sampling,
                core.seed_for(args.seed, problem.index, "branch", j),
            )
        )
        for k, alts, at_prefix in prefixes:
            q, p = lq[k], lp[k]
            for rank, alt in enumerate(alts, 1):
                cont = next(conts)
                cont = [] if alt in eos else cont  # a forced EOS ends the branch
                text = core.completion_text(tok, [*spine[:k], alt, *cont], lm.eos_ids)
                predicted, viable = label(grader, text, problem.answer, args.answer_format)
                branches.append(
                    {
                        "problem_index": problem.index,
                        "spine": j,
                        "spine_length": n,
                        "spine_correct": correct,
                        "position": k,
                        "u": (k + 0.5) / n,
                        "rank": rank,
                        "token_id": int(alt),
                        "token": tok.decode([alt]),
                        "is_spine_token": int(alt == spine[k]),
                        "teacher_prob": float(q[alt].exp()),
                        "student_prob": float(p[alt].exp()),
                        "log_ratio": float(q[alt] - p[alt]),
                        **at_prefix,
                        "continuation_ids": cont,
                        "finished": bool(alt in eos or (cont and cont[-1] in eos)),
                        "predicted": predicted,
                        "viable": viable,
                    }
                )
    return {"spines": spine_records, "branches": branches}


def summarize(branches: list[dict[str, Any]], n_bins: int, n_boot: int, seed: int) -> dict[str, Any]:
    """AUROC of each predictor with its cluster-bootstrap CI, the viability rate by u-bin, and the fitted schedule."""
    y = np.array([b["viable"] for b in branches], dtype=bool)
    clusters = np.array([b["problem_index"] for b in branches])
    ci_note = f"95% percentile cluster bootstrap over problems, {n_boot} resamples, seed {seed}"
    out: dict[str, Any] = {
        "branches": len(branches),
        "positives": int(y.sum()),
        "negatives": int((~y).sum()),
        "problems": len(set(clusters.tolist())),
        "ci": ci_note,
        "auroc": {},
    }
    for name in PREDICTORS:
        x = np.array([b[name] for b in branches], dtype=float)
        auc, orientation = stats.oriented_auroc(x, y) if len(x) else (float("nan"), None)
        entry: dict[str, Any] = {"auroc": auc, "orientation": orientation, "ci": [None, None]}
        if orientation is not None:
            signed = x if orientation == "higher" else -x
            boot = stats.cluster_bootstrap(lambda rows, s=signed: stats.auroc(s[rows], y[rows]), clusters, n_boot, seed)
            entry["ci"] = list(stats.percentile_ci(boot))
            entry["resamples_with_both_classes"] = int(np.isfinite(boot).sum())
        else:
            entry["note"] = "undefined: the branches are all viable or all not viable"
        out["auroc"][name] = entry
    u = np.array([b["u"] for b in branches], dtype=float)
    edges = stats.bin_edges(n_bins)
    if len(branches):
        rate = stats.binned_mean(u, y.astype(float), clusters, n_bins, n_boot, seed)
        n, mean, lo, hi = rate.n, rate.mean, rate.lo, rate.hi
    else:
        n, mean, lo, hi = np.zeros(n_bins, dtype=int), *(np.full(n_bins, np.nan) for _ in range(3))
    out["rate_by_u"] = {"bin_edges": edges, "n": n, "rate": mean, "lo": lo, "hi": hi}
    out["moderate"] = {
        "w_min": stats.MODERATE[0],
        "tau": stats.MODERATE[1],
        "s": stats.MODERATE[2],
        "flags": "--position_w_min 0.25 --position_tau 0.3 --position_s 0.1",
    }
    centres = (edges[:-1] + edges[1:]) / 2
    if not y.any():
        out["schedule_fit"] = {"error": "no viable branch: the viability curve is 0 everywhere, nothing to fit"}
    elif int((n > 0).sum()) < 4:
        out["schedule_fit"] = {
            "error": f"only {int((n > 0).sum())} u-bins hold branches; the fit needs 4 (raise --prefixes)"
        }
    else:
        fit = stats.fit_schedule(centres, np.nan_to_num(mean), weight=n)
        out["schedule_fit"] = {
            "scale": fit.scale,
            "w_min": fit.w_min,
            "tau": fit.tau,
            "s": fit.s,
            "cost": fit.cost,
            "flags": fit.flags(),
            "normalised_rate": mean / fit.scale if fit.scale > 0 else np.full(n_bins, np.nan),
            "normalisation": "rate / a, where a (the rate that w = 1 stands for) is fitted jointly with (w_min, tau, s); "
            "bins weighted by their number of branches",
        }
    return core.jsonable(out)


def bin_rows(summary: dict[str, Any]) -> list[list[Any]]:
    r = summary["rate_by_u"]
    edges = r["bin_edges"]
    fit = summary["schedule_fit"]
    norm = fit.get("normalised_rate") or [None] * (len(edges) - 1)
    return [
        [i, edges[i], edges[i + 1], r["n"][i], r["rate"][i], r["lo"][i], r["hi"][i], norm[i]]
        for i in range(len(edges) - 1)
    ]


def plot(summary: dict[str, Any], branches: list[dict[str, Any]], out_dir: Path) -> None:
    """viability.png: rate by u with the fitted and the Moderate schedules (both times the fitted scale);
    viability_roc.png: the ROC curve of each predictor in its better orientation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = summary["rate_by_u"]
    edges = np.asarray(r["bin_edges"], dtype=float)
    centres = (edges[:-1] + edges[1:]) / 2
    rate = np.array(r["rate"], dtype=float)
    grid = np.linspace(0, 1, 201)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = np.isfinite(rate)
    ax.errorbar(
        centres[ok],
        rate[ok],
        yerr=[rate[ok] - np.array(r["lo"], float)[ok], np.array(r["hi"], float)[ok] - rate[ok]],
        fmt="o",
        color="black",
        capsize=3,
        label="viability rate (95% cluster CI)",
    )
    fit = summary["schedule_fit"]
    scale = fit.get("scale", 1.0)
    if "w_min" in fit:
        ax.plot(
            grid,
            scale * stats.schedule(grid, fit["w_min"], fit["tau"], fit["s"]),
            color="tab:orange",
            label=f"fitted a·w(u): {fit['flags']}",
        )
    ax.plot(
        grid, scale * stats.schedule(grid, *stats.MODERATE), color="tab:blue", linestyle="--", label="Moderate a·w(u)"
    )
    ax.set_xlabel("relative position u of the forced token")
    ax.set_ylabel("share of viable branches")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"branch viability by position ({summary['branches']} branches, {summary['problems']} problems)")
    core.save_figure(fig, out_dir / "viability.png")

    fig, ax = plt.subplots(figsize=(6, 6))
    y = np.array([b["viable"] for b in branches], dtype=bool)
    for number, (name, entry) in enumerate(summary["auroc"].items()):
        if entry["orientation"] is None:
            continue
        x = np.array([b[name] for b in branches], dtype=float)
        fpr, tpr = stats.roc_curve(x if entry["orientation"] == "higher" else -x, y)
        ax.plot(
            fpr,
            tpr,
            label=f"{name} ({entry['orientation']}) {entry['auroc']:.3f}",
            linestyle="-" if number < 10 else "--",
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC of viability predictors" + ("" if y.any() and (~y).any() else " (undefined: one class only)"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    core.save_figure(fig, out_dir / "viability_roc.png")
