"""PNG figures of a curvdist dataset, read through the DuckDB views of ``curvdist.io.query.open``.

``make_plots(out, run_id=None)`` writes, for each run (or the one named), into ``OUT/plots/<run_id>/``:

- ``h_vs_sigma.png``: h_k and h^Kron_k against σ_k on log–log axes for representative layers (per layer type, the
  layer whose α is nearest the type's median), with the fitted lines log h = α log σ + c (c from the same OLS);
- ``alpha_by_type.png``: α by layer type (box and jittered points);
- ``alpha_by_depth.png``: α against block index, one line per layer type;
- ``decomposition.png``: mean α, α_Kron, β, φ and χ-slope per layer type (α_Kron = β + φ, α = α_Kron + χ-slope);
- ``s_vs_alphagamma.png``: the spectral transfer relation s ≈ αγ, with the identity line.

Layers with a null exponent are left out of the figure that needs it; a figure with nothing to show says so.
Figures are built with ``matplotlib.figure.Figure`` (Agg canvas), so importing this module never changes the
pyplot backend of the caller; files are written atomically through ``curvdist.io.store``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from curvdist.io import query, store
from curvdist.vocab import LAYER_TYPES

_DPI = 110
_MAX_PANELS = 9
_PLAIN = FuncFormatter(lambda v, _: f"{v:.3g}")
# label minor ticks 2 and 5 only (one decade has at most three labels)
_PLAIN_MINOR = FuncFormatter(lambda v, _: f"{v:.3g}" if f"{v:.1e}"[0] in "25" else "")


def _rows(con, sql: str, params: dict | None = None) -> list[dict]:
    rel = con.sql(sql, params=params) if params else con.sql(sql)
    return query.arrow(rel).to_pylist()


def _order(types: set[str]) -> list[str]:
    known = [t for t in LAYER_TYPES if t in types]
    return known + sorted(t for t in types if t not in LAYER_TYPES)


def _colors(types: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if len(types) > 10 else "tab10"]
    return {t: cmap(i % cmap.N) for i, t in enumerate(types)}


def _fin(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _save(fig: Figure, path: Path) -> Path:
    store.atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=_DPI))
    return path


# ---------------------------------------------------------------------------------------------------- figures
def _representatives(layers: list[dict]) -> list[dict]:
    by_type: dict[str, list[dict]] = {}
    for r in layers:
        by_type.setdefault(r["layer_type"] or "other", []).append(r)
    reps = []
    for t in _order(set(by_type)):
        rs = by_type[t]
        fitted = [r for r in rs if _fin(r["alpha"])]
        if fitted:
            med = float(np.median([r["alpha"] for r in fitted]))
            reps.append(min(fitted, key=lambda r: (abs(r["alpha"] - med), r["layer"])))
        else:
            reps.append(min(rs, key=lambda r: r["layer"]))
    return reps[:_MAX_PANELS]


def _fit_line(ax, sigma: np.ndarray, h: np.ndarray, slope: Any, color, label: str) -> None:
    ok = (sigma > 0) & (h > 0) & np.isfinite(sigma) & np.isfinite(h)
    if not _fin(slope) or ok.sum() < 2:
        return
    ls, lh = np.log(sigma[ok]), np.log(h[ok])
    c = lh.mean() - slope * ls.mean()  # the OLS intercept given the OLS slope
    xs = np.array([ls.min(), ls.max()])
    ax.plot(np.exp(xs), np.exp(c + slope * xs), color=color, lw=1.5, label=f"{label} = {slope:.2f}")


def plot_h_vs_sigma(con, run_id: str, path: Path) -> Path:
    layers = _rows(con, "SELECT layer, layer_type, alpha, alpha_kron FROM layers WHERE run_id = $r", {"r": run_id})
    reps = _representatives(layers)
    n = max(len(reps), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    if not reps:
        _empty(axes[0], "no layers")
    for ax, rep in zip(axes, reps):
        d = _rows(con, "SELECT k, sigma, h, h_kron FROM directions WHERE run_id = $r AND layer = $l ORDER BY k",
                  {"r": run_id, "l": rep["layer"]})
        sigma = np.array([x["sigma"] if _fin(x["sigma"]) else np.nan for x in d], dtype=float)
        plotted = False
        for col, color, slope, label in (("h", "C0", rep["alpha"], "α"), ("h_kron", "C1", rep["alpha_kron"], "α_Kron")):
            h = np.array([x[col] if _fin(x[col]) else np.nan for x in d], dtype=float)
            ok = (sigma > 0) & (h > 0)
            if ok.any():
                ax.scatter(sigma[ok], h[ok], s=14, color=color, alpha=0.8, label=col)
                _fit_line(ax, sigma, h, slope, color, label)
                plotted = True
        h_all = np.array([x["h"] if _fin(x["h"]) else np.nan for x in d], dtype=float)
        if plotted and (h_all <= 0).any():
            ax.text(0.98, 0.02, f"{int((h_all <= 0).sum())} of {len(d)} directions with h ≤ 0 not shown",
                    ha="right", va="bottom", fontsize=6, transform=ax.transAxes)
        name = rep["layer"] if len(rep["layer"]) <= 40 else "…" + rep["layer"][-39:]
        if not plotted:
            _empty(ax, f"{name}\nno direction with h > 0 and σ > 0")
            continue
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            # plain labels: mathtext on every minor log tick is slow and cramped; minor labels on short ranges only
            axis.set_major_formatter(_PLAIN)
            axis.set_minor_formatter(_PLAIN_MINOR if lim[1] < 100 * lim[0] else NullFormatter())
        ax.tick_params(which="both", labelsize=6)
        ax.set_title(f"{name}\n({rep['layer_type']})", fontsize=8)
        ax.set_xlabel("σ_k")
        ax.set_ylabel("curvature")
        ax.legend(fontsize=7)
    for ax in axes[len(reps):]:
        ax.set_axis_off()
    fig.suptitle(f"directional curvature vs gradient singular value — {run_id}", fontsize=10)
    return _save(fig, path)


def plot_alpha_by_type(con, run_id: str, path: Path) -> Path:
    rows = _rows(con, "SELECT layer_type, alpha FROM layers WHERE run_id = $r AND alpha IS NOT NULL "
                      "AND isfinite(alpha)", {"r": run_id})
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    types = _order({r["layer_type"] or "other" for r in rows})
    if not types:
        _empty(ax, "no layer with a fitted α")
        return _save(fig, path)
    colors = _colors(types)
    data = [[r["alpha"] for r in rows if (r["layer_type"] or "other") == t] for t in types]
    ax.boxplot(data, showfliers=False, widths=0.6)
    rng = np.random.default_rng(0)
    for i, (t, vals) in enumerate(zip(types, data), 1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(vals)), vals, s=12, color=colors[t], alpha=0.8, zorder=3)
    ax.set_xticks(range(1, len(types) + 1), [f"{t}\n(n={len(v)})" for t, v in zip(types, data)], fontsize=8)
    ax.set_ylabel("α")
    ax.set_title(f"curvature exponent α by layer type — {run_id}", fontsize=10)
    return _save(fig, path)


def plot_alpha_by_depth(con, run_id: str, path: Path) -> Path:
    rows = _rows(con, "SELECT layer_type, block, alpha FROM layers WHERE run_id = $r AND alpha IS NOT NULL "
                      "AND isfinite(alpha) AND block IS NOT NULL ORDER BY block", {"r": run_id})
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    types = _order({r["layer_type"] or "other" for r in rows})
    if not types:
        _empty(ax, "no layer with a fitted α and a block index")
        return _save(fig, path)
    colors = _colors(types)
    for t in types:
        pts = [(r["block"], r["alpha"]) for r in rows if (r["layer_type"] or "other") == t]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, color=colors[t], label=t)
    ax.set_xlabel("block")
    ax.set_ylabel("α")
    ax.legend(fontsize=7, ncols=2)
    ax.set_title(f"α by depth — {run_id}", fontsize=10)
    return _save(fig, path)


_DECOMP = (("alpha", "α"), ("alpha_kron", "α_Kron"), ("beta", "β"), ("phi", "φ"), ("chi_slope", "χ-slope"))


def plot_decomposition(con, run_id: str, path: Path) -> Path:
    aggs = ", ".join(f"avg({c}) AS {c}_mean, stddev_samp({c}) AS {c}_std" for c, _ in _DECOMP)
    rows = _rows(con, f"SELECT layer_type, {aggs} FROM layers WHERE run_id = $r GROUP BY layer_type",
                 {"r": run_id})
    rows = [r for r in rows if any(_fin(r[f"{c}_mean"]) for c, _ in _DECOMP)]
    fig = Figure(figsize=(max(6, 1.3 * len(rows) + 2), 4), layout="constrained")
    ax = fig.subplots()
    if not rows:
        _empty(ax, "no layer with fitted exponents")
        return _save(fig, path)
    by_type = {r["layer_type"] or "other": r for r in rows}
    types = _order(set(by_type))
    x = np.arange(len(types))
    w = 0.8 / len(_DECOMP)
    for j, (c, label) in enumerate(_DECOMP):
        means = [by_type[t][f"{c}_mean"] if _fin(by_type[t][f"{c}_mean"]) else np.nan for t in types]
        stds = [by_type[t][f"{c}_std"] if _fin(by_type[t][f"{c}_std"]) else 0.0 for t in types]
        ax.bar(x + (j - (len(_DECOMP) - 1) / 2) * w, means, w, yerr=stds, capsize=2, label=label, color=f"C{j}")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x, types, fontsize=8)
    ax.set_ylabel("exponent (mean ± std over layers)")
    ax.legend(fontsize=7, ncols=len(_DECOMP))
    ax.set_title(f"spectral alignment decomposition: α_Kron = β + φ, α = α_Kron + χ-slope — {run_id}", fontsize=9)
    return _save(fig, path)


def plot_s_vs_alphagamma(con, run_id: str, path: Path) -> Path:
    rows = _rows(con, "SELECT layer_type, alpha * gamma AS ag, s FROM layers WHERE run_id = $r "
                      "AND alpha IS NOT NULL AND gamma IS NOT NULL AND s IS NOT NULL", {"r": run_id})
    rows = [r for r in rows if _fin(r["ag"]) and _fin(r["s"])]
    fig = Figure(figsize=(5, 4.5), layout="constrained")
    ax = fig.subplots()
    if not rows:
        _empty(ax, "no layer with α, γ and s")
        return _save(fig, path)
    types = _order({r["layer_type"] or "other" for r in rows})
    colors = _colors(types)
    for t in types:
        pts = [r for r in rows if (r["layer_type"] or "other") == t]
        ax.scatter([r["ag"] for r in pts], [r["s"] for r in pts], s=14, color=colors[t], label=t)
    vals = [r["ag"] for r in rows] + [r["s"] for r in rows]
    lo, hi = min(vals), max(vals)
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=1, label="s = αγ")
    ax.set_xlabel("α·γ")
    ax.set_ylabel("s")
    ax.legend(fontsize=7)
    ax.set_title(f"spectral transfer s ≈ αγ — {run_id}", fontsize=10)
    return _save(fig, path)


FIGURES = {
    "h_vs_sigma.png": plot_h_vs_sigma,
    "alpha_by_type.png": plot_alpha_by_type,
    "alpha_by_depth.png": plot_alpha_by_depth,
    "decomposition.png": plot_decomposition,
    "s_vs_alphagamma.png": plot_s_vs_alphagamma,
}


_TRAJECTORY = (("alpha", "α"), ("alpha_kron", "α_Kron"), ("beta", "β"), ("phi", "φ"), ("grad_snr", "gradient SNR"),
               ("power_law_best", "share of layers best fit by a power law (BIC)"))


def trajectory_rows(con, where: str = "") -> list[dict]:
    """Medians per (step, layer type) of the quantities :func:`trajectory_figure` draws, over the ``layers`` rows
    with a ``step`` (and the SQL condition ``where``, e.g. a run-id pattern)."""
    return _rows(con, "SELECT step, coalesce(layer_type, 'other') AS layer_type, "
                      "median(alpha) AS alpha, median(alpha_kron) AS alpha_kron, median(beta) AS beta, "
                      "median(phi) AS phi, median(grad_snr) AS grad_snr, "
                      "avg(CASE WHEN rank_model = 'power_law' THEN 1.0 ELSE 0.0 END) AS power_law_best "
                      f"FROM layers WHERE step IS NOT NULL {f'AND ({where})' if where else ''} "
                      "GROUP BY ALL ORDER BY step")


def trajectory_figure(rows: list[dict], path: Path, title: str) -> Path:
    """α, α_Kron, β, φ, the gradient SNR (medians per layer type) and the share of layers whose rank profile a
    power law fits best by BIC, against the training step (rows of :func:`trajectory_rows`)."""
    fig = Figure(figsize=(12, 6.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    types = _order({r["layer_type"] for r in rows})
    colors = _colors(types)
    for ax, (key, label) in zip(axes, _TRAJECTORY):
        if not types:
            _empty(ax, "no run with a step")
            continue
        for t in types:
            pts = [(r["step"], r[key]) for r in rows if r["layer_type"] == t and _fin(r[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colors[t], label=t)
        ax.set_xlabel("training step")
        ax.set_title(label, fontsize=10)
    if types:
        axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_trajectory(out: str | os.PathLike, path: Path) -> Path:
    """The trajectory figure over every run of ``out`` with a ``step``."""
    con = query.open(out)
    try:
        rows = trajectory_rows(con)
    finally:
        con.close()
    return trajectory_figure(rows, path, f"over training — {out}")


def plot_run(con, out: str | os.PathLike, run_id: str) -> list[Path]:
    d = store.plots_dir(out, run_id)
    return [fn(con, run_id, d / name) for name, fn in FIGURES.items()]


def make_plots(out: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """Write the figures of ``run_id`` (default: every run with layers) to ``OUT/plots/<run_id>/``."""
    con = query.open(out)
    try:
        runs = [r[0] for r in con.sql("SELECT DISTINCT run_id FROM layers ORDER BY run_id").fetchall()]
        if run_id is not None:
            if run_id not in runs:
                raise ValueError(f"run_id={run_id!r} has no layers in {str(out)!r}; runs with layers: "
                                 f"{', '.join(runs) or 'none'}")
            runs = [run_id]
        paths = [p for r in runs for p in plot_run(con, out, r)]
        steps = con.sql("SELECT count(DISTINCT step) FROM runs WHERE step IS NOT NULL").fetchall()[0][0] \
            if "step" in con.sql("SELECT * FROM runs LIMIT 0").columns else 0
    finally:
        con.close()
    if run_id is None and steps > 1:   # a trajectory (model.checkpoints): one figure over training
        paths.append(plot_trajectory(out, Path(out) / "plots" / "trajectory.png"))
    return paths
