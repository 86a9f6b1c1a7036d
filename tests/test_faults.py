"""Faults with real processes: a stage actor SIGKILLed while loading, accumulating statistics or in its spectral
work is replaced and the run ends with the numbers of an undisturbed run; a SIGKILLed driver resumes on rerun; Ctrl-C
(SIGINT) stops the actors and exits 130.  The kill points are reached through ``CURVDIST_FAULT`` (the process
announces its pid at that point and waits); the kill itself is an ordinary ``os.kill(pid, SIGKILL)`` from here."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from curvdist import config as C
from curvdist.io import query
from curvdist.io.verify import verify
from curvdist.runner import driver

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ARGS = ["model.name=tiny-gpt2", "stages=2", "model.dtype=float64", "stat_dtype=float64", "top_k=6",
        "data.source=synthetic", "data.sequences=6", "data.seq_len=16", "data.micro_batch=2", "plots=false",
        "ray.num_cpus=2"]
CLI = [sys.executable, "-m", "curvdist"]
ROOT = Path(__file__).parents[1]
YAML = str(ROOT / "configs" / "tiny-gpt2.yaml")


def load(*extra):
    return C.load_config(YAML, ARGS + list(extra))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import ray
    cache = tmp_path_factory.mktemp("cache")
    saved = {k: os.environ.get(k) for k in ("CURVDIST_CACHE", "CURVDIST_FAULT")}
    os.environ["CURVDIST_CACHE"] = str(cache)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield cache
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def read(out, run_id):
    con = query.open(out)
    layers = query.arrow(con.sql(f"select * from layers where run_id='{run_id}'")).to_pylist()
    dirs = query.arrow(con.sql(f"select * from directions where run_id='{run_id}'")).to_pylist()
    run = query.read_run(out, run_id)
    con.close()
    return layers, dirs, run


@pytest.fixture(scope="module")
def baseline(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    run_id = driver.main(load(f"out={out}"))
    return read(out, run_id)


def assert_same(result, baseline):
    layers, dirs, _ = result
    ref_layers, ref_dirs, _ = baseline
    names = [r["layer"] for r in layers]
    assert len(names) == len(set(names)), "duplicate layer rows"
    assert sorted(names) == sorted(r["layer"] for r in ref_layers)
    keys = [(r["layer"], r["k"]) for r in dirs]
    assert len(keys) == len(set(keys)), "duplicate direction rows"
    assert sorted(keys) == sorted((r["layer"], r["k"]) for r in ref_dirs)
    by = {r["layer"]: r for r in layers}
    for r in ref_layers:
        for key in ("alpha", "alpha_kron", "beta", "phi", "chi_slope", "gamma", "s", "n_valid", "status"):
            assert by[r["layer"]][key] == pytest.approx(r[key], rel=1e-9, abs=1e-12) if isinstance(r[key], float) \
                else by[r["layer"]][key] == r[key], (r["layer"], key)
    dby = {(r["layer"], r["k"]): r for r in dirs}
    for r in ref_dirs:
        for key in ("sigma", "h", "h_gn", "h_kron", "h_sop"):
            assert dby[(r["layer"], r["k"])][key] == pytest.approx(r[key], rel=1e-9, abs=1e-300), (r["layer"], key)


def killer(pid_file: Path, sig=signal.SIGKILL, timeout=120.0) -> threading.Thread:
    """Wait for the process at the fault point to announce itself, then send it ``sig``."""
    def run():
        deadline = time.monotonic() + timeout
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), sig)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("stage,point", [(0, "load"), (1, "stats"), (0, "spectral"), (1, "spectral")])
def test_stage_killed_is_replaced(env, baseline, tmp_path, stage, point):
    faults = tmp_path / "faults"
    faults.mkdir()
    os.environ["CURVDIST_FAULT"] = f"{stage}:{point}:{faults}"
    try:
        t = killer(faults / f"{point}-stage{stage}.pid")
        run_id = driver.main(load(f"out={tmp_path / 'out'}"))
        t.join(5)
    finally:
        os.environ.pop("CURVDIST_FAULT", None)
    killed = int((faults / f"{point}-stage{stage}.pid").read_text())
    assert not pid_alive(killed)
    result = read(tmp_path / "out", run_id)
    timings = json.loads(result[2]["timings_json"])
    assert timings["stage_restarts"] == 1
    # the group is replayed from its statistics pass, so the replacement keeps its rows again and the projections
    # pass replays them (a worker without them would make it stream)
    assert [p["projections"] for p in timings["passes"] if p["kind"] == "projections"] == ["replayed"]
    assert_same(result, baseline)


def test_stage_killed_with_the_gloo_transport_is_replaced(env, baseline, tmp_path):
    """ray.transport=gloo: stage outputs go actor to actor over a Ray collective group.  Stage 1 killed during the
    statistics pass is replaced, the group is formed afresh (a survivor drops its old process group), and the run
    ends equal to the object-store baseline.  Ray kills both ends of a failed direct transfer, so the stage that was
    receiving from the killed one may be replaced too: one kill costs one or two of ray.max_restarts."""
    faults = tmp_path / "faults"
    faults.mkdir()
    os.environ["CURVDIST_FAULT"] = f"1:stats:{faults}"
    try:
        t = killer(faults / "stats-stage1.pid")
        run_id = driver.main(load(f"out={tmp_path / 'out'}", "ray.transport=gloo"))
        t.join(5)
    finally:
        os.environ.pop("CURVDIST_FAULT", None)
    assert not pid_alive(int((faults / "stats-stage1.pid").read_text()))
    result = read(tmp_path / "out", run_id)
    timings = json.loads(result[2]["timings_json"])
    assert timings["stage_restarts"] in (1, 2) and timings["layout"]["transport"] == "gloo"
    assert_same(result, baseline)


def _cli(args, env_extra=None, **kw):
    e = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen(CLI + ["run", YAML, *args], env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def reached(proc, pid_file: Path, timeout=240.0) -> Path:
    """Wait until the CLI run ``proc`` reaches its fault point (the pid file appears); fail with its stderr."""
    deadline = time.monotonic() + timeout
    while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pid_file.exists(), proc.communicate()[1][-2000:]
    return pid_file


def test_driver_killed_then_rerun_resumes(env, baseline, tmp_path):
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    # killed mid-way through the exact pass, right after the first stage's exact rows are committed (the last
    # stage measures its own layers first, while the sweeps of stage 0 go on)
    proc = _cli(ARGS + [f"out={out}"], {"CURVDIST_FAULT": f"driver:written-exact:{faults}"})
    reached(proc, faults / "written-exact-stagedriver.pid")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    # what the killed driver left is readable and whole: both stages' Kronecker commits, one exact commit, no run
    # row yet; a reader sees every layer (its Kronecker rows, or its exact rows where they are committed)
    written = sorted(p.name for p in (out / "layers").rglob("*.parquet"))
    assert len(written) == 3 and sum("-exact-" in n for n in written) == 1, written
    con = query.open(out)
    assert con.sql("select count(*) from layers").fetchall() == [(len(baseline[0]),)]
    con.close()
    pads.dataset(out / "layers", partitioning="hive").to_table()
    run_id = C.resolve_run_id(load(f"out={out}"))
    assert query.read_run(out, run_id) is None
    n_first = len(query.done_layers(out, run_id))
    assert 0 < n_first < len(baseline[0])
    report = verify(out)             # whole files only: no problem, the missing runs row is a warning
    assert not report.problems and any("interrupted" in w for w in report.warnings)
    rerun = _cli(ARGS + [f"out={out}"])
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert f"({n_first} already written)" in err
    assert_same(read(out, run_id), baseline)
    report = verify(out)
    assert not report.problems and not report.warnings


def test_sigint_stops_actors_and_exits_130(env, tmp_path):
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    proc = _cli(ARGS + [f"out={out}"], {"CURVDIST_FAULT": f"1:stats:{faults}"})
    pid_file = reached(proc, faults / "stats-stage1.pid")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)   # seconds here; the margin is for a loaded CI machine
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "rerun the same command" in err
    assert "Traceback" not in err
    stage_pid = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while pid_alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pid_alive(stage_pid), "the stage actor outlived the interrupted driver"
    assert not list(out.rglob("*.parquet")) if out.exists() else True   # nothing was finished, nothing written


def test_non_finite_weights_give_statuses_and_the_run_completes(env, tmp_path):
    """A NaN in one weight makes the loss and every gradient non-finite: every layer gets a status saying so, no
    stage crashes, and the run is recorded as complete."""
    import torch
    from transformers import AutoModelForCausalLM

    from curvdist.io import sources
    src = sources.resolve_checkpoint(load().model)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    ck = tmp_path / "nan-gpt2"
    model.save_pretrained(ck)
    run_id = driver.main(load(f"model.path={ck}", f"out={tmp_path / 'out'}"))
    layers, dirs, run = read(tmp_path / "out", run_id)
    assert run["status"] == "complete"
    assert len(layers) == len(query.done_layers(tmp_path / "out", run_id)) >= 9
    assert all(r["status"].startswith("non_finite") for r in layers), {r["layer"]: r["status"] for r in layers}
    assert all(r["alpha"] is None for r in layers) and not dirs


def test_second_writer_refused_then_sigterm_keeps_finished_layers(env, baseline, tmp_path):
    """A second `curvdist run` of the same run id into the same out is refused at once (the run lock, exit 2);
    SIGTERM (preemption) stops the first like Ctrl-C with exit 143, finished layers kept, lock released; the rerun
    ends with the numbers of an undisturbed run."""
    from curvdist.io.lock import lock_path
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    proc = _cli(ARGS + [f"out={out}"], {"CURVDIST_FAULT": f"driver:written-exact:{faults}"})
    reached(proc, faults / "written-exact-stagedriver.pid")
    second = _cli(ARGS + [f"out={out}"])
    _, err2 = second.communicate(timeout=120)
    assert second.returncode == 2, err2[-2000:]
    assert "is being written by another run" in err2 and f"pid {proc.pid} on host" in err2, err2
    assert "Traceback" not in err2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err and "rerun the same command" in err and "Traceback" not in err
    run_id = C.resolve_run_id(load(f"out={out}"))
    kept = len(query.done_layers(out, run_id))
    assert 0 < kept < len(baseline[0]) and f"{kept} finished layers kept" in err
    assert not lock_path(out, run_id).exists()
    rerun = _cli(ARGS + [f"out={out}"])
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert f"({kept} already written)" in err
    assert_same(read(out, run_id), baseline)


READER = r"""
import json, subprocess, sys, time
from pathlib import Path
import curvdist
from curvdist.io.summary import summary
from curvdist.io.verify import verify
out, stop, top_k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
# layers with status ok whose direction rows are not exactly k = 1..min(top_k, m, n), and directions of no layer
SQL = (f"select l.layer from layers l left join (select run_id, layer, count(*) c, min(k) lo, max(k) hi "
       f"from directions group by all) d using (run_id, layer) where l.status = 'ok' and "
       f"(coalesce(d.c, 0) != least({top_k}, l.m, l.n) or d.lo != 1 or d.hi != d.c) "
       f"union all select layer from directions anti join layers using (run_id, layer)")
report = {"polls": 0, "cli_polls": 0, "errors": [], "bad": [], "counts": [], "commits": [], "writing": 0}
def check(n, c, bad):
    report["counts"].append(n)
    report["commits"].append(c)
    report["bad"] += bad
last = False
while not last:
    last = stop.exists()
    if not (out / "_curvdist.json").exists():
        time.sleep(0.05)
        continue
    r = subprocess.run([sys.executable, "-m", "curvdist", "query", str(out),
                        f"select (select count(*) from layers) n, (select count(*) from all_layers) c, ({SQL}) bad", "--format", "json"],
                       capture_output=True, text=True)
    if r.returncode:
        report["errors"].append(r.stderr[-500:])
    else:
        row = json.loads(r.stdout)[0]
        check(row["n"], row["c"], [row["bad"]] if row["bad"] else [])
        report["cli_polls"] += 1
    t = time.monotonic()
    while time.monotonic() - t < 1.0 and not last:
        try:
            con = curvdist.open(out)
            check(*con.sql("select (select count(*) from layers), count(*) from all_layers").fetchall()[0],
                  [b for (b,) in con.sql(SQL).fetchall()])
            summary(con)
            con.close()
            v = verify(out)
            report["bad"] += v.problems
            report["writing"] += any("is being written now" in w for w in v.warnings)
            report["polls"] += 1
        except Exception as e:
            report["errors"].append(repr(e))
print(json.dumps(report))
"""


def test_reader_during_a_run_sees_whole_layers_only(env, baseline, tmp_path, monkeypatch):
    """Two runs of different run ids write one out at the same time (this process, and a `curvdist run` process
    with run_id=other) while a third process polls `curvdist query`, `curvdist.open`, the summary and `verify` in
    a loop: the readers never fail and never see a layer without all its direction rows (or direction rows
    without their layer), verify finds no problem and says a run is being written; both runs end equal to an
    undisturbed run, and the dataset verifies clean.  Every stage step sleeps 1.5 s (the schedule tests' hook; the
    numbers are unchanged), so a run's commits span seconds however fast its passes compute (the exact pass of
    this tiny model takes ~0.5 s in Taylor mode: the reader, ~0.3 s a poll and ~2 s a CLI query, missed it)."""
    from curvdist.runner.spec import SLEEP_ENV
    monkeypatch.setenv(SLEEP_ENV, "1.5")   # this process's run and, through the environment, the CLI run's
    out, stop = tmp_path / "out", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(stop), "6"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT)
    other = _cli(ARGS + [f"out={out}", "run_id=other"])
    try:
        run_id = driver.main(load(f"out={out}"))
        _, other_err = other.communicate(timeout=300)
    finally:
        stop.touch()
    assert other.returncode == 0, other_err[-2000:]
    got, err = reader.communicate(timeout=120)
    assert reader.returncode == 0, err[-2000:]
    report = json.loads(got)
    assert not report["errors"], report["errors"][:3]
    assert not report["bad"], report["bad"][:10]
    assert report["cli_polls"] >= 2 and report["polls"] >= 5 and report["writing"] >= 1, report
    assert report["counts"][-1] == 2 * len(baseline[0])
    assert len(set(report["commits"])) >= 2, "the reader saw no intermediate state of the run"
    assert_same(read(out, run_id), baseline)
    assert_same(read(out, "other"), baseline)
    final = verify(out)
    assert not final.problems and not final.warnings, (final.problems, final.warnings)
