"""One Ray cluster and one set of stage actors, kept across the checkpoints of a trajectory.

    with Session(cfg, plans) as session:            # nothing started yet
        for cfg_k, ckpt_k, todo_k in checkpoints:
            load = session.load(cfg_k, ckpt_k, todo_k)   # first: Ray, placement, actors; later: weights only
            session.pool.run("group 1/1", step)          # the measurement of checkpoint k on the same actors

Why: the checkpoints of a training run differ only in their weights.  Starting Ray, placing the workers, importing
transformers, building every stage module and tokenizing the data again per checkpoint costs more than measuring a
small model, and on a large one it repeats the placement wait.  So the first checkpoint that has work starts the
stage actors (each builds its stage from that checkpoint, :class:`curvdist.runner.worker.Worker`); every later one
only sends each actor the next checkpoint's :class:`~curvdist.runner.spec.WorkerSpec`, and the actor reads its own
parameters of that checkpoint into the module it already holds (:meth:`Worker.load_weights`: weights-only reads, as
at start).  The stage plan is the first checkpoint's: a trajectory has one architecture
(:func:`curvdist.runner.trajectory.same_architecture` refuses anything else before Ray starts).

A stage actor that dies is replaced from the spec of the checkpoint measured at that moment (it builds its stage
from that checkpoint), so replacement and replay (:mod:`curvdist.runner.supervise`) work as in a single run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from curvdist import config as C
from curvdist.runner import cluster, transport
from curvdist.runner.plan import StagePlan
from curvdist.runner.spec import WorkerSpec
from curvdist.runner.supervise import WorkerPool


@dataclass(frozen=True)
class Load:
    """How one checkpoint's weights reached the stage actors."""
    kind: str                    # "full": Ray, placement and actors started, every stage built; "weights": swapped in
    load_s: float                # the driver's wall time of the load step (actors built, or weights swapped in)
    setup_s: float               # full: Ray start + placement + load_s; weights: load_s
    first_setup_s: float         # the session's full set-up (its first checkpoint with work), for comparison
    weights_s: tuple[float, ...] = ()   # weights: each worker's own read-and-copy time

    def timings(self) -> dict:
        out = {"setup": self.kind, "load_s": self.load_s, "setup_s": self.setup_s,
               "first_setup_s": self.first_setup_s}
        if self.weights_s:
            out["weights_s"] = [round(s, 4) for s in self.weights_s]
        return out


class Session:
    """The cluster, the placement, the stage actors and the stage-to-stage link of one or more measurements that
    share a stage plan; :meth:`close` (or leaving the ``with`` block) stops the actors and frees the placement."""

    def __init__(self, cfg: C.RunConfig, plans: list[StagePlan]):
        self.cfg, self.plans = cfg, plans
        self.device = cluster.device_of(cfg)
        self.placement: cluster.Placement | None = None
        self.link: transport.Link | None = None
        self.pool: WorkerPool | None = None
        self.specs: list[WorkerSpec] = []
        self.batches: list | None = None   # the evaluation batch, tokenized once (a trajectory has one dataset)
        self.start_s = 0.0
        self.first_setup_s: float | None = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> cluster.Placement:
        """Ray (a local cluster unless ``ray.address``) and the placement group, once."""
        if self.placement is None:
            t0 = time.perf_counter()
            cpus, gpus = cluster.start_ray(self.cfg)
            self.placement = cluster.place(self.cfg, stages=len(self.plans), device=self.device, cpus=cpus,
                                           gpus=gpus)
            self.link = transport.Link(self.placement.transport)
            self.start_s = time.perf_counter() - t0
        return self.placement

    def load(self, cfg: C.RunConfig, ckpt, todo: dict[int, list[str]]) -> Load:
        """Bring checkpoint ``ckpt`` onto the stage actors, each told the layers ``todo`` of its stage: start them
        (the first time), else swap the weights in."""
        import ray

        placement = self.start()
        self.specs = cluster.worker_specs(cfg, ckpt, self.plans, todo, self.device, placement)
        t0 = time.perf_counter()
        if self.pool is None:
            self.pool = WorkerPool(cluster.worker_starter(lambda i: self.specs[i], placement), placement.workers,
                                   max_restarts=cfg.ray.max_restarts, wait_s=cfg.ray.node_wait_s,
                                   missing=lambda: cluster.missing(placement))
            self.pool.run("loading", lambda actors: ray.get([a.info.remote() for a in actors]))
            load_s = time.perf_counter() - t0
            self.first_setup_s = self.start_s + load_s
            return Load("full", load_s, self.first_setup_s, self.first_setup_s)
        secs = self.pool.run("loading weights", lambda actors: ray.get(
            [a.load_weights.remote(self.specs[i]) for i, a in enumerate(actors)]))
        load_s = time.perf_counter() - t0
        return Load("weights", load_s, load_s, self.first_setup_s, tuple(secs))

    @property
    def restarts(self) -> int:
        return len(self.pool.restarts) if self.pool is not None else 0

    def close(self) -> None:
        """Stop the actors, drop the link and free the placement (Ray itself stays up); idempotent."""
        if self.link is not None:
            self.link.close()
        if self.pool is not None:
            self.pool.kill()
        cluster.release(self.placement)
        self.link, self.pool, self.placement = None, None, None
