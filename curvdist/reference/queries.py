"""DuckDB helpers of the reproduction report: the snapshot views, formatting, per-type statistics and the claims.

Every number of docs/reproduction.md comes through :func:`q` / :func:`one` on a connection from :func:`connect`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb

from curvdist.vocab import LAYER_TYPES

PAPER = {("cnn", "conv"): "1.94–2.17", ("mlp", "other"): "2.18", ("lm", "attn_qkv"): "1.43",
         ("lm", "attn_out"): "1.17", ("lm", "mlp_up"): "0.84", ("lm", "mlp_down"): "1.15"}


LM_TYPES = ("attn_qkv", "attn_out", "mlp_up", "mlp_down")


LLAMA_TYPES = ("attn_q", "attn_k", "attn_v", "attn_out", "mlp_gate", "mlp_up", "mlp_down")


MODEL_OF = {"lm": "GPT-2 LM (trained here)", "cnn": "ResNet (trained here)", "mlp": "MLP (trained here)",
            "smollm2": "SmolLM2-135M", "minilm": "all-MiniLM-L6-v2"}


NEAR_2 = 0.4          # tolerance of "α near 2" for conv and MLP-network layers


THRESHOLD = 1.2       # the paper's prediction for LLaMA-class MLP layers: α < 1.2


MAIN_DIRS = ("lm", "cnn", "mlp", "smollm2", "minilm")


TYPE_ORDER = "[" + ", ".join(f"'{t}'" for t in LAYER_TYPES) + "]"


LAYER_COLS = ("run_id, layer, layer_type, block, family, m, n, rows, n_terms, fisher, alpha, r2_alpha, alpha_kron, "
               "r2_alpha_kron, beta, phi, chi_slope, gamma, s, triangle_rel_error, n_valid, n_valid_kron, status, "
               "t_exact_s, n_units, grad_snr, noise_scale, stable_directions, alpha_se, alpha_half_a, alpha_half_b, "
               "alpha_se_h, exact_units, rank_model, step")


# columns of issues 12, 13 and 16 that older snapshots lack (read as null)
SIGNAL_COLS = {"layers": [("n_units", "BIGINT"), ("grad_snr", "DOUBLE"), ("noise_scale", "DOUBLE"),
                          ("stable_directions", "INTEGER"), ("alpha_se", "DOUBLE"), ("alpha_half_a", "DOUBLE"),
                          ("alpha_half_b", "DOUBLE"), ("alpha_se_h", "DOUBLE"), ("exact_units", "BIGINT"),
                          ("rank_model", "VARCHAR"), ("step", "BIGINT")],
               "directions": [("stability", "DOUBLE"), ("kron_floor_ratio", "DOUBLE")],
               "runs": [("created_at", "TIMESTAMP WITH TIME ZONE")]}


def connect(snap: str | Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET threads = 1")
    for name in ("layers", "directions", "runs", "phases", "training", "dirstats"):
        path = Path(snap) / f"{name}.parquet"
        if name == "dirstats" and not path.exists():
            continue
        path = str(path.resolve()).replace("'", "''")
        src = f"read_parquet('{path}', union_by_name=true)"
        have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
        extra = "".join(f", CAST(NULL AS {typ}) AS {col}" for col, typ in SIGNAL_COLS.get(name, ())
                        if col not in have)   # a snapshot written before these columns existed
        con.execute(f"CREATE VIEW {name} AS SELECT *{extra} FROM {src}")
    return con


def f(x, d: int = 3) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{d}f}"


def q(con, sql: str, params: dict | None = None) -> list[dict]:
    rel = con.execute(sql, params or {})
    cols = [c[0] for c in rel.description]
    return [dict(zip(cols, r)) for r in rel.fetchall()]


def one(con, sql: str, params: dict | None = None):
    rows = q(con, sql, params)
    return next(iter(rows[0].values())) if rows else None


def table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def has_run(con, run_id: str) -> bool:
    return bool(one(con, "SELECT count(*) FROM layers WHERE run_id = $r", {"r": run_id}))


def stats(con, run_id: str, layer_type: str, col: str = "alpha", extra: str = "") -> dict:
    return q(con, f"SELECT avg({col}) AS mean, stddev_samp({col}) AS std, count({col}) AS n, min({col}) AS min, "
                  f"max({col}) AS max, median({col}) AS median, median(r2_alpha) AS r2 FROM layers "
                  f"WHERE run_id = $r AND layer_type = $t {extra}", {"r": run_id, "t": layer_type})[0]


def mean_alpha(con, run_id: str, types: tuple[str, ...] | None = None) -> float | None:
    cond = "" if types is None else "AND layer_type IN (" + ", ".join(f"'{t}'" for t in types) + ")"
    return one(con, f"SELECT avg(alpha) FROM layers WHERE run_id = $r {cond}", {"r": run_id})


def claims(con) -> dict[str, bool]:
    """The qualitative statements of the document, computed from the snapshot."""
    conv, mlpnet = stats(con, "cnn", "conv"), stats(con, "mlp", "other")
    lm = {t: stats(con, "lm", t)["mean"] for t in LM_TYPES}
    lm_all = mean_alpha(con, "lm", LM_TYPES)
    return {
        "conv_near_2": conv["mean"] is not None and abs(conv["mean"] - 2) <= NEAR_2,
        "mlp_net_near_2": mlpnet["mean"] is not None and abs(mlpnet["mean"] - 2) <= NEAR_2,
        "lm_below_cnn": lm_all is not None and conv["mean"] is not None and lm_all < conv["mean"],
        "lm_each_type_below_cnn": conv["mean"] is not None and all(v is not None and v < conv["mean"]
                                                                   for v in lm.values()),
        "lm_mlp_up_lowest": all(v is not None for v in lm.values()) and min(lm, key=lm.get) == "mlp_up",
        "lm_qkv_above_attn_out": None not in (lm["attn_qkv"], lm["attn_out"]) and lm["attn_qkv"] > lm["attn_out"],
        "lm_mlp_down_above_mlp_up": None not in (lm["mlp_down"], lm["mlp_up"]) and lm["mlp_down"] > lm["mlp_up"],
    }


def mlp_answer(con, run_id: str, types: tuple[str, ...]) -> dict:
    cond = ", ".join(f"'{t}'" for t in types)
    return q(con, f"SELECT avg(alpha) AS mean, stddev_samp(alpha) AS std, min(alpha) AS min, max(alpha) AS max, "
                  f"count(alpha) AS n, count(*) FILTER (WHERE alpha < {THRESHOLD}) AS below FROM layers "
                  f"WHERE run_id = $r AND layer_type IN ({cond})", {"r": run_id})[0]


def _cfg(con, run: str) -> dict:
    return json.loads(one(con, "SELECT config_json FROM runs WHERE run_id = $r", {"r": run}) or "{}")


def loss_terms_of(con, run: str):
    return one(con, "SELECT max(n_terms) FROM layers WHERE run_id = $r", {"r": run})


def _by_type(con, run: str, col: str, t: str):
    return one(con, f"SELECT avg({col}) FROM layers WHERE run_id = $r AND layer_type = $t", {"r": run, "t": t})
