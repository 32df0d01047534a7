"""Train a LoRA adapter by on-policy self-distillation: parse the flags, load model and data, run the trainer.

    PWOPSD_TRAIN_DATASET=train.jsonl python code/ea_opsd_train.py --model_name_or_path MODEL --method pwopsd \\
        --output_dir outputs/run --use_peft --fixed_teacher ...

Flags: every field of `OPSDConfig` (TRL's GOLDConfig plus the method flags, see docs/methods.md#flags-and-defaults),
TRL's `ModelConfig` (model, LoRA) and the script arguments below. The dataset is `PWOPSD_TRAIN_DATASET` (default
`siyanzhao/Openthoughts_math_30k_opsd`), or `--dataset_name`: a Hub id, or a local `.jsonl`/`.json`/`.parquet`/`.csv` file
or a folder of them (files whose name contains `train` if there are any, e.g. a Hub snapshot's
`data/train-*.parquet`); only `problem` and `solution` are read. User errors (bad flags, unreadable data, missing
model) print one line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pwopsd.io import DATASET_BUILDERS, OneLineErrors, UserError, first_line, run_main

DEFAULT_DATASET = "siyanzhao/Openthoughts_math_30k_opsd"
REQUIRED_COLUMNS = ("problem", "solution")

logger = logging.getLogger("ea_opsd_train")


def _script_arguments_cls():
    from trl import ScriptArguments

    @dataclass
    class OPSDScriptArguments(ScriptArguments):
        """TRL's script arguments; `--dataset_name` overrides PWOPSD_TRAIN_DATASET; `--torch_dtype` is the reference's
        spelling of ModelConfig's `--dtype`."""

        torch_dtype: str | None = field(
            default=None,
            metadata={"help": "Model dtype (alias of --dtype): bfloat16 | float16 | float32 | auto."},
        )

    return OPSDScriptArguments


def _parser():
    """`TrlParser((ScriptArguments, OPSDConfig, ModelConfig))` whose argparse errors are one line, not the usage."""
    from trl import ModelConfig, TrlParser

    from pwopsd.config import OPSDConfig

    class _Parser(OneLineErrors, TrlParser):
        """TRL's parser with one-line errors (its usage block is very long)."""

    return _Parser((_script_arguments_cls(), OPSDConfig, ModelConfig))


def resolve_dataset_spec(script_args) -> str:
    return script_args.dataset_name or os.environ.get("PWOPSD_TRAIN_DATASET") or DEFAULT_DATASET


def load_train_dataset(spec: str):
    """The training split of `spec` (local file/folder or Hub id), reduced to the `problem` and `solution` columns."""
    from datasets import load_dataset

    path = Path(spec).expanduser()
    looks_local = path.exists() or path.suffix in DATASET_BUILDERS or spec.startswith(("/", ".", "~"))
    try:
        if looks_local:
            if not path.exists():
                raise UserError(f"cannot read dataset '{spec}' (PWOPSD_TRAIN_DATASET): no such file or folder")
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in DATASET_BUILDERS)
            if len(files) > 1 and any("train" in p.name for p in files):  # a Hub snapshot: keep the train split
                files = [p for p in files if "train" in p.name]
            kinds = {DATASET_BUILDERS.get(p.suffix) for p in files}
            if not files or None in kinds or len(kinds) != 1:
                raise UserError(
                    f"cannot read dataset '{spec}': expected a .jsonl/.json/.parquet/.csv file or a folder of one kind "
                    f"of them, found {', '.join(sorted(p.name for p in files)[:5]) or 'no data files'}"
                )
            if all(_is_blank(p) for p in files):  # `datasets` reports these as StopIteration or "no data"
                raise UserError(f"dataset '{spec}' has no rows (its file(s) are empty): provide problem/solution rows")
            dataset = load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
        else:
            dataset = load_dataset(spec, split="train")
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for unreadable input: report them as one line
        reason = first_line(err)
        raise UserError(f"cannot read dataset '{spec}' (PWOPSD_TRAIN_DATASET): {reason}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise UserError(
            f"dataset '{spec}' lacks column(s) {', '.join(missing)}; it has {', '.join(dataset.column_names)}. "
            "Provide rows with 'problem' and 'solution' (PWOPSD_TRAIN_DATASET)"
        )
    if len(dataset) == 0:
        raise UserError(f"dataset '{spec}' has no rows")
    dataset = dataset.select_columns(list(REQUIRED_COLUMNS))
    check_text_columns(dataset, spec)
    return dataset


def _is_blank(path: Path) -> bool:
    """An empty (or whitespace-only, for text formats) data file."""
    size = path.stat().st_size
    if size == 0:
        return True
    if path.suffix == ".parquet" or size > 1 << 16:
        return False
    return not path.read_bytes().strip()


def check_text_columns(dataset, spec: str) -> None:
    """Every `problem` and `solution` must be a string: a null, a number or a list would be rendered into the prompt
    as "None", "3" or "[1, 2]" and trained on silently. Names the first bad row (0-based) and how many there are."""
    bad: list[tuple[int, str, object]] = []
    for column in REQUIRED_COLUMNS:
        for i, value in enumerate(dataset[column]):
            if not isinstance(value, str):
                bad.append((i, column, value))
    if bad:
        i, column, value = min(bad, key=lambda b: (b[0], REQUIRED_COLUMNS.index(b[1])))
        shown = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        more = f" ({len(bad)} values in all)" if len(bad) > 1 else ""
        raise UserError(
            f"dataset '{spec}' row {i} (0-based): column '{column}' is {shown}, not a string{more}; fix or remove "
            "such rows"
        )


def format_learning_rate(lr: float) -> str:
    """`5e-06` -> `5e-6`, `0.0001` -> `0.0001`: the spelling of the reference's WandB run names."""
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}{m.group(2)}", f"{lr:g}")


def apply_run_config(training_args) -> None:
    """`--run_config NAME`: append NAME to output_dir (unless already there), name the WandB run
    `{NAME}_lr{lr}_bs{processes × per-device batch × GA}` (docs/architecture.md#dataset-and-cli)."""
    if training_args.wandb_project:
        os.environ["WANDB_PROJECT"] = training_args.wandb_project
    name = training_args.run_config
    if not name:
        return
    if Path(training_args.output_dir).name != name:
        training_args.output_dir = str(Path(training_args.output_dir) / name)
    batch = training_args.world_size * training_args.per_device_train_batch_size
    batch *= training_args.gradient_accumulation_steps
    training_args.run_name = f"{name}_lr{format_learning_rate(training_args.learning_rate)}_bs{batch}"


def model_dtype(script_args, model_args):
    """`--torch_dtype` (or `--dtype`) as a floating-point torch dtype, or "auto"."""
    import torch

    name = script_args.torch_dtype or model_args.dtype or "auto"
    if name == "auto":
        return name
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        what = "not a floating-point dtype" if isinstance(dtype, torch.dtype) else "not a torch dtype"
        raise UserError(f"--torch_dtype {name!r} is {what}: use bfloat16, float16, float32 or auto")
    return dtype


def check_model_args(script_args, model_args, training_args) -> None:
    """What can be checked before minutes of loading: the model folder, the dtype, LoRA's rank, vLLM's presence."""
    path = model_args.model_name_or_path
    if not path:
        raise UserError("--model_name_or_path is required (a local folder or a Hub id)")
    local = Path(path).expanduser()
    if local.exists() or path.startswith(("/", ".", "~")):
        if not local.is_dir():
            raise UserError(
                f"cannot load --model_name_or_path '{path}': no such folder (a local model folder or a Hub id)"
            )
        if not (local / "config.json").is_file():
            raise UserError(
                f"cannot load --model_name_or_path '{path}': the folder has no config.json, so it is not a model "
                "folder (pass the folder save_pretrained wrote, or a Hub id)"
            )
    model_dtype(script_args, model_args)
    if model_args.use_peft and model_args.lora_r < 1:
        raise UserError(f"--lora_r must be >= 1 (the LoRA rank), got {model_args.lora_r}")
    if training_args.use_vllm and not _vllm_installed():
        raise UserError(
            "--use_vllm needs vLLM, which is not installed in this Python: install it (GPU machines) or drop "
            "--use_vllm to roll out with transformers generate"
        )


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def auto_load_dtype(path: str, kwargs: dict):
    """`--torch_dtype auto` (or unset): the checkpoint's dtype, except float32 on a CPU that does not compute it
    natively (`pwopsd.device.compute_dtype`: bf16 on an AVX2-only CPU is ~10x slower than float32). Explicit values
    are never changed; GPUs keep transformers' "auto"."""
    import torch

    from pwopsd.device import checkpoint_dtype, compute_dtype

    if torch.cuda.is_available():
        return "auto"
    checkpoint = checkpoint_dtype(path, **kwargs)
    chosen = compute_dtype("auto", "cpu", checkpoint)
    if checkpoint is None or chosen == checkpoint:
        return "auto"
    logger.info(
        "--torch_dtype auto: loading the %s checkpoint in %s (this CPU has no native %s matmul; pass --torch_dtype %s "
        "to keep it)", str(checkpoint).removeprefix("torch."), str(chosen).removeprefix("torch."),
        str(checkpoint).removeprefix("torch."), str(checkpoint).removeprefix("torch."),
    )  # fmt: skip
    return chosen


def load_model_and_tokenizer(script_args, model_args, trust_remote_code: bool = False):
    """AutoModelForCausalLM with --torch_dtype/--attn_implementation, use_cache off; tokenizer with left padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_args.model_name_or_path
    if not path:
        raise UserError("--model_name_or_path is required (a local folder or a Hub id)")
    dtype = model_dtype(script_args, model_args)
    kwargs = {"revision": model_args.model_revision, "trust_remote_code": trust_remote_code}
    if dtype == "auto":
        dtype = auto_load_dtype(path, kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=model_args.attn_implementation, **kwargs
        )
    except (OSError, ValueError) as err:  # missing files, unreadable config or tokenizer, unknown architecture
        reason = first_line(err).rstrip(":, ")
        raise UserError(f"cannot load --model_name_or_path '{path}': {reason}") from None
    model.config.use_cache = False
    return model, tokenizer  # a missing pad token is set by the trainer (pad = eos, as the reference)


def resume_argument(resume: str | None) -> str | bool | None:
    """`--resume_from_checkpoint`: 'last'/'true' -> True (the trainer picks the newest complete checkpoint of
    output_dir), a folder -> its path (the trainer checks that it is complete), nothing -> None."""
    if not resume:
        return None
    if resume.lower() in ("true", "last"):
        return True
    if not Path(resume).is_dir():
        raise UserError(f"--resume_from_checkpoint '{resume}' is not a folder (or pass 'last')")
    return resume


SCHEDULE_FLAGS = ("--position_w_min", "--position_tau", "--position_s")


def check_schedule_flags(argv: list[str]) -> None:
    """`--position_schedule_from` with any of the three schedule flags on the command line is refused, even when a
    flag repeats its default (the config alone cannot tell a default from an explicit value)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if "--position_schedule_from" not in given:
        return
    clash = [flag for flag in SCHEDULE_FLAGS if flag in given]
    if clash:
        raise UserError(f"--position_schedule_from sets the schedule; drop {', '.join(clash)} (or drop the file)")


def run(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    check_schedule_flags(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        script_args, training_args, model_args = parser.parse_args_and_config(argv)
    except ValueError as err:  # config validation (__post_init__) of any of the three dataclasses
        raise UserError(first_line(err)) from None

    logging.basicConfig(
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    hf_logging.set_verbosity_warning()

    from trl import get_peft_config

    from pwopsd.config import ConfigError
    from pwopsd.health import HealthCallback
    from pwopsd.losses import METHODS
    from pwopsd.trainer import EAOPSDTrainer

    if training_args.method is None:
        raise UserError(f"--method is required: {' | '.join(METHODS)}")
    if training_args.fixed_teacher and not model_args.use_peft:
        raise UserError("--fixed_teacher needs --use_peft (the teacher is the base model with the adapter disabled)")
    check_model_args(script_args, model_args, training_args)
    apply_run_config(training_args)
    resume = resume_argument(training_args.resume_from_checkpoint)
    if training_args.position_schedule_from and training_args.process_index == 0:
        logger.info(
            "PW-OPSD schedule from %s: --position_w_min %.6g --position_tau %.6g --position_s %.6g",
            training_args.position_schedule_from,
            training_args.position_w_min,
            training_args.position_tau,
            training_args.position_s,
        )

    dataset = load_train_dataset(resolve_dataset_spec(script_args))
    model, tokenizer = load_model_and_tokenizer(script_args, model_args, training_args.trust_remote_code)
    health = HealthCallback(training_args)
    try:
        trainer = EAOPSDTrainer(
            model=model,
            args=training_args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=[health],
        )
        trainer.train(resume_from_checkpoint=resume)
    except ConfigError as err:
        raise UserError(str(err)) from None
    if health.fatal or health.stopped:  # no final adapter: the launchers merge output_dir only after a clean run
        raise UserError(health.fatal or health.stopped)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        logger.info("final adapter saved to %s", training_args.output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: run(argv), "ea_opsd_train.py")


if __name__ == "__main__":
    sys.exit(main())
