"""In-process collection: every micro-batch of ``data`` through a whole model, its error seeds back to the hooked
layers (:class:`curvdist.math.factors.StatisticsCollector`).  Pure: torch only.

    stats = collect_statistics(model, data, "cross_entropy", fisher="mc", layers=layers, seed=0)
    proj = collect_projections(model, data, "cross_entropy", layers=layers, directions={name: (U, V)})

The Ray workers run the same collector over a slice of the model instead (:mod:`curvdist.runner.worker`); both
draw their seeds from :func:`curvdist.math.sequence.error_seeds` with micro-batch keys 0, 1, 2, … in data order.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from curvdist.math import forward, losses
from curvdist.math.factors import LayerStatistics, Projections, StatisticsCollector
from curvdist.math.rowcache import RowCache
from curvdist.math.sequence import error_seeds


def run_collector(collector: StatisticsCollector, model: nn.Module, data: Iterable, loss: str, fisher: str,
         mc_samples: int, seed: int, pass_kind: str) -> None:
    """Forward every micro-batch, back-propagate its error seeds (:func:`curvdist.math.sequence.error_seeds`: the
    seed schedule both routes share; micro-batch keys 0, 1, … in data order) to the hooked layer outputs
    (``torch.autograd.grad``: parameter ``.grad`` is never touched)."""
    losses.check_loss(loss)
    losses.check_fisher(fisher)
    if mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples} must be ≥ 1")
    n_batches = 0
    with collector, torch.enable_grad():
        for b, (inputs, targets) in enumerate(data):
            collector.begin_microbatch(forward.row_mask(inputs), key=b)
            logits = forward.model_logits(model, inputs)
            n = losses.count_terms(logits, targets, loss)
            outs = collector.outputs(b)
            if not outs:
                raise RuntimeError("no selected layer output requires grad: enable grad on the layers' parameters")
            for kind, s in error_seeds(logits, targets, loss=loss, fisher=fisher, mc_samples=mc_samples, seed=seed,
                                       pass_kind=pass_kind, microbatch=b):
                collector.seed_kind(kind)
                torch.autograd.grad(logits, outs, s.to(logits.dtype), retain_graph=True, allow_unused=True)
                collector.seed_kind(None)
            del logits, outs
            collector.end_microbatch(n, key=b)
            n_batches += 1
    if n_batches == 0:
        raise ValueError("data is empty: pass at least one (inputs, targets) micro-batch")


def collect_statistics(model: nn.Module, data: Iterable, loss: str, *, fisher: str = "empirical",
                       layers: Mapping[str, nn.Module], stat_dtype: torch.dtype = torch.float32,
                       factor_budget_bytes: int | None = None, mc_samples: int = 1,
                       seed: int = 0, factor_mode: str = "dense", sketch_rank: int = 512,
                       row_cache: RowCache | None = None) -> dict[str, LayerStatistics]:
    """G (true-label seed, for every ``fisher``), C_A and C_δ (``fisher`` seeds) of every layer over ``data``,
    an iterable of ``(inputs, targets)`` micro-batches; normalised as in the module docstring.  Each factor is held
    as :func:`curvdist.math.modes.choose` decides from ``factor_mode`` and ``factor_budget_bytes``.  ``row_cache``
    keeps the rows for :func:`collect_projections` (:mod:`curvdist.math.rowcache`)."""
    col = StatisticsCollector(layers, stat_dtype=stat_dtype, factor_budget_bytes=factor_budget_bytes,
                              factor_mode=factor_mode, sketch_rank=sketch_rank, seed=seed, row_cache=row_cache)
    run_collector(col, model, data, loss, fisher, mc_samples, seed, "stats")
    return col.finalize()


def collect_projections(model: nn.Module, data: Iterable, loss: str, *, fisher: str = "empirical",
                        layers: Mapping[str, nn.Module],
                        directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                        stat_dtype: torch.dtype = torch.float32, mc_samples: int = 1,
                        seed: int = 0, bases: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                        rows: RowCache | None = None) -> dict[str, Projections]:
    """rayleigh_delta, rayleigh_A and h_sop along ``directions`` ({name: (U (K, m), V (K, n))}) without dense factors,
    and the Rayleigh–Ritz eigenvalues of sketched factors along ``bases`` ({name: {"A" | "delta": V}}).
    Uses the same ``seed`` stream as :func:`collect_statistics`, so ``rayleigh_delta`` equals diag(U C_δ Uᵀ).
    With a complete ``rows`` cache of that statistics pass (same data, seed and fisher) the rows are replayed instead
    of a second forward and backward."""
    sel = {name: mod for name, mod in layers.items() if name in directions}
    if set(directions) - set(sel):
        raise ValueError(f"directions given for unknown layers: {sorted(set(directions) - set(sel))}")
    col = StatisticsCollector(sel, stat_dtype=stat_dtype, dense=False, directions=directions,
                              bases={n: b for n, b in (bases or {}).items() if n in sel and b})
    if rows is not None and rows.complete:
        rows.replay(col)
    else:
        run_collector(col, model, data, loss, fisher, mc_samples, seed, "projections")
    return col.projections()
