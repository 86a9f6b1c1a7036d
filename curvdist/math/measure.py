"""From one layer's statistics to its output rows: spectral step, metrics, fits.  Pure: tensors in, rows out.

Shared by the in-process :func:`curvdist.analyze` and by the pipeline stage actors, so that both paths compute
every number with the same code.  A layer goes through three steps:

1. :func:`spectral_step` — top-K singular triplets of G (K = min(top_k, m, n)), top-K eigenpairs of C_A and C_δ
   (dense factors: :func:`curvdist.math.eigenvalues.top_eigenvalues`, eigenvalues only; sketched ones: the one-pass Nyström eigenpairs with
   their error bound, and the Ritz basis for step 2, :mod:`curvdist.math.sketch`), the split-half stability and
   half σ (:mod:`curvdist.math.noise`), and the directions D_k = u_k v_kᵀ handed to the projected and exact passes;
2. the projected pass (h^SoP, Rayleigh quotients from rows, and the Rayleigh–Ritz eigenvalues of sketched factors,
   which replace the Nyström ones) and the exact pass (h, h^GN), run by the caller;
3. :func:`layer_rows` — ρ, Φ, Λ, χ, stability and the Kronecker floor ratio per direction; the exponent fits,
   α of each half and the gradient signal-to-noise of the layer.

Kronecker floor (empirical errors).  σ_k = (1/N) Σ_i (u_kᵀδ_i)(v_kᵀa_i) over the R rows, so Cauchy–Schwarz gives
N²σ_k² ≤ Σ_i (u_kᵀδ_i)² · Σ_i (v_kᵀa_i)² = N u_kᵀC_δu_k · R v_kᵀC_Av_k, i.e. h^Kron_k ≥ (N/R)·σ_k²: the empirical
Kronecker curvature can never fall below a σ² law.  ``kron_floor_ratio`` = h^Kron_k / ((N/R)σ_k²) ≥ 1 says how far
above it a direction sits; an α_Kron read off directions with ratios near 1 is the bound's slope 2, not a finding.
(mc and type2 errors are not those of G, so no such bound holds there: the column is null.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from curvdist.math import eigenvalues, fit, metrics, noise, sketch, spectral
from curvdist.vocab import EXACT_SUBSET_COLUMNS, NO_DIRECTION_STATUSES, NOISE_COLUMNS, VOIDING, Status, status_code


@dataclass
class LayerSpectra:
    """Spectral results of one layer; tensors live on the layer's device until :func:`layer_rows`."""

    name: str
    m: int
    n: int
    rows: int
    n_terms: int
    k: int                                   # directions computed, min(top_k, m, n); 0 when none
    sigma: torch.Tensor | None = None        # (k,)
    U: torch.Tensor | None = None            # (k, m) rows are u_k
    V: torch.Tensor | None = None            # (k, n) rows are v_k
    lambda_A: torch.Tensor | None = None     # (k,)
    lambda_delta: torch.Tensor | None = None
    lambda_A_err: torch.Tensor | None = None      # (k,) error estimates of sketched factors' λ; None when dense
    lambda_delta_err: torch.Tensor | None = None
    modes: tuple[str | None, str | None] = ("dense", "dense")   # how C_A and C_δ were held (curvdist.math.modes)
    bases: dict = field(default_factory=dict)     # {"A" | "delta": Ritz basis V (d, p)} of sketched factors
    rayleigh_A: torch.Tensor | None = None   # from the dense factors; the projected pass fills them otherwise
    rayleigh_delta: torch.Tensor | None = None
    stability: torch.Tensor | None = None    # (k,) split-half stability; None when a half is empty
    sigma_half: torch.Tensor | None = None   # (2, k) u_kᵀ G_a v_k and u_kᵀ G_b v_k
    noise: noise.GradientNoise | None = None
    status: str = "ok"
    factor_status: str = "ok"
    timings: dict = field(default_factory=dict)

    @property
    def directions(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.k == 0 else (self.U, self.V)


def gradient_status(G: torch.Tensor) -> str:
    if not bool(torch.isfinite(G).all()):
        return Status.NON_FINITE_GRADIENT.with_reason(
            "G has NaN or Inf entries (check the loss, the dtype and the checkpoint)")
    if not bool((G != 0).any()):
        return Status.ZERO_GRADIENT.with_reason(
            "G is identically zero (the layer does not influence the loss on this batch)")
    return Status.OK.value


def spectral_step(stats, top_k: int, *, seed: int = 0) -> LayerSpectra:
    """Top-K structure of one layer from its :class:`curvdist.math.factors.LayerStatistics`."""
    import time

    m, n = stats.m, stats.n
    k = min(top_k, m, n)
    out = LayerSpectra(stats.name, m, n, stats.rows, stats.n_terms, k, factor_status=stats.status,
                       noise=getattr(stats, "noise", None), modes=getattr(stats, "modes", ("dense", "dense")))
    status = gradient_status(stats.G)
    if status_code(status) in NO_DIRECTION_STATUSES:
        out.k, out.status = 0, status
        return out
    out.status = status
    t0 = time.perf_counter()
    sigma, U, V = spectral.top_singular(stats.G, k, seed=seed)
    out.sigma, out.U, out.V = sigma, U.T.contiguous(), V.T.contiguous()
    halves = getattr(stats, "halves", None)
    if halves is not None:
        out.stability = noise.split_half_stability(*halves, k, seed=seed)
        out.sigma_half = torch.stack([noise.half_sigma(G_h, out.U, out.V) for G_h in halves])
    out.timings["svd_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for factor, C, X in (("A", stats.C_A, V), ("delta", stats.C_delta, U)):
        if isinstance(C, sketch.SketchedFactor):    # Rayleigh quotients come from the projections pass
            lam, _, err = sketch.nystrom_eigen(C, k)
            setattr(out, f"lambda_{factor}_err", err)
            out.bases[factor] = sketch.ritz_basis(C)
        elif C is not None:
            lam = eigenvalues.top_eigenvalues(C, k, seed=seed)
            setattr(out, f"rayleigh_{factor}", metrics.rayleigh(C, X))
        else:
            continue
        setattr(out, f"lambda_{factor}", lam)
    out.timings["eig_s"] = time.perf_counter() - t0
    if out.status == "ok" and stats.status != "ok":
        out.status = stats.status
    return out


def _hard(status: str) -> bool:
    """Statuses that void the exponents (a factor over budget only voids β and φ, which the fit sees as nulls)."""
    return status_code(status) in VOIDING


def _np(t):
    return None if t is None else t.detach().double().cpu()


def _nullable(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _eigenvalues(sp: LayerSpectra, projections, factor: str):
    """(λ (k,), error estimates (k,) or None) of one factor, float64 on the CPU: the projections pass's
    Rayleigh–Ritz values of a sketched factor when it ran, else the spectral step's (dense, or Nyström)."""
    lam = getattr(projections, f"lambda_{factor}", None)
    if lam is not None:
        return _np(lam), _np(getattr(projections, f"lambda_{factor}_err"))
    return _np(getattr(sp, f"lambda_{factor}")), _np(getattr(sp, f"lambda_{factor}_err"))


def _worst_relative(lam, err) -> float | None:
    """max_k err_k / λ_k over λ_k > 0: the layer's ``lambda_rel_err_*`` (None for a dense factor)."""
    if lam is None or err is None or not bool((lam > 0).any()):
        return None
    return _nullable((err[lam > 0] / lam[lam > 0]).max())


def layer_rows(sp: LayerSpectra, *, layer_type: str, block: int | None, fisher: str,
               projections=None, curvature=None, extra: dict | None = None):
    """Output rows of one layer: ``(layer_row: dict, direction_rows: list[dict], spectra_rows: list[dict])``.

    ``projections`` (from :func:`curvdist.math.collect.collect_projections`) supply h^SoP, the Rayleigh quotients of
    factors that were not held dense, and the Rayleigh–Ritz eigenvalues of sketched factors; ``curvature`` supplies
    exact h and h^GN.  The layer row says how each factor was held (``factor_mode_A``/``_delta``) and the worst
    relative error estimate of its λ_k (``lambda_rel_err_*``, null for dense factors); spectra rows carry
    ``factor_mode`` and ``eigenvalue_err`` (:mod:`curvdist.math.sketch` states what the estimates bound).
    """
    base = {"layer": sp.name, "layer_type": layer_type, "block": block, "m": sp.m, "n": sp.n, "rows": sp.rows,
            "n_terms": sp.n_terms, "fisher": fisher}
    base.update(extra or {})
    base.update(dict.fromkeys(NOISE_COLUMNS))
    base.update(dict.fromkeys(EXACT_SUBSET_COLUMNS))
    directions, spectra_rows = [], []
    summary = None
    lam = {f: _eigenvalues(sp, projections, f) for f in ("A", "delta")}
    for i, f in enumerate(("A", "delta")):
        base[f"factor_mode_{f}"] = sp.modes[i]
        base[f"lambda_rel_err_{f}"] = _worst_relative(*lam[f])
    if sp.k > 0:
        ray_d = sp.rayleigh_delta if sp.rayleigh_delta is not None else getattr(projections, "rayleigh_delta", None)
        ray_a = sp.rayleigh_A if sp.rayleigh_A is not None else getattr(projections, "rayleigh_A", None)
        h = getattr(curvature, "h", None)
        h_gn = getattr(curvature, "h_gn", None)
        h_sop = getattr(projections, "h_sop", None)
        sigma = _np(sp.sigma)
        nan = torch.full_like(sigma, float("nan"))
        ray_d, ray_a, h = _np(ray_d), _np(ray_a), _np(h)
        # direction_metrics echoes its inputs too; NaN (a missing input) becomes a null in the row
        cols = {key: _np(v) for key, v in metrics.direction_metrics(
            sigma, ray_d if ray_d is not None else nan, ray_a if ray_a is not None else nan,
            lambda_delta=lam["delta"][0], lambda_A=lam["A"][0], h=h, h_sop=_np(h_sop)).items()}
        cols["h_gn"] = _np(h_gn)
        sub = getattr(curvature, "subset", None)     # standard errors of h from a subsample (math.subsample)
        if sub is not None:
            cols["h_se"], cols["h_gn_se"] = sub.h_se, (sub.h_gn_se if h_gn is not None else None)
            base["exact_units"] = sub.units
            rel = sub.unit_rel_sd[torch.isfinite(sub.unit_rel_sd)]
            base["h_unit_rel_sd"] = _nullable(rel.median()) if rel.numel() else None
        cols["stability"] = _np(sp.stability)
        if fisher == "empirical" and sp.rows > 0:   # the Cauchy–Schwarz floor (module docstring)
            cols["kron_floor_ratio"] = cols["h_kron"] / ((sp.n_terms / sp.rows) * sigma ** 2)
        names = ["sigma", "h", "h_gn", "h_kron", "h_sop", "rayleigh_delta", "rayleigh_A", "lambda_delta",
                 "lambda_A", "rho_delta", "rho_A", "phi", "Lambda", "chi", "stability", "kron_floor_ratio", "h_se",
                 "h_gn_se"]
        for i in range(sp.k):
            row = {"layer": sp.name, "k": i + 1}
            for c in names:
                v = cols.get(c)
                row[c] = None if v is None else _nullable(v[i])
            directions.append(row)
        summary = fit.summarize_layer(
            sigma.numpy(), h=None if h is None else h.numpy(), h_kron=cols["h_kron"].numpy(),
            Lambda=cols["Lambda"].numpy(), Phi=cols["phi"].numpy(),
            status=sp.status if _hard(sp.status) else None, h_cov=None if sub is None else sub.h_cov.numpy())
        h_half = getattr(curvature, "h_half", None)
        if sp.sigma_half is not None and h_half is not None and not _hard(sp.status):
            for i, col in enumerate(("alpha_half_a", "alpha_half_b")):   # α of each half, full-batch directions
                base[col] = fit.fit_exponents(_np(sp.sigma_half[i]).numpy(), _np(h_half[i]).numpy()).alpha
        base["stable_directions"] = noise.stable_directions(cols["stability"])
        for i, factor in enumerate(("A", "delta")):
            values, errs = lam[factor]
            if values is not None:
                errs = [None] * len(values) if errs is None else errs.tolist()
                spectra_rows += [{"layer": sp.name, "factor": factor, "k": j + 1, "eigenvalue": float(x),
                                  "factor_mode": sp.modes[i], "eigenvalue_err": e}
                                 for j, (x, e) in enumerate(zip(values.tolist(), errs))]
    if summary is None:
        summary = fit.summarize_layer([], status=sp.status if sp.status != "ok" else "no_directions")
    base.update(sp.noise.as_dict() if sp.noise is not None else {})
    row = dict(base)
    row.update({key: (_nullable(v) if isinstance(v, float) else v) for key, v in summary.as_dict().items()})
    if sp.status != "ok" and row.get("status", "ok") == "ok":
        row["status"] = sp.status
    return row, directions, spectra_rows
