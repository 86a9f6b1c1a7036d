"""Fixtures shared by several test files: real DeepSpeed checkpoints (slow to make, so made once per session)."""
import os

import pytest


@pytest.fixture(scope="session")
def ds_runs(tmp_path_factory):
    """{"zero2": llama ZeRO-2 saved at steps 1, 2, 3; "zero3": gpt2 ZeRO-3 saved at step 2}, trained together by
    real DeepSpeed at world size 2 (tests/ds_train.py), each beside DeepSpeed's own consolidation ``hf-<tag>``."""
    pytest.importorskip("deepspeed")
    from ds_train import launch

    root = tmp_path_factory.mktemp("deepspeed")
    jobs = {"zero2": launch(root / "zero2", "--family", "llama", "--stage", "2", "--steps", "3", "--save-at", "1,2,3"),
            "zero3": launch(root / "zero3", "--family", "gpt2", "--stage", "3", "--steps", "2")}
    for name, job in jobs.items():
        log, _ = job.communicate(timeout=600)
        assert job.returncode == 0, f"{name}: {log[-3000:]}"
    return {name: root / name for name in jobs}


# a local Ray cluster per module, for the DeepSpeed and trajectory tests
@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["CURVDIST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    ray.init("local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()
