"""Exponent fits of one layer (SPEC §1, "Exponents of one layer").  Pure numpy: arrays in, numbers out.

Inputs are the top-K quantities of one layer, indexed by the position k = 1..K of the singular triplet (σ descending,
as an SVD returns them): σ_k, the exact curvature h_k, the Kronecker curvature h^Kron_k, Λ_k = λ^δ_k λ^A_k and
Φ_k = ρ^δ_k ρ^A_k.  Every fit is ordinary least squares on natural logs (:func:`ols`); a fit needs ≥ 3 points.

Index sets (a direction is "positive" when its value is > 0 and finite):

- ``V_σ = {k : σ_k positive}``                      → γ, R²_γ, the rank-model BICs, all with x = log k, k the
  position in 1..K (so γ uses every direction of the window whatever h is, as the seed paper does);
- ``V_α = {k : σ_k and h_k positive}``, ``n_valid = |V_α|`` → α, R²_α (the paper's α, on its own set);
- ``V_s = {k : h_k positive}``                       → s: h sorted descending, on ranks r = 1..|V_s|;
- ``V_c = {k : σ_k, h^Kron_k, Λ_k, Φ_k and (when given) h_k positive}``, ``n_valid_kron = |V_c|``
  → α_Kron, β, φ, χ-slope, all on this ONE set, so that the Spectral Alignment Decomposition is exact to rounding
  (OLS is linear in y and log h^Kron = log Λ + log Φ, log h = log χ + log h^Kron):
  α_Kron = β + φ  and  α = α_Kron + χ-slope.  V_c ⊆ V_α when h is given; χ-slope is reported only when V_c = V_α
  (then α on V_α equals α on V_c and both identities hold); otherwise it is null and the status says why.

An input that is None, or has no finite entry at all, is "not measured" (a factor over budget arrives as NaNs).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from curvdist.vocab import Status

MIN_VALID = 3
RANK_MODELS = ("power_law", "exponential", "lognormal")


def _vec(x) -> np.ndarray | None:
    """1-D float64 numpy copy of an array-like (numpy, list, torch on any device); None stays None."""
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.array(x, dtype=np.float64).reshape(-1)


def _given(x) -> np.ndarray | None:
    x = _vec(x)
    return None if x is None or not np.isfinite(x).any() else x


def _pos(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.isfinite(x) & (x > 0)


def _num(x) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def ols(x, y) -> tuple[float, float, float]:
    """Least squares line y ≈ a + b x: returns ``(slope b, intercept a, R²)``.

    b = Σ(x−x̄)(y−ȳ) / Σ(x−x̄)²,  a = ȳ − b x̄,  R² = 1 − Σ(y − a − b x)² / Σ(y − ȳ)².
    NaN where undefined (fewer than 2 points or constant x: all three; constant y: R²).
    """
    x, y = _vec(x), _vec(y)
    if x.size != y.size:
        raise ValueError(f"ols: x has {x.size} points, y has {y.size}")
    if x.size < 2:
        return math.nan, math.nan, math.nan
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float(xc @ xc)
    if sxx == 0.0:
        return math.nan, math.nan, math.nan
    b = float(xc @ yc) / sxx
    a = float(y.mean() - b * x.mean())
    sst = float(yc @ yc)
    rss = float(((y - a - b * x) ** 2).sum())
    return b, a, (1.0 - rss / sst) if sst > 0 else math.nan


def slope_se(x, y) -> float:
    """OLS standard error of the slope: √(RSS/(n−2) / Σ(x−x̄)²); NaN with fewer than 3 points or constant x.

    It assumes independent, equal-variance residuals; the K directions of one layer are neither, so read it as a
    measure of scatter about the line, with ``alpha_half_a``/``alpha_half_b`` as the check against the batch."""
    x, y = _vec(x), _vec(y)
    if x.size < 3:
        return math.nan
    b, a, _ = ols(x, y)
    sxx = float(((x - x.mean()) ** 2).sum())
    if not math.isfinite(b) or sxx == 0.0:
        return math.nan
    rss = float(((y - a - b * x) ** 2).sum())
    return math.sqrt(rss / (x.size - 2) / sxx)


def alpha_se_from_h(sigma, h, h_cov) -> float:
    """Standard error of α (the OLS slope of log h on log σ over V_α) due to the error of h alone, by the delta
    method: α̂ = Σ_k c_k log h_k with c_k = (x_k − x̄)/Σ(x − x̄)², x = log σ, and Cov(log h_k, log h_l) ≈
    C_kl / (h_k h_l) (C: the covariance of the h estimates, :func:`curvdist.math.subsample.estimate`), so

        alpha_se_h² = Σ_kl c_k c_l C_kl / (h_k h_l)        over k, l ∈ V_α.

    First order in the relative error of h (read it as such when h_se/h is not small).  NaN with fewer than 3
    valid directions or a C with no finite entry."""
    sigma, h = _vec(sigma), _vec(h)
    C = np.array(h_cov, dtype=np.float64).reshape(h.size, h.size) if not hasattr(h_cov, "detach") else \
        h_cov.detach().cpu().double().numpy().reshape(h.size, h.size)
    va = _pos(sigma) & _pos(h)
    if va.sum() < MIN_VALID:
        return math.nan
    x = np.log(sigma[va])
    xc = x - x.mean()
    sxx = float(xc @ xc)
    if sxx == 0.0:
        return math.nan
    c = xc / sxx / h[va]
    Cv = C[np.ix_(va, va)]
    if not np.isfinite(Cv).all():
        return math.nan
    return math.sqrt(max(float(c @ Cv @ c), 0.0))


def _slope(x, y) -> tuple[float | None, float | None]:
    b, _, r2 = ols(x, y)
    return _num(b), _num(r2)


def _pr(w: np.ndarray) -> float | None:
    """Participation ratio (Σw)²/Σw² of non-negative weights; None when Σw² = 0."""
    s2 = float((w * w).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else None


@dataclass(frozen=True)
class Exponents:
    """Exponents of one layer from σ and h (see the module docstring for the index set of each).

    α = slope of log h_k on log σ_k over V_α (R²: r2_alpha, OLS standard error: alpha_se); γ = −slope of log σ_k on log k over V_σ;
    s = −slope of log h_(r) on log r, h_(1) ≥ h_(2) ≥ … the positive h sorted descending;
    PR_h = (Σh)²/Σh² over the positive h; PR_grad = (Σσ²)²/Σσ⁴ over the finite σ.
    α and s are null when n_valid < 3 (γ, which does not depend on h, is kept when |V_σ| ≥ 3); status is "ok"
    or the reason ("too_few_valid: …", "zero_gradient: …", "non_finite_gradient: …", "no_directions: …").
    """

    alpha: float | None
    r2_alpha: float | None
    gamma: float | None
    r2_gamma: float | None
    s: float | None
    r2_s: float | None
    n_valid: int | None
    pr_h: float | None
    pr_grad: float | None
    status: str
    alpha_se: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _gradient_status(sigma: np.ndarray | None) -> str:
    if sigma is None or sigma.size == 0:
        return Status.NO_DIRECTIONS.with_reason("no singular values given")
    if _pos(sigma).any():
        return Status.OK.value
    bad = int((~np.isfinite(sigma)).sum())
    if bad:
        return Status.NON_FINITE_GRADIENT.with_reason(
        f"{bad} of {sigma.size} singular values are NaN or Inf and none is positive")
    return Status.ZERO_GRADIENT.with_reason(f"all {sigma.size} singular values are zero")


def fit_exponents(sigma, h=None) -> Exponents:
    """α, γ, s and participation ratios of one layer from plain arrays σ (descending, K) and h (K).

    Never raises on bad values: a zero or non-finite gradient, or fewer than 3 valid directions, gives null
    exponents and a status naming the reason.  ``h=None`` (exact curvature off) gives γ and PR_grad only.
    """
    sigma, h = _vec(sigma), _vec(h)
    status = _gradient_status(sigma)
    if status != "ok":
        return Exponents(None, None, None, None, None, None, 0 if h is not None else None, None, None, status)
    if h is not None and h.size != sigma.size:
        raise ValueError(f"fit_exponents: sigma has {sigma.size} entries, h has {h.size}")
    k = np.arange(1, sigma.size + 1, dtype=np.float64)
    vs = _pos(sigma)
    gamma = r2_gamma = None
    if vs.sum() >= MIN_VALID:
        g, r2_gamma = _slope(np.log(k[vs]), np.log(sigma[vs]))
        gamma = None if g is None else -g
    pr_grad = _pr(sigma[np.isfinite(sigma)] ** 2)
    if h is None:
        if vs.sum() < MIN_VALID:
            status = Status.TOO_FEW_VALID.with_reason(f"{int(vs.sum())} positive singular values < {MIN_VALID}")
        return Exponents(None, None, gamma, r2_gamma, None, None, None, None, pr_grad, status)
    va = vs & _pos(h)
    n_valid = int(va.sum())
    hp = np.sort(h[_pos(h)])[::-1]
    pr_h = _pr(hp)
    if n_valid < MIN_VALID:
        status = Status.TOO_FEW_VALID.with_reason(f"n_valid={n_valid} < {MIN_VALID}")
        return Exponents(None, None, gamma, r2_gamma, None, None, n_valid, pr_h, pr_grad, status)
    alpha, r2_alpha = _slope(np.log(sigma[va]), np.log(h[va]))
    ms, r2_s = _slope(np.log(np.arange(1, hp.size + 1, dtype=np.float64)), np.log(hp))
    if alpha is None:
        status = Status.DEGENERATE_SIGMA.with_reason(f"the {n_valid} valid singular values are all equal")
    se = _num(slope_se(np.log(sigma[va]), np.log(h[va]))) if alpha is not None else None
    return Exponents(alpha, r2_alpha, gamma, r2_gamma, None if ms is None else -ms, r2_s, n_valid, pr_h, pr_grad,
                     status, alpha_se=se)


def rank_model_bics(sigma) -> dict:
    """BIC of three OLS models of the rank profile log σ_k over V_σ (k the position, 1..K):

    - power law     log σ_k = log c − γ log k                  (p = 2)
    - exponential   log σ_k = log c − b k                      (p = 2)
    - lognormal     log σ_k = log c + a log k + b (log k)²     (p = 3)

    BIC = n log(RSS/n) + p log n (−inf when RSS = 0).  Returns
    ``{"power_law": {"bic", "rss", "log_c", "gamma"}, "exponential": {"bic", "rss", "log_c", "b"},
    "lognormal": {"bic", "rss", "log_c", "a", "b"}, "best": name of the minimum BIC (first on ties), "n": n}``;
    with n < 4 every number and "best" are None.  (The seed paper's files name the log-normal coefficients the
    other way round, np.polyfit order: their ``a`` is our ``b``.)
    """
    sigma = _vec(sigma)
    sigma = np.zeros(0) if sigma is None else sigma
    v = _pos(sigma)
    n = int(v.sum())
    lk = np.log(np.arange(1, sigma.size + 1, dtype=np.float64))[v]
    kk = np.arange(1, sigma.size + 1, dtype=np.float64)[v]
    y = np.log(sigma[v])
    designs = {"power_law": ([lk], ("gamma",), -1.0), "exponential": ([kk], ("b",), -1.0),
               "lognormal": ([lk, lk * lk], ("a", "b"), 1.0)}
    out: dict = {"n": n, "best": None}
    for name, (cols, names, sign) in designs.items():
        res = {"bic": None, "rss": None, "log_c": None, **{c: None for c in names}}
        if n >= 4:
            X = np.column_stack([np.ones(n)] + cols)
            coef = np.linalg.lstsq(X, y, rcond=None)[0]
            rss = float(((y - X @ coef) ** 2).sum())
            p = X.shape[1]
            bic = n * math.log(rss / n) + p * math.log(n) if rss > 0 else -math.inf
            res.update(bic=bic, rss=rss, log_c=float(coef[0]),
                       **{c: sign * float(v_) for c, v_ in zip(names, coef[1:])})
        out[name] = res
    if n >= 4:
        out["best"] = min(RANK_MODELS, key=lambda m: out[m]["bic"])
    return out


@dataclass(frozen=True)
class LayerSummary:
    """All exponents of one layer, one row of the ``layers`` table (fields as in SPEC §1).

    alpha, r2_alpha, n_valid: over V_α (equals :func:`fit_exponents`, the seed paper's α);
    alpha_se_h: the part of α's standard error due to the error of h (:func:`alpha_se_from_h`; 0 when h is the
    full-batch value, null when not known); alpha_se = √(OLS scatter SE² + alpha_se_h²) (:func:`summarize_layer`);
    alpha_kron, r2_alpha_kron (slope of log h^Kron on log σ), beta (log Λ on log σ), phi (log Φ on log σ),
    chi_slope (log(h/h^Kron) on log σ), n_valid_kron: all over the common set V_c, so α_Kron = β + φ and
    α = α_Kron + χ-slope hold to rounding whenever the terms are reported;
    gamma, r2_gamma over V_σ; s, r2_s over the positive h; triangle_error = |s − αγ|,
    triangle_rel_error = |s − αγ| / |s|; rank_model = the minimum-BIC model of :func:`rank_model_bics`.
    """

    alpha: float | None = None
    r2_alpha: float | None = None
    alpha_se: float | None = None
    alpha_se_h: float | None = None
    alpha_kron: float | None = None
    r2_alpha_kron: float | None = None
    beta: float | None = None
    phi: float | None = None
    chi_slope: float | None = None
    gamma: float | None = None
    r2_gamma: float | None = None
    s: float | None = None
    r2_s: float | None = None
    n_valid: int | None = None
    n_valid_kron: int | None = None
    pr_h: float | None = None
    pr_grad: float | None = None
    triangle_error: float | None = None
    triangle_rel_error: float | None = None
    rank_model: str | None = None
    bic_power_law: float | None = None
    bic_exponential: float | None = None
    bic_lognormal: float | None = None
    status: str = "ok"

    def as_dict(self) -> dict:
        return asdict(self)


def summarize_layer(sigma, h=None, h_kron=None, Lambda=None, Phi=None, *, status: str | None = None,
                    h_cov=None) -> LayerSummary:
    """Every exponent of one layer (see :class:`LayerSummary` and the module docstring for the index sets).

    ``h_cov`` (K, K): the covariance of the h estimates when h comes from a subsample of the batch
    (:mod:`curvdist.math.subsample`).  Estimator: α stays the OLS slope on logs, the seed paper's, and its
    standard error takes h's uncertainty in, alpha_se = √(se_OLS² + alpha_se_h²).  Why not weighted least squares
    with delta-method weights 1/Var(log h_k): the weights depend on the subsample size, so α's estimand would move
    with n (WLS tilts towards the directions measured best, the top ones), and the Spectral Alignment
    Decomposition needs one weighting for every fit; subsampling noise in log h is unbiased to first order, so it
    costs OLS variance, not bias, and that variance is what alpha_se_h reports.  Adding it to the scatter SE is
    conservative (the residual scatter already holds part of the same noise); alpha_se_h alone is the error of α
    with respect to the full-batch α along the same directions.

    ``h=None`` (exact curvature off): α, χ-slope, s and the triangle fields are null.  ``h_kron=None``: α_Kron, β,
    φ and χ-slope are null; ``Lambda``/``Phi`` None (or all NaN): β / φ null, the rest still fitted.
    ``status``: a reason decided by the caller (e.g. "zero_gradient: …"); anything but None or "ok" voids
    every number and becomes the status.  Otherwise the status is the first problem found, or "ok".
    """
    sigma = _vec(sigma)
    if status is not None and status != "ok":
        return LayerSummary(status=status)
    h, hk, lam, phi = _given(h), _given(h_kron), _given(Lambda), _given(Phi)
    for name, arr in (("h", h), ("h_kron", hk), ("Lambda", lam), ("Phi", phi)):
        if arr is not None and sigma is not None and arr.size != sigma.size:
            raise ValueError(f"summarize_layer: sigma has {sigma.size} entries, {name} has {arr.size}")
    e = fit_exponents(sigma, h)
    if _gradient_status(sigma) != "ok":
        return LayerSummary(n_valid=e.n_valid, status=e.status)
    status = e.status
    out = {f: getattr(e, f) for f in ("alpha", "r2_alpha", "alpha_se", "gamma", "r2_gamma", "s", "r2_s", "n_valid", "pr_h",
                                      "pr_grad")}
    if hk is not None:
        vc = _pos(sigma) & _pos(hk)
        for arr in (lam, phi, h):
            if arr is not None:
                vc &= _pos(arr)
        n_kron = int(vc.sum())
        out["n_valid_kron"] = n_kron
        if n_kron >= MIN_VALID:
            x = np.log(sigma[vc])
            out["alpha_kron"], out["r2_alpha_kron"] = _slope(x, np.log(hk[vc]))
            if lam is not None:
                out["beta"] = _slope(x, np.log(lam[vc]))[0]
            if phi is not None:
                out["phi"] = _slope(x, np.log(phi[vc]))[0]
            if h is not None and e.alpha is not None:
                if n_kron == e.n_valid:
                    out["chi_slope"] = _slope(x, np.log(h[vc]) - np.log(hk[vc]))[0]
                elif status == "ok":
                    status = (f"{Status.DECOMPOSITION_SUBSET.value}: h_kron, Lambda or Phi is not positive and finite at "
                              f"{e.n_valid - n_kron} of the n_valid={e.n_valid} directions; chi_slope left null "
                              f"(alpha = alpha_kron + chi_slope needs one index set)")
        elif status == "ok":
            status = Status.TOO_FEW_VALID_KRON.with_reason(f"n_valid_kron={n_kron} < {MIN_VALID}")
    if h_cov is not None and h is not None and e.alpha is not None:
        se_h = _num(alpha_se_from_h(sigma, h, h_cov))
        out["alpha_se_h"] = se_h
        if se_h is not None and out["alpha_se"] is not None:
            out["alpha_se"] = math.hypot(out["alpha_se"], se_h)
    if e.alpha is not None and e.gamma is not None and e.s is not None:
        err = abs(e.s - e.alpha * e.gamma)
        out["triangle_error"] = err
        out["triangle_rel_error"] = err / abs(e.s) if e.s != 0 else None
    bics = rank_model_bics(sigma)
    out["rank_model"] = bics["best"]
    for m in RANK_MODELS:
        out[f"bic_{m}"] = _num(bics[m]["bic"])
    out = {key: (_num(v) if isinstance(v, float) else v) for key, v in out.items()}
    return LayerSummary(**out, status=status)
