"""``--device`` and ``--dtype`` resolved on this machine, with a one-line error when it lacks one.

``auto`` means the first CUDA device in bfloat16 where there is one (float16 on GPUs without
bfloat16), otherwise the CPU in float32.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import psutil
import torch

from flexmoe.errors import FlexMoEError
from flexmoe.placement import device_problem, dtype_problem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """The device and dtype a frozen base model is held in."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto") -> Placement:
        resolved = resolve_device(device)
        return cls(resolved, resolve_dtype(dtype, resolved))

    def __str__(self) -> str:
        return f"{self.device} {str(self.dtype).removeprefix('torch.')}"

    def for_trained_weights(self) -> Placement:
        """Where pretrained weights that an optimiser updates are held: in float32, since an
        update below bfloat16's resolution (2**-8 of a weight; a step of a learning rate of 1e-5
        is far smaller) would round away to nothing. Under ``autocast`` they compute in
        bfloat16; with float16, which is not autocast, they compute in float32."""
        return replace(self, dtype=torch.float32)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the block: float32 weights (trained adapters, personal experts,
        a base held for training) compute in bfloat16 when ``dtype`` is bfloat16.

        float16 is left out: training in it needs loss scaling, which flexmoe does not do.
        """
        if self.dtype != torch.bfloat16 or self.device.type not in ("cpu", "cuda"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def experts_implementation(self) -> str | None:
        """How fused experts compute here, None for transformers' choice: on the CPU ``eager``
        (a loop over the experts hit), as ``grouped_mm`` has no fast CPU kernel (a float32 training
        step of smol-moe took 1.23x as long with it: benchmarks/perf/perf.py, section speed)."""
        return "eager" if self.device.type == "cpu" else None

    @property
    def memory_bytes(self) -> int:
        """The memory of this device: the GPU's, or the host's for the CPU."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device.index or 0).total_memory
        return psutil.virtual_memory().total

    @property
    def slow(self) -> str | None:
        """Why this placement computes far slower than float32 would here, or None."""
        fast = {
            torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
            torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
        }
        if self.device.type != "cpu" or self.dtype not in fast or fast[self.dtype]():
            return None
        return (
            f"{str(self.dtype).removeprefix('torch.')} on this CPU has no fast matrix kernel "
            f"({torch.backends.cpu.get_cpu_capability()}): bfloat16 was about 12x slower than "
            "float32 on such a CPU (docs/performance.md); it halves memory"
        )


def resolve_device(name: str) -> torch.device:
    """The device called ``name``, refused in one line when this machine has none."""
    problem = device_problem(name)
    if problem:
        raise FlexMoEError(f"device {problem}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(name.partition(":")[2] or 0)
        if index >= count:
            seen = f"{count} CUDA device{'s' * (count != 1)}" if count else "no CUDA device"
            raise FlexMoEError(
                f"device {name!r} is not available: torch {torch.__version__} sees {seen} here; "
                "use --device cpu or auto"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise FlexMoEError("device 'mps' is not available on this machine; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype called ``name``; ``auto`` picks by ``device``."""
    problem = dtype_problem(name)
    if problem:
        raise FlexMoEError(f"dtype {problem}, got {name!r}")
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (accelerators run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Stopwatch:
    """Seconds spent in named phases on ``device``, each lap ending when its work has."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def lap(self, phase: str) -> Iterator[None]:
        synchronize(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            elapsed = time.perf_counter() - started
            self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
