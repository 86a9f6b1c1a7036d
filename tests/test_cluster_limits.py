"""A cluster that cannot run the plan fails at once with one line (never hangs): an unreachable Ray address, more
stages than the joined cluster's CPUs, more stages than GPUs.  Real processes: the CLI and a real Ray head."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).parents[1]
BASE = ["model.name=tiny-gpt2", "data.source=synthetic", "data.sequences=4", "data.seq_len=16", "plots=false"]


def cli(args, tmp_path, timeout=120):
    env = dict(os.environ, CURVDIST_CACHE=str(tmp_path / "cache"), RAY_AUTH_MODE="disabled")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "curvdist", "run", str(ROOT / "configs" / "tiny-gpt2.yaml"), *BASE,
                        f"out={tmp_path / 'out'}", *args], env=env, capture_output=True, text=True, timeout=timeout)
    return p, time.monotonic() - t0


def one_error_line(p) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address,within", [("127.0.0.1:{port}", 60), ("10.255.255.1:6379", 60)])
def test_unreachable_ray_address_fails_fast(tmp_path, address, within):
    """Nothing listens (connection refused) or nothing answers (a blackhole address: the 5 s connect timeout)."""
    p, elapsed = cli([f"ray.address={address.format(port=free_port())}"], tmp_path)
    line = one_error_line(p)
    assert "cannot reach the Ray cluster" in line and "ray.address" in line
    assert elapsed < within          # a stated bound: 5 s connect timeout + start-up, not Ray's minutes of retries
    assert not (tmp_path / "out").exists()


def test_more_stages_than_gpus_fails_at_once(tmp_path):
    p, _ = cli(["device=cuda", "stages=2", "ray.num_cpus=2"], tmp_path)
    line = one_error_line(p)
    assert "0 GPUs but 2 stages" in line and "lower `stages`" in line
    assert not (tmp_path / "out").exists()


def test_more_stages_than_cpus_of_a_joined_cluster_fails_at_once(tmp_path):
    port = free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # its own temp dir (short: Unix socket paths are limited), so that its ray_current_cluster file does not make
    # later ray.init() calls of this machine try to join it after it is gone
    temp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    head = subprocess.Popen([ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             f"--temp-dir={temp}",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"],
                            env=dict(os.environ, RAY_AUTH_MODE="disabled"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        p, _ = cli([f"ray.address=127.0.0.1:{port}", "stages=2", "ray.cpus_per_stage=1"], tmp_path)
        line = one_error_line(p)
        assert "1 CPUs but 2 stages" in line and "ray.cpus_per_stage" in line
        assert not (tmp_path / "out").exists()
    finally:   # the head's processes share its session: stop them all
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        shutil.rmtree(temp, ignore_errors=True)
