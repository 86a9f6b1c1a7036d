"""The α-by-layer-type summary of a dataset (``curvdist summary``, the table a run prints): reads the DuckDB views
of :func:`curvdist.io.query.open`, writes nothing.

    con = curvdist.open("out/quickstart")
    print(format_summary(summary(con, run_id)))
"""
from __future__ import annotations

import json
import math
from typing import Any

import duckdb
import pyarrow as pa

from curvdist.io.query import arrow
from curvdist.vocab import GRAD_SNR_FLOOR, LAYER_TYPES

SUMMARY_QUANTITIES = ("alpha", "alpha_kron", "beta", "phi")


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> set[str]:
    return {r[0] for r in con.sql(f"DESCRIBE {view}").fetchall()}


def null_runs(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """run_id → its null run in the dataset (same measurement with gradient_labels=sampled, see config.null_pairs)."""
    from curvdist.config import null_pairs

    configs = {}
    for run_id, text in con.sql("SELECT run_id, config_json FROM runs").fetchall():
        try:
            configs[run_id] = json.loads(text) if text else {}
        except ValueError:
            continue
    return null_pairs({r: d for r, d in configs.items() if isinstance(d, dict)})


def summary(con: duckdb.DuckDBPyConnection, run_id: str | None = None) -> pa.Table:
    """α, α_Kron, β, φ by (run_id, layer_type): ``<q>_mean, <q>_median, <q>_std, <q>_n`` (non-null count), plus
    ``n_layers``; ``n_sketched`` (layers with a factor held as a Nyström sketch) and ``lambda_rel_err_max`` (the
    largest relative error estimate of their eigenvalues); ``grad_snr_median`` and ``stable_directions_median`` with
    ``low_snr`` (median grad_snr below
    :data:`curvdist.vocab.GRAD_SNR_FLOOR`); and, for a run whose null run (:func:`null_runs`) is in the dataset,
    ``null_run_id``, ``alpha_null_mean`` and ``alpha_minus_null`` (mean over the layers of both of α − α_null).
    ``run_id=None`` summarises every run in the dataset."""
    have = _columns(con, "layers")
    aggs = ", ".join(f"avg({q}) AS {q}_mean, median({q}) AS {q}_median, stddev_samp({q}) AS {q}_std, "
                     f"count({q}) AS {q}_n" for q in SUMMARY_QUANTITIES)
    for q in ("grad_snr", "stable_directions"):   # datasets written before these columns existed: nulls
        aggs += f", median({q if q in have else 'CAST(NULL AS DOUBLE)'}) AS {q}_median"
    if "factor_mode_A" in have:                    # sketch mode: how many layers, and their worst λ error estimate
        aggs += (", count(*) FILTER (WHERE factor_mode_A = 'sketch' OR factor_mode_delta = 'sketch') AS n_sketched"
                 ", max(greatest(coalesce(lambda_rel_err_A, 0), coalesce(lambda_rel_err_delta, 0))) FILTER (WHERE "
                 "factor_mode_A = 'sketch' OR factor_mode_delta = 'sketch') AS lambda_rel_err_max")
    else:
        aggs += ", CAST(0 AS BIGINT) AS n_sketched, CAST(NULL AS DOUBLE) AS lambda_rel_err_max"
    pairs = [(r, n) for r, n in null_runs(con).items() if run_id is None or r == run_id]
    values = ", ".join(f"($r{i}, $n{i})" for i in range(len(pairs))) or "(CAST(NULL AS VARCHAR), CAST(NULL AS VARCHAR))"
    params = {f"r{i}": r for i, (r, _) in enumerate(pairs)} | {f"n{i}": n for i, (_, n) in enumerate(pairs)}
    order = "[" + ", ".join(f"'{t}'" for t in LAYER_TYPES) + "]"
    where = "WHERE run_id = $run_id" if run_id is not None else ""
    params |= {"run_id": run_id} if run_id is not None else {}
    sql = (f"WITH pairs(run_id, null_id) AS (VALUES {values}), "
           f"paired AS (SELECT l.run_id, l.layer_type, any_value(p.null_id) AS null_run_id, "
           f"avg(n.alpha) AS alpha_null_mean, avg(l.alpha - n.alpha) AS alpha_minus_null "
           f"FROM layers l JOIN pairs p ON l.run_id = p.run_id JOIN layers n ON n.run_id = p.null_id "
           f"AND n.layer = l.layer GROUP BY 1, 2), "
           f"s AS (SELECT run_id, layer_type, count(*) AS n_layers, {aggs} FROM layers {where} "
           f"GROUP BY run_id, layer_type) "
           f"SELECT s.*, s.grad_snr_median < {GRAD_SNR_FLOOR} AS low_snr, paired.null_run_id, "
           f"paired.alpha_null_mean, paired.alpha_minus_null FROM s LEFT JOIN paired USING (run_id, layer_type) "
           f"ORDER BY run_id, coalesce(list_position({order}, layer_type), 999), layer_type")
    return arrow(con.sql(sql, params=params) if params else con.sql(sql))


SNR_NOTE = (f"! = median grad_snr < {GRAD_SNR_FLOOR:g}: at least half of these layers' ‖G‖² is expected sampling "
            "noise (1 = pure noise); α may measure the batch, not the network (see stable_directions, and compare "
            "with a gradient_labels=sampled run)")


SKETCH_NOTE = ("sketched = layers with C_A or C_δ held as a Nyström sketch (factor_mode); in brackets the largest "
               "relative error estimate of their λ_k (spectra.eigenvalue_err / eigenvalue), which β and φ inherit")


def format_summary(table: pa.Table) -> str:
    """A plain-text rendering of ``summary`` (mean ± std, median, n per quantity; grad_snr and stable directions
    beside α, ``!`` on a low-SNR layer type; α − α_null where a null run exists)."""
    def f(x: Any) -> str:
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

    rows = table.to_pylist()
    nulls = any(r.get("null_run_id") for r in rows)
    sketched = any(r.get("n_sketched") for r in rows)
    head = (["run_id", "layer_type", "n"] + [f"{q} (mean±std / median)" for q in SUMMARY_QUANTITIES]
            + ["grad_snr", "stable"] + (["alpha-alpha_null"] if nulls else [])
            + (["sketched (max λ err)"] if sketched else []))
    lines = []
    for r in rows:
        cells = [str(r["run_id"]), str(r["layer_type"]), str(r["n_layers"])]
        cells += [f"{f(r[q + '_mean'])}±{f(r[q + '_std'])} / {f(r[q + '_median'])}" for q in SUMMARY_QUANTITIES]
        cells += [f(r.get("grad_snr_median")) + (" !" if r.get("low_snr") else ""),
                  "—" if r.get("stable_directions_median") is None else f"{r['stable_directions_median']:g}"]
        cells += [f(r.get("alpha_minus_null"))] if nulls else []
        if sketched:
            n = r.get("n_sketched") or 0
            err = r.get("lambda_rel_err_max")
            cells.append(f"{n}/{r['n_layers']}" + (f" ({err:.1e})" if n and err is not None else ""))
        lines.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *lines)]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *lines])
    text += "\n" + SNR_NOTE if any(r.get("low_snr") for r in rows) else ""
    return text + ("\n" + SKETCH_NOTE if sketched else "")
