"""The diagnostic's `--answer_format` and `--backend`: labels under the last-number fallback on the real SmolLM2, the
transformers generator's per-row seeding, and the vLLM path through a recording stand-in for the `vllm` module (vLLM
itself is GPU-only and not installed here): the exact token ids, sampling parameters and calls it receives."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from test_extract import naive_boxed, naive_last_number  # naive references (tests/ is importable under pytest)

from pwopsd.diagnose import cli, core

REPO = Path(__file__).resolve().parents[1]
GSM8K = str(REPO / "data" / "gsm8k_train.jsonl")


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def naive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def naive_answer(text: str) -> str | None:
    """The boxed-or-last-number rule from test_extract's naive references (a box when there is one, else the last
    number)."""
    boxed = naive_boxed(text)
    return boxed if boxed is not None else naive_last_number(text)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir("qwen3")
    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _arith_rows(path: Path) -> Path:
    rows = [(7, 5), (9, 4), (6, 8)]
    with path.open("w", encoding="utf-8") as f:
        for a, b in rows:
            f.write(
                json.dumps(
                    {
                        "problem": f"What is {a} + {b}?",
                        "solution": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
                        "answer": str(a + b),
                    }
                )
                + "\n"
            )
    return path


# ----------------------------------------------------------------------------------------------------------------------
# --answer_format on the real SmolLM2 (it answers in words, without a box)


def test_labels_under_boxed_or_last_number_on_smollm2(smollm2_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from pwopsd.evaluation.grade import grade_answer

    data = _arith_rows(tmp_path / "arith.jsonl")
    common = ["--model", smollm2_dir, "--data_file", data, "--num_problems", 3, "--temperature", 0.6,
              "--backend", "transformers", "--device", "cpu", "--dtype", "float32", "--bootstrap", 20, "--bins", 4,
              "--no_plots", "--answer_format", "boxed_or_last_number"]  # fmt: skip
    out = tmp_path / "o"
    rc, _, err = _run(capsys, "profile", *common, "--out_dir", out, "--rollouts", 3, "--max_completion_length", 40)
    assert rc == 0, err
    rc, _, err = _run(
        capsys, "viability", *common, "--out_dir", out, "--spines", 1, "--prefixes", 2, "--alternatives", 2,
        "--max_completion_length", 40, "--continuation_tokens", 24, "--hf_batching", "padded",
    )  # fmt: skip
    assert rc == 0, err
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    eos = {tok.eos_token_id, 2}
    golds = [str(a + b) for a, b in [(7, 5), (9, 4), (6, 8)]]

    def text_of(ids):
        stop = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        return tok.decode(ids[:stop], skip_special_tokens=True)

    profile = json.loads((out / "profile.json").read_text())
    viability = json.loads((out / "viability.json").read_text())
    assert profile["settings"]["answer_format"] == viability["settings"]["answer_format"] == "boxed_or_last_number"
    assert profile["settings"]["backend"] == viability["settings"]["backend"] == "transformers"
    labelled = []
    for rec in profile["records"]:
        labelled.append((text_of(rec["completion_ids"]), rec["predicted"], rec["correct"], rec["problem_index"]))
    for s in viability["records"]["spines"]:
        labelled.append((text_of(s["ids"]), s["predicted"], s["correct"], s["problem_index"]))
    spine_ids = {(s["problem_index"], s["spine"]): s["ids"] for s in viability["records"]["spines"]}
    for b in viability["records"]["branches"]:
        spine = spine_ids[(b["problem_index"], b["spine"])]
        ids = [*spine[: b["position"]], b["token_id"], *b["continuation_ids"]]
        labelled.append((text_of(ids), b["predicted"], b["viable"], b["problem_index"]))
    assert len(labelled) == 9 + 3 + len(viability["records"]["branches"]) and viability["records"]["branches"]
    unboxed_answers = 0
    for text, predicted, label, index in labelled:
        assert predicted == naive_answer(text), text
        assert label == grade_answer(naive_answer(text), golds[index]), text
        unboxed_answers += "\\boxed" not in text and predicted is not None
    assert unboxed_answers > 0  # the fallback is what gives these samples an answer (the box rule gives None)
    assert {label for _, _, label, _ in labelled} == {True, False}  # both labels occur: the grader's side is exercised
    # the answer format is part of the settings: a resume with another one is refused
    rc, _, err = _run(capsys, "profile", *common[:-1], "boxed", "--out_dir", out, "--rollouts", 3,
                      "--max_completion_length", 40)  # fmt: skip
    assert rc == 2 and err.count("\n") == 1
    assert "answer_format: 'boxed_or_last_number' -> 'boxed'" in err and "--no_resume" in err


def test_naive_answer_matches_the_rule_on_edge_cases():
    from pwopsd.evaluation.extract import extract_answer

    texts = ["So the answer is 14.", "7 + 5 = 12, \\boxed{12} then 3", "-3 and 1,234.5", "none", "\\boxed{}", "2.",
             "1,2345 or 5-3", "\\boxed{1} \\boxed 7", "\\boxed{\\frac{1}{2}}", "x 3.5.7"]  # fmt: skip
    for text in texts:
        assert extract_answer(text, "boxed_or_last_number") == naive_answer(text), text
    assert extract_answer("So the answer is 14.", "boxed") is None


def test_records_log_without_the_new_settings_resumes_as_boxed_transformers(tiny, tmp_path, capsys):
    path = tiny[0]
    out = tmp_path / "p"
    argv = ["profile", "--model", path, "--data_file", GSM8K, "--num_problems", 1, "--out_dir", out,
            "--rollouts", 1, "--max_completion_length", 3, "--bootstrap", 5, "--bins", 2, "--no_plots"]  # fmt: skip
    assert _run(capsys, *argv)[0] == 0
    log = out / "profile.records.partial.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    assert header["header"]["answer_format"] == "boxed" and header["header"]["backend"] == "transformers"
    assert header["header"]["hf_batching"] == "length"
    del header["header"]["answer_format"], header["header"]["backend"], header["header"]["hf_batching"]
    old = json.dumps(header) + "\n" + "".join(lines[1:])
    log.write_text(old)  # a log written before the two settings existed
    assert _run(capsys, *argv)[0] == 0 and log.read_text() == old  # resumed: nothing regenerated
    rc, _, err = _run(capsys, *argv, "--answer_format", "boxed_or_last_number")
    assert rc == 2 and "answer_format: 'boxed' -> 'boxed_or_last_number'" in err


# ----------------------------------------------------------------------------------------------------------------------
# the transformers generator


def test_transformers_rows_are_seeded_one_by_one_and_mixed_lengths_batch(tiny):
    _, model, tok = tiny
    lm = core.LoadedModel(model, tok, [tok.convert_tokens_to_ids("<|im_end|>")], tok.pad_token_id, torch.device("cpu"))
    a, b, c = [5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17]
    sampling = core.Sampling(1.0, top_p=0.95, top_k=50)
    got = core.generate(lm, [a, b, c], 6, sampling, seed=3)
    seeds = [naive_seed(3, i) for i in range(3)]
    assert core.row_seeds(3, 3) == seeds
    alone = [core.generate_seeded(lm, [row], 6, sampling, [s])[0] for row, s in zip([a, b, c], seeds)]
    assert got == alone  # a row's sample depends on its ids and seed only, not on the other rows of the call
    assert core.generate(lm, [a, b, c], 6, sampling, seed=4) != got
    assert (
        core.generate_seeded(lm, [a, a], 6, sampling, seeds[:2])[0]
        == core.generate_seeded(lm, [a], 6, sampling, seeds[:1])[0]
    )
    # padded: rows of equal length need no pad, so the call is the unpadded one; mixed lengths agree when greedy
    assert core.generate_seeded(lm, [a, c], 6, sampling, [seeds[0], seeds[2]], "padded") == [got[0], got[2]]
    greedy = core.generate(lm, [a, b, c], 5, core.Sampling(0.0), seed=0)
    assert core.generate(lm, [a, b, c], 5, core.Sampling(0.0), seed=0, batching="padded") == greedy
    for row, out in zip([a, b, c], greedy):  # naive greedy loop, no cache
        ids = list(row)
        new = []
        for _ in range(5):
            with torch.no_grad():
                t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            new.append(t)
            if t in lm.eos_ids:
                break
        assert out == new


# ----------------------------------------------------------------------------------------------------------------------
# the vLLM path, through a stand-in module that records what it is given


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    instances: ClassVar[list[FakeLLM]] = []
    vocab: ClassVar[int] = 0

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list, list, bool]] = []
        FakeLLM.instances.append(self)

    @staticmethod
    def sample(seed: int, max_tokens: int, stop: int, vocab: int) -> tuple[list[int], str, int | None]:
        """What this stand-in returns for one request: random ids; a third of them stop early, half of those with
        the stop id left out of token_ids (finish_reason "stop", stop_reason the id)."""
        rng = random.Random(seed)
        ids = [rng.randrange(10, vocab) for _ in range(max_tokens)]
        if rng.random() < 1 / 3:
            cut = rng.randrange(max_tokens)
            return ([*ids[:cut], stop], "stop", None) if rng.random() < 0.5 else (ids[:cut], "stop", stop)
        return ids, "length", None

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params, use_tqdm))
        outputs = []
        for prompt, sp in zip(prompts, params, strict=True):
            assert set(prompt) == {"prompt_token_ids"}
            ids, reason, stop_reason = self.sample(
                sp.kwargs["seed"], sp.kwargs["max_tokens"], sp.kwargs["stop_token_ids"][0], self.vocab
            )
            completion = types.SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop_reason)
            outputs.append(types.SimpleNamespace(outputs=[completion]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch, tiny):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    FakeLLM.instances = []
    FakeLLM.vocab = len(tiny[2])
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(core, "cuda_available", lambda: True)
    return FakeLLM


def _expected(seed: int, max_tokens: int, eos: list[int], vocab: int) -> list[int]:
    ids, reason, stop_reason = FakeLLM.sample(seed, max_tokens, eos[0], vocab)
    if reason == "stop" and stop_reason is not None:
        ids = [*ids, stop_reason]
    return ids


@pytest.mark.parametrize("continuation", ["sample", "greedy"])
def test_viability_through_vllm_sends_the_forced_ids_and_seeds(fake_vllm, tiny, tmp_path, capsys, continuation):
    from pwopsd.prompts import student_prompt_text, teacher_prompt_text

    path, model, tok = tiny
    out = tmp_path / "v"
    rc, _, err = _run(
        capsys, "viability", "--model", path, "--data_file", GSM8K, "--num_problems", 2, "--out_dir", out,
        "--backend", "vllm", "--gpu_memory_utilization", 0.3, "--device", "cpu", "--dtype", "float32",
        "--seed", 5, "--spines", 2, "--prefixes", 3, "--alternatives", 2, "--max_completion_length", 7,
        "--continuation_tokens", 4, "--top_k", 0, "--top_p", 0.9, "--temperature", 0.8, "--continuation", continuation,
        "--bootstrap", 5, "--bins", 3, "--no_plots",
    )  # fmt: skip
    assert rc == 0, err
    [llm] = fake_vllm.instances
    assert llm.kwargs == {
        "model": str(path),
        "dtype": "float32",
        "gpu_memory_utilization": 0.3,
        "seed": 5,
        "enforce_eager": True,
    }
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    vocab = len(tok)
    result = json.loads((out / "viability.json").read_text())
    assert result["settings"]["backend"] == "vllm" and result["settings"]["gpu_memory_utilization"] == 0.3
    spines = result["records"]["spines"]
    branches = result["records"]["branches"]
    problems = core.load_problems(GSM8K, 2)
    calls = iter(llm.calls)
    for pr in problems:
        s_ids = tok(student_prompt_text(tok, pr.problem), add_special_tokens=True)["input_ids"]
        t_ids = tok(teacher_prompt_text(tok, pr.problem, pr.solution), add_special_tokens=True)["input_ids"]
        prompts, params, use_tqdm = next(calls)  # the spines: one request per spine
        assert prompts == [{"prompt_token_ids": s_ids}] * 2 and use_tqdm is False
        spine_seed = naive_seed(5, pr.index, "spine")
        for i, sp in enumerate(params):
            seed = naive_seed(spine_seed, i)
            assert sp.kwargs == {"n": 1, "temperature": 0.8, "top_p": 0.9, "top_k": -1, "max_tokens": 7, "seed": seed,
                                 "stop_token_ids": eos, "detokenize": False}  # fmt: skip
        mine = [s for s in spines if s["problem_index"] == pr.index]
        for j, s in enumerate(mine):
            expected = _expected(naive_seed(spine_seed, j), 7, eos, vocab)
            stop = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
            assert s["ids"] == expected[:stop]
            prompts, params, _ = next(calls)  # all branches of this spine in one call
            with torch.no_grad():
                zt = model(torch.tensor([t_ids + s["ids"]])).logits[0, len(t_ids) - 1 : -1]
            n = len(s["ids"])
            positions = sorted({min(int((i + 0.5) / 3 * n), n - 1) for i in range(3)})
            forced = [s_ids + s["ids"][:k] + [a] for k in positions for a in zt[k].topk(2).indices.tolist()]
            assert [p["prompt_token_ids"] for p in prompts] == forced
            branch_seed = naive_seed(5, pr.index, "branch", j)
            greedy = continuation == "greedy"
            for i, sp in enumerate(params):
                assert sp.kwargs == {"n": 1, "temperature": 0.0 if greedy else 0.8, "top_p": 1.0 if greedy else 0.9,
                                     "top_k": -1, "max_tokens": 4, "seed": naive_seed(branch_seed, i),
                                     "stop_token_ids": eos, "detokenize": False}  # fmt: skip
            mine_b = [b for b in branches if b["problem_index"] == pr.index and b["spine"] == j]
            assert [[*s_ids, *s["ids"][: b["position"]], b["token_id"]] for b in mine_b] == forced
            for row, b in enumerate(mine_b):
                expected = _expected(naive_seed(branch_seed, row), 4, eos, vocab)
                stop = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
                cont = [] if b["token_id"] in eos else expected[:stop]
                assert b["continuation_ids"] == cont
                assert b["finished"] == (b["token_id"] in eos or bool(cont and cont[-1] in eos))
    assert next(calls, None) is None  # 1 + (spines) calls per problem, nothing else


def test_profile_through_vllm_one_call_per_problem(fake_vllm, tiny, tmp_path, capsys):
    path, _, tok = tiny
    out = tmp_path / "p"
    rc, _, err = _run(capsys, "profile", "--model", path, "--data_file", GSM8K, "--num_problems", 2, "--out_dir", out,
                      "--backend", "auto", "--device", "cpu", "--rollouts", 3, "--max_completion_length", 5,
                      "--top_k", 7, "--bootstrap", 5, "--bins", 2, "--no_plots")  # fmt: skip
    assert rc == 0, err
    [llm] = fake_vllm.instances
    assert len(llm.calls) == 2  # auto chose vllm (installed, CUDA visible)
    for (prompts, params, _), index in zip(llm.calls, (0, 1)):
        assert len(prompts) == 3
        assert [sp.kwargs["top_k"] for sp in params] == [7, 7, 7]
        assert [sp.kwargs["temperature"] for sp in params] == [1.1] * 3
        assert [sp.kwargs["seed"] for sp in params] == [
            naive_seed(naive_seed(0, index, "rollout"), r) for r in range(3)
        ]
    result = json.loads((out / "profile.json").read_text())
    assert result["settings"]["backend"] == "vllm"
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    rec = result["records"][4]
    expected = _expected(naive_seed(naive_seed(0, 1, "rollout"), 1), 5, eos, len(tok))
    stop = next((i + 1 for i, t in enumerate(expected) if t in eos), len(expected))
    assert rec["problem_index"] == 1 and rec["rollout"] == 1 and rec["completion_ids"] == expected[:stop]


def test_auto_backend_resolution(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails
    monkeypatch.setattr(core, "cuda_available", lambda: True)
    assert core.resolve_backend("auto") == "transformers"
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    assert core.resolve_backend("auto") == "vllm"
    monkeypatch.setattr(core, "cuda_available", lambda: False)
    assert core.resolve_backend("auto") == "transformers"
    assert core.resolve_backend("transformers") == "transformers"


def test_backend_and_answer_format_errors_are_one_line(monkeypatch, tmp_path, capsys, tiny):
    base = ["profile", "--model", tiny[0], "--data_file", GSM8K, "--num_problems", 1, "--out_dir", tmp_path / "o"]
    monkeypatch.setitem(sys.modules, "vllm", None)
    cases = [
        (["--backend", "vllm"], "--backend vllm: vLLM is not installed; pip install vllm (CUDA only) or pass "
                                "--backend transformers"),
        (["--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
        (["--answer_format", "last"], "argument --answer_format: invalid choice: 'last'"),
        (["--gpu_memory_utilization", "0"], "--gpu_memory_utilization must be in (0, 1], got 0.0"),
    ]  # fmt: skip
    for extra, needle in cases:
        rc, _, err = _run(capsys, *base, *extra)
        assert rc == 2 and err.startswith("diagnose.py: error: ") and err.count("\n") == 1 and needle in err, err
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(core, "cuda_available", lambda: False)
    rc, _, err = _run(capsys, *base, "--backend", "vllm")
    assert rc == 2 and err == (
        "diagnose.py: error: --backend vllm needs a CUDA GPU (none is visible); pass --backend transformers\n"
    )


def test_padded_batching_gives_the_greedy_branches_of_length_batching(tiny, tmp_path, capsys):
    path = tiny[0]
    argv = ["viability", "--model", path, "--data_file", GSM8K, "--num_problems", 1, "--spines", 2, "--prefixes", 3,
            "--alternatives", 2, "--max_completion_length", 6, "--continuation_tokens", 4, "--continuation", "greedy",
            "--backend", "transformers", "--bootstrap", 5, "--bins", 3, "--no_plots"]  # fmt: skip
    results = {}
    for batching in ("length", "padded"):
        rc, _, err = _run(capsys, *argv, "--out_dir", tmp_path / batching, "--hf_batching", batching)
        assert rc == 0, err
        results[batching] = json.loads((tmp_path / batching / "viability.json").read_text())
    assert results["padded"]["settings"]["hf_batching"] == "padded"
    assert results["padded"]["records"] == results["length"]["records"]
    assert len({len(s["ids"]) for s in results["padded"]["records"]["spines"]}) >= 1


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_follows_the_cpus_bf16_capability(tiny, tmp_path, monkeypatch, native):
    """`--dtype auto` loads a bf16 checkpoint in bf16 on a CPU with native bf16 matmul and in float32 on one without
    (an AVX2-only CPU computes bf16 about 10x slower); an explicit dtype is kept."""
    from transformers import AutoModelForCausalLM

    from pwopsd import device

    path = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny[0], dtype=torch.bfloat16).save_pretrained(path)
    tiny[2].save_pretrained(path)
    config = json.loads((Path(path) / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    monkeypatch.setattr(device, "_native_bf16", lambda device_type: native)
    assert core.load_model(str(path), "cpu", "auto").model.dtype == (torch.bfloat16 if native else torch.float32)
    assert core.load_model(str(path), "cpu", "bfloat16").model.dtype == torch.bfloat16
