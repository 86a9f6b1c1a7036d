"""What the driver hands a stage worker: one frozen, typed object built once from the run config and the plan.

    spec = WorkerSpec.build(cfg, ckpt, plan.stages[1], replica=0, replicas=2, layers=[...], device="cpu", threads=2)
    Worker(spec)          # in-process (tests) or ray.remote(Worker) (the driver)

The worker reads every setting from here and states no default of its own: the defaults live in
:mod:`curvdist.config` only.  ``measurement`` is the same :class:`curvdist.math.sequence.Measurement` that the
in-process route builds, so both routes run one measurement sequence.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from curvdist.config import RunConfig
from curvdist.math.sequence import Measurement
from curvdist.runner.plan import StagePlan

# environment variables of the test hooks (inert unless set; read by the driver, carried by the spec)
FAULT_ENV = "CURVDIST_FAULT"          # <stage>:<point>:<dir>: that stage waits to be killed at <point>
SLEEP_ENV = "CURVDIST_STAGE_SLEEP"    # seconds: every forward step of every stage sleeps that long (schedule tests)


def measurement(cfg: RunConfig) -> Measurement:
    """The run's :class:`Measurement` (what is measured, not where)."""
    return Measurement(loss=cfg.loss, fisher=cfg.fisher, mc_samples=cfg.mc_samples, top_k=cfg.top_k,
                       seed=cfg.data.seed, exact=cfg.exact, gn=cfg.gn,
                       exact_layers=tuple(cfg.exact_layers) if cfg.exact_layers is not None else None,
                       gradient_labels=cfg.gradient_labels, exact_dtype=cfg.exact_dtype,
                       sketch_rank=cfg.sketch_rank)


@dataclass(frozen=True)
class WorkerSpec:
    """One stage worker: which slice of which checkpoint, which layers, on what device, measuring what."""

    checkpoint: str                   # the safetensors or DeepSpeed directory (every worker reads only its tensors)
    stage: int                        # position in the pipeline, 0 .. stages-1
    stages: int
    replica: int                      # which copy of the pipeline, 0 .. replicas-1 (replica 0 reports the rows)
    replicas: int
    first_block: int
    last_block: int                   # inclusive
    has_embedding: bool
    has_head: bool
    layers: tuple[str, ...]           # the layers this stage analyses (the driver narrows them per pass group)
    dtype: str                        # forward dtype (model.dtype)
    stat_dtype: str                   # accumulation dtype of G, C_A, C_δ
    device: str                       # "cpu" or "cuda" (a Ray GPU actor sees its own GPU as cuda:0)
    threads: int                      # torch threads of this actor
    attn_implementation: str
    factor_budget_bytes: int
    factor_mode: str                  # the policy (config factor_mode), for layers the plan gave no modes
    factor_modes: tuple[tuple[str, str | None, str | None], ...]   # (layer, mode of C_A, mode of C_δ) from the plan
    row_cache_bytes: int              # the statistics pass's rows kept for the projections pass (0: none)
    micro_batch: int                  # sequences of a full micro-batch (data.micro_batch): sizes the exact jets
    measurement: Measurement
    config_json: str | None = None    # model.config_json: a DeepSpeed checkpoint's config.json kept elsewhere
    collective: str = "gloo"          # replicas' all-reduce: nccl (a GPU per worker) or gloo (CPU, shared GPUs)
    transport: str = "object_store"   # how this worker's outputs reach the next stage (curvdist.runner.transport)
    fault: str | None = None          # test hook, see FAULT_ENV
    sleep_s: float = 0.0              # test hook, see SLEEP_ENV

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def reports_rows(self) -> bool:
        """Replicas hold identical combined statistics after the all-reduce; only replica 0 reports the rows."""
        return self.replica == 0

    @classmethod
    def build(cls, cfg: RunConfig, checkpoint, plan: StagePlan, *, stages: int, replica: int, replicas: int,
              layers, device: str, threads: int, gpus_per_worker: float = 0.0,
              transport: str = "object_store") -> WorkerSpec:
        return cls(checkpoint=str(checkpoint), stage=plan.index, stages=stages, replica=replica, replicas=replicas,
                   first_block=plan.first_block, last_block=plan.last_block, has_embedding=plan.has_embedding,
                   has_head=plan.has_head, layers=tuple(layers), dtype=cfg.model.dtype, stat_dtype=cfg.stat_dtype,
                   device=device, threads=int(threads), attn_implementation=cfg.model.attn_implementation,
                   factor_budget_bytes=int(cfg.factor_budget_gb * 2**30), factor_mode=cfg.factor_mode,
                   factor_modes=tuple((n, *plan.modes[n]) for n in layers if n in plan.modes),
                   row_cache_bytes=int(cfg.row_cache_gb * 2**30), micro_batch=int(cfg.data.micro_batch),
                   measurement=measurement(cfg),
                   config_json=cfg.model.config_json,
                   collective="nccl" if device == "cuda" and gpus_per_worker >= 1 else "gloo", transport=transport,
                   fault=os.environ.get(FAULT_ENV) or None, sleep_s=float(os.environ.get(SLEEP_ENV) or 0.0))
