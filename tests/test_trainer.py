"""OPSDTrainer / EAOPSDTrainer on CPU with tiny models: real training steps, teacher modes, loss paths, checkpoints,
resume, vLLM call arguments (recording stand-in), generation dumps."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from pwopsd import batch as batch_module
from pwopsd.batch import build_distillation_batch, distillation_batch_from_collated
from pwopsd.collator import SelfDistillationDataCollator
from pwopsd.config import ConfigError, OPSDConfig
from pwopsd.losses import METHODS
from pwopsd.teacher import EMATeacher
from pwopsd.trainer import EAOPSDTrainer

ROWS = [
    {"problem": f"What is {a} + {b}?", "solution": f"{a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."}
    for a, b in [(1, 2), (30, 4), (5, 60), (7, 8), (90, 1), (2, 22), (13, 3), (4, 44)]
]


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def make_args(tmp_path: Path, method: str = "pwopsd", **overrides) -> OPSDConfig:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        method=method,
        max_steps=2,
        save_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-2,
        max_completion_length=6,
        max_length=512,
        fixed_teacher=True,
        temperature=1.1,
        top_p=0.95,
        top_k=20,
        lmbda=1.0,
        beta=0.0,
        jsd_token_clip=0.05,
        logging_steps=1,
        report_to="none",
        save_only_model=False,
        dataloader_pin_memory=False,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    return OPSDConfig(**kwargs)


def make_trainer(model_dir: Path, args: OPSDConfig, peft: bool = True, rows=ROWS, callbacks=None) -> EAOPSDTrainer:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    return EAOPSDTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config() if peft else None,
        callbacks=callbacks,
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [("eos_mask", "pad", "--eos_mask must be one of pad_id, length, got 'pad'"),
     ("rollout_batching", "steps", "--rollout_batching must be one of micro_batch, step, got 'steps'"),
     ("prompt_padding", "middle", "--prompt_padding must be one of right, left"),
     ("teacher_think", "on", "--teacher_think must be one of")],
)  # fmt: skip
def test_choice_flags_are_checked_when_the_config_is_built_in_code(tmp_path, flag, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_args(tmp_path, "opsd", **{flag: value})


def test_chunked_loss_refuses_a_head_it_would_get_wrong(tiny_model_dir, tmp_path):
    # the chunked path applies the student's lm_head weight to both sides: a head trained beside the LoRA
    # (modules_to_save; the fixed teacher must use the original), or a trained head under the EMA teacher, needs the
    # dense path (LoRA on lm_head itself is refused by TRL's SFTTrainer)
    path = tiny_model_dir("qwen3")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    head_saved = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")
    cases = [
        (make_args(tmp_path, "opsd"), head_saved, "a PEFT-adapted lm_head"),
        (make_args(tmp_path, "opsd", fixed_teacher=False, use_ema_teacher=True), None, "trainable lm_head with the ema"),
    ]
    for args, peft_config, message in cases:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with pytest.raises(ConfigError, match=f"{message}.*: pass --dense_loss"):
            EAOPSDTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
                          peft_config=peft_config)  # fmt: skip
        args.dense_loss = True  # the reference path takes them
        EAOPSDTrainer(model=model, args=args, train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer,
                      peft_config=peft_config)  # fmt: skip


def split_params(model) -> tuple[dict, dict]:
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    return lora, base


def fixed_batch(trainer: EAOPSDTrainer, completions: list[list[int]]) -> dict:
    """A deterministic micro-batch (no sampling): collator output + given completions."""
    prompts = trainer.data_collator(ROWS[: len(completions)])
    return distillation_batch_from_collated(
        prompts,
        completions,
        max_completion_length=trainer.args.max_completion_length,
        pad_token_id=trainer.pad_token_id,
        eos_mask=trainer.args.eos_mask,
        prompt_padding=trainer.args.prompt_padding,
    )


def randomize_lora(model, seed: int = 0) -> None:
    """Give the adapter non-zero weights (B starts at 0), so student and teacher differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


# ---------------------------------------------------------------------------------------------------------------------
# Two optimizer steps per method, fixed teacher
# ---------------------------------------------------------------------------------------------------------------------
METRIC_KEYS = {
    "opsd": ["opsd/neg_token_fraction"],
    "pwopsd": ["ea/position_weight_mean", "ea/position_weight_min", "ea/position_weight_max"],
    "eopd": ["eopd/teacher_entropy_mean", "eopd/pct_high_entropy", "eopd/L_OPD_mean", "eopd/L_FKL_mean"],
    "reopold": ["reopold/floor", "reopold/phase", "reopold/R_mean", "reopold/M_fraction", "reopold/H_mean"],
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_steps_fixed_teacher(tiny_model_dir, tmp_path, method):
    overrides = {"reopold_t_switch": 1} if method == "reopold" else {}
    trainer = make_trainer(tiny_model_dir("qwen3"), make_args(tmp_path, method, **overrides))
    lora0, base0 = split_params(trainer.model)
    trainer.train()
    lora1, base1 = split_params(trainer.model)
    assert trainer.state.global_step == 2
    assert any(not torch.equal(lora0[n], lora1[n]) for n in lora0), "LoRA weights did not change"
    assert all(torch.equal(base0[n], base1[n]) for n in base0), "base weights changed"
    out = Path(trainer.args.output_dir)
    for step in (1, 2):
        ckpt = out / f"checkpoint-{step}"
        assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
        assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for key in [*METRIC_KEYS[method], "completions/mean_length", "completions/clipped_ratio"]:
        assert all(key in h for h in logs), key
    assert all(0 < h["completions/mean_length"] <= 6 for h in logs)
    teacher, base_logits, _ = teacher_logits_and_base_logits(trainer, tiny_model_dir("qwen3"))
    torch.testing.assert_close(teacher, base_logits, atol=1e-5, rtol=1e-5)  # after training: still the base
    if method == "reopold":  # the phase follows state.global_step: step 0 -> phase I, step 1 -> phase II
        assert [h["reopold/phase"] for h in logs] == [1.0, 2.0]


def teacher_logits_and_base_logits(trainer: EAOPSDTrainer, path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The trainer's teacher-pass logits on a fixed batch, and the base model's logits at the same positions."""
    batch = fixed_batch(trainer, [[100, 101, 102], [103, 104, 105, 106, 107, 108]])
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    dense = trainer.args.dense_loss
    trainer.args.dense_loss = True  # logits rather than hidden states
    with torch.no_grad(), trainer._teacher_context(unwrapped):
        teacher = trainer._completion_features(
            unwrapped,
            batch["teacher_input_ids"],
            batch["teacher_attention_mask"],
            batch["teacher_position_ids"],
            batch["teacher_prompt_length"],
        )
    trainer.args.dense_loss = dense
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    p_t = batch["teacher_prompt_length"]
    with torch.no_grad():
        expected = base(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
    return teacher, expected[:, p_t - 1 : -1], batch


def test_fixed_teacher_logits_equal_base_model(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen3")
    trainer = make_trainer(path, make_args(tmp_path, "opsd"))
    randomize_lora(trainer.model)
    teacher, expected, batch = teacher_logits_and_base_logits(trainer, path)
    torch.testing.assert_close(teacher, expected, atol=1e-5, rtol=1e-5)
    # with the adapter on, the same sequence gives other logits: the adapter is really disabled for the teacher
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        lora_logits = unwrapped(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"])
    p_t = batch["teacher_prompt_length"]
    assert (lora_logits.logits[:, p_t - 1 : -1] - expected).abs().max() > 1e-3


@pytest.mark.parametrize("method", sorted(METHODS))
def test_chunked_loss_equals_dense_loss_and_gradients(tiny_model_dir, tmp_path, method):
    trainer = make_trainer(tiny_model_dir("qwen3"), make_args(tmp_path, method, loss_chunk_size=3))
    randomize_lora(trainer.model)
    batch = fixed_batch(trainer, [[100, 101, 102], [103, 104, 105, 106, 107, 108]])
    results = {}
    for dense in (True, False):
        trainer.args.dense_loss = dense
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[dense] = (loss.detach(), grads)
    torch.testing.assert_close(results[False][0], results[True][0], atol=1e-6, rtol=1e-5)
    assert results[True][1].keys() == results[False][1].keys() and results[True][1]
    for name, grad in results[True][1].items():
        torch.testing.assert_close(results[False][1][name], grad, atol=1e-6, rtol=1e-4)
    assert any(g.abs().max() > 0 for g in results[True][1].values())


# ---------------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------------
def test_resume_restores_the_optimizer_step(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen3")
    full = make_trainer(path, make_args(tmp_path / "a", "reopold", reopold_t_switch=1, max_steps=2))
    full.train()
    full_lora, _ = split_params(full.model)
    resumed = make_trainer(path, make_args(tmp_path / "a", "reopold", reopold_t_switch=1, max_steps=2))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-1"))
    assert resumed.state.global_step == 2
    logs = [h for h in resumed.state.log_history if "loss" in h]
    assert [h["step"] for h in logs][-1] == 2
    # the step run after the resume sees global_step 1 >= t_switch: REOPOLD phase II
    assert logs[-1]["reopold/phase"] == 2.0
    resumed_lora, _ = split_params(resumed.model)
    for name, value in full_lora.items():  # same data, same RNG state: the same second step
        torch.testing.assert_close(resumed_lora[name], value, atol=1e-6, rtol=1e-5)


def test_prompts_cut_to_max_length_are_summarised_at_the_end_of_training(tiny_model_dir, tmp_path, caplog):
    args = make_args(tmp_path, "opsd", max_steps=2, save_steps=10, max_length=40)
    trainer = make_trainer(tiny_model_dir("qwen3"), args, rows=ROWS[:4])  # 2 steps x 2 rows = every row
    collator = trainer.data_collator
    teachers = collator.prompt_texts(ROWS[:4])[1]  # the teacher prompts (with the solution) are all longer than 40
    naive = [len(trainer.processing_class(t)["input_ids"]) for t in teachers]
    assert min(naive) > 40
    with caplog.at_level("WARNING"):
        trainer.train()
    assert (collator.truncated_rows, collator.longest_prompt) == (4, max(naive))
    summaries = [r.getMessage() for r in caplog.records if r.name == "pwopsd.trainer" and "were cut" in r.getMessage()]
    assert summaries == [
        f"4 prompt row(s) were longer than --max_length 40 and were cut (longest: {collator.longest_prompt} tokens)"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Teacher modes
# ---------------------------------------------------------------------------------------------------------------------
def test_ema_teacher_update_matches_naive_formula():
    model = torch.nn.Linear(3, 2)
    ema = EMATeacher(model, decay=0.9)
    with ema.swapped_in():  # before the first optimizer step: the current weights
        pass
    ema.update()  # lazy init from the weights after the first step
    theta1 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    expected = 0.9 * theta1 + 0.1 * model.weight.detach()
    current = model.weight.detach().clone()
    with ema.swapped_in():
        torch.testing.assert_close(model.weight.detach(), expected)
    assert torch.equal(model.weight.detach(), current)  # restored after the teacher pass
    state = ema.state_dict()
    other = EMATeacher(model, decay=0.9)
    other.load_state_dict(state)
    with other.swapped_in():
        torch.testing.assert_close(model.weight.detach(), expected)


def test_ema_teacher_trains_and_checkpoints(tiny_model_dir, tmp_path):
    args = make_args(tmp_path, "opsd", fixed_teacher=False, use_ema_teacher=True, ema_decay=0.5)
    trainer = make_trainer(tiny_model_dir("qwen3"), args)
    trainer.train()
    assert trainer.teacher_mode == "ema" and trainer.ema_teacher.shadow is not None
    state = torch.load(Path(args.output_dir) / "checkpoint-2" / "ema_teacher.pt", weights_only=True)
    assert state["decay"] == 0.5 and all("lora_" in n for n in state["shadow"])


def test_dynamic_teacher_without_peft(tiny_model_dir, tmp_path):
    args = make_args(tmp_path, "eopd", fixed_teacher=False, max_steps=1, save_steps=10)
    trainer = make_trainer(tiny_model_dir("qwen3"), args, peft=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.teacher_mode == "dynamic"
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_fixed_teacher_needs_peft(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--use_peft"):
        make_trainer(tiny_model_dir("qwen3"), make_args(tmp_path, "opsd"), peft=False)


# ---------------------------------------------------------------------------------------------------------------------
# Dumps and the vLLM rollout path (recording stand-in for vllm.LLM / SamplingParams)
# ---------------------------------------------------------------------------------------------------------------------
def test_generation_dumps(tiny_model_dir, tmp_path):
    args = make_args(tmp_path, "opsd", max_steps=2, save_steps=10, generations_dump_steps=2)
    trainer = make_trainer(tiny_model_dir("dsr1_llama"), args)
    trainer.train()
    files = sorted((Path(args.output_dir) / "generations").iterdir())
    assert [f.name for f in files] == ["generations_step_2.json"]
    records = json.loads(files[0].read_text())
    assert len(records) == 2 and {r["step"] for r in records} == {2}
    assert all(
        r["prompt"].startswith("<｜begin▁of▁sentence｜><｜begin▁of▁sentence｜><｜User｜>Problem:") for r in records
    )
    assert all(isinstance(r["completion"], str) for r in records)


class RecordingLLM:
    """Stands in for `vllm.LLM`: records the engine arguments, prompts, sampling params and weight pushes."""

    instances: ClassVar[list[RecordingLLM]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list, object]] = []
        self.loaded: list[list[tuple[str, torch.Tensor]]] = []
        self.prefix_cache_resets = 0
        self.completion_of: dict[tuple, list[int]] = {}
        model = SimpleNamespace(load_weights=self._load_weights)
        self.llm_engine = SimpleNamespace(
            model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=model)))
        )
        RecordingLLM.instances.append(self)

    def _load_weights(self, weights):
        if not self.loaded or self._sync_open is False:
            self.loaded.append([])
            self._sync_open = True
        self.loaded[-1].extend((name, t.detach().clone()) for name, t in weights)

    _sync_open = False

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1
        self._sync_open = False

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        outputs = []
        for k, _ in enumerate(prompts):
            ids = [100 + k, 101, 2] if k % 2 == 0 else [110, 111, 112, 113, 114, 115, 116]  # 2 = <|im_end|>
            self.completion_of[tuple(prompts[k]["prompt_token_ids"])] = ids
            outputs.append(
                SimpleNamespace(
                    prompt_token_ids=prompts[k]["prompt_token_ids"],
                    outputs=[SimpleNamespace(token_ids=ids, logprobs=None)],
                )
            )
        return outputs


class RecordingSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.mark.parametrize("batching", ["micro_batch", "step"])
def test_vllm_rollouts_get_reference_engine_and_sampling_arguments(tiny_model_dir, tmp_path, monkeypatch, batching):
    import trl.generation.vllm_generation as vllm_generation

    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "LLM", RecordingLLM, raising=False)
    monkeypatch.setattr(vllm_generation, "SamplingParams", RecordingSamplingParams, raising=False)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("VLLM_ENFORCE_EAGER", "1")
    RecordingLLM.instances.clear()
    built = []  # (prompt ids, completion) of every micro-batch that was trained on

    def spy(**kwargs):
        prompts = batch_module.prompt_token_lists(kwargs["student_prompts"], kwargs["student_prompt_attention_mask"])
        built.extend(zip(map(tuple, prompts), kwargs["completions"]))
        return build_distillation_batch(**kwargs)

    monkeypatch.setattr(batch_module, "build_distillation_batch", spy)
    path = tiny_model_dir("qwen3")
    args = make_args(
        tmp_path,
        "pwopsd",
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.4,
        gradient_accumulation_steps=2,
        max_steps=2,
        save_steps=10,
        presence_penalty=0.0,
        rollout_batching=batching,
    )
    trainer = make_trainer(path, args)
    trainer.train()
    (llm,) = RecordingLLM.instances
    assert llm.kwargs["model"] == str(path)
    assert llm.kwargs["tensor_parallel_size"] == 1
    assert llm.kwargs["gpu_memory_utilization"] == 0.4
    assert llm.kwargs["max_model_len"] == 512  # max_length
    assert llm.kwargs["max_num_seqs"] == 2 * 2  # per-device batch x GA
    assert llm.kwargs["seed"] == 0  # process_index // tp
    assert llm.kwargs["enforce_eager"] is True  # VLLM_ENFORCE_EAGER
    assert llm.kwargs["enable_sleep_mode"] is False
    # 2 optimizer steps x 2 micro-batches of 2 prompts: one call per micro-batch, or one per step (reference policy)
    assert [len(prompts) for prompts, _ in llm.calls] == ([2, 2, 2, 2] if batching == "micro_batch" else [4, 4])
    tokenizer = trainer.processing_class
    collator = SelfDistillationDataCollator(tokenizer)
    for prompts, params in llm.calls:
        assert params.kwargs == {
            "n": 1,
            "repetition_penalty": 1.0,
            "temperature": 1.1,
            "top_p": 0.95,
            "top_k": 20,
            "min_p": 0.0,
            "max_tokens": 6,
            "logprobs": None,
            "presence_penalty": 0.0,
        }
        for prompt in prompts:  # the student prompt with its template, unpadded
            text = tokenizer.decode(prompt["prompt_token_ids"], skip_special_tokens=False)
            problem = text.split("Problem: ")[1].split("\n\n")[0]
            (expected,) = collator.prompt_texts([{"problem": problem, "solution": ""}])[0]
            assert text == expected
            assert tokenizer.pad_token_id not in prompt["prompt_token_ids"]
    # weights pushed before the first rollout and after each optimizer step that precedes a rollout
    assert len(llm.loaded) == 2 and llm.prefix_cache_resets == 2
    names = [n for n, _ in llm.loaded[-1]]
    assert all("lora" not in n and "base_layer" not in n for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    # the second push holds W + scale * B @ A of the adapter after step 1, and the model is unmerged afterwards
    pushed = dict(llm.loaded[-1])["model.layers.0.self_attn.q_proj.weight"]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.layers[0].self_attn.q_proj.weight
    assert (pushed - base).abs().max() > 0
    # every micro-batch trained on the completions sampled for its own prompts (truncated to max_completion_length)
    assert len(built) == 8
    assert all(completion == llm.completion_of[prompt][:6] for prompt, completion in built)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    # rows alternate a stopped 3-token completion and a 6-token truncated one
    assert logs[0]["completions/mean_length"] == pytest.approx(4.5)
    assert logs[0]["completions/clipped_ratio"] == pytest.approx(0.5)
