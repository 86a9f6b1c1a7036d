"""Sums across replicas: the R workers that hold the same stage form one ``torch.distributed`` process group.

Why torch.distributed and not the driver or Ray's collective library: the tensors combined are a stage's G and
dense Kronecker factors (LLaMA-7B: up to ~60 GiB of fp32 factors per replica set), which must not travel through
the driver or the object store; torch.distributed all-reduces them in place on the workers' own devices (NCCL
between GPUs, device to device; Gloo on CPU), ships with torch (nothing more to install, unlike Ray's collective
library, whose CPU backend needs pygloo), and the group is small and static (one per stage).  Each worker process
belongs to exactly one group, so the default process group is used.

    group = ReplicaGroup.join(rank=r, world=R, address="10.0.0.5", port=29517, device=torch.device("cuda:0"))
    group.all_reduce_sum(tensors)      # in place: every replica ends with the sum over replicas
    group.leave()

With one replica nothing is initialised and the sums are the worker's own.
"""
from __future__ import annotations

import datetime
import socket

import torch


def free_port() -> tuple[str, int]:
    """This host's address as the other replicas reach it, and a TCP port free on it now (rank 0 binds it)."""
    import ray

    ip = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return ip, s.getsockname()[1]


class ReplicaGroup:
    """The process group of one stage's replicas (or a no-op for one replica)."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device = world, device

    @classmethod
    def join(cls, *, rank: int, world: int, address: str, port: int, device: torch.device, backend: str = "gloo",
             timeout_s: float = 3600.0) -> ReplicaGroup:
        """``backend``: ``nccl`` (each replica on its own GPU: device to device) or ``gloo`` (CPU workers, or
        replicas that share a GPU — NCCL refuses two ranks on one device — where the sums go through host memory).
        ``timeout_s`` bounds how long a replica waits in a collective for the others: replicas over unequal shares
        of the micro-batches reach it at different times, so it is generous."""
        import torch.distributed as dist

        if backend not in ("nccl", "gloo"):
            raise ValueError(f"collective backend {backend!r}: nccl or gloo")
        group = cls(world, device if backend == "nccl" else torch.device("cpu"))
        if world > 1:
            if dist.is_initialized():
                dist.destroy_process_group()
            dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return group

    def all_reduce_sum(self, tensors: list[torch.Tensor], pack_bytes: int = 2**24) -> list[torch.Tensor]:
        """Sum every tensor over the replicas; returns the sums in the input order, on the inputs' devices.

        Large tensors (dense factors, G) are reduced in place one by one on the group's device, so no second copy
        of a stage's statistics is ever made; small ones (counts, projections) are packed per dtype into one flat
        buffer, so the many small sums cost one collective, not one each."""
        if self.world <= 1:
            return list(tensors)
        import torch.distributed as dist

        out: list[torch.Tensor | None] = [None] * len(tensors)
        small: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            if t.numel() * t.element_size() >= pack_bytes:
                x = t.contiguous().to(self.device)
                dist.all_reduce(x, op=dist.ReduceOp.SUM)
                out[i] = x.to(t.device)
            else:
                small.setdefault(t.dtype, []).append(i)
        for idx in small.values():
            flat = torch.cat([tensors[i].reshape(-1).to(self.device) for i in idx])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                out[i] = flat[offset:offset + n].view(tensors[i].shape).to(tensors[i].device)
                offset += n
        return out  # type: ignore[return-value]

    def leave(self) -> None:
        import torch.distributed as dist

        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
