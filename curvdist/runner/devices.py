"""What a device offers: memory and dense throughput of known GPUs, and the memory a run can read at run time.

    devices.GPUS["H100-80"].memory_bytes          # 80e9: the vendor's nominal capacity (GB = 1e9 bytes)
    devices.GPUS["H100-80"].tflops("bfloat16")    # 989: dense (no sparsity) tensor-core peak, TFLOP/s
    devices.cuda_memory_bytes()                   # torch.cuda.get_device_properties(0).total_memory, or None
    devices.host_memory_bytes()                   # this machine's RAM (a CPU stage's "device")

The table holds vendor data-sheet figures, not measurements: nominal memory (what nvidia-smi reports is slightly
more for every entry, so the nominal figure is the conservative one) and dense peak throughput per dtype (bf16/fp16
on tensor cores without sparsity; fp32 without TF32, which is what torch's default fp32 matmul uses; fp64 with the
FP64 tensor cores where the GPU has them).  V100 has no bfloat16 tensor cores: its bf16 entry is the fp32 rate.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    """One GPU model: nominal memory (GB = 1e9 bytes) and dense peak TFLOP/s per dtype."""
    name: str
    memory_gb: float
    bf16: float
    fp16: float
    fp32: float
    fp64: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def tflops(self, dtype: str) -> float:
        """Dense peak TFLOP/s for ``dtype`` (bfloat16, float16, float32, float64)."""
        return {"bfloat16": self.bf16, "float16": self.fp16, "float32": self.fp32, "float64": self.fp64}[dtype]


# vendor data sheets (SXM unless named PCIe); dense, no sparsity
GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("V100-32", 32, 15.7, 125, 15.7, 7.8),
    GPU("A10-24", 24, 125, 125, 31.2, 0.98),
    GPU("A100-40", 40, 312, 312, 19.5, 19.5),
    GPU("A100-80", 80, 312, 312, 19.5, 19.5),
    GPU("L40S-48", 48, 362, 362, 91.6, 1.4),
    GPU("RTX4090-24", 24, 165, 165, 82.6, 1.3),
    GPU("H100-PCIe-80", 80, 756, 756, 51, 51),
    GPU("H100-80", 80, 989, 989, 67, 67),
    GPU("H200-141", 141, 989, 989, 67, 67),
)}


def cuda_memory_bytes(index: int = 0) -> int | None:
    """Total memory of CUDA device ``index`` as the driver process sees it, or None without a visible GPU.

    On a remote Ray cluster the driver may run on a node without GPUs (or with other ones than the workers'):
    then this is None and the caller falls back to ``hardware.device_memory_gb`` / ``hardware.gpu``."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        return None
    return int(torch.cuda.get_device_properties(index).total_memory)


def host_memory_bytes() -> int | None:
    """Physical memory of this machine (every CPU stage of a local cluster shares it), or None if unknown."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None
