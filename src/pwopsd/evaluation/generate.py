"""Generation backends of the evaluator: the prompt, vLLM, and transformers with vLLM's sampling chain.

The prompt is `{problem}` + `pwopsd.prompts.EVAL_PROMPT_SUFFIX` as one user message (no `Problem:` prefix, no think
patch), rendered with the chat template (docs/evaluation.md#prompt). vLLM takes every prompt at once with
`SamplingParams(n=val_n, seed=S)`; the transformers backend (`--backend hf`) runs the same sampling chain with one
generator per (problem, sample), so its samples do not depend on batching and a resumed run continues exactly
(docs/evaluation.md#sampling-and-backends).

Sample seeds (`--sample_seeds`, `sample_seed`): both backends give sample j of problem p the same integer seed. The
random streams drawn from equal seeds still differ between backends (vLLM draws exponential noise over the
vocabulary on the GPU, the transformers backend one uniform per token from a CPU `torch.Generator`), so equal seeds
give equal samples only within a backend.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pwopsd.io import UserError, first_line
from pwopsd.prompts import EVAL_PROMPT_SUFFIX, render_user_prompt

if TYPE_CHECKING:
    from pwopsd.evaluation.evaluate import EvalArguments


def build_prompt(tokenizer: Any, problem: str, enable_thinking: bool) -> str:
    """`{problem}` + EVAL_PROMPT_SUFFIX as one user message, through the chat template, generation prompt added."""
    return render_user_prompt(tokenizer, problem + EVAL_PROMPT_SUFFIX, enable_thinking=enable_thinking)


def vllm_installed() -> bool:
    """Whether `import vllm` can work, without importing it (heavy, GPU-only); a `None` entry in `sys.modules`
    (Python's "known absent") counts as not installed."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def resolve_backend(name: str) -> str:
    """auto: vLLM when it is installed and CUDA is available, else transformers."""
    if name != "auto":
        return name
    if not vllm_installed():
        return "hf"
    import torch

    return "vllm" if torch.cuda.is_available() else "hf"


SAMPLE_SEED_RULES = ("engine", "independent")
"""`--sample_seeds`: how sample j of problem p is seeded from `--seed` S (recorded as `sample_seed_rule`)."""


def sample_seed(seed: int, index: int, sample: int, rule: str) -> int:
    """The seed of sample `sample` of problem `index` in a run seeded `seed`.

    * engine (default, the reference's vLLM behaviour): `seed + sample`. vLLM expands a request with
      `SamplingParams(n=N, seed=S)` into N child requests and seeds child j with S + j (vllm/v1/engine/
      parallel_sampling.py), the same for every problem. Run seeds S and S + 1 therefore share N - 1 of their N
      sample seeds (seeds 0, 1, 2 with N = 12: 11 shared streams per consecutive pair).
    * independent: the first 8 bytes, little-endian, top bit cleared, of
      BLAKE2b(`"pwopsd-eval-sample:{seed}:{index}:{sample}"`, digest_size=8): a distinct seed per
      (seed, problem, sample), so no two runs or problems share a stream.
    """
    if rule == "engine":
        return seed + sample
    if rule == "independent":
        digest = hashlib.blake2b(f"pwopsd-eval-sample:{seed}:{index}:{sample}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") & (2**63 - 1)
    raise ValueError(f"unknown sample seed rule {rule!r}; choose one of {', '.join(SAMPLE_SEED_RULES)}")


class VLLMBackend:
    """One vLLM engine; every prompt is submitted at once and problems are yielded as they finish.

    The engine is built with `distributed_executor_backend="mp"`, `enforce_eager=True`, `dtype="auto"`, the given
    tensor-parallel size, memory fraction and `max_model_len` (docs/evaluation.md#sampling-and-backends)."""

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
        self.val_n = args.val_n
        self.independent = args.sample_seeds == "independent" and args.seed is not None
        if self.independent:  # one request per sample, each with its own seed (see sample_seed)
            assert args.seed is not None
            seed = args.seed
            sampling["n"] = 1
            self.sampling_for = lambda index: [
                SamplingParams(**sampling, seed=sample_seed(seed, index, j, "independent")) for j in range(args.val_n)
            ]
        else:
            if args.seed is not None:
                sampling["seed"] = args.seed
            self.sampling_params = SamplingParams(**sampling)
        self.lora_request = None
        if args.checkpoint_dir:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, args.checkpoint_dir)

    def generate(self, prompts: Sequence[str], indices: Sequence[int]) -> Iterator[tuple[int, list[str]]]:
        """Yield (problem index, N texts in generation order) as problems finish."""
        from tqdm.auto import tqdm

        # Same requests as LLM.generate (which is enqueue + this loop), but finished problems come out one by one.
        if self.independent:  # N requests of n=1 per problem, sample j of problem p at position p * N + j
            request_prompts = [prompt for prompt in prompts for _ in range(self.val_n)]
            params: Any = [sp for index in indices for sp in self.sampling_for(index)]
            slots = [(index, j) for index in indices for j in range(self.val_n)]
        else:
            request_prompts, params, slots = list(prompts), self.sampling_params, [(index, None) for index in indices]
        request_ids = self.llm.enqueue(request_prompts, params, lora_request=self.lora_request, use_tqdm=False)
        # enqueue returns vLLM's internal ids, "{id}-{8 random chars}"; finished outputs carry the plain {id}
        slot_of = {request_id.split("-", 1)[0]: slot for request_id, slot in zip(request_ids, slots)}
        pending: dict[int, dict[int, str]] = {}
        engine = self.llm.llm_engine
        with tqdm(total=len(prompts), desc="generating (vLLM)") as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if not output.finished:
                        continue
                    index, sample = slot_of[output.request_id]
                    if sample is None:
                        samples = sorted(output.outputs, key=lambda c: c.index)  # generation order
                        bar.update(1)
                        yield index, [c.text for c in samples]
                        continue
                    done = pending.setdefault(index, {})
                    done[sample] = output.outputs[0].text
                    if len(done) == self.val_n:
                        del pending[index]
                        bar.update(1)
                        yield index, [done[j] for j in range(self.val_n)]


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
        # the mask is made on the scores' device; `generate` keeps the ids there too (both on the model's device)
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, generated.to(scores.device), True)
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
        # probability p_i; masked tokens (p = 0) can never be picked. One uniform per row from the row's generator;
        # the generators live on the CPU (their streams do not depend on the device), their draws move to the logits'.
        cdf = torch.softmax(scores.float(), dim=-1).cumsum_(dim=-1)
        draws = [torch.rand((), generator=g, dtype=torch.float32, device="cpu") for g in self.generators]
        u = torch.stack(draws).to(cdf.device)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).clamp_(max=cdf.shape[1] - 1)
        keep = torch.full_like(scores, float("-inf"))
        return keep.scatter_(1, picks, 0.0)


def row_generators(seed: int | None, index: int, val_n: int, rule: str = "engine") -> list[Any]:
    """One CPU generator per sample of problem `index`, seeded with `sample_seed(seed, index, sample, rule)` (the
    integer vLLM would use), or from OS entropy if unseeded."""
    import torch

    generators = []
    for sample in range(val_n):
        g = torch.Generator()
        if seed is None:
            g.seed()
        else:
            g.manual_seed(sample_seed(seed, index, sample, rule))
        generators.append(g)
    return generators


HF_BATCHING = ("problem", "padded")
"""How the transformers backend batches: `problem` = the N samples of one problem per `generate` call (one prompt
repeated, no padding, so no attention mask: SDPA keeps its causal fast path and native GQA instead of copying the KV
cache per head group every step); `padded` = several whole problems per call, prompts left-padded."""


class HFBackend:
    """transformers generation with the vLLM sampling chain, in the dtype `--dtype` resolves to (`compute_dtype`).

    Batching (`batching`, see HF_BATCHING): by default the N samples of one problem form one batch; `padded` batches
    whole problems together, up to --hf_batch_size sequences per call. Each sample draws from its own seeded
    generator, so both give the same samples for the same seed."""

    def __init__(self, args: EvalArguments, tokenizer: Any, batching: str = "problem") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from pwopsd.device import checkpoint_dtype, compute_dtype

        if batching not in HF_BATCHING:
            raise ValueError(f"unknown batching {batching!r}; choose one of {', '.join(HF_BATCHING)}")
        self.args = args
        self.batching = batching
        self.share_prefill = True  # one prompt's N rows share its prompt pass (`_shared_prompt_cache`)
        self.tokenizer = tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoint = checkpoint_dtype(args.base_model, trust_remote_code=args.trust_remote_code)
        self.dtype = compute_dtype(getattr(args, "dtype", "auto"), self.device, checkpoint)
        self.description = (
            f"transformers backend on {self.device}: --dtype {getattr(args, 'dtype', 'auto')} -> "
            f"{str(self.dtype).removeprefix('torch.')} (checkpoint "
            f"{str(checkpoint).removeprefix('torch.') if checkpoint else 'unknown'}), one batch per {batching}"
        ).replace("per padded", "per --hf_batch_size rows")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                args.base_model, dtype=self.dtype, trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load --base_model {args.base_model}: {first_line(e)}") from e
        if args.checkpoint_dir:
            from peft import PeftModel

            try:
                model = PeftModel.from_pretrained(model, args.checkpoint_dir)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                raise UserError(
                    f"cannot load the LoRA adapter --checkpoint_dir {args.checkpoint_dir}: {first_line(e)}"
                ) from e
        self.model = model.to(self.device).eval()
        from pwopsd.rollouts import eos_token_ids  # the trainer's stop ids: tokenizer EOS + generation-config EOS

        self.eos_ids = sorted(set(eos_token_ids(model, tokenizer)))
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
        """Yield (problem index, N texts) group by group; greedy decoding runs once and repeats its text N times."""
        from tqdm.auto import tqdm

        args = self.args
        greedy = args.temperature == 0
        rows_per_problem = 1 if greedy else args.val_n
        with tqdm(total=len(prompts), desc="generating (transformers)") as bar:
            for group in self._groups(prompts, indices, rows_per_problem):
                texts_in, group_indices = zip(*group)
                texts = self._generate_group(list(texts_in), list(group_indices), rows_per_problem)
                for k, index in enumerate(group_indices):
                    mine = texts[k * rows_per_problem : (k + 1) * rows_per_problem]
                    yield index, mine * args.val_n if greedy else mine
                    bar.update(1)

    def _groups(
        self, prompts: Sequence[str], indices: Sequence[int], rows_per_problem: int
    ) -> list[list[tuple[str, int]]]:
        """Fixed groups of problem indices (one problem each, or with `padded` at most --hf_batch_size rows each), so
        a resumed run batches the remaining problems as the first run did."""
        per_call = 1 if self.batching == "problem" else max(1, self.args.hf_batch_size // rows_per_problem)
        groups: dict[int, list[tuple[str, int]]] = {}
        for prompt, index in zip(prompts, indices):
            groups.setdefault(index // per_call, []).append((prompt, index))
        return list(groups.values())

    def _shared_prompt_cache(self, prefix_ids: Any, rows: int) -> Any:
        """The KV cache of one prompt's first P - 1 tokens, computed once (batch 1) and repeated for its `rows` rows.

        `generate` then feeds only the last prompt token: the N identical prompt rows are not each recomputed. The
        prompt pass is compute-bound (N x P tokens through the model): on a 2-core AVX2 CPU, SmolLM2-135M with a
        161-token prompt and 4 samples, one problem's generation of 32 tokens took 4.26 s recomputed vs 3.04 s shared,
        with the same greedy ids."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(input_ids=prefix_ids.to(self.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(rows)
        return cache

    def _generate_group(self, prompts: list[str], indices: list[int], rows_per_problem: int) -> list[str]:
        """One `generate` call: the prompts (one, or left-padded ones), each repeated `rows_per_problem` times; the
        decoded texts. A single prompt has no padding, so its all-ones mask is dropped by transformers' SDPA mask
        builder: attention stays on the causal, native-GQA path (no `repeat_kv` copy of the cache per step)."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        args = self.args
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        prompt_length = inputs["input_ids"].shape[1]
        assert args.max_model_len is not None
        budget = min(args.max_new_tokens, args.max_model_len - prompt_length)
        if budget < 1:
            raise UserError(f"problems {indices}: the prompt ({prompt_length} tokens) does not fit --max_model_len")
        extra: dict[str, Any] = {}
        if self.share_prefill and len(prompts) == 1 and rows_per_problem > 1 and prompt_length > 1:
            extra["past_key_values"] = self._shared_prompt_cache(inputs["input_ids"][:, :-1], rows_per_problem)
        inputs = {k: v.repeat_interleave(rows_per_problem, dim=0).to(self.device) for k, v in inputs.items()}
        config = GenerationConfig(  # greedy over processed scores: sampling happens in RowSampler
            do_sample=False,
            max_new_tokens=budget,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        processors = sampling_processors(args, prompt_length)
        if args.temperature != 0:
            generators = [g for i in indices for g in row_generators(args.seed, i, args.val_n, args.sample_seeds)]
            processors.append(RowSampler(generators))
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, **extra, generation_config=config, logits_processor=LogitsProcessorList(processors)
            )
        return [self._decode(row[prompt_length:].tolist()) for row in output]
