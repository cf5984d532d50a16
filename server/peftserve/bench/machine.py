"""The machine under the numbers: its dense matmul rate (the MFU denominator) and what it is."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def synchronize(device: str) -> None:
    """Wait for queued device work so wall-clock times are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(
    device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 2.0
) -> float:
    """Dense n x n @ n x n FLOP/s on this device and dtype, repeated for about `seconds`.

    On CPU the faster of torch's matmul (MKL) and the prepacked oneDNN path the server's Linear
    layers use: MFU is measured against the best dense rate the machine offers.
    """
    from peftserve.runner.linear import onednn_usable, pack, packed_linear

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    kernels = [lambda: a @ b]
    if torch.device(device).type == "cpu" and onednn_usable(dtype):
        packed = pack(b.T.contiguous())  # a @ b == linear(a, b.T)
        kernels.append(lambda: packed_linear(a, packed))
    return max(_rate(kernel, device, 2 * n**3, seconds / len(kernels)) for kernel in kernels)


def _rate(kernel: Callable[[], object], device: str, flops: float, seconds: float) -> float:
    kernel()  # warm-up: thread pools, kernel selection
    synchronize(device)
    reps, start = 0, time.perf_counter()
    while True:
        kernel()
        reps += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and reps >= 3:
            return flops * reps / elapsed


def peak_matmul_rate(device: str, dtype: torch.dtype, bursts: int = 5, seconds: float = 0.4) -> float:
    """The best matmul_rate of several short bursts: on a shared machine one burst usually runs alone."""
    return max(matmul_rate(device, dtype, seconds=seconds) for _ in range(bursts))


def environment(device: str) -> dict[str, object]:
    """What the numbers were measured on, including how busy the machine was when they were."""
    import peft
    import transformers

    info: dict[str, object] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


@dataclass(frozen=True)
class CpuSample:
    """Busy CPU time of the whole machine and of the benchmark's own processes, at one instant."""

    wall: float
    machine_busy_s: float
    own_s: float


def cpu_sample(pids: Sequence[int]) -> CpuSample | None:
    """Read /proc for the machine's busy CPU-seconds and those of `pids`; None where /proc is missing."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            # cpu  user nice system idle iowait irq softirq steal ...
            fields = [int(v) for v in f.readline().split()[1:9]]
        own = 0
        for pid in pids:
            with open(f"/proc/{pid}/stat") as f:
                after_name = f.read().rsplit(")", 1)[1].split()
            own += int(after_name[11]) + int(after_name[12])  # utime, stime (all threads)
    except (OSError, ValueError, IndexError):
        return None
    busy = sum(fields) - fields[3] - fields[4]
    return CpuSample(time.perf_counter(), busy / ticks, own / ticks)


def other_cores(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """Cores other processes kept busy on average between two samples: the noise a run's numbers carry."""
    if before is None or after is None or after.wall <= before.wall:
        return None
    foreign = (after.machine_busy_s - before.machine_busy_s) - (after.own_s - before.own_s)
    return max(0.0, foreign / (after.wall - before.wall))
