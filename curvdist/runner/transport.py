"""How activations, their gradients and the exact pass's tangents move from one stage actor to the next.

    kind = resolve(cfg.ray.transport, device="cuda", gpus_per_worker=1.0, replicas=1)    # "nccl"
    connect(actors, kind)             # once the actors are up, and again after a replacement
    actor.forward.options(**call_options(kind)).remote(...)     # a call whose result another actor consumes
    return wire(y, kind)              # inside the worker: what such a call returns

Kinds:

- ``object_store``: the result is copied to host memory as a NumPy array and goes through Ray's object store
  (device → host → shared memory → host → device).  Works everywhere, and is what a replaced actor needs nothing
  for; the default on CPU.
- ``nccl``: Ray Direct Transport (RDT, ``@ray.method(tensor_transport=...)``): the producing actor keeps the
  tensor on its GPU and the consumer receives it device to device over NCCL; the object store carries only a
  reference.  Needs CuPy in the workers (Ray's NCCL communicator) and one GPU per worker.
- ``cuda_ipc``: RDT over CUDA IPC: one-sided, no collective group; workers on the same node (fractional GPUs on
  one device, or NVLink peers), the consumer maps the producer's memory.
- ``gloo``: RDT over ``torch.distributed`` Gloo on host memory: no object-store copy (whether that is faster
  depends on the sizes and the machine: ``benchmarks/bench_transport.py``).  Ray's Gloo group uses the default
  ``torch.distributed`` process group of each worker, which the replicas' all-reduce
  (:mod:`curvdist.runner.collective`) also uses, so it needs ``replicas: 1``.

Faults: when an actor dies mid-transfer, Ray kills both ends of a failed direct transfer, so under an RDT kind one
lost worker can cost two replacements of ``ray.max_restarts`` (tests/test_faults.py).

``auto`` is ``nccl`` when every worker has a GPU of its own and CuPy is importable, and ``object_store`` otherwise
(``cuda_ipc`` is opt-in: Ray's RDT is marked alpha in the installed Ray, and CUDA IPC between actors on different
devices of a node depends on peer access).  Only ``object_store`` and ``gloo`` run in this project's CPU tests.
"""
from __future__ import annotations

import importlib.util
import uuid

import numpy as np
import torch

from curvdist.config import TRANSPORTS as POLICIES

KINDS = POLICIES[1:]
_RDT = {"gloo": "GLOO", "nccl": "NCCL", "cuda_ipc": "CUDA_IPC"}           # Ray's transport names
_GROUP_BACKEND = {"gloo": "torch_gloo", "nccl": "nccl"}                    # two-sided kinds need a collective group


class TransportError(ValueError):
    """A transport this layout cannot use, with the fix."""


def cupy_available() -> bool:
    return importlib.util.find_spec("cupy") is not None


def resolve(policy: str, *, device: str, gpus_per_worker: float, replicas: int) -> str:
    """The kind of transport a run uses under ``policy`` (config ``ray.transport``); raises TransportError when
    an explicit kind cannot work in this layout."""
    if policy not in POLICIES:
        raise TransportError(f"ray.transport={policy!r}: one of {', '.join(POLICIES)}")
    cuda = device == "cuda"
    if policy == "auto":
        return "nccl" if cuda and gpus_per_worker >= 1 and cupy_available() else "object_store"
    if policy in ("nccl", "cuda_ipc") and not cuda:
        raise TransportError(f"ray.transport={policy} moves GPU tensors but the stages run on {device}; "
                             "use ray.transport=object_store or gloo (or device=cuda)")
    if policy == "nccl" and not cupy_available():
        raise TransportError("ray.transport=nccl needs CuPy in the workers (Ray's NCCL communicator): "
                             "pip install cupy-cuda12x, or use ray.transport=cuda_ipc (one node) or object_store")
    if policy == "gloo" and replicas > 1:
        raise TransportError(f"ray.transport=gloo shares each worker's torch.distributed process group with the "
                             f"replicas' all-reduce, so it needs replicas: 1 (got {replicas}); use "
                             "ray.transport=object_store with replicas")
    return policy


def rdt(kind: str) -> str | None:
    """Ray's tensor-transport name of ``kind`` (None: the object store)."""
    return _RDT.get(kind)


def call_options(kind: str) -> dict:
    """Options of an actor call whose result another actor consumes."""
    name = rdt(kind)
    return {"tensor_transport": name} if name else {}


def wire(t: torch.Tensor, kind: str) -> np.ndarray | torch.Tensor:
    """What a stage returns for the next one: a NumPy copy in host memory (object store; half precision widened
    to float32, which NumPy lacks), or the tensor itself, detached (RDT; on the host for Gloo)."""
    t = t.detach()
    if rdt(kind) is None:
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.cpu().numpy()
    return t.cpu().contiguous() if kind == "gloo" else t.contiguous()


def nbytes(x) -> int:
    """Bytes of what :func:`wire` returned (0 for None)."""
    if x is None:
        return 0
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return int(np.asarray(x).nbytes)


def host_copy(x) -> np.ndarray | torch.Tensor:
    """A private copy of a received stage input in host memory (the exact pass reuses it): Ray hands object-store
    arguments as zero-copy views that would stay pinned there, and RDT tensors may live on the device."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    return np.array(x, copy=True)


class Link:
    """The collective group of a two-sided RDT kind over every stage actor of a run (none for the object store
    or CUDA IPC).  Re-formed after an actor is replaced: a Ray actor belongs to at most one group per backend."""

    def __init__(self, kind: str):
        self.kind, self.name = kind, None

    def connect(self, actors: list) -> None:
        backend = _GROUP_BACKEND.get(self.kind)
        if backend is None or len(actors) < 2:
            return
        import ray
        from ray.experimental.collective import create_collective_group

        self.close()
        ray.get([a.leave_link.remote() for a in actors])   # a survivor of a replacement still holds the old group
        self.name = f"curvdist-{uuid.uuid4().hex[:12]}"
        create_collective_group(list(actors), backend=backend, name=self.name)

    def close(self) -> None:
        if self.name is None:
            return
        from ray.experimental.collective import destroy_collective_group

        import ray

        try:
            destroy_collective_group(self.name)
        except (ray.exceptions.RayError, ValueError, KeyError):   # an actor of the group is gone already
            pass
        self.name = None
