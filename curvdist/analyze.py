"""The in-process measurement: :func:`analyze` runs every step of SPEC §1 on one model in one process.

    result = curvdist.analyze(model, data, loss="cross_entropy", top_k=20, fisher="empirical")
    result.layers       # pyarrow.Table, one row per layer (α, α_Kron, β, φ, χ-slope, γ, s, …, status)
    result.directions   # pyarrow.Table, one row per (layer, k)

Three passes over the evaluation batch: (1) statistics G, C_A, C_δ (dense, or Nyström sketches); (2) projected
statistics along the directions (h^SoP, Rayleigh quotients for factors not held dense, and the Rayleigh–Ritz step of
sketched factors), replayed from the rows of pass 1 when they fit :data:`curvdist.math.rowcache.ROW_CACHE_BYTES`;
(3) exact h and h^GN
by batched Hessian- and Jacobian-vector products.  The Ray runner does the same work split across stages.
Micro-batches are keyed 0, 1, 2, … in data order (their key decides their half, :mod:`curvdist.math.noise`).
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import torch
from torch import nn

from curvdist.math import families, forward
from curvdist.math.collect import collect_projections, collect_statistics
from curvdist.math.curvature import exact_curvature
from curvdist.math.losses import label_generator, sampled_targets
from curvdist.math.rowcache import ROW_CACHE_BYTES, RowCache
from curvdist.math.sequence import Measurement, assemble_rows, exact_layer_names, spectral_steps
from curvdist.vocab import DIRECTION_COLUMNS, SPECTRA_COLUMNS


@dataclass
class Result:
    """Tables of one analysis: ``layers`` (one row per layer), ``directions`` (one per layer and k),
    ``spectra`` (top eigenvalues of C_A and C_δ), and wall-clock ``timings`` per phase in seconds."""

    layers: pa.Table
    directions: pa.Table
    spectra: pa.Table
    timings: dict = field(default_factory=dict)

    def layer(self, name: str) -> dict:
        rows = [r for r in self.layers.to_pylist() if r["layer"] == name]
        if not rows:
            raise KeyError(f"no layer {name!r}; layers are {self.layers.column('layer').to_pylist()[:8]}…")
        return rows[0]


def _table(rows: list[dict], columns: list[str] | None = None) -> pa.Table:
    if not rows:
        return pa.table({c: pa.array([], pa.float64()) for c in (columns or [])})
    return pa.Table.from_pylist(rows)


def analyze(model: nn.Module, data: Iterable, loss: str = "cross_entropy", *, top_k: int = 20,
            fisher: str = "empirical", exact: bool = True, gn: bool = True, layers=None, exact_layers=None,
            dtype: torch.dtype | None = None, stat_dtype: torch.dtype | None = None,
            factor_budget_bytes: int | None = None, mc_samples: int = 1, seed: int = 0,
            gradient_labels: str = "true", exact_dtype: str = "model", factor_mode: str = "auto",
            sketch_rank: int = 512, exact_data=None) -> Result:
    """Measure every selected layer of ``model`` on the evaluation batch ``data``.

    Exact h from a subsample (issue 16): the directions need a batch much larger than the gradient noise scale,
    but h along fixed directions is a mean over micro-batches, so ``exact_data`` can be a seeded sample of
    ``data``'s micro-batches, e.g. ``{b: batches[b] for b in curvdist.math.sequence.exact_microbatches(len(batches),
    8, seed)}`` (what the Ray runner's ``data.exact_sequences`` picks).  The ``directions`` rows then carry
    ``h_se``/``h_gn_se``, their standard errors as estimates of the full-batch values, and the layer rows
    ``alpha_se_h`` (:mod:`curvdist.math.subsample`, :func:`curvdist.math.fit.summarize_layer`).

    Args:
        model: any ``nn.Module``; Hugging Face models are called with keyword inputs.
        data: iterable of ``(inputs, targets)`` micro-batches; it is read three times (materialised once).
        loss: ``"cross_entropy"`` (targets -100 ignored) or ``"mse"``, always a mean over loss terms.
        top_k: K, the number of singular directions per layer.
        fisher: error kind of C_δ: ``"empirical"`` (SPEC default), ``"mc"`` or ``"type2"``.
        exact: compute exact h (HVPs) and, with ``gn``, h^GN (JVPs); False leaves them null.
        layers: None (all supported layers) or module names / glob patterns.
        exact_layers: None (every analysed layer) or patterns of the layers that also get exact h and h^GN.
        dtype: cast the model and floating inputs to this dtype first (float64 for validation).
        stat_dtype: accumulation dtype of G, C_A, C_δ (default float64 when the model is float64, else float32).
        factor_budget_bytes: the memory one factor may take (None: unbounded).
        factor_mode: ``"dense"`` (a factor over the budget is not measured: status ``factor_too_large``),
            ``"sketch"`` (every factor a streaming Nyström sketch, :mod:`curvdist.math.sketch`) or ``"auto"``
            (dense when it fits the budget, else sketched).
        sketch_rank: Nyström columns l of a sketched factor (memory 2·d·(l + 10) numbers; ≥ top_k + 2).
        gradient_labels: ``"true"`` (the data's targets) or ``"sampled"``: every target replaced by one draw from the
            model's predictive distribution (:func:`curvdist.math.losses.sampled_targets`, seeded by ``seed`` and the
            micro-batch), so that E G = 0 — the null measurement to compare a run with.
        exact_data: the micro-batches of the exact pass (h and h^GN): None (default: ``data``), an iterable of
            ``(inputs, targets)`` or a mapping key → micro-batch (a key decides the micro-batch's half, like the
            position in ``data``); read as a simple random sample of ``data``'s micro-batches, whose number is the
            population of the standard errors.  Directions, σ and the Kronecker quantities always use ``data``.
        exact_dtype: minimum precision of the exact HVPs: ``"model"`` (the model's dtype, the in-process default),
            ``"float32"`` or ``"float64"`` (the parameters are upcast for the exact pass and restored after); the
            Ray runner defaults to float32 (config key ``exact_dtype``), since bfloat16 HVPs are off by percent.
    """
    m = Measurement(loss=loss, fisher=fisher, mc_samples=mc_samples, top_k=top_k, seed=seed, exact=exact, gn=gn,
                    exact_layers=tuple(exact_layers) if exact_layers is not None else None,
                    gradient_labels=gradient_labels, exact_dtype=exact_dtype, sketch_rank=sketch_rank)
    if dtype is not None:
        model = model.to(dtype)
    param = next(model.parameters())
    device, mdtype = param.device, param.dtype
    stat_dtype = stat_dtype or (torch.float64 if mdtype == torch.float64 else torch.float32)
    batches = [(forward.to_device(x, device, mdtype), forward.to_device(y, device, mdtype if loss == "mse" else None))
               for x, y in data]
    if not batches:
        raise ValueError("data is empty: pass at least one (inputs, targets) micro-batch")
    exact_keys, exact_batches = None, batches
    if exact_data is not None:
        items = list(exact_data.items()) if isinstance(exact_data, Mapping) else list(enumerate(exact_data))
        if not items:
            raise ValueError("exact_data is empty: pass at least one micro-batch, or None to use data")
        if len(items) > len(batches):
            raise ValueError(f"exact_data holds {len(items)} micro-batches, data only {len(batches)}: exact_data "
                             "must be a sample of data's micro-batches")
        exact_keys = [k for k, _ in items]
        exact_batches = [(forward.to_device(x, device, mdtype),
                          forward.to_device(y, device, mdtype if loss == "mse" else None)) for _, (x, y) in items]
    family = families.detect_family(model)
    selected = families.select_layers(model, layers, family)
    timings: dict = {}
    was_training = model.training
    model.eval()
    try:
        with forward.second_order_attention():
            if gradient_labels == "sampled":
                with torch.no_grad():
                    batches = [(x, sampled_targets(forward.model_logits(model, x), y, loss, label_generator(seed, b)))
                               for b, (x, y) in enumerate(batches)]
                    if exact_keys is None:
                        exact_batches = batches
                    else:   # a micro-batch's sampled labels are a function of its key: the same as in data
                        exact_batches = [(x, sampled_targets(forward.model_logits(model, x), y, loss,
                                                             label_generator(seed, b)))
                                         for b, (x, y) in zip(exact_keys, exact_batches)]
            t0 = time.perf_counter()
            rows = RowCache(ROW_CACHE_BYTES)    # the projections pass replays these rows when they fit
            stats = collect_statistics(model, batches, loss, fisher=fisher, layers=selected, stat_dtype=stat_dtype,
                                       factor_budget_bytes=factor_budget_bytes, mc_samples=mc_samples, seed=seed,
                                       factor_mode=factor_mode, sketch_rank=sketch_rank, row_cache=rows)
            timings["factors_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            spectra = spectral_steps(stats, m)
            timings["spectral_s"] = time.perf_counter() - t0
            directions = {name: sp.directions for name, sp in spectra.items() if sp.directions is not None}
            live = {name: selected[name] for name in directions}
            bases = {name: spectra[name].bases for name in directions}
            t0 = time.perf_counter()
            proj = collect_projections(model, batches, loss, fisher=fisher, layers=live, directions=directions,
                                       stat_dtype=stat_dtype, mc_samples=mc_samples, seed=seed,
                                       bases=bases, rows=rows) if live else {}
            del rows
            timings["projections_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            exact_live = {n: selected[n] for n in exact_layer_names(spectra, m)}
            with forward.parameters_in(model, forward.exact_torch_dtype(exact_dtype, mdtype)):
                curv = exact_curvature(model, exact_batches, loss, {n: directions[n] for n in exact_live},
                                       layers=exact_live, hessian=True, gn=gn, keys=exact_keys,
                                       population=len(batches)) if exact_live else {}
            timings["exact_s"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
    layer_rows, direction_rows, spectra_rows = assemble_rows(
        spectra, m, classify=lambda name: families.classify(name, family, model), projections=proj, curvature=curv,
        extra=lambda name: {"family": family})
    return Result(_table(layer_rows), _table(direction_rows, list(DIRECTION_COLUMNS)),
                  _table(spectra_rows, list(SPECTRA_COLUMNS)), timings)
