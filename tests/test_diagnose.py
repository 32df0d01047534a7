"""The diagnostic (`code/diagnose.py`): its statistics against naive implementations, the forced-branch ids, the
labels, both commands end to end on the tiny Qwen3 model, resume, and one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pwopsd.diagnose import cli, core, stats, viability

REPO = Path(__file__).resolve().parents[1]
GSM8K = str(REPO / "data" / "gsm8k_train.jsonl")

# ----------------------------------------------------------------------------------------------------------------------
# statistics


def naive_auroc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def test_auroc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = int(rng.integers(2, 40))
        scores = rng.integers(0, 5, size=n).astype(float)  # many ties
        labels = rng.random(n) < 0.4
        if labels.all() or not labels.any():
            continue
        assert stats.auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels), abs=1e-12)
    assert stats.auroc([1, 2, 3], [True, False, True]) == pytest.approx(0.5)
    assert stats.auroc([0.1, 0.9], [False, True]) == 1.0
    assert math.isnan(stats.auroc([1, 2], [True, True]))


def test_oriented_auroc_flips_a_negative_predictor():
    assert stats.oriented_auroc([3, 2, 1, 0], [True, True, False, False]) == (1.0, "higher")
    assert stats.oriented_auroc([0, 1, 2, 3], [True, True, False, False]) == (1.0, "lower")
    auc, orientation = stats.oriented_auroc([0, 1, 2, 3], [True, False, True, False])
    assert orientation == "lower" and auc == pytest.approx(1 - naive_auroc([0, 1, 2, 3], [1, 0, 1, 0]))
    assert stats.oriented_auroc([1, 2], [False, True]) == (1.0, "higher")


def test_roc_curve_matches_threshold_sweep():
    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.3, 0.3, 0.1])
    labels = np.array([1, 1, 0, 1, 0, 0, 1], dtype=bool)
    fpr, tpr = stats.roc_curve(scores, labels)
    expected = [(0.0, 0.0)]
    for t in sorted(set(scores), reverse=True):
        pred = scores >= t
        expected.append(((pred & ~labels).sum() / (~labels).sum(), (pred & labels).sum() / labels.sum()))
    assert np.allclose(np.c_[fpr, tpr], np.array(expected))
    # trapezoid area under the ROC = AUROC with ties counted 1/2
    assert np.trapezoid(tpr, fpr) == pytest.approx(naive_auroc(scores, labels))


def test_cluster_bootstrap_resamples_whole_clusters_with_the_seeded_generator():
    clusters = np.array([5, 5, 5, 2, 2, 9, 7, 7, 7, 7])
    values = np.arange(10.0)
    seen = []

    def stat(rows):
        seen.append(rows.copy())
        return float(values[rows].mean())

    got = stats.cluster_bootstrap(stat, clusters, n_boot=30, seed=11)
    # naive loop with the same generator: draw K cluster indices (sorted distinct ids) with replacement, take all rows
    rng = np.random.default_rng(11)
    ids = sorted(set(clusters.tolist()))
    for b in range(30):
        draw = rng.integers(0, len(ids), size=len(ids))
        rows = [i for d in draw for i in range(len(clusters)) if clusters[i] == ids[d]]
        assert seen[b].tolist() == rows
        assert got[b] == pytest.approx(values[rows].mean())
        # whole clusters only: each cluster appears with a multiple of its size
        for c in ids:
            assert (clusters[seen[b]] == c).sum() % (clusters == c).sum() == 0
    assert np.array_equal(got, stats.cluster_bootstrap(lambda r: float(values[r].mean()), clusters, 30, 11))
    assert not np.array_equal(got, stats.cluster_bootstrap(lambda r: float(values[r].mean()), clusters, 30, 12))


def test_percentile_ci_skips_undefined_resamples():
    samples = np.array([np.nan, *np.arange(101.0)])
    assert stats.percentile_ci(samples) == pytest.approx((2.5, 97.5))
    assert all(math.isnan(x) for x in stats.percentile_ci(np.array([np.nan])))


def test_bin_index_and_binned_mean_against_naive_loops():
    rng = np.random.default_rng(0)
    u = np.r_[rng.random(200), 0.0, 1.0, 0.5, 0.25]
    v = rng.normal(size=len(u))
    c = rng.integers(0, 6, size=len(u))
    n_bins = 7
    naive_bin = []
    for x in u:
        b = 0
        while b < n_bins - 1 and x >= (b + 1) / n_bins:
            b += 1
        naive_bin.append(b)
    assert stats.bin_index(u, n_bins).tolist() == naive_bin
    got = stats.binned_mean(u, v, c, n_bins, n_boot=40, seed=5)
    for b in range(n_bins):
        rows = [i for i in range(len(u)) if naive_bin[i] == b]
        assert got.n[b] == len(rows)
        assert got.mean[b] == pytest.approx(sum(v[i] for i in rows) / len(rows))

        def pooled(sel, b=b):
            sel = [i for i in sel if naive_bin[i] == b]
            return sum(v[i] for i in sel) / len(sel) if sel else float("nan")

        boot = stats.cluster_bootstrap(pooled, c, n_boot=40, seed=5)
        assert (got.lo[b], got.hi[b]) == pytest.approx(stats.percentile_ci(boot))


def test_schedule_is_the_training_schedule():
    from pwopsd.losses import schedule_weight

    u = np.linspace(0, 1, 11)
    for params in (stats.MODERATE, (0.1, 0.6, 0.05)):
        assert stats.schedule(u, *params) == pytest.approx(schedule_weight(torch.tensor(u), *params).numpy())
    assert stats.schedule(np.array([0.0, 0.3, 1.0]), *stats.MODERATE) == pytest.approx(
        [0.2856, 0.625, 0.9993], abs=1e-4
    )


@pytest.mark.parametrize("truth", [(0.2, 0.45, 0.08), (0.5, 0.25, 0.15), (0.05, 0.6, 0.05)])
def test_schedule_fit_recovers_known_parameters(truth):
    rng = np.random.default_rng(1)
    u = (np.arange(20) + 0.5) / 20
    scale = 0.7
    rate = scale * stats.schedule(u, *truth) + rng.normal(0, 0.01, size=20)
    fit = stats.fit_schedule(u, rate, weight=np.full(20, 50))
    assert fit.scale == pytest.approx(scale, abs=0.05)
    assert fit.w_min == pytest.approx(truth[0], abs=0.05)
    assert fit.tau == pytest.approx(truth[1], abs=0.03)
    assert fit.s == pytest.approx(truth[2], abs=0.03)
    assert fit.flags().startswith("--position_w_min ")
    with pytest.raises(ValueError, match="at least 4 bins"):
        stats.fit_schedule(u[:3], rate[:3])


# ----------------------------------------------------------------------------------------------------------------------
# per-token quantities, ids, answers, labels


def test_token_stats_against_naive_sums():
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(4, 6, generator=g) * 2, torch.randn(4, 6, generator=g) * 2
    zs[2] = zt[2]  # one position where teacher and student agree exactly
    ids = torch.tensor([0, 3, 5, 1])
    T, c = 1.1, 0.05
    got = core.token_stats(zt, zs, ids, T, c)
    for t in range(4):
        q = [math.exp(x / T) for x in zt[t].tolist()]
        p = [math.exp(x / T) for x in zs[t].tolist()]
        q = [x / sum(q) for x in q]
        p = [x / sum(p) for x in p]
        terms = [qi * (math.log(qi) - math.log(pi)) for qi, pi in zip(q, p)]
        clipped = sum(min(d, c) for d in terms)
        assert got["kl_forward"][t] == pytest.approx(sum(terms), abs=1e-5)
        assert got["kl_forward_clipped"][t] == pytest.approx(clipped, abs=1e-5)
        assert got["kl_reverse"][t] == pytest.approx(
            sum(pi * (math.log(pi) - math.log(qi)) for qi, pi in zip(q, p)), abs=1e-5
        )
        assert got["teacher_entropy"][t] == pytest.approx(-sum(x * math.log(x) for x in q), abs=1e-5)
        assert got["student_entropy"][t] == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-5)
        assert got["top1_agree"][t] == float(q.index(max(q)) == p.index(max(p)))
        assert got["logq_token"][t] == pytest.approx(math.log(q[ids[t]]), abs=1e-5)
        assert got["logp_token"][t] == pytest.approx(math.log(p[ids[t]]), abs=1e-5)
        assert got["negative_clipped"][t] == float(clipped < 0)
    assert got["kl_forward"][2] == pytest.approx(0.0, abs=1e-6)
    assert core.relative_positions(4).tolist() == [0.125, 0.375, 0.625, 0.875]


def test_forced_branch_ids_and_prefix_positions():
    prompt, spine = [7, 8, 9], [11, 12, 13, 14]
    assert core.forced_branch_ids(prompt, spine, 0, 99) == [7, 8, 9, 99]
    assert core.forced_branch_ids(prompt, spine, 3, 99) == [7, 8, 9, 11, 12, 13, 99]
    with pytest.raises(ValueError):
        core.forced_branch_ids(prompt, spine, 4, 99)
    for length, k in itertools.product((1, 3, 10, 37), (1, 4, 8)):
        naive = sorted({min(math.floor((i + 0.5) / k * length), length - 1) for i in range(k)})
        assert viability.prefix_positions(length, k) == naive


def test_gold_answers_of_gsm8k_rows_and_answer_columns():
    assert core.gold_answer({"solution": "a\n#### 1,250"}, "answer") == "1250"
    assert core.gold_answer({"solution": "so \\boxed{\\frac{1}{2}}."}, "answer") == "\\frac{1}{2}"
    assert core.gold_answer({"answer": " 5 ", "solution": "#### 6"}, "answer") == "5"
    assert core.gold_answer({"solution": "no answer"}, "answer") is None
    problems = core.load_problems(GSM8K, 2)
    first = [json.loads(line) for line in Path(GSM8K).read_text().splitlines()[:2]]
    assert [p.answer for p in problems] == [r["solution"].split("####")[-1].strip() for r in first] == ["72", "10"]


def test_labels_come_from_the_grader():
    from pwopsd.evaluation.workers import MathGrader

    with MathGrader("reference", num_workers=1) as grader:
        assert viability.label(grader, "so 48+24 = \\boxed{72}", "72") == ("72", True)
        assert viability.label(grader, "\\boxed{\\frac{144}{2}}", "72") == ("\\frac{144}{2}", True)  # equivalence
        assert viability.label(grader, "\\boxed{71}", "72") == ("71", False)
        assert viability.label(grader, "72", "72") == (None, False)  # no box: not viable


# ----------------------------------------------------------------------------------------------------------------------
# end to end on the tiny Qwen3 model


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir("qwen3")
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_viability_end_to_end_tiny_qwen3(tiny, tmp_path, capsys):
    from pwopsd.evaluation.extract import extract_boxed_answer
    from pwopsd.evaluation.grade import grade_answer
    from pwopsd.prompts import student_prompt_text, teacher_prompt_text

    path, model, tok = tiny
    out = tmp_path / "v"
    argv = [
        "viability",
        "--model",
        str(path),
        "--data_file",
        GSM8K,
        "--num_problems",
        "2",
        "--out_dir",
        str(out),
        "--spines",
        "2",
        "--prefixes",
        "3",
        "--alternatives",
        "2",
        "--continuation_tokens",
        "4",
        "--max_completion_length",
        "6",
        "--continuation",
        "greedy",
        "--bootstrap",
        "20",
        "--bins",
        "5",
    ]
    rc, stdout, _ = _run(capsys, *argv)
    assert rc == 0, stdout
    result = json.loads((out / "viability.json").read_text())
    for name in ("viability.png", "viability_roc.png", "viability_bins.csv"):
        assert (out / name).stat().st_size > 0
    branches, spines = result["records"]["branches"], result["records"]["spines"]
    problems = core.load_problems(GSM8K, 2)
    assert len(spines) == 4
    eos = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    expected = sum(len(viability.prefix_positions(len(s["ids"]), 3)) * 2 for s in spines)
    assert len(branches) == expected > 0
    for b in branches:
        pr = problems[b["problem_index"]]
        spine = next(s["ids"] for s in spines if s["problem_index"] == b["problem_index"] and s["spine"] == b["spine"])
        k = b["position"]
        s_ids = tok(student_prompt_text(tok, pr.problem), add_special_tokens=True)["input_ids"]
        t_ids = tok(teacher_prompt_text(tok, pr.problem, pr.solution), add_special_tokens=True)["input_ids"]
        # the alternative is the teacher's rank-r token after the spine prefix
        with torch.no_grad():
            zt = model(torch.tensor([t_ids + spine[:k]])).logits[0, -1].float()
            zs = model(torch.tensor([s_ids + spine[:k]])).logits[0, -1].float()
        assert zt.topk(b["rank"]).indices[-1].item() == b["token_id"]
        assert b["teacher_prob"] == pytest.approx(torch.softmax(zt / 1.1, -1)[b["token_id"]].item(), rel=1e-4)
        assert b["student_prob"] == pytest.approx(torch.softmax(zs / 1.1, -1)[b["token_id"]].item(), rel=1e-4)
        assert b["is_spine_token"] == int(spine[k] == b["token_id"])
        assert b["u"] == pytest.approx((k + 0.5) / len(spine))
        # the student continued greedily from exactly prompt + prefix + alternative
        forced = s_ids + spine[:k] + [b["token_id"]]
        if b["token_id"] not in eos:
            with torch.no_grad():
                gen = model.generate(
                    torch.tensor([forced]),
                    max_new_tokens=4,
                    do_sample=False,
                    eos_token_id=sorted(eos),
                    pad_token_id=tok.pad_token_id,
                )[0, len(forced) :].tolist()
            cut = []
            for t in gen:
                cut.append(t)
                if t in eos:
                    break
            assert b["continuation_ids"] == cut
        # the label is the grader's verdict on the branch's final box
        ids = [*spine[:k], b["token_id"], *b["continuation_ids"]]
        stop = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        text = tok.decode(ids[:stop], skip_special_tokens=True)
        assert b["predicted"] == extract_boxed_answer(text)
        assert b["viable"] == grade_answer(extract_boxed_answer(text), pr.answer)
    s = result["summary"]
    assert s["positives"] + s["negatives"] == len(branches)
    assert sum(s["rate_by_u"]["n"]) == len(branches)
    assert set(s["auroc"]) == set(viability.PREDICTORS)
    assert "--position_w_min 0.25 --position_tau 0.3 --position_s 0.1" in stdout
    # resume: a re-run reads the records log and generates nothing new; other settings are refused
    log = (out / "viability.records.partial.jsonl").read_text()
    assert len(log.splitlines()) == 3  # header + 2 problems
    rc, _, _ = _run(capsys, *argv)
    assert rc == 0 and (out / "viability.records.partial.jsonl").read_text() == log
    assert json.loads((out / "viability.json").read_text())["records"] == result["records"]
    rc, _, err = _run(capsys, *argv[:-4], "--alternatives", "3", *argv[-4:])
    assert rc == 2 and err.count("\n") == 1 and "other settings" in err and "--no_resume" in err


def test_viability_summary_with_both_classes_and_cluster_ci():
    rng = np.random.default_rng(0)
    branches = []
    for prob in range(8):
        for i in range(12):
            u = (i + 0.5) / 12
            viable = bool(rng.random() < 0.8 * stats.schedule(np.array(u), 0.2, 0.4, 0.1))
            row = {name: float(rng.random()) for name in viability.PREDICTORS}
            branches.append({**row, "u": u, "problem_index": prob, "viable": viable})
    s = viability.summarize(branches, n_bins=6, n_boot=50, seed=2)
    y = [b["viable"] for b in branches]
    auc = naive_auroc([b["u"] for b in branches], y)
    assert s["auroc"]["u"]["orientation"] == "higher"
    assert s["auroc"]["u"]["auroc"] == pytest.approx(auc)
    lo, hi = s["auroc"]["u"]["ci"]
    assert lo <= auc <= hi
    assert s["positives"] == sum(y) and s["negatives"] == len(y) - sum(y)
    assert "flags" in s["schedule_fit"] and s["schedule_fit"]["flags"].startswith("--position_w_min")


def test_profile_end_to_end_tiny_qwen3(tiny, tmp_path, capsys):
    from pwopsd.prompts import student_prompt_text, teacher_prompt_text

    path, model, tok = tiny
    out = tmp_path / "p"
    rc, stdout, _ = _run(
        capsys,
        "profile",
        "--model",
        str(path),
        "--data_file",
        GSM8K,
        "--num_problems",
        "2",
        "--out_dir",
        str(out),
        "--rollouts",
        "2",
        "--max_completion_length",
        "6",
        "--bootstrap",
        "20",
        "--bins",
        "4",
    )
    assert rc == 0
    result = json.loads((out / "profile.json").read_text())
    assert (out / "profile.png").stat().st_size > 0 and (out / "profile_bins.csv").read_text().startswith("metric,")
    records = result["records"]
    assert len(records) == 4
    problems = core.load_problems(GSM8K, 2)
    rec = records[0]
    pr = problems[rec["problem_index"]]
    comp = rec["completion_ids"]
    s_ids = tok(student_prompt_text(tok, pr.problem), add_special_tokens=True)["input_ids"]
    t_ids = tok(teacher_prompt_text(tok, pr.problem, pr.solution), add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        zt = model(torch.tensor([t_ids + comp])).logits[0, len(t_ids) - 1 : -1].double()
        zs = model(torch.tensor([s_ids + comp])).logits[0, len(s_ids) - 1 : -1].double()
    lq, lp = torch.log_softmax(zt / 1.1, -1), torch.log_softmax(zs / 1.1, -1)
    fkl = (lq.exp() * (lq - lp)).sum(-1)
    clipped = (lq.exp() * (lq - lp)).clamp(max=0.05).sum(-1)
    assert rec["metrics"]["kl_forward"] == pytest.approx(fkl.tolist(), abs=1e-5)
    assert rec["metrics"]["kl_forward_clipped"] == pytest.approx(clipped.tolist(), abs=1e-5)
    assert rec["metrics"]["logq_token"] == pytest.approx(
        lq.gather(-1, torch.tensor(comp)[:, None])[:, 0].tolist(), abs=1e-4
    )
    # binning: token counts per bin = a naive count of u = (k - 1/2)/L over every rollout
    naive = [0] * 4
    for r in records:
        for k in range(1, r["n_tokens"] + 1):
            naive[min(int((k - 0.5) / r["n_tokens"] * 4), 3)] += 1
    assert result["summary"]["bins"]["all"]["kl_forward"]["n"] == naive
    assert sum(naive) == result["summary"]["tokens"] == sum(r["n_tokens"] for r in records)
    mean0 = np.mean(
        [
            m
            for r in records
            for k, m in enumerate(r["metrics"]["kl_forward"])
            if min(int((k + 0.5) / r["n_tokens"] * 4), 3) == 0
        ]
    )
    assert result["summary"]["bins"]["all"]["kl_forward"]["mean"][0] == pytest.approx(mean0)
    assert "profile: 4 rollouts" in stdout


# ----------------------------------------------------------------------------------------------------------------------
# bad inputs: one line, exit 2


def test_bad_inputs_are_one_line_errors(tmp_path, capsys, tiny):
    path = str(tiny[0])
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"problem": "1+1?", "solution": "It is two."}) + "\n")
    not_model = tmp_path / "empty_folder"
    not_model.mkdir()
    base = ["--out_dir", str(tmp_path / "o"), "--num_problems", "1"]
    cases = [
        (["viability", "--model", path, "--data_file", str(tmp_path / "missing.jsonl"), *base], "does not exist"),
        (["viability", "--model", path, "--data_file", str(tmp_path / "x.txt"), *base], "unsupported type"),
        (["viability", "--model", path, "--data_file", GSM8K, "--prefixes", "0", *base], "--prefixes must be >= 1"),
        (["viability", "--model", path, "--data_file", str(no_answer), *base], "row 0 has no answer"),
        (["profile", "--model", str(not_model), "--data_file", GSM8K, *base], "is not a model folder"),
        (["profile", "--model", str(tmp_path / "nope"), "--data_file", GSM8K, *base], "does not exist"),
        (["profile", "--model", path, "--data_file", GSM8K, "--rollouts", "x", *base], "invalid int value"),
        (["profile", "--data_file", GSM8K, *base], "--model"),
    ]
    for argv, needle in cases:
        rc, _, err = _run(capsys, *argv)
        assert rc == 2, argv
        assert err.startswith("diagnose.py: error: ") and err.count("\n") == 1 and needle in err, err
        assert "Traceback" not in err


def test_entry_script_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "code" / "diagnose.py"),
            "viability",
            "--model",
            str(tmp_path),
            "--data_file",
            GSM8K,
            "--prefixes",
            "0",
            "--out_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == "diagnose.py: error: --prefixes must be >= 1, got 0\n"


def test_records_log_resumes_drops_a_torn_last_line_and_refuses_corruption(tmp_path):
    path = tmp_path / "viability.records.partial.jsonl"
    settings = {"seed": 0, "command": "viability"}
    log = core.PartialLog(path, settings, resume=True)
    assert not path.exists()  # nothing is written (or replaced) before a problem is done
    log.append(0, {"branches": [1]})
    log.append(3, {"branches": [2]})
    whole = path.read_text()
    path.write_text(whole + '{"problem_index": 4, "rec')  # killed while appending
    again = core.PartialLog(path, settings, resume=True)
    assert again.done == {0: {"branches": [1]}, 3: {"branches": [2]}}
    assert path.read_text() == whole
    with pytest.raises(core.UserError, match="other settings"):
        core.PartialLog(path, {"seed": 1, "command": "viability"}, resume=True)
    lines = whole.splitlines(keepends=True)
    path.write_text(lines[0] + "garbage\n" + lines[2])
    with pytest.raises(core.UserError, match="line 2 is corrupt"):
        core.PartialLog(path, settings, resume=True)
    fresh = core.PartialLog(path, settings, resume=False)
    assert fresh.done == {} and path.read_text().startswith(lines[0][:1])  # replaced at the first append only
    fresh.append(7, [])
    assert path.read_text().splitlines()[1] == '{"problem_index": 7, "records": []}'
