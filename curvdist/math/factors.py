"""Layer gradients, Kronecker factors and projected statistics, collected by hooks.

Pure: torch only (no ray, no pyarrow, no os / IO); tensors in, tensors out.

For one layer W (m × n) and the whole evaluation batch (every micro-batch) with N loss terms and R valid rows at the
layer (rows dropped by the row mask do not count), a_i the input rows and δ_i the error rows obtained by
back-propagating a *seed* (a gradient of the **summed** loss, :func:`curvdist.math.losses.error_seeds`):

    G   = (1/N) Σ_i δ_i a_iᵀ                  δ from the true-label seed  (= ∇_W L for the mean loss, untied W)
    C_A = (1/R) Σ_i a_i a_iᵀ
    C_δ = (1/N) Σ_i Σ_seeds δ_i δ_iᵀ         δ from the fisher seeds: ``empirical`` = the true seed, ``mc`` (labels
                                               drawn from the model; seeds carry 1/√S), ``type2`` (Hessian square root)

This is curvlinops' ``KFACLinearOperator(kfac_approx="expand")`` with a mean-reduced loss: its input covariance is
Σ a aᵀ / (N_data · weight-sharing size) = Σ a aᵀ / R and its gradient covariance Σ δδᵀ / N.  Known differences
(docs and tests/test_factors.py): MSE ``empirical`` (curvlinops scales the loss by √C, so its C_δ is C times the
second moment of ∇ℓ_t used here; ``mc``/``type2`` agree), and targets -100 (curvlinops still counts ignored positions
as loss terms in ``mc``/``type2`` and mixes the two counts in ``empirical``; here N counts the valid terms only).

Projected statistics for fixed directions U (K, m), V (K, n) need no dense factor:

    rayleigh_delta_k = (1/N) Σ_i Σ_seeds (u_kᵀδ_i)²      = u_kᵀ C_δ u_k
    rayleigh_A_k     = (1/R) Σ_i (v_kᵀa_i)²              = v_kᵀ C_A v_k
    h_sop_k          = (1/N) Σ_i Σ_seeds (u_kᵀδ_i)² (v_kᵀa_i)²

The :class:`StatisticsCollector` only sees layer inputs (forward hook) and layer output gradients (tensor hook), so
it works for an in-process model (:mod:`curvdist.math.collect`) and for a pipeline stage
that runs part of the model and receives its output gradient from elsewhere::

    col = StatisticsCollector(layers, stat_dtype=torch.float32)
    with col:                                    # hooks registered on enter, removed on exit
        for each micro-batch:
            col.begin_microbatch(row_mask)       # (B, T) bool or None
            out = stage_forward(x)               # forward hooks record a_i (masked) and C_A
            col.seed_kind("true")                # next backward's gradients are true-label errors δ (for G)
            torch.autograd.grad(out, col.outputs(), grad_from_next_stage, retain_graph=True)
            col.seed_kind("fisher")              # ... each fisher seed ("both" for empirical: one backward)
            ...
            col.end_microbatch(n_terms)          # N_b of this micro-batch (the stage must be told it)
    stats = col.finalize()

With the dense statistics the collector also keeps, for :mod:`curvdist.math.noise`, the sum of G over the micro-batches
of half a (``G_a``; half b is G minus it) and Σ_u ‖g_u‖² over the units u (sequences, images, samples: the items of
a layer input's leading axis), from which the layer's gradient signal-to-noise and split-half stability follow.

Each factor is held as its mode says (:mod:`curvdist.math.modes`): dense (d×d), a streaming Nyström sketch
(:mod:`curvdist.math.sketch`; ``finalize`` then gives a :class:`curvdist.math.sketch.SketchedFactor` in place of the
matrix), or not at all (over ``factor_budget_bytes``; the status says so).  Given Ritz ``bases`` of sketched factors,
the projections pass also accumulates Z = C V and :meth:`StatisticsCollector.projections` returns their
Rayleigh–Ritz eigenvalues and error estimates.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from curvdist.math import layers as L
from curvdist.math import modes as M
from curvdist.math import noise, sketch
from curvdist.math.moments import LayerSums
from curvdist.math.rowcache import RowCache
from curvdist.vocab import Status

SEED_KINDS = (None, "true", "fisher", "both")


@dataclass
class LayerStatistics:
    """Normalised statistics of one layer; ``C_A``/``C_delta`` are the dense factor, its sketch, or None when over
    budget (see ``status``), as ``modes`` says."""
    name: str
    m: int
    n: int
    G: torch.Tensor                    # (m, n)
    C_A: torch.Tensor | sketch.SketchedFactor | None       # (n, n), or the sketch C_A [Ω Ψ] (n, l + s)
    C_delta: torch.Tensor | sketch.SketchedFactor | None   # (m, m), or (m, l + s)
    rows: int                          # R, valid rows at the layer
    n_terms: int                       # N, loss terms of the whole batch
    status: str = "ok"
    factor_bytes: int = 0              # bytes of the factors (dense or sketches) actually allocated; G excluded
    halves: tuple[torch.Tensor, torch.Tensor] | None = None   # (G_a, G_b), each (m, n); None if a half is empty
    noise: noise.GradientNoise | None = None                    # grad_snr, noise_scale, … from the units
    modes: tuple[str | None, str | None] = ("dense", "dense")   # (C_A, C_δ): "dense", "sketch", None (not measured)


@dataclass
class Projections:
    """Projected statistics of one layer along K fixed directions, each (K,); for a sketched factor also its
    refined eigenvalues and their error estimates (:func:`curvdist.math.sketch.refined_eigenvalues`), else None."""
    rayleigh_delta: torch.Tensor
    rayleigh_A: torch.Tensor
    h_sop: torch.Tensor
    lambda_A: torch.Tensor | None = None
    lambda_A_err: torch.Tensor | None = None
    lambda_delta: torch.Tensor | None = None
    lambda_delta_err: torch.Tensor | None = None


class _Open:
    """What one micro-batch in flight has recorded: its row mask, the hooked layer outputs, per layer one record
    (input rows, projected input rows, kept-row mask, unit of each row) per module call, and the true-seed rows of
    layers called more than once (their per-unit norms need every call's rows)."""

    def __init__(self, mask: torch.Tensor | None, names):
        self.mask = mask
        self.outputs: list[tuple[torch.Tensor, int, torch.Tensor]] = []
        self.calls: dict[str, list[tuple[torch.Tensor | None, ...]]] = {n: [] for n in names}
        self.true_rows: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}


class StatisticsCollector:
    """Hooks on ``layers`` ({name: module}, each :func:`curvdist.math.layers.is_supported`) that accumulate, per layer,
    G, C_A and C_δ (``dense=True``) and/or the projected statistics along ``directions`` ({name: (U, V)}).

    Protocol per micro-batch: :meth:`begin_microbatch` → forward → for every seed: :meth:`seed_kind` then a backward
    that reaches the layer outputs (e.g. ``torch.autograd.grad(out, self.outputs(), seed, retain_graph=True)``) →
    :meth:`end_microbatch` with the micro-batch's number of loss terms.  Backward passes while the kind is ``None``
    (or outside a micro-batch) are ignored, so other passes may run with the hooks attached.
    Accumulation is in ``stat_dtype`` on the rows' device.  Each factor's mode (:mod:`curvdist.math.modes`) is
    ``factor_modes[name]`` ((C_A, C_δ), as a plan decided) or else :func:`curvdist.math.modes.choose` of
    ``factor_mode`` and ``factor_budget_bytes``: a factor over budget is never allocated and the layer's status says
    so.  Sketches have ``sketch_rank`` columns and test matrices seeded by (``seed``, layer, factor, dimension).
    ``bases`` ({name: {"A": V, "delta": V}}, from :attr:`curvdist.math.measure.LayerSpectra.bases`) adds the
    Rayleigh–Ritz products of sketched factors to a projections pass.  ``row_cache`` (:mod:`curvdist.math.rowcache`)
    keeps the rows seen, so that a projections collector can be fed them without a second pass.
    """

    def __init__(self, layers: Mapping[str, nn.Module], *, stat_dtype: torch.dtype = torch.float32,
                 factor_budget_bytes: int | None = None, dense: bool = True,
                 directions: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 factor_mode: str = "dense", factor_modes: Mapping[str, tuple[str | None, str | None]] | None = None,
                 sketch_rank: int = 512, seed: int = 0,
                 bases: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                 device: torch.device | str | None = None, row_cache: RowCache | None = None):
        for name, mod in layers.items():
            if not L.is_supported(mod):
                raise ValueError(f"layer {name} ({type(mod).__name__}) is not supported")
        for what, given in (("directions", directions), ("bases", bases)):
            missing = set(given or {}) - set(layers)
            if missing:
                raise ValueError(f"{what} given for unknown layers: {sorted(missing)}")
        M.check_policy(factor_mode)
        if sketch_rank < 1:
            raise ValueError(f"sketch_rank={sketch_rank} must be ≥ 1")
        self.dtype = stat_dtype
        # where sums not yet allocated are created for state(): the rows' device (a replica that saw no rows of a
        # kind must hand the all-reduce tensors on the same device as the others)
        self.device = torch.device(device) if device is not None else None
        self.layers = {}
        for name, mod in layers.items():
            modes, status = self._modes(name, mod, factor_mode, (factor_modes or {}).get(name), factor_budget_bytes,
                                        sketch_rank)
            self.layers[name] = LayerSums(name, mod, dense=dense, dtype=stat_dtype, modes=modes, status=status,
                                          sketch_rank=sketch_rank, seed=seed, direction=(directions or {}).get(name),
                                          bases=(bases or {}).get(name))
        self.n_terms = 0
        self.n_terms_a = 0                    # loss terms of the micro-batches of half a (noise.half_of)
        self._handles: list = []
        self._open: dict[Any, _Open] = {}     # micro-batches in flight: key → their recorded rows
        self._forward_key: Any = None         # the micro-batch whose forward the hooks record now
        self._kind: str | None = None
        self._scale = 1.0
        self.row_cache = row_cache

    def _modes(self, name: str, mod: nn.Module, policy: str, given, budget: int | None, rank: int):
        """(mode of C_A, mode of C_δ) and the statuses of the factors left unmeasured."""
        m, n = L.shape(mod)
        item = torch.empty((), dtype=self.dtype).element_size()
        modes = tuple(given) if given is not None else tuple(M.choose(policy, d, rank, item, budget) for d in (n, m))
        status = []
        for label, d, mode in (("C_A", n, modes[0]), ("C_delta", m, modes[1])):
            if mode is None:
                status.append(Status.FACTOR_TOO_LARGE.with_reason(M.too_large(
                    label, d, str(self.dtype).replace("torch.", ""), item, rank, budget or 0, policy)))
            elif mode not in ("dense", "sketch"):
                raise ValueError(f"layer {name}: factor mode {mode!r} is not dense, sketch or None")
        return modes, status

    # hooks ---------------------------------------------------------------------------------------------------------
    def attach(self) -> StatisticsCollector:
        if not self._handles:
            self._handles = [st.module.register_forward_hook(partial(self._on_forward, st))
                             for st in self.layers.values()]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):  # -> self
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # micro-batch protocol ----------------------------------------------------------------------------------------
    # Several micro-batches may be in flight at once (a pipeline stage runs the forwards of later micro-batches
    # before the backward of an earlier one): each has a key, its rows are kept apart, and a backward routes the
    # captured errors to the micro-batch whose forward produced the outputs.
    def begin_microbatch(self, row_mask: torch.Tensor | None = None, key: Any = 0) -> None:
        """Open micro-batch ``key`` and record the next forward into it; ``row_mask`` (B, T) bool drops padding rows
        of layers whose input is (B, T, n)."""
        if key in self._open:
            raise ValueError(f"micro-batch {key!r} is already open")
        self._open[key] = _Open(None if row_mask is None else row_mask.bool(), self.layers)
        self._forward_key, self._kind = key, None

    def seed_kind(self, kind: str | None, scale: float = 1.0) -> None:
        """What the next backward's output gradients are: ``"true"`` (true-label seed → G), ``"fisher"`` (→ C_δ and
        the projections), ``"both"`` (empirical: one backward for both) or None (ignore).  Captured gradients are
        multiplied by ``scale`` (pass N_b if the gradient arriving is that of the micro-batch's *mean* loss)."""
        if kind not in SEED_KINDS:
            raise ValueError(f"seed kind {kind!r} not in {SEED_KINDS}")
        self._kind, self._scale = kind, scale

    def outputs(self, key: Any = 0) -> list[torch.Tensor]:
        """Tensors to pass as ``inputs`` of a backward so that it reaches every hooked layer: the layer outputs of
        micro-batch ``key``, or, for an output that was later modified in place (``nn.ReLU(inplace=True)``), the
        layer's weight, whose backward passes through the output's original node (where the hook sits)."""
        out, seen = [], set()
        for t, version, weight in self._open[key].outputs:
            x = t if t._version == version or not weight.requires_grad else weight
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
        return out

    def end_microbatch(self, n_terms: int, key: Any = 0) -> None:
        """Close micro-batch ``key``: add its loss terms to N and drop its recorded rows and outputs."""
        self.n_terms += int(n_terms)
        if self.row_cache is not None:
            self.row_cache.add_terms(n_terms)
        if noise.half_of(key) == 0:
            self.n_terms_a += int(n_terms)
        rec = self._open.pop(key, None)
        for name, rows in (rec.true_rows.items() if rec is not None else ()):
            d, a, u = (torch.cat(x) for x in zip(*rows))
            self._add_units(self.layers[name], d, a, u)
        if self._forward_key == key:
            self._forward_key = None
        self._kind = None

    @property
    def in_flight(self) -> int:
        """Micro-batches open now (each holds its recorded rows until :meth:`end_microbatch`)."""
        return len(self._open)

    # combining collectors (replicas over disjoint micro-batches) ---------------------------------------------------
    def state(self) -> list[torch.Tensor]:
        """Every running sum as one flat list in a fixed order, then a float64 tensor of the counts (N, N of half a,
        and per layer R, whether errors were seen, and the number of units).  Summing the states of collectors that
        saw disjoint micro-batches (an all-reduce) and loading the sum with :meth:`set_state` gives the collector of all of them, because
        every statistic is a sum over rows, normalised only in :meth:`finalize` / :meth:`projections`.  Sums not
        yet allocated are zeros, so collectors of the same layers give lists of equal shapes."""
        out = []
        for st in self.layers.values():
            for path, shape in st.sums().items():
                v = st.get(path)
                out.append(v if v is not None else torch.zeros(shape, dtype=self.dtype, device=self.device))
        counts = [float(self.n_terms), float(self.n_terms_a)] + [
            x for st in self.layers.values() for x in (float(st.rows), float(st.seen_error), float(st.units))]
        out.append(torch.tensor(counts, dtype=torch.float64))
        return out

    def set_state(self, values: list[torch.Tensor]) -> None:
        """Load a (reduced) :meth:`state` of a collector of the same layers."""
        values = list(values)
        counts = values.pop().double().cpu().tolist()
        self.n_terms, self.n_terms_a = int(round(counts[0])), int(round(counts[1]))
        it = iter(values)
        for j, st in enumerate(self.layers.values()):
            for path in st.sums():
                st.put(path, next(it))
            st.rows = int(round(counts[2 + 3 * j]))
            st.seen_error = counts[3 + 3 * j] > 0
            st.units = int(round(counts[4 + 3 * j]))

    def _keep(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None or isinstance(module, nn.Conv2d) or tuple(x.shape[:-1]) != tuple(mask.shape):
            return None
        return mask.reshape(-1).to(x.device)

    def _on_forward(self, st: LayerSums, module: nn.Module, inputs: tuple, output: Any) -> None:
        key = self._forward_key
        if key is None:
            return
        rec = self._open[key]
        x = inputs[0].detach()
        a = L.input_rows(module, x).to(self.dtype)
        keep = self._keep(module, x, rec.mask)
        units = noise.row_units(x, a.shape[0]) if st.dense else None
        if units is not None and units.numel() and not rec.calls[st.name]:
            st.units += int(units[-1]) + 1
        if keep is not None:
            a = a[keep]
            units = None if units is None else units[keep]
        cA = st.add_input_rows(a)
        block = self.row_cache.add_inputs(st.name, a) if self.row_cache is not None else -1
        calls = rec.calls[st.name]
        calls.append((a if st.dense else None, cA, keep, units, block))
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self._on_grad, st, key, len(calls) - 1))
            rec.outputs.append((output, output._version, module.weight))

    def _on_grad(self, st: LayerSums, key: Any, call: int, g: torch.Tensor) -> None:
        kind = self._kind
        rec = self._open.get(key)
        if kind is None or rec is None or call >= len(rec.calls[st.name]):
            return
        a, cA, keep, units, block = rec.calls[st.name][call]
        d = L.output_rows(st.module, g.detach()).to(self.dtype)
        if self._scale != 1.0:
            d = d * self._scale
        if keep is not None:
            d = d[keep]
        st.seen_error = True
        if kind in ("true", "both") and a is not None:
            gd = d.T @ a
            st.G = gd if st.G is None else st.G.add_(gd)
            if noise.half_of(key) == 0:
                st.G_a = gd.clone() if st.G_a is None else st.G_a.add_(gd)
            if len(rec.calls[st.name]) == 1:
                self._add_units(st, d, a, units)
            else:   # cross terms between calls: the norms wait for every call's rows (end_microbatch)
                rec.true_rows.setdefault(st.name, []).append((d, a, units))
        if kind in ("fisher", "both"):
            st.add_fisher_rows(d, cA)
            if self.row_cache is not None:
                self.row_cache.add_errors(st.name, block, d)

    @staticmethod
    def _add_units(st: LayerSums, d: torch.Tensor, a: torch.Tensor, units: torch.Tensor) -> None:
        s = noise.unit_sq_norms(d, a, units).sum().reshape(1)
        st.unit_sq = s if st.unit_sq is None else st.unit_sq.add_(s)

    # results -----------------------------------------------------------------------------------------------------
    def _check(self) -> None:
        if self.n_terms <= 0:
            raise ValueError("no loss terms were recorded: call end_microbatch(n_terms) for every micro-batch")

    def finalize(self) -> dict[str, LayerStatistics]:
        """Normalised G, C_A, C_δ per layer (requires ``dense=True``)."""
        self._check()
        out = {}
        for name, st in self.layers.items():
            N, R = self.n_terms, st.rows
            G = st.G / N if st.G is not None else torch.zeros(st.m, st.n, dtype=self.dtype)
            status = list(st.status)
            if not st.seen_error:
                status.insert(0, Status.NO_ERROR_ROWS.with_reason(
                    "the layer's output never received a gradient (is it on the path to the loss, and does it require "
                    "grad?)"))
            C_A = st.cov_A.value(R) if st.cov_A is not None else None
            C_d = st.cov_delta.value(N) if st.cov_delta is not None else None
            nbytes = sum(acc.nbytes for acc in (st.cov_A, st.cov_delta) if acc is not None)
            halves = noise.halves(st.G, st.G_a, N, self.n_terms_a) if st.G is not None else None
            unit_sq = float(st.unit_sq.sum()) if st.unit_sq is not None else 0.0
            gn = noise.gradient_noise(float(G.double().square().sum()), unit_sq, st.units, N)
            out[name] = LayerStatistics(name, st.m, st.n, G, C_A, C_d, R, N, "; ".join(status) or "ok", nbytes,
                                        halves, gn, st.modes)
        return out

    def projections(self) -> dict[str, Projections]:
        """Normalised projected statistics for the layers that were given directions."""
        self._check()
        out = {}
        for name, st in self.layers.items():
            if st.proj_A is None:
                continue
            K = st.proj_A.P.shape[0]
            sop = st.sop if st.sop is not None else torch.zeros(K, dtype=self.dtype)
            p = Projections(st.proj_delta.value(self.n_terms), st.proj_A.value(st.rows), sop / self.n_terms)
            for factor, acc, norm in (("A", st.ritz_A, st.rows), ("delta", st.ritz_delta, self.n_terms)):
                if acc is not None:
                    lam, err = sketch.refined_eigenvalues(acc.test, acc.value(norm), K)
                    setattr(p, f"lambda_{factor}", lam)
                    setattr(p, f"lambda_{factor}_err", err)
            out[name] = p
        return out
