"""α over a training run (``model.checkpoints``, :mod:`curvdist.runner.trajectory`) on real DeepSpeed checkpoints.

The ZeRO-2 Llama of ``ds_runs`` (tests/conftest.py) saved at steps 1, 2 and 3 is the trajectory; every step must
equal its own separate run.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curvdist import config as C
from curvdist.io import store
from curvdist.runner import driver

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
PY = sys.executable
COMMON = ["model.dtype=float64", "stat_dtype=float64", "top_k=6", "data.source=synthetic", "data.sequences=4",
          "data.seq_len=16", "data.micro_batch=2", "plots=false"]


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["CURVDIST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    ray.init("local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
def test_trajectory_resumed_after_sigkill_equals_separate_runs(ray_local, ds_runs, tmp_path):
    """model.checkpoints over the 3 ZeRO-2 checkpoints into one dataset: the driver is SIGKILLed once the first
    checkpoint is complete; the rerun skips it, measures the other two, and every step equals its separate run;
    `step` is in runs and layers, and the trajectory plot is written."""
    import signal
    import time

    from curvdist.runner import trajectory
    over = COMMON + ["stages=2", "exact=false", "run_id=traj", f"out={tmp_path / 'traj'}", "model.name=null",
                     f"model.checkpoints=[{ds_runs['zero2']}/global_step*]"]
    cfg = C.load_config(None, over)
    assert [s for s, _ in trajectory.checkpoints(cfg.model)] == [1, 2, 3]
    (tmp_path / "run.yaml").write_text("plots: false\n")
    job = subprocess.Popen([PY, "-m", "curvdist", "run", str(tmp_path / "run.yaml"), *over], start_new_session=True,
                           env=dict(os.environ, PYTHONPATH=str(HERE.parent), RAY_AUTH_MODE="disabled"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not store.run_exists(tmp_path / "traj", "traj-step1") and time.time() < deadline \
                and job.poll() is None:
            time.sleep(0.2)
        assert store.run_exists(tmp_path / "traj", "traj-step1"), "the first checkpoint never completed"
    finally:
        os.killpg(job.pid, signal.SIGKILL)   # the driver and the Ray processes it started
        job.wait()
    assert not store.run_exists(tmp_path / "traj", "traj-step3")
    first = sorted(p.name for p in (tmp_path / "traj" / "layers" / "run_id=traj-step1").iterdir())
    assert driver.main(cfg) == "traj-step3"
    assert sorted(p.name for p in (tmp_path / "traj" / "layers" / "run_id=traj-step1").iterdir()) == first
    con = store.open(tmp_path / "traj")
    assert con.sql("select run_id, step from runs order by step").fetchall() == \
        [("traj-step1", 1), ("traj-step2", 2), ("traj-step3", 3)]
    traj = {(r["step"], r["layer"]): r for r in store.arrow(con.sql("select * from layers")).to_pylist()}
    for step in (1, 2, 3):
        one = C.load_config(None, COMMON + ["stages=2", "exact=false", f"out={tmp_path / f'one{step}'}",
                                            f"model.path={ds_runs['zero2']}/global_step{step}"])
        run_id = driver.main(one)
        rows = store.arrow(store.open(tmp_path / f"one{step}").sql("select * from layers")).to_pylist()
        assert len(rows) >= 8 and all(r["step"] == step and r["run_id"] == run_id for r in rows)
        for r in rows:
            t = traj[(step, r["layer"])]
            for key in ("alpha_kron", "beta", "phi", "gamma", "grad_snr"):
                assert t[key] == pytest.approx(r[key], rel=1e-9, nan_ok=True), (step, r["layer"], key)
    assert len({traj[(s, "model.layers.1.mlp.up_proj")]["alpha_kron"] for s in (1, 2, 3)}) == 3  # weights differ
    from curvdist.plots import plot_trajectory
    png = plot_trajectory(tmp_path / "traj", tmp_path / "traj.png")
    assert png.stat().st_size > 10_000
