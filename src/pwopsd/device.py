"""Which dtype to compute in on a device: the checkpoint's when the device computes it natively, else float32.

Checkpoints are released in bfloat16. A CPU without native bf16 matmul (AVX2-only, e.g. older AMD EPYC, or any CPU
run with `ONEDNN_MAX_CPU_ISA=AVX2`) emulates it: a 32x576 @ 576x1536 bf16 matmul took 12-32 ms against about 1 ms in
float32, so a bf16 evaluation ran 6x slower than the same one in float32. `compute_dtype("auto", ...)` therefore
picks float32 there and the checkpoint dtype everywhere else.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the CLIs check their flags before paying for it
    import torch

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
"""`--dtype` values: auto (see `compute_dtype`) or an explicit floating-point dtype, used as given."""


def _device_type(device: Any) -> str:
    import torch

    return torch.device(device).type


def _probe_bf16_cpu() -> bool:
    """A tiny timed probe: a bf16 matmul at most 2x slower than the float32 one counts as native. Emulated bf16 is
    10-30x slower, native one is faster than float32, so the 2x threshold is far from both even on a loaded machine."""
    import torch

    a, b = torch.randn(32, 576), torch.randn(576, 1536)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        x @ y  # warm-up (kernel selection)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a.bfloat16(), b.bfloat16()) <= 2 * best(a, b)


@functools.cache
def _native_bf16(device_type: str) -> bool:
    import torch

    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        # oneDNN runs bf16 matmuls natively with avx512_core (AVX512-BW/VL/DQ) or newer, AMX or ARM's bf16; it
        # honours ONEDNN_MAX_CPU_ISA, so an AVX2 cap reads False here. Without oneDNN's answer: the timed probe.
        try:
            if torch.backends.mkldnn.is_available():
                return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            pass
        return _probe_bf16_cpu()
    return True  # other accelerators (mps, xpu, npu) that load bf16 checkpoints compute them natively


def native_bf16(device: Any) -> bool:
    """Whether `device` computes bfloat16 matmuls natively (not emulated through float32), cached per device type.

    * CUDA: `torch.cuda.is_bf16_supported()` (compute capability 8.0+, e.g. not a V100 or T4).
    * CPU: oneDNN's bf16 support check (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`: AVX512 core or newer, AMX,
      ARM bf16), which follows `ONEDNN_MAX_CPU_ISA`; if it cannot be asked, a tiny timed probe (bf16 matmul at most
      2x the float32 time). Not `torch.backends.cpu.get_cpu_capability()`: that is ATen's vector ISA, while matmuls
      go through oneDNN, whose own check decides (an AMD EPYC reads AVX512 / True, and AVX2 / False under
      `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`).
    """
    return _native_bf16(_device_type(device))


def native_dtype(dtype: torch.dtype, device: Any) -> bool:
    """Whether `device` computes `dtype` natively: float32 everywhere, bf16 per `native_bf16`, float16 on CUDA and on
    CPUs with oneDNN fp16 (AVX512-FP16 / AMX-FP16)."""
    import torch

    if dtype == torch.bfloat16:
        return native_bf16(device)
    if dtype == torch.float16 and _device_type(device) == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


def compute_dtype(requested: str, device: Any, checkpoint: torch.dtype | None = None) -> torch.dtype:
    """The dtype to load a model in on `device`.

    An explicit `requested` (bfloat16, float16, float32) is used as given. `auto` is the checkpoint's dtype
    (`checkpoint`, see `checkpoint_dtype`; float32 when unknown, transformers' own default) when the device computes
    it natively, else float32: a bf16 checkpoint on an AVX2-only CPU is evaluated 6x faster in float32, with the same
    weights (bf16 -> float32 is exact)."""
    import torch

    if requested != "auto":
        dtype = getattr(torch, requested, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    if checkpoint is None or not checkpoint.is_floating_point:
        return torch.float32
    return checkpoint if native_dtype(checkpoint, device) else torch.float32


def checkpoint_dtype(model: str, **kwargs: Any) -> torch.dtype | None:
    """The dtype a checkpoint was saved in (`dtype`, or the older `torch_dtype`, of its config), None if unknown.

    A local folder is read directly; a hub id goes through `AutoConfig` (`kwargs`: revision, trust_remote_code)."""
    import torch

    config_file = Path(model).expanduser() / "config.json"
    name: Any = None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(config, dict):
            name = config.get("dtype") or config.get("torch_dtype")
            if name is None and isinstance(config.get("text_config"), dict):
                name = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    elif Path(model).expanduser().exists() or model.startswith(("/", ".", "~")):
        return None  # a local path without config.json: not a hub id either
    else:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model, **kwargs)
        except Exception:  # unknown dtype: the caller falls back to float32
            return None
        name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
