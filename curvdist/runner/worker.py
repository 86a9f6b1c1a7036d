"""The stage worker: a slice of the checkpoint, its layers' statistics, spectral work, rows and exact curvature.

``Worker`` is a plain class (no Ray import) so that the same code runs as a Ray actor (``ray.remote(Worker)``, see
:mod:`curvdist.runner.driver`) and in-process in tests.  It is built from one frozen
:class:`curvdist.runner.spec.WorkerSpec` and runs the shared measurement sequence
(:mod:`curvdist.math.sequence`).  The schedule (:mod:`curvdist.runner.schedule`) sends, per micro-batch ``b``:

    forward:   y = stage_j.forward(b, x)              j = 0 .. S-2   (x: input ids or the previous stage's y)
    loss:      msg = last.loss_backward(b, y, targets)    (forward, loss, every seed back to its input; msg: the
                                                          seeds' gradients and N_b, the micro-batch's loss terms)
    backward:  msg = stage_j.backward(b, msg)             j = S-2 .. 0  (closes micro-batch b on stage j)

Several micro-batches may be in flight on one stage (the 1F1B schedule runs the forwards of later micro-batches
before the backward of an earlier one); the statistics collector keeps their rows apart by micro-batch.  Error
seeds come from :func:`curvdist.math.sequence.measurement_seeds`, a function of the micro-batch index alone, so any
schedule and any number of replicas give the numbers of the in-process route.  At the end of a pass the R
replicas of this stage add their sums (:mod:`curvdist.runner.collective`) before anything is normalised.  The
statistics pass keeps its rows within ``spec.row_cache_bytes`` (:mod:`curvdist.math.rowcache`); the projections pass
replays them, with no call per micro-batch, when the driver finds that every worker holds all of its own.
Tensors travel between stages as the run's transport carries them (:mod:`curvdist.runner.transport`): NumPy
arrays through Ray's object store (bfloat16 widened to float32 and cast back), or tensors actor to actor.
"""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from curvdist.io import checkpoint
from curvdist.io.slice import build_slice, reload_weights
from curvdist.math import families, forward, losses
from curvdist.math.factors import StatisticsCollector
from curvdist.math.rowcache import RowCache
from curvdist.math.sequence import assemble_rows, exact_layer_names, measurement_seeds, spectral_steps
from curvdist.runner import transport
from curvdist.runner.collective import ReplicaGroup, free_port
from curvdist.runner.spec import WorkerSpec
from curvdist.runner.supervise import fault_point
from curvdist.runner.tangents import ExactSteps

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass(frozen=True)
class PassReport:
    """What a worker says at the end of a pass: its busy time (inside forward/backward calls) and the pass's
    length on this worker, for the busy fraction busy / (wall × workers) the driver records."""
    stage: int
    replica: int
    kind: str
    busy_s: float
    wall_s: float
    microbatches: int


@dataclass(frozen=True)
class RowCacheState:
    """What a worker's row cache holds before the projections pass (:meth:`Worker.row_cache`): ``complete`` when
    every row of its statistics pass is kept, so that the pass can be replayed; else ``reason`` says why not."""
    stage: int
    replica: int
    complete: bool
    nbytes: int
    reason: str = ""


@dataclass(frozen=True)
class WorkerInfo:
    stage: int
    replica: int
    layers: tuple[str, ...]
    loaded_tensors: tuple[str, ...]
    device: str
    pid: int
    peak_rss_bytes: int
    peak_device_bytes: int | None
    timings: dict = field(default_factory=dict)
    checkpoint: str = ""              # the checkpoint whose weights the worker holds now
    weight_loads: int = 0             # checkpoints swapped in after the first (Worker.load_weights)


@dataclass(frozen=True)
class StageRows:
    """A stage's output rows (replica 0 only; the other replicas return empty lists)."""
    layers: list[dict]
    directions: list[dict]
    spectra: list[dict]


class Worker(ExactSteps):
    """Holds blocks ``spec.first_block .. spec.last_block`` of the checkpoint and the statistics of its layers."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.m = spec.measurement
        torch.set_num_threads(max(1, spec.threads))
        self.device = torch.device(spec.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = DTYPES[spec.dtype]
        self.stat_dtype = DTYPES[spec.stat_dtype]
        t0 = time.perf_counter()
        index = checkpoint.CheckpointIndex.open(spec.checkpoint, spec.config_json)
        fault_point(spec.fault, spec.stage, "load")
        self.module = build_slice(index, spec.first_block, spec.last_block, has_embedding=spec.has_embedding,
                                  has_head=spec.has_head, dtype=self.dtype, device=self.device,
                                  attn_implementation=spec.attn_implementation)
        for p in self.module.parameters():
            p.requires_grad_(True)   # so that layer outputs carry a graph; gradients are taken w.r.t. outputs only
        self.family = index.family
        self._all_layers = families.select_layers(self.module, None, self.family)
        self.loaded_tensors = tuple(getattr(self.module, "loaded_tensors", ()))
        self.timings: dict[str, float] = {"load_s": time.perf_counter() - t0}
        self.weight_loads = 0
        self.group = ReplicaGroup(1, self.device)
        self.collector: StatisticsCollector | None = None
        self.rows: RowCache | None = None   # the statistics pass's rows, until the projections pass begins
        self._pass = ""
        self.reset()
        self.set_layers(list(spec.layers))

    #: spec fields a weight swap keeps: they fix the module this worker built (the rest may change per checkpoint)
    SLICE_FIELDS = ("stage", "stages", "replica", "replicas", "first_block", "last_block", "has_embedding",
                    "has_head", "dtype", "device", "attn_implementation", "threads", "transport", "collective")

    def load_weights(self, spec: WorkerSpec) -> float:
        """Measure another checkpoint of the same architecture (a trajectory): read its weights for this stage
        only (weights-only, as at start) into the module built at start, take ``spec`` (its layers and factor
        modes) and forget every result of the previous checkpoint.  Returns the seconds the weights took.  A no-op
        read when ``spec`` names the checkpoint already held (a replayed load after another worker's
        replacement)."""
        changed = [f for f in self.SLICE_FIELDS if getattr(spec, f) != getattr(self.spec, f)]
        if changed:
            raise ValueError(f"stage {self.spec.stage}: a weight swap cannot change {', '.join(changed)} "
                             f"(the stage module is kept); start a new measurement for another layout")
        t0 = time.perf_counter()
        if (spec.checkpoint, spec.config_json) != (self.spec.checkpoint, self.spec.config_json):
            index = checkpoint.CheckpointIndex.open(spec.checkpoint, spec.config_json)
            if index.family != self.family:
                raise ValueError(f"stage {spec.stage}: checkpoint {spec.checkpoint} is a {index.family} model, "
                                 f"the stage holds a {self.family}; measure it as a separate trajectory")
            reload_weights(self.module, index, dtype=self.dtype, device=self.device)
            self.loaded_tensors = tuple(self.module.loaded_tensors)
            self.weight_loads += 1
        self.spec = spec
        self.m = spec.measurement
        self.reset()
        self.set_layers(list(spec.layers))
        self.timings = {"load_s": self.timings["load_s"], "weights_s": time.perf_counter() - t0}
        return self.timings["weights_s"]

    def set_layers(self, names: list[str]) -> None:
        """The layers analysed by the next passes (one group of the plan's passes); clears earlier results."""
        missing = [n for n in names if n not in self._all_layers]
        if missing:
            raise ValueError(f"stage {self.spec.stage}: layers {missing[:4]} are not in blocks "
                             f"{self.spec.first_block}..{self.spec.last_block}")
        self.layers = {n: self._all_layers[n] for n in names}
        self.spectra, self.projections, self.curvature = {}, {}, {}

    def reset(self) -> None:
        """Forget everything of the current group (hooks, cached micro-batches, partial results), so that the
        driver can replay the group from its start after another worker was replaced."""
        if self.collector is not None:
            self.collector.detach()
        self.collector, self.rows = None, None
        self._mb: dict[int, dict] = {}               # micro-batches in flight: their stage input and output
        self._inputs: dict[int, tuple] = {}          # micro-batch → (stage input, attention mask), from pass 1
        self._targets: dict[int, np.ndarray] = {}    # last stage: micro-batch → targets, from pass 1
        self._n_terms: dict[int, int] = {}           # micro-batch → loss terms, from pass 1
        self.spectra, self.projections, self.curvature = {}, {}, {}
        self._pass = ""
        self.reset_exact()

    # ------------------------------------------------------------------ info and replicas
    def ping(self) -> int:
        return os.getpid()

    def info(self) -> WorkerInfo:
        peak_dev = int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None
        return WorkerInfo(self.spec.stage, self.spec.replica, tuple(self.layers), self.loaded_tensors,
                          str(self.device), os.getpid(), peak_rss_bytes(), peak_dev, dict(self.timings),
                          self.spec.checkpoint, self.weight_loads)

    def replica_address(self) -> tuple[str, int]:
        """Rank 0 of a stage's replicas: where the others meet it (this node's address, a free port)."""
        return free_port()

    def join_replicas(self, address: str, port: int) -> int:
        """Join (or re-join, after a replacement) the process group of this stage's replicas."""
        self.group.leave()
        self.group = ReplicaGroup.join(rank=self.spec.replica, world=self.spec.replicas, address=address, port=port,
                                       device=self.device, backend=self.spec.collective)
        return self.spec.replica

    def leave_link(self) -> None:
        """Before the driver re-forms the stage-to-stage group (:class:`curvdist.runner.transport.Link`): drop a
        Gloo transport's process group, which Ray's Gloo communicator creates once per process."""
        if self.spec.transport == "gloo":
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # ------------------------------------------------------------------ statistics and projections passes
    def begin_pass(self, kind: str, replay: bool = False) -> None:
        """``kind`` = "stats" (G, C_A, C_δ, each dense or sketched as the plan says; the rows are kept within
        ``spec.row_cache_bytes``, :mod:`curvdist.math.rowcache`) or "projections" (Rayleigh quotients and h^SoP
        along the directions, and the Rayleigh–Ritz products of sketched factors).  ``replay``: the projections
        are fed the kept rows here (the same rows in the same order as the micro-batches a stream would send, so
        the same sums); the driver then streams nothing.  Either way the rows are freed here."""
        self._pass, self._busy, self._count = kind, 0.0, 0
        self._t_pass = time.perf_counter()
        if kind == "stats":
            self._inputs, self._targets, self._n_terms = {}, {}, {}
            self.rows = RowCache(self.spec.row_cache_bytes) if self.spec.row_cache_bytes > 0 else None
            self.collector = StatisticsCollector(
                self.layers, stat_dtype=self.stat_dtype, factor_budget_bytes=self.spec.factor_budget_bytes,
                factor_mode=self.spec.factor_mode, factor_modes={n: (a, d) for n, a, d in self.spec.factor_modes},
                sketch_rank=self.m.sketch_rank, seed=self.m.seed, device=self.device, row_cache=self.rows)
        else:
            dirs = {n: sp.directions for n, sp in self.spectra.items() if sp.directions is not None}
            bases = {n: self.spectra[n].bases for n in dirs if self.spectra[n].bases}
            self.collector = StatisticsCollector({n: self.layers[n] for n in dirs}, stat_dtype=self.stat_dtype,
                                                 dense=False, directions=dirs, bases=bases, device=self.device)
            state, rows, self.rows = self.row_cache(), self.rows, None
            if replay:
                if not state.complete:
                    raise RuntimeError(f"stage {self.spec.stage} replica {self.spec.replica}: cannot replay the "
                                       f"statistics pass's rows: {state.reason}")
                t0 = time.perf_counter()
                if rows.n_terms:   # a replica that got no micro-batch has nothing to replay, as nothing to stream
                    rows.replay(self.collector)
                self._busy += time.perf_counter() - t0
            del rows
        self.collector.attach()

    def row_cache(self) -> RowCacheState:
        """Whether this worker holds every row of its last statistics pass (asked by the driver before the
        projections pass: it replays only when every worker does)."""
        c, budget = self.rows, self.spec.row_cache_bytes
        if c is None:
            why = "row_cache_gb=0" if budget <= 0 else "no statistics pass since the worker started or was reset"
        else:
            why = "" if not c.overflowed else f"its rows outgrew row_cache_gb={budget / 2**30:.3g}"
        return RowCacheState(self.spec.stage, self.spec.replica, not why, 0 if c is None else c.nbytes,
                             why and f"s{self.spec.stage}r{self.spec.replica}: {why}")

    def _input(self, x) -> torch.Tensor:
        t = torch.as_tensor(x)
        if t.is_floating_point():
            return t.to(self.device, self.dtype).requires_grad_(True)
        return t.to(self.device)

    def forward(self, mb: int, x, attention_mask=None):
        """Stages 0 .. S-2: this stage's output for micro-batch ``mb`` (kept, with its graph, until backward), as
        the run's transport carries it (:func:`curvdist.runner.transport.wire`)."""
        t0 = time.perf_counter()
        y = transport.wire(self._forward(mb, x, attention_mask), self.spec.transport)
        self._busy += time.perf_counter() - t0
        return y

    def _forward(self, mb: int, x, attention_mask) -> torch.Tensor:
        if self.spec.sleep_s:   # schedule tests: the stage's compute replaced by a fixed time
            time.sleep(self.spec.sleep_s)
        if self._pass == "stats":   # the exact pass reuses every stage's inputs: no upstream recomputation
            self._inputs[mb] = (transport.host_copy(x), None if attention_mask is None else np.array(attention_mask))
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(self.device)
        xt = self._input(x)
        self.collector.begin_microbatch(mask, key=mb)
        with torch.enable_grad(), forward.second_order_attention():
            y = self.module(xt, attention_mask=mask)
        self._mb[mb] = {"x": xt, "y": y}
        return y

    def _grad(self, mb: int, y: torch.Tensor, grad_y: torch.Tensor, kind: str):
        outs = self.collector.outputs(mb)
        x = self._mb[mb]["x"]
        wrt = outs + ([x] if x.is_floating_point() and x.requires_grad else [])
        if not wrt:
            return None
        self.collector.seed_kind(kind)
        grads = torch.autograd.grad(y, wrt, grad_y.to(y.dtype), retain_graph=True, allow_unused=True)
        self.collector.seed_kind(None)
        gx = grads[-1] if wrt[-1] is x else None
        return None if gx is None else transport.wire(gx, self.spec.transport)

    def loss_backward(self, mb: int, x, attention_mask, targets) -> dict:
        """Last stage: forward to the logits, the loss terms, and every seed back to this stage's input; closes
        micro-batch ``mb`` here.  Returns {"grads": {"<i>:<kind>": gradient of the stage input}, "n_terms": N_b}
        (one value: Ray's direct tensor transports carry single returns)."""
        t0 = time.perf_counter()
        logits = self._forward(mb, x, attention_mask)
        tgt = torch.as_tensor(targets).to(self.device)
        if self.m.gradient_labels == "sampled":   # the null run: labels drawn from the model in pass 1, then reused
            tgt = self._targets[mb] if self._pass != "stats" else losses.sampled_targets(
                logits, tgt, self.m.loss, losses.label_generator(self.m.seed, mb))
        if self._pass == "stats":
            self._targets[mb] = tgt
        n_terms = losses.count_terms(logits, tgt, self.m.loss)
        out = {f"{i}:{kind}": self._grad(mb, logits, s, kind)
               for i, (kind, s) in enumerate(measurement_seeds(logits, tgt, self.m, self._pass, mb))}
        self._close(mb, int(n_terms))
        self._busy += time.perf_counter() - t0
        return {"grads": out, "n_terms": int(n_terms)}

    def backward(self, mb: int, msg: dict) -> dict | int:
        """Stages S-2 .. 0: back-propagate every seed's gradient of this stage's output; closes micro-batch ``mb``
        (its N_b loss terms, counted on the last stage, come with the message).  Stage 0 returns N_b."""
        t0 = time.perf_counter()
        y, n_terms = self._mb[mb]["y"], int(msg["n_terms"])
        out = {key: None if g is None else self._grad(mb, y, torch.as_tensor(g).to(self.device), key.split(":")[1])
               for key, g in msg["grads"].items()}
        self._close(mb, n_terms)
        self._busy += time.perf_counter() - t0
        return {"grads": out, "n_terms": n_terms} if self.spec.stage > 0 else n_terms

    def _close(self, mb: int, n_terms: int) -> None:
        self.collector.end_microbatch(n_terms, key=mb)
        self._mb.pop(mb, None)   # this micro-batch's activations and graph are freed here
        self._count += 1
        if self._pass == "stats":
            self._n_terms[mb] = n_terms
            if self._count == 2:
                fault_point(self.spec.fault, self.spec.stage, "stats")

    def end_pass(self) -> PassReport:
        """Combine the replicas' sums, then normalise: the spectral step after statistics, the projections after
        the projections pass."""
        col, self.collector = self.collector, None
        col.detach()
        wall = time.perf_counter() - self._t_pass
        self.timings[f"{self._pass}_s"] = wall
        col.set_state(self.group.all_reduce_sum(col.state()))
        if self._pass == "stats":
            t0 = time.perf_counter()
            stats = col.finalize()
            del col
            fault_point(self.spec.fault, self.spec.stage, "spectral")
            self.spectra = spectral_steps(stats, self.m)
            self.timings["spectral_s"] = time.perf_counter() - t0
        else:
            self.projections = col.projections()
            for sp in self.spectra.values():   # the Ritz bases served their pass: free them before the exact pass
                sp.bases = {}
        return PassReport(self.spec.stage, self.spec.replica, self._pass, self._busy, wall, self._count)

    # ------------------------------------------------------------------ results
    def live_layers(self) -> list[str]:
        """Layers that get exact curvature (:func:`curvdist.math.sequence.exact_layer_names`)."""
        return exact_layer_names(self.spectra, self.m)

    def rows(self, phase: str) -> StageRows:
        """This stage's rows (replica 0; the others return none).  ``phase="kronecker"`` (after the projections
        pass): every layer, h and h^GN null, ``exact_pending`` true for the layers the exact pass will measure;
        ``phase="exact"``: those layers again, complete (they replace the Kronecker rows in the readers' views)."""
        if not self.spec.reports_rows:
            return StageRows([], [], [])
        fault_point(self.spec.fault, self.spec.stage, f"rows-{phase}")
        live = set(self.live_layers())
        if phase == "kronecker":
            spectra, curvature = self.spectra, {}
        elif phase == "exact":
            spectra = {n: sp for n, sp in self.spectra.items() if n in self.curvature}
            curvature = self.curvature
        else:
            raise ValueError(f"phase {phase!r} is not kronecker or exact")
        layers, directions, spectra_rows = assemble_rows(
            spectra, self.m, classify=lambda n: families.classify(n, self.family, self.module),
            projections=self.projections, curvature=curvature,
            extra=lambda n: self._row_extra(n) | {
                "phase": phase, "exact_pending": phase == "kronecker" and n in live,
                "exact_dtype": str(self._xdtype).replace("torch.", "") if phase == "exact" else None})
        return StageRows(layers, directions, spectra_rows if phase == "kronecker" else [])

    def _row_extra(self, name: str) -> dict:
        return {"family": self.family, "stage": self.spec.stage, "device": str(self.device),
                "t_factors_s": self.timings.get("stats_s"), "t_spectral_s": self.timings.get("spectral_s"),
                "t_exact_s": self.timings.get("exact_s")}
