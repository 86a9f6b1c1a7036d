"""Which transport a layout gets, and what a stage hands the next one (curvdist.runner.transport)."""
import numpy as np
import pytest
import torch

from curvdist import config as C
from curvdist.runner import transport as T


def test_auto_picks_the_object_store_on_cpu_and_device_transports_on_gpus():
    assert T.resolve("auto", device="cpu", gpus_per_worker=0, replicas=2) == "object_store"
    assert T.resolve("auto", device="cuda", gpus_per_worker=0.5, replicas=1) == "object_store"   # cuda_ipc: opt-in
    assert T.resolve("cuda_ipc", device="cuda", gpus_per_worker=0.5, replicas=1) == "cuda_ipc"
    own = T.resolve("auto", device="cuda", gpus_per_worker=1, replicas=1)
    assert own == ("nccl" if T.cupy_available() else "object_store")


@pytest.mark.parametrize("policy, device, replicas, needle", [
    ("nccl", "cpu", 1, "device=cuda"), ("cuda_ipc", "cpu", 1, "object_store or gloo"),
    ("gloo", "cpu", 2, "replicas: 1")])
def test_explicit_transports_that_cannot_work_are_refused_with_the_fix(policy, device, replicas, needle):
    with pytest.raises(T.TransportError, match=needle):
        T.resolve(policy, device=device, gpus_per_worker=0, replicas=replicas)
    if policy == "gloo":
        assert T.resolve(policy, device=device, gpus_per_worker=0, replicas=1) == "gloo"


def test_nccl_without_cupy_names_the_package():
    if T.cupy_available():
        pytest.skip("CuPy is installed here")
    with pytest.raises(T.TransportError, match="cupy"):
        T.resolve("nccl", device="cuda", gpus_per_worker=1, replicas=1)


def test_the_config_key_is_validated():
    assert C.load_config(None, ["ray.transport=gloo"]).ray.transport == "gloo"
    with pytest.raises(C.ConfigError, match="transport"):
        C.load_config(None, ["ray.transport=rdma"])


def test_wire_format():
    """Object store: a NumPy copy, bfloat16 widened to float32 (NumPy has no bfloat16) and exactly representable;
    RDT: the tensor itself in its own dtype, detached, with its bytes counted."""
    x = torch.randn(3, 5, dtype=torch.bfloat16, requires_grad=True) * 1
    a = T.wire(x, "object_store")
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    assert torch.equal(torch.as_tensor(a).to(torch.bfloat16), x.detach())
    b = T.wire(x, "gloo")
    assert isinstance(b, torch.Tensor) and b.dtype == torch.bfloat16 and not b.requires_grad
    assert T.nbytes(a) == 60 and T.nbytes(b) == 30 and T.nbytes(None) == 0
    assert T.call_options("object_store") == {} and T.call_options("gloo") == {"tensor_transport": "GLOO"}
    c = T.host_copy(b)
    c += 1
    assert not torch.equal(c, b)          # a private copy
