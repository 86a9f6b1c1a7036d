"""A Ray node that holds a stage actor leaves the cluster mid-run, on a real multi-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: a head with no CPUs for the driver, worker nodes of 1 CPU each as separate raylets,
all on 127.0.0.1).  With a spare node the run finishes there with the numbers of an undisturbed run; without one it
stops after ``ray.node_wait_s`` with one line naming what is missing, finished layers kept, and a rerun once a node
has joined ends equal.  The node to remove is the one whose stage reached a ``CURVDIST_FAULT`` point (the stage
writes its node id there).  These tests start their own cluster: they never touch another Ray."""
import json
import os
import threading
import time
from pathlib import Path

import pytest
from test_faults import ARGS, assert_same, read

from curvdist import config as C
from curvdist.io import query
from curvdist.runner import driver
from curvdist.runner.supervise import CapacityLost

pytestmark = [pytest.mark.ray, pytest.mark.slow]

YAML = str(Path(__file__).parents[1] / "configs" / "tiny-gpt2.yaml")
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}


def load(*extra):
    return C.load_config(YAML, [*ARGS, "ray.node_wait_s=15", *extra])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        pytest.skip("another Ray is connected in this process")
    saved = {k: os.environ.get(k) for k in ("CURVDIST_CACHE", "CURVDIST_FAULT", "RAY_AUTH_MODE")}
    os.environ["CURVDIST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                      "include_dashboard": False})
    for _ in range(2):
        c.add_node(**NODE)
    c.wait_for_nodes()
    # ray.init turns a 127.0.0.1 address into this machine's outward IP unless it believes that it runs a
    # single-machine cluster; the nodes listen on loopback only
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address=c.address, log_to_driver=False, _node_ip_address="127.0.0.1")
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = True
    yield c
    ray.shutdown()
    c.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def baseline(cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    return read(out, driver.main(load(f"out={out}")))


def remover(cluster, marker: Path, timeout=240.0) -> dict:
    """In a thread: wait for the stage at the fault point to announce itself, then remove its node."""
    done: dict = {}

    def run():
        deadline = time.monotonic() + timeout
        while not marker.with_suffix(".pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        node_id = marker.with_suffix(".node").read_text()
        node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
        cluster.remove_node(node)
        done["node"] = node_id

    done["thread"] = threading.Thread(target=run, daemon=True)
    done["thread"].start()
    return done


def run_with_fault(fault: str, *args):
    os.environ["CURVDIST_FAULT"] = fault
    try:
        return driver.main(load(*args))
    finally:
        os.environ.pop("CURVDIST_FAULT", None)


def alive_nodes() -> set[str]:
    import ray
    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_node_lost_with_spare_capacity_finishes_equal(cluster, baseline, tmp_path):
    cluster.add_node(**NODE)           # a spare node: 3 CPUs for 2 stages of 1 CPU
    cluster.wait_for_nodes()
    faults = tmp_path / "faults"
    faults.mkdir()
    removed = remover(cluster, faults / "stats-stage1")
    run_id = run_with_fault(f"1:stats:{faults}", f"out={tmp_path / 'out'}")
    removed["thread"].join(60)
    assert removed.get("node") and removed["node"] not in alive_nodes()
    result = read(tmp_path / "out", run_id)
    assert json.loads(result[2]["timings_json"])["stage_restarts"] == 1
    assert_same(result, baseline)


def test_node_lost_without_capacity_stops_then_resumes_equal(cluster, baseline, tmp_path):
    """Both nodes hold a stage: the node of stage 1 leaves while stage 1 hands over its exact rows (stage 0's are
    committed: the last stage's come last), the replacement finds no room, the run stops after ray.node_wait_s with finished layers kept; a
    node joins, and the rerun measures only what is missing and ends equal."""
    import ray
    assert ray.cluster_resources().get("CPU") == 2
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    removed = remover(cluster, faults / "rows-exact-stage1")
    t0 = time.monotonic()
    with pytest.raises(CapacityLost) as e:
        run_with_fault(f"1:rows-exact:{faults}", f"out={out}")
    waited = time.monotonic() - t0
    removed["thread"].join(60)
    msg = str(e.value)
    assert "stage actor(s) [1]" in msg and "within 15 s (ray.node_wait_s)" in msg, msg
    assert "bundle(s) [1]" in msg and "without a node" in msg and "rerun the same command" in msg, msg
    assert waited >= 15
    run_id = C.resolve_run_id(load(f"out={out}"))
    kept = query.done_layers(out, run_id)
    assert 0 < len(kept) < len(baseline[0])
    cluster.add_node(**NODE)           # capacity comes back
    cluster.wait_for_nodes()
    assert driver.main(load(f"out={out}")) == run_id
    assert_same(read(out, run_id), baseline)
