"""The SmolLM2 batch-size check of docs/reproduction.md: ``smollm2`` (4 sequences) against ``smollm2-b1024``
(16 sequences of the same pydoc text, whose seeded windows include the 4 of ``smollm2``), exact h for block 29
in both, Kronecker quantities for all 30 blocks in both.  Every number is a query on the snapshot."""
from __future__ import annotations

from .queries import LLAMA_TYPES, THRESHOLD, f, has_run, loss_terms_of, q, table

REF, BIG = "smollm2", "smollm2-b1024"
BLOCK = 29
MLP = ("mlp_gate", "mlp_up", "mlp_down")


def _verdict(values: list[float]) -> str:
    """The answer's wording of :func:`curvdist.reference.sections._answer` for a set of α values."""
    if not values:
        return "not measured"
    if max(values) < THRESHOLD:
        return "yes"
    return "on average" if sum(values) / len(values) < THRESHOLD else "no"


def _values(con, run: str, col: str, block: int | None) -> list[float]:
    cond = "" if block is None else f"AND block = {int(block)}"
    types = ", ".join(f"'{t}'" for t in MLP)
    return [r["v"] for r in q(con, f"SELECT {col} AS v FROM layers WHERE run_id = $r AND layer_type IN ({types}) "
                                   f"AND {col} IS NOT NULL {cond}", {"r": run})]


def claim(con) -> dict | None:
    """Whether the MLP answer (α < THRESHOLD) changes with the 4× batch: per batch, the verdict and count for block
    29's MLP layers (exact α) and for all MLP layers' α_Kron; ``changes`` when either verdict differs."""
    if not (has_run(con, REF) and has_run(con, BIG)):
        return None
    c = {"terms": (loss_terms_of(con, REF), loss_terms_of(con, BIG))}
    for key, col, block in (("exact", "alpha", BLOCK), ("kron", "alpha_kron", None)):
        vals = [_values(con, r, col, block) for r in (REF, BIG)]
        c[key] = [{"verdict": _verdict(v), "below": sum(x < THRESHOLD for x in v), "n": len(v)} for v in vals]
    c["changes"] = any(c[k][0]["verdict"] != c[k][1]["verdict"] for k in ("exact", "kron"))
    return c


def sentence(con) -> str:
    c = claim(con)
    if c is None:
        return ""
    (na, nb), e, k = c["terms"], c["exact"], c["kron"]
    return (f"Batch-size check: the answer to \"do MLP layers have α < {THRESHOLD}?\" "
            + ("**changes**" if c["changes"] else "does **not** change")
            + f" with the 4× batch ({f(na)} → {f(nb)} loss terms): block {BLOCK}'s MLP layers have exact "
            f"α < {THRESHOLD} in {e[0]['below']} of {e[0]['n']} → {e[1]['below']} of {e[1]['n']} (answer "
            f"{e[0]['verdict']} → {e[1]['verdict']}), and the MLP layers of all blocks have α_Kron < {THRESHOLD} in "
            f"{k[0]['below']} of {k[0]['n']} → {k[1]['below']} of {k[1]['n']} (answer {k[0]['verdict']} → "
            f"{k[1]['verdict']}).")


def section(con) -> list[str]:
    """The table and sentence for the SmolLM2 section (nothing when ``smollm2-b1024`` is not in the snapshot)."""
    if not (has_run(con, REF) and has_run(con, BIG)):
        return []
    na, nb = loss_terms_of(con, REF), loss_terms_of(con, BIG)
    seq = {r["run_id"]: r["n"] for r in q(con, "SELECT run_id, count(DISTINCT block) AS n FROM layers "
                                               "WHERE run_id IN ($a, $b) AND alpha_kron IS NOT NULL GROUP BY 1",
                                          {"a": REF, "b": BIG})}
    body = []
    for t in LLAMA_TYPES:
        a, b = (q(con, "SELECT avg(alpha) AS v FROM layers WHERE run_id = $r AND block = $k AND layer_type = $t",
                  {"r": r, "k": BLOCK, "t": t})[0]["v"] for r in (REF, BIG))
        body.append([f"exact α, block {BLOCK}", f"`{t}`", f(a), f(b), f(b - a) if None not in (a, b) else "—"])
    for t in LLAMA_TYPES:
        a, b = (q(con, "SELECT avg(alpha_kron) AS v FROM layers WHERE run_id = $r AND layer_type = $t",
                  {"r": r, "t": t})[0]["v"] for r in (REF, BIG))
        body.append([f"mean α_Kron, {seq.get(BIG, '—')} blocks", f"`{t}`", f(a), f(b),
                     f(b - a) if None not in (a, b) else "—"])
    return [
        (f"Evaluation batch (`{BIG}`): the same measurement on 16 sequences of the same pydoc text "
         f"({f(na)} → {f(nb)} loss terms; the seeded window draw of `curvdist.io.data` keeps the first draws, so the 4 "
         f"sequences of `{REF}` are among the 16), exact h for block {BLOCK} only (its downstream is the final norm "
         "and the head), α_Kron for every block:"),
        "",
        table(["quantity", "type", f"{f(na)} loss terms ({REF})", f"{f(nb)} loss terms ({BIG})", "difference"],
              body),
        "",
        sentence(con),
        "",
    ]
