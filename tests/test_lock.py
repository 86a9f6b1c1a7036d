"""The run lock (curvdist.io.lock): one writer per (out, run id), stale locks of dead writers taken over, other run
ids free.  Real processes and real files; the CLI-level refusal of a second `curvdist run` is in
tests/test_faults.py::test_second_writer_refused_then_sigterm_keeps_finished_layers."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from curvdist.io import lock as L


def test_second_writer_of_the_same_run_id_is_refused(tmp_path):
    with L.run_lock(tmp_path, "r1"):
        owner = json.loads(L.lock_path(tmp_path, "r1").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname() and owner["run_id"] == "r1"
        with pytest.raises(L.RunLocked) as e:
            L.RunLock(tmp_path, "r1").acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and "another out or run_id" in msg
        with L.run_lock(tmp_path, "r2"):          # another run id in the same out: no conflict
            assert L.lock_path(tmp_path, "r2").exists()
        assert not L.lock_path(tmp_path, "r2").exists()
    assert not L.lock_path(tmp_path, "r1").exists()


def test_lock_of_a_sigkilled_writer_is_taken_over(tmp_path):
    code = ("import sys, time; from curvdist.io.lock import RunLock; RunLock(sys.argv[1], 'r').acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(L.RunLocked):           # alive: refused
        L.RunLock(tmp_path, "r").acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with pytest.warns(L.StaleLockWarning, match=f"pid {proc.pid} on host .*: process {proc.pid} is no longer "):
        lk = L.RunLock(tmp_path, "r").acquire()
    assert json.loads(lk.path.read_text())["pid"] == os.getpid()
    lk.release()
    assert not lk.path.exists()


def _plant(out, **owner):
    rec = {"run_id": "r", "host": socket.gethostname(), "pid": os.getpid(), "pid_start": None,
           "started_at": "2026-01-01T00:00:00+00:00"} | owner
    L.lock_path(out, "r").write_text(json.dumps(rec))
    return L.lock_path(out, "r")


def test_lock_of_another_host_is_stale_only_when_its_heartbeat_stopped(tmp_path):
    path = _plant(tmp_path, host="node-elsewhere", pid=1)
    with pytest.raises(L.RunLocked, match="node-elsewhere"):
        L.RunLock(tmp_path, "r").acquire()
    old = time.time() - L.STALE_OTHER_HOST_S - 60
    os.utime(path, (old, old))
    with pytest.warns(L.StaleLockWarning, match="heartbeat stopped"):
        L.RunLock(tmp_path, "r").acquire().release()


def test_lock_of_an_earlier_incarnation_of_a_requeued_slurm_job_is_stale(tmp_path, monkeypatch):
    _plant(tmp_path, host="node-elsewhere", pid=1, job="4242")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(L.RunLocked):            # another job's live lock
        L.RunLock(tmp_path, "r").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with pytest.warns(L.StaleLockWarning, match="earlier incarnation of SLURM job 4242"):
        L.RunLock(tmp_path, "r").acquire().release()


def test_slurm_script_is_valid_bash_without_ray_stop_address():
    """launch/slurm.sbatch parses, requeues itself, and no longer calls `ray stop --address` (not a ray option)."""
    import pathlib
    script = pathlib.Path(__file__).parents[1] / "launch" / "slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "ray stop --address" not in text and "#SBATCH --requeue" in text and "scontrol requeue" in text


def test_reused_pid_is_stale(tmp_path):
    _plant(tmp_path, pid_start="1")      # our own pid, but a process that started at another time
    with pytest.warns(L.StaleLockWarning, match="pid now belongs to another process"):
        L.RunLock(tmp_path, "r").acquire().release()


def test_heartbeat_touches_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    with L.run_lock(tmp_path, "r") as lk:
        old = time.time() - 1000
        os.utime(lk.path, (old, old))
        deadline = time.monotonic() + 10
        while lk.path.stat().st_mtime < old + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lk.path.stat().st_mtime > old + 1


def test_a_run_that_wrote_nothing_leaves_no_directory(tmp_path):
    out = tmp_path / "new" / "out"
    with L.run_lock(out, "r"):
        assert out.is_dir()
    assert not out.exists()


def test_verify_during_a_run_does_not_call_its_commits_in_flight_leftovers(tmp_path):
    from curvdist.io import store
    from curvdist.io.verify import verify
    store.write_result(tmp_path, "r", "p1", {"layers": [{"layer": "a", "status": "ok", "m": 2, "n": 2}],
                                             "directions": {"layer": ["a"] * 2, "k": [1, 2]}})
    store.write_part(tmp_path, "directions", "r", "p2", {"layer": ["b"], "k": [1]})   # a commit in flight
    with L.run_lock(tmp_path, "r"):
        rep = verify(tmp_path)
        assert not rep.problems
        assert [w for w in rep.warnings if "orphan" in w or "interrupted" in w] == []
        assert any(f"run r is being written now (pid {os.getpid()}" in w for w in rep.warnings), rep.warnings
    rep = verify(tmp_path)                        # the writer is gone: now they are an interrupted write's
    assert any("orphan rows" in w for w in rep.warnings) and any("no runs row" in w for w in rep.warnings)
