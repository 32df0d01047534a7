"""What the benchmarks share: peak memory of a measured section, and one measurement per fresh subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time


def status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the level at `start()`: CUDA allocator peak, or CPU peak RSS (VmHWM reset, with a sampler
    thread as a fallback where /proc/self/clear_refs is not writable)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._stop = threading.Event()
        self._sampled = 0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.base = status_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = True
        except OSError:
            self._hwm = False
            self._sampled = self.base
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, status_kb("VmRSS") * 1024)
            time.sleep(0.002)

    def stop_mb(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self._hwm:
            peak = status_kb("VmHWM") * 1024
        else:
            self._stop.set()
            peak = self._sampled
        return max(peak - self.base, 0) / 2**20


def run_in_subprocess(script: str, cfg: dict, label: str, env: dict[str, str] | None = None) -> dict:
    """Run ``python SCRIPT --worker JSON(cfg)`` in a fresh process; its last stdout line is the JSON result."""
    proc = subprocess.run(
        [sys.executable, script, "--worker", json.dumps(cfg)], capture_output=True, text=True, check=False, env=env
    )
    if proc.returncode != 0:
        sys.exit(f"worker {label} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
