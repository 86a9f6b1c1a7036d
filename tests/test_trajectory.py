"""α over a training run (``model.checkpoints``, :mod:`curvdist.runner.trajectory`) on real DeepSpeed checkpoints.

The ZeRO-2 Llama of ``ds_runs`` (tests/conftest.py) saved at steps 1, 2 and 3 is the trajectory.  Its checkpoints
share one set of stage actors: the first builds the stages, the later ones only swap the weights in
(:class:`curvdist.runner.session.Session`); every step must still equal its own separate run.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ds_train import RUN

from curvdist import config as C
from curvdist.io import checkpoint as ckpt
from curvdist.io import query, zero
from curvdist.io.slice import build_slice, reload_weights
from curvdist.runner import driver

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
PY = sys.executable


def test_reload_weights_in_place_equals_a_fresh_build(ds_runs):
    """A stage built from step 1 and given step 3's weights by ``reload_weights``: the same parameter objects, now
    holding exactly what a stage built from step 3 holds (and computing the same), read from the stage's own
    fragments only; a checkpoint of another architecture is refused with the parameters untouched."""
    idx1, idx3 = (ckpt.CheckpointIndex.open(ds_runs["zero2"] / f"global_step{s}") for s in (1, 3))
    last = idx1.num_blocks - 1
    stage = build_slice(idx1, 2, last, has_embedding=False, has_head=True, dtype=torch.float64)
    params = {n: p for n, p in stage.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    zero.BYTES_READ.clear()
    reload_weights(stage, idx3, dtype=torch.float64)
    own = set(idx3.stage_tensors(2, last, has_embedding=False, has_head=True))
    assert set(zero.BYTES_READ) == own and sum(zero.BYTES_READ.values()) == sum(idx3.tensors[n].nbytes for n in own)
    fresh = build_slice(idx3, 2, last, has_embedding=False, has_head=True, dtype=torch.float64)
    assert all(p is params[n] for n, p in stage.named_parameters())
    assert all(torch.equal(p, dict(fresh.named_parameters())[n]) for n, p in stage.named_parameters())
    assert any(not torch.equal(before[n], p) for n, p in stage.named_parameters())   # the steps differ
    x = torch.randn(2, 8, idx1.config["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stage(x), fresh(x))
    other = ckpt.CheckpointIndex.open(ds_runs["zero3"])   # a GPT-2
    after = {n: p.detach().clone() for n, p in stage.named_parameters()}
    with pytest.raises(KeyError, match="no tensor for"):
        reload_weights(stage, other, dtype=torch.float64)
    assert all(torch.equal(after[n], p) for n, p in stage.named_parameters())


def _same(a, b) -> bool:
    """Both absent, or equal to 1e-6."""
    return (a is None and b is None) or (a is not None and b is not None
                                         and a == pytest.approx(b, rel=1e-6, abs=1e-300, nan_ok=True))


@pytest.mark.ray
def test_trajectory_keeps_its_actors_and_equals_separate_runs(ray_local, ds_runs, tmp_path):
    """The 3 checkpoints measured as one trajectory (exact h on block 1): the stage actors are started once (the
    same worker processes measure every step; the first run records a full set-up, the later ones a weight swap
    timed beside it), and every step's rows equal its separate run to 1e-6."""
    cfg = C.load_config(None, RUN + ["stages=2", "exact_layers=['*.1.*']", "run_id=traj", "model.name=null",
                                        f"out={tmp_path / 'traj'}",
                                        f"model.checkpoints=[{ds_runs['zero2']}/global_step*]"])
    assert driver.main(cfg) == "traj-step3"
    con = query.open(tmp_path / "traj")
    t = {r[0]: json.loads(r[1]) for r in con.sql("select step, timings_json from runs").fetchall()}
    assert [t[s]["setup"] for s in (1, 2, 3)] == ["full", "weights", "weights"]
    assert len({tuple(t[s]["worker_pids"]) for s in (1, 2, 3)}) == 1 and len(t[1]["worker_pids"]) == 2
    assert t[1]["setup_s"] == t[2]["first_setup_s"] == t[3]["first_setup_s"] >= t[1]["load_s"] > 0
    assert all(len(t[s]["weights_s"]) == 2 and t[s]["setup_s"] == t[s]["load_s"] for s in (2, 3))
    traj = {(r["step"], r["layer"]): r for r in query.arrow(con.sql("select * from layers")).to_pylist()}
    dirs = {(r["run_id"], r["layer"], r["k"]): r for r in query.arrow(con.sql("select * from directions")).to_pylist()}
    for step in (1, 2, 3):
        one = C.load_config(None, RUN + ["stages=2", "exact_layers=['*.1.*']", f"out={tmp_path / f'one{step}'}",
                                            f"model.path={ds_runs['zero2']}/global_step{step}"])
        run_id = driver.main(one)
        c1 = query.open(tmp_path / f"one{step}")
        assert json.loads(query.read_run(tmp_path / f"one{step}", run_id)["timings_json"])["setup"] == "full"
        rows = query.arrow(c1.sql("select * from layers")).to_pylist()
        assert len(rows) >= 8 and sum(r["alpha"] is not None for r in rows) > 0
        for r in rows:
            for key in ("alpha", "alpha_kron", "beta", "phi", "gamma", "grad_snr"):
                assert _same(traj[(step, r["layer"])][key], r[key]), (step, r["layer"], key)
        drows = query.arrow(c1.sql("select * from directions")).to_pylist()
        assert sum(d["h"] is not None for d in drows) > 0
        for d in drows:
            mine = dirs[(f"traj-step{step}", d["layer"], d["k"])]
            for key in ("sigma", "h", "h_kron"):
                assert _same(mine[key], d[key]), (step, d["layer"], d["k"], key)


def test_checkpoints_of_two_architectures_are_refused(ds_runs, tmp_path):
    """A trajectory whose second checkpoint has another config.json (same tensor shapes): one error before Ray
    starts, naming both checkpoints and the fix; nothing written."""
    a, b = tmp_path / "a" / "checkpoint-1", tmp_path / "b" / "checkpoint-2"
    shutil.copytree(ds_runs["zero2"] / "hf-global_step1", a)
    shutil.copytree(ds_runs["zero2"] / "hf-global_step2", b)
    conf = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps(dict(conf, rms_norm_eps=conf["rms_norm_eps"] * 10)))
    out = tmp_path / "out"
    cfg = C.load_config(None, RUN + ["stages=2", f"out={out}", "model.name=null",
                                        f"model.checkpoints=[{a},{b}]"])
    with pytest.raises(ValueError, match=r"checkpoint-2 has another architecture than .*checkpoint-1 .*rms_norm_eps"
                                         r".*separate trajectories"):
        driver.main(cfg)
    assert not out.exists()


@pytest.mark.ray
def test_trajectory_resumed_after_sigkill_equals_separate_runs(ray_local, ds_runs, tmp_path):
    """model.checkpoints over the 3 ZeRO-2 checkpoints into one dataset: the driver is SIGKILLed once the first
    checkpoint is complete; the rerun skips it, measures the other two, and every step equals its separate run;
    `step` is in runs and layers, and the trajectory plot is written."""
    import signal
    import time

    from curvdist.runner import trajectory
    over = RUN + ["stages=2", "exact=false", "run_id=traj", f"out={tmp_path / 'traj'}", "model.name=null",
                     f"model.checkpoints=[{ds_runs['zero2']}/global_step*]"]
    cfg = C.load_config(None, over)
    assert [s for s, _ in trajectory.checkpoints(cfg.model)] == [1, 2, 3]
    (tmp_path / "run.yaml").write_text("plots: false\n")
    job = subprocess.Popen([PY, "-m", "curvdist", "run", str(tmp_path / "run.yaml"), *over], start_new_session=True,
                           env=dict(os.environ, PYTHONPATH=str(HERE.parent), RAY_AUTH_MODE="disabled"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not query.run_exists(tmp_path / "traj", "traj-step1") and time.time() < deadline \
                and job.poll() is None:
            time.sleep(0.2)
        assert query.run_exists(tmp_path / "traj", "traj-step1"), "the first checkpoint never completed"
    finally:
        os.killpg(job.pid, signal.SIGKILL)   # the driver and the Ray processes it started
        job.wait()
    assert not query.run_exists(tmp_path / "traj", "traj-step3")
    first = sorted(p.name for p in (tmp_path / "traj" / "layers" / "run_id=traj-step1").iterdir())
    assert driver.main(cfg) == "traj-step3"
    assert sorted(p.name for p in (tmp_path / "traj" / "layers" / "run_id=traj-step1").iterdir()) == first
    con = query.open(tmp_path / "traj")
    assert con.sql("select run_id, step from runs order by step").fetchall() == \
        [("traj-step1", 1), ("traj-step2", 2), ("traj-step3", 3)]
    traj = {(r["step"], r["layer"]): r for r in query.arrow(con.sql("select * from layers")).to_pylist()}
    for step in (1, 2, 3):
        one = C.load_config(None, RUN + ["stages=2", "exact=false", f"out={tmp_path / f'one{step}'}",
                                            f"model.path={ds_runs['zero2']}/global_step{step}"])
        run_id = driver.main(one)
        rows = query.arrow(query.open(tmp_path / f"one{step}").sql("select * from layers")).to_pylist()
        assert len(rows) >= 8 and all(r["step"] == step and r["run_id"] == run_id for r in rows)
        for r in rows:
            t = traj[(step, r["layer"])]
            for key in ("alpha_kron", "beta", "phi", "gamma", "grad_snr"):
                assert t[key] == pytest.approx(r[key], rel=1e-9, nan_ok=True), (step, r["layer"], key)
    assert len({traj[(s, "model.layers.1.mlp.up_proj")]["alpha_kron"] for s in (1, 2, 3)}) == 3  # weights differ
    from curvdist.plots import plot_trajectory
    png = plot_trajectory(tmp_path / "traj", tmp_path / "traj.png")
    assert png.stat().st_size > 10_000
