"""Pipeline schedules: the 1F1B order (pure), and a real Ray pipeline whose stages' compute is a fixed sleep."""
import json
import os

import pytest

from curvdist import config as C
from curvdist.io import query
from curvdist.runner import driver
from curvdist.runner.schedule import (Op, dependency, one_f_one_b, submission_order, sweep_dependency, sweep_orders,
                                      warmup)
from curvdist.runner.spec import SLEEP_ENV


def simulate(stages: int, microbatches: int, in_flight: int, t_forward: float = 1.0, t_backward: float = 0.0):
    """Run the schedule as the actors would (each stage in its order, a call starts when its stage is free and its
    dependency is finished); returns (makespan, largest number of micro-batches open on each stage)."""
    per_stage = one_f_one_b(stages, range(microbatches), in_flight)
    order = submission_order(per_stage)
    finish: dict[Op, float] = {}
    free = [0.0] * stages
    open_now = [0] * stages
    peak = [0] * stages
    for op in order:   # the submission order is a valid serialisation: dependencies come first
        dep = dependency(op, stages)
        start = max(free[op.stage], finish[dep] if dep is not None else 0.0)
        cost = t_forward + t_backward if op.kind == "L" else (t_forward if op.kind == "F" else t_backward)
        finish[op] = free[op.stage] = start + cost
        if op.kind == "F":
            open_now[op.stage] += 1
            peak[op.stage] = max(peak[op.stage], open_now[op.stage])
        elif op.kind == "B":
            open_now[op.stage] -= 1
    return max(finish.values()), peak


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("in_flight", [1, 2, 4, 8])
def test_one_f_one_b_is_complete_and_bounded(stages, in_flight):
    for M in (1, 3, 16):
        per_stage = one_f_one_b(stages, range(M), in_flight)
        order = submission_order(per_stage)   # raises on a deadlock
        assert sorted((o.kind, o.stage, o.mb) for o in order) == sorted(
            [("F", j, b) for j in range(stages - 1) for b in range(M)]
            + [("B", j, b) for j in range(stages - 1) for b in range(M)] + [("L", stages - 1, b) for b in range(M)])
        for j, seq in enumerate(per_stage):   # each stage keeps its own order inside the merged one
            assert [o for o in order if o.stage == j] == seq
        _, peak = simulate(stages, M, in_flight)
        for j in range(stages - 1):
            assert peak[j] <= warmup(j, stages, in_flight, M)


def test_one_f_one_b_fills_the_pipeline():
    """With a fixed forward time t, S = 4 stages and M = 16 micro-batches take (M + S − 1)·t with in_flight = S,
    and M·S·t when one micro-batch is in flight at a time (the old driver)."""
    S, M = 4, 16
    assert simulate(S, M, S)[0] == pytest.approx(M + S - 1)
    assert simulate(S, M, 1)[0] == pytest.approx(M * S)


@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("in_flight", [1, 2, 4])
def test_exact_sweep_orders_complete_and_pipelined(stages, in_flight):
    """Sweeps from every source stage below the last, two chunks each: every call scheduled once, each stage in
    its own order, no deadlock; with one source and a fixed forward time t, (M + S − 1)·t as in the other passes."""
    M = 5
    sweeps = [(b, j, c) for b in range(M) for j in range(stages - 1) for c in range(2)]
    per_stage = sweep_orders(stages, sweeps, in_flight)
    order = submission_order(per_stage, sweep_dependency)
    want = sorted([("F", i, w) for w in sweeps for i in range(w[1], stages - 1)]
                  + [("B", i, w) for w in sweeps for i in range(w[1], stages - 1)]
                  + [("L", stages - 1, w) for w in sweeps])
    assert sorted((o.kind, o.stage, o.mb) for o in order) == want
    for j, seq in enumerate(per_stage):
        assert [o for o in order if o.stage == j] == seq
    one = [(b, 0, 0) for b in range(16)]
    finish, free = {}, [0.0] * stages
    for op in submission_order(sweep_orders(stages, one, stages), sweep_dependency):
        dep = sweep_dependency(op, stages)
        start = max(free[op.stage], finish[dep] if dep is not None else 0.0)
        finish[op] = free[op.stage] = start + (0.0 if op.kind == "B" else 1.0)
    assert max(finish.values()) == pytest.approx(16 + stages - 1)


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["CURVDIST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_stages_overlap_with_fixed_sleep(ray_local, tmp_path, monkeypatch):
    """S = 4 real stage actors whose forward steps each sleep t (the test hook ``CURVDIST_STAGE_SLEEP``), M = 16
    micro-batches: the statistics pass takes within 1.5× of (M + S − 1)·t (one at a time it would be M·S·t), and
    the recorded busy fraction is ≥ 0.7."""
    S, M, t = 4, 16, 0.25
    monkeypatch.setenv(SLEEP_ENV, str(t))
    cfg = C.load_config(None, ["model.name=tiny-gpt2", f"stages={S}", "data.source=synthetic", f"data.sequences={2 * M}",
                               "data.seq_len=8", "data.micro_batch=2", "top_k=2", "exact=false", "plots=false",
                               "layers=[transformer.h.*.mlp.c_fc]", "ray.cpus_per_stage=0.5", f"out={tmp_path}"])
    run_id = driver.main(cfg)
    timings = json.loads(query.read_run(tmp_path, run_id)["timings_json"])
    stats = next(p for p in timings["passes"] if p["kind"] == "stats")
    ideal = (M + S - 1) * t
    assert stats["wall_s"] <= 1.5 * ideal, (stats, ideal, M * S * t)
    assert stats["busy_fraction"] >= 0.7, stats
    assert len(stats["busy_s"]) == S and min(stats["busy_s"]) >= M * t


@pytest.mark.ray
@pytest.mark.slow
def test_exact_sweeps_overlap_with_fixed_sleep(ray_local, tmp_path, monkeypatch):
    """The exact pass with the same sleeping stages: one exact layer on stage 0, so each of the M sweeps visits all
    S stages; with the sweeps pipelined the pass takes within 1.5× of (M + S − 1)·t (one sweep at a time: M·S·t),
    and it records one sweep per micro-batch.  t = 0.5 s: the backward half of a sweep, the last stage's own
    layers and the pass bracket are real compute that no sleep stands for (~2.8 s here), so the sleep must
    dominate for the ratio to measure the schedule."""
    S, M, t = 4, 16, 0.5
    monkeypatch.setenv(SLEEP_ENV, str(t))
    cfg = C.load_config(None, ["model.name=tiny-gpt2", f"stages={S}", "data.source=synthetic", f"data.sequences={2 * M}",
                               "data.seq_len=8", "data.micro_batch=2", "top_k=2", "exact=true", "plots=false",
                               "layers=[transformer.h.0.mlp.c_fc]", "ray.cpus_per_stage=0.5", f"out={tmp_path}"])
    run_id = driver.main(cfg)
    timings = json.loads(query.read_run(tmp_path, run_id)["timings_json"])
    exact = next(p for p in timings["passes"] if p["kind"] == "exact")
    ideal = (M + S - 1) * t
    assert exact["sweeps"] == M
    assert exact["wall_s"] <= 1.5 * ideal, (exact, ideal, M * S * t)
