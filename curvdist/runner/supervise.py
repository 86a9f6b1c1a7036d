"""Stage actors that die are replaced, and the work they lost is replayed.

    stages = WorkerPool(start_actor, n, max_restarts=3)
    stages.run("loading", lambda actors: ray.get([a.info.remote() for a in actors]))
    stages.run("group 1", run_group)         # run_group(actors) does one group's passes and writes its rows

A step is a function of the current actor list.  When it fails with a Ray error, every actor is pinged: the dead
ones (SIGKILL, OOM killer, a lost node) are replaced by fresh actors in the same placement-group bundle, which
reload their slice of the checkpoint; the live ones drop the step's partial state (:meth:`Worker.reset`);
then the step runs again from its start.  A step must therefore be replayable: the driver's group step re-reads
which layers are already written, so rows written before the failure are neither lost nor duplicated.  An error
with no dead actor (a bug, bad input inside a task) is raised unchanged.

Also here: the resume bookkeeping of a dataset (parts that a killed driver left without their ``layers`` commit
record are dropped before a rerun) and a fast reachability check of a Ray address.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from curvdist.io import store

console = Console(stderr=True)


PING_TIMEOUT_S = 120.0   # a worker that answers no ping for this long after a failure is treated as dead


class ClusterError(RuntimeError):
    """The Ray cluster cannot run this plan (too few CPUs/GPUs, placement timed out) or its actors kept dying;
    the CLI reports it in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and Kubernetes send before a kill, on preemption or at the time limit): handled like
    Ctrl-C (workers stopped, finished layers kept), and the CLI exits with :data:`EXIT_TERMINATED`."""


EXIT_TERMINATED = 143   # 128 + SIGTERM, the shell's convention; Ctrl-C exits 130


def raise_terminated(signum, frame) -> None:
    """The SIGTERM handler of ``curvdist run``: raise :class:`Terminated` in the main thread.  Further SIGTERMs
    are ignored so that stopping the workers is not cut short (a scheduler sends SIGKILL after its grace time)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


class StageFailure(ClusterError):
    """Stage actors kept dying: more replacements were needed than ``ray.max_restarts`` allows."""


class CapacityLost(ClusterError):
    """Replacements of dead stage actors found no room (their node left the cluster and none came back) within
    ``ray.node_wait_s``."""


class WorkerPool:
    """The stage actors of one run, with replacement of dead ones (at most ``max_restarts`` in the run).

    A replacement starts in its slot's placement-group bundle.  When the dead actor's node left the cluster, Ray
    reschedules that bundle onto a node with room (a remaining one, or one that joins later), and the replacement
    waits for it: at most ``wait_s``, then :class:`CapacityLost` says what is missing (``missing()``: a line about
    the unplaced bundles) and how to resume."""

    def __init__(self, start: Callable[[int], Any], n: int, *, max_restarts: int = 3, wait_s: float = 600.0,
                 missing: Callable[[], str] = lambda: ""):
        self._start = start
        self.actors = [start(i) for i in range(n)]
        self.max_restarts = max_restarts
        self.wait_s = wait_s
        self._missing = missing
        self.restarts: list[dict] = []

    def run(self, what: str, step: Callable[[list], Any]) -> Any:
        import ray

        while True:
            try:
                return step(self.actors)
            except ray.exceptions.RayError as e:
                dead = self.dead()
                if not dead:
                    raise
                if len(self.restarts) + len(dead) > self.max_restarts:
                    raise StageFailure(
                        f"stage actor(s) {dead} died during {what} after {len(self.restarts)} replacement(s) in this "
                        f"run (ray.max_restarts={self.max_restarts}); finished layers are kept: check the workers' "
                        f"memory and logs (/tmp/ray/session_latest/logs), then rerun the same command to resume"
                    ) from e
                for i in dead:
                    console.print(f"[yellow]stage {i} died during {what} ({type(e).__name__}); starting a "
                                  f"replacement and replaying {what}[/]", soft_wrap=True)
                    ray.kill(self.actors[i], no_restart=True)
                    self.actors[i] = self._start(i)
                    self.restarts.append({"stage": i, "during": what, "at": time.time()})
                alive = [a for i, a in enumerate(self.actors) if i not in dead]
                ray.get([a.reset.remote() for a in alive])
                self._await(dead, what)

    def _await(self, fresh: list[int], what: str) -> None:
        """Wait at most ``wait_s`` for the replacements ``fresh`` to be placed and loaded (their first answer)."""
        import ray

        refs = {self.actors[i].ping.remote(): i for i in fresh}
        _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.wait_s)
        if pending:
            late = sorted(refs[r] for r in pending)
            console.print(f"[yellow]stage(s) {late}: no replacement running after {self.wait_s:g} s[/]")
            raise CapacityLost(
                f"stage actor(s) {late} lost during {what} could not be restarted within {self.wait_s:g} s "
                f"(ray.node_wait_s): {self._missing() or 'their replacements did not start'}; finished layers "
                "are kept: add nodes (or raise ray.node_wait_s for nodes that take longer to return), then rerun "
                "the same command to resume")

    def dead(self) -> list[int]:
        """Indices of the actors whose process is gone.  A live actor answers after the calls queued before the
        ping (each actor runs its calls in order), so this also waits for the failed step's leftovers."""
        import ray

        out = []
        for i, a in enumerate(self.actors):
            try:
                ray.get(a.ping.remote(), timeout=PING_TIMEOUT_S)
            except ray.exceptions.RayActorError:
                out.append(i)
            except ray.exceptions.GetTimeoutError:   # alive but stuck (a collective whose peer died): replace it
                out.append(i)
        return out

    def kill(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:   # already gone
                pass


def drop_orphans(out: str | Path, run_id: str) -> list[Path]:
    """Remove what a killed writer left behind for ``run_id``: hidden temporary files, and ``directions`` /
    ``spectra`` parts whose ``layers`` part (written last, the commit record) is missing.  Those layers are not
    counted as done, so the rerun recomputes them; without this their rows would be duplicated."""
    out = Path(out)
    committed = {p.name for p in _parts(store.partition_dir(out, "layers", run_id))}
    removed = []
    for table in store.TABLES:
        d = store.partition_dir(out, table, run_id)
        if not d.is_dir():
            continue
        for p in d.iterdir():
            orphan = table in ("directions", "spectra") and p.suffix == ".parquet" and p.name not in committed
            if p.name.startswith(".tmp-") or (orphan and not p.name.startswith(".")):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def fault_point(fault: str | None, stage: int | str, point: str) -> None:
    """Fault injection for the kill tests (``tests/test_faults.py``), inert unless the driver was started with
    ``CURVDIST_FAULT=<stage>:<point>:<dir>`` (``fault`` is that value, carried by the worker's spec).  The first
    incarnation of that stage, on reaching ``point`` (``load``, ``stats``, ``spectral``, ``rows-kronecker``,
    ``rows-exact``; the driver itself is stage ``driver``, points ``written-kronecker``, ``written-exact``), writes
    its Ray node id to ``<dir>/<point>-stage<stage>.node`` (in a Ray worker), then its pid to
    ``<dir>/<point>-stage<stage>.pid``, and waits to be killed from outside (a real SIGKILL of this process, or
    the removal of its node); the replacement actor finds the marker and goes on."""
    if not fault:
        return
    want, where, directory = fault.split(":", 2)
    if want != str(stage) or where != point:
        return
    stage = want
    marker = Path(directory) / f"{point}-stage{stage}.pid"
    if marker.exists():
        return
    node = _node_id()
    if node:   # which Ray node holds this process (the node-loss tests remove that node)
        marker.with_suffix(".node").write_text(node)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marker)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:   # interruptible sleep: a SIGKILL ends it
        time.sleep(0.05)


def _node_id() -> str | None:
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:   # noqa: BLE001 - not in a Ray process
        return None


def _parts(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.suffix == ".parquet" and not p.name.startswith(".")] if d.is_dir() else []


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail within ``timeout_s`` when ``host:port`` does not accept a TCP connection (``ray.init`` would retry
    for a long time).  ``auto`` and ``ray://`` client addresses are left to Ray."""
    if address in ("auto", "local") or "://" in address and not address.startswith("ray://"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray.address {address!r} is not host:port (e.g. 10.0.0.1:6379, or 'auto' on a node of "
                         "the cluster); fix ray.address, or set it to null to start a local Ray")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address} within {timeout_s:g} s ({e.strerror or e}); "
                              "check ray.address and that `ray start --head` runs there, or set ray.address to null "
                              "for a local Ray") from None
