"""α over training (issues 13 and 16): the section of docs/reproduction.md on the LM's trajectory run.

The checkpoints of one seeded training run (steps 20, 80, 200, epoch 1, final) are measured as one
``model.checkpoints`` trajectory (:func:`curvdist.reference.reproduce.phase_trajectory`, runs ``lm-traj-step<N>``):
directions σ_k, u_k, v_k and the Kronecker part from all held-out sequences, exact h on a seeded subsample of whole
micro-batches (``data.exact_sequences``), so every exact α carries ``alpha_se`` (the OLS scatter and the error of h
from the subsample, :func:`curvdist.math.fit.alpha_se_from_h`).  Every number is a DuckDB query on the snapshot; a
snapshot without these runs renders nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

from curvdist.vocab import GRAD_SNR_FLOOR

from .queries import LM_TYPES, f, one, q, table

BASE = "lm-traj"               # run ids lm-traj-step<N>
TYPES = (*LM_TYPES, "head")
# the final LM measured the earlier ways, beside its trajectory point: (run, what it is)
# runs of the same checkpoints (by their training-metrics name) with directions and exact h from one small batch
BESIDE = {"lm-step20": ("lm-step20-b128",), "lm-epoch1": ("lm-epoch1-b64",), "lm": ("lm-final-b128",)}
# the Kronecker part (exact=false) of the same checkpoints on the same 2048 sequences, in 64-sequence micro-batches
KRON = {"lm-step20": "lm-step20-kron-b2048", "lm-step80": "lm-step80-kron-b2048",
        "lm-epoch1": "lm-epoch1-kron-b2048", "lm": "lm-kron-b2048"}
_LIKE = f"'{BASE}-step%'"


def runs(con) -> list[dict]:
    """The trajectory's runs in step order: run_id, step, and the checkpoint's training metrics (eval loss)."""
    rows = q(con, f"SELECT run_id, max(step) AS step FROM layers WHERE run_id LIKE {_LIKE} AND step IS NOT NULL "
                  "GROUP BY run_id ORDER BY step")
    for r in rows:
        m = q(con, "SELECT model, t2.key, t2.value FROM training t1 JOIN training t2 USING (model) "
                   "WHERE t1.key = 'steps' AND t1.value = $s AND model NOT LIKE '%(earlier checkpoint)'",
              {"s": r["step"]})
        r.update({x["key"]: x["value"] for x in m})
        r["model"] = m[0]["model"] if m else None
    return rows


def _data(con, run: str) -> dict:
    return json.loads(one(con, "SELECT config_json FROM runs WHERE run_id = $r", {"r": run}) or "{}").get("data", {})


def type_row(con, run: str, t: str) -> dict:
    return q(con, "SELECT count(*) AS n, avg(alpha) AS alpha, count(alpha) AS n_alpha, median(alpha_se) AS se, "
                  "median(alpha_se_h) AS se_h, avg(alpha_kron) AS alpha_kron, avg(beta) AS beta, avg(phi) AS phi, "
                  "median(grad_snr) AS snr, median(exact_units) AS units, "
                  "avg(CASE WHEN rank_model = 'power_law' THEN 1.0 ELSE 0.0 END) AS power_law "
                  "FROM layers WHERE run_id = $r AND layer_type = $t", {"r": run, "t": t})[0]


def within(con, a: str, b: str, t: str) -> dict:
    """Per layer of type ``t`` in both runs: how many |α_a − α_b| ≤ 2·alpha_se_a, of how many compared."""
    r = q(con, "SELECT count(*) AS n, count(*) FILTER (WHERE abs(x.alpha - y.alpha) <= 2 * x.alpha_se) AS inside, "
               "median(abs(x.alpha - y.alpha)) AS gap FROM layers x JOIN layers y USING (layer) "
               "WHERE x.run_id = $a AND y.run_id = $b AND x.layer_type = $t AND x.alpha IS NOT NULL "
               "AND y.alpha IS NOT NULL AND x.alpha_se IS NOT NULL", {"a": a, "b": b, "t": t})[0]
    return r


def section(con) -> list[str]:
    rs = runs(con)
    if not rs:
        return []
    first = rs[-1]["run_id"]
    d = _data(con, first)
    body = []
    for r in rs:
        for t in TYPES:
            s = type_row(con, r["run_id"], t)
            if not s["n"]:
                continue
            body.append([f(r["step"], 0), f(r.get("eval_loss")), f"`{t}`",
                         f"{f(s['alpha'])} ± {f(s['se'])}" if s["alpha"] is not None else "—", f(s["se_h"]),
                         f(s["alpha_kron"]), f(s["beta"]), f(s["phi"]), f(s["snr"], 2), f(s["power_law"], 2)])
    out = [
        "## α over training",
        "",
        ("The LM's checkpoints from one seeded training run — optimiser steps "
         f"{', '.join(f(r['step'], 0) for r in rs)} (the last two are epoch 1 and the final model) — measured as one "
         "trajectory (`model.checkpoints=[out/reproduce/trajectory/step*]`, links named by each checkpoint's "
         f"optimiser steps; runs `{BASE}-step<N>`, a `step` column in `runs` and `layers`). The directions and the "
         f"Kronecker part come from all {f(d.get('sequences'))} held-out sequences ({f(d.get('micro_batch'))} per "
         f"micro-batch); exact h from a seeded sample of {f(d.get('exact_sequences'))} of them "
         "(`data.exact_sequences`, whole micro-batches, the same ones at every step), with h_se from the spread of "
         "the sampled micro-batches (ratio estimator, finite-population corrected). α ± is the median of "
         "`alpha_se` (OLS scatter and the error of h combined); α_se,h the median of the part due to the "
         "subsample. The BIC column is the share of layers whose σ_k profile a power law fits best."),
        "",
        table(["step", "eval loss", "type", "mean α ± median alpha_se", "median α_se,h", "mean α_Kron", "mean β",
               "mean φ", "median grad_snr", "power-law share (BIC)"], body),
        "",
        *_reading(con, rs),
        "![α over training, GPT-2 LM](reproduction/trajectory_lm.png)",
        "",
        *_beside(con, rs),
    ]
    return out


def _reading(con, rs) -> list[str]:
    types = ", ".join(f"'{t}'" for t in LM_TYPES)
    lines = []
    snr = [(r, one(con, f"SELECT median(grad_snr) FROM layers WHERE run_id = $r AND layer_type IN ({types})",
                   {"r": r["run_id"]})) for r in rs]
    signal = [f(r["step"], 0) for r, s in snr if s is not None and s >= GRAD_SNR_FLOOR]
    lines.append(f"Median grad_snr of the block layers on the direction batch is at least {f(GRAD_SNR_FLOOR, 0)} "
                 f"(signal regime) at step{'s' if len(signal) != 1 else ''} {', '.join(signal) or 'none'} of "
                 f"{len(rs)}.")
    a0 = {t: type_row(con, rs[0]["run_id"], t)["alpha"] for t in LM_TYPES}
    a1 = {t: type_row(con, rs[-1]["run_id"], t)["alpha"] for t in LM_TYPES}
    moves = [f"`{t}` {f(a0[t])} → {f(a1[t])}" for t in LM_TYPES if a0[t] is not None and a1[t] is not None]
    if moves:
        lines.append(f"Mean exact α from step {f(rs[0]['step'], 0)} to step {f(rs[-1]['step'], 0)}: "
                     f"{'; '.join(moves)}.")
    return [" ".join(lines), ""]


def _has(con, run: str) -> bool:
    return bool(one(con, "SELECT count(*) FROM layers WHERE run_id = $r", {"r": run}))


def _batch(con, run: str) -> str:
    d = _data(con, run)
    ex = d.get("exact_sequences")
    return (f"directions from {f(d.get('sequences'))} sequences, exact h from "
            f"{'the same' if ex is None else f'a sample of {f(ex)}'}")


def kron_gap(con, a: str, b: str) -> dict:
    """|α_Kron(a) − α_Kron(b)| of the same checkpoint and sequences, a with exact h and b without, split by index
    set: ``same`` over the layers where both fit α_Kron on the same directions (n_valid_kron equal), ``fewer``
    over those where a's set is smaller: V_c requires h_k > 0 when h is measured (one index set for
    α = α_Kron + χ-slope, :mod:`curvdist.math.fit`), so a direction whose exact h is ≤ 0 leaves a's fits only.
    Each: {"n": layers, "max": largest |Δ| or None}."""
    rows = q(con, "SELECT x.n_valid_kron = y.n_valid_kron AS s, abs(x.alpha_kron - y.alpha_kron) AS g FROM layers x "
                       "JOIN layers y USING (layer) WHERE x.run_id = $a AND y.run_id = $b AND x.alpha_kron IS NOT NULL "
                       "AND y.alpha_kron IS NOT NULL", {"a": a, "b": b})
    out = {}
    for key, same in (("same", True), ("fewer", False)):
        d = [r["g"] for r in rows if bool(r["s"]) is same]
        out[key] = {"n": len(d), "max": max(d) if d else None}
    return out


def _gap_text(g: dict) -> str:
    s, w = g["same"], g["fewer"]
    txt = f"{s['n']} layers on the same directions agree to {s['max']:.0e}" if s["n"] else "no layer on the same directions"
    if w["n"]:
        txt += f", {w['n']} with directions left out differ by up to {w['max']:.2f}"
    return txt


def _beside(con, rs: list[dict]) -> list[str]:
    body, inside, n = [], 0, 0
    for r in rs:
        others = [o for o in BESIDE.get(r["model"], ()) if _has(con, o)]
        if not others:
            continue
        for run in (r["run_id"], *others):
            for t in LM_TYPES:
                s = type_row(con, run, t)
                w = within(con, r["run_id"], run, t) if run != r["run_id"] else None
                if w:
                    inside, n = inside + w["inside"], n + w["n"]
                body.append([f(r["step"], 0), f"`{run}`", _batch(con, run), f"`{t}`", f(s["alpha"]), f(s["se"]),
                             f(s["se_h"]), f(s["snr"], 2), f"{w['inside']} of {w['n']}" if w else "—",
                             f(w["gap"]) if w else "—"])
    kron = [(r, KRON[r["model"]]) for r in rs if r["model"] in KRON and _has(con, KRON[r["model"]])]
    if not body and not kron:
        return []
    out = ["### Beside the runs that take directions and exact h from one small batch", ""]
    if body:
        out += [
            ("The same checkpoints measured the earlier way: directions σ_k, u_k, v_k and exact h from one batch of "
             "64–128 sequences. Per layer type: mean α, median alpha_se and its h part, median grad_snr of the "
             "direction batch, and per layer whether the other run's α lies within 2·alpha_se of the trajectory's "
             "(with the median |Δα|). A difference beyond the error bars is a difference of directions — a small "
             "batch's σ_k, u_k, v_k carry its sampling noise — not of h's subsampling, which alpha_se covers."),
            "",
            table(["step", "run", "batch", "type", "mean α", "median alpha_se", "median α_se,h", "median grad_snr",
                   "layers within 2·alpha_se of the trajectory", "median |Δα|"], body),
            "",
            f"In all, {inside} of {n} layers of the small-batch runs lie within 2·alpha_se of the trajectory's α.",
            "",
        ]
    if kron:
        gaps = [(r, k, kron_gap(con, r["run_id"], k)) for r, k in kron]
        out += [("The Kronecker part against the `*-kron-b2048` runs of the same checkpoints (the same 2048 "
                 "sequences in 64-sequence micro-batches, no exact h): α_Kron is the same wherever both runs fit it "
                 "on the same directions; where the trajectory's exact h (from its 128-sequence sample) is ≤ 0 at "
                 "some direction, that direction leaves all its Kronecker fits too (α_Kron, β, φ and χ-slope share "
                 "one index set, which requires h > 0 when h is measured, so that α = α_Kron + χ-slope holds), and "
                 "α_Kron moves with the set, not with the micro-batch cut: "
                 + "; ".join(f"step {f(r['step'], 0)} (`{k}`): {_gap_text(g)}" for r, k, g in gaps) + "."), ""]
    return out


def figure(con, path: Path) -> Path | None:
    """α, α_Kron, β, φ, grad_snr and the power-law share over the steps (the trajectory figure of `curvdist plot`)."""
    from curvdist import plots

    rows = plots.trajectory_rows(con, f"run_id LIKE {_LIKE}")
    if not rows:
        return None
    return plots.trajectory_figure(rows, path, "over training — GPT-2 LM trained here")
