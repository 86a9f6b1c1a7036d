"""Batch sizes for α in the signal regime, from a previous run: what `curvdist plan` suggests (issue 16).

    s = suggest_sizes(cfg)        # None unless cfg.out holds a finished run of the same model with noise_scale
    s.sequences, s.exact_sequences

- **N, the statistics batch** (directions, σ, Kronecker quantities): a multiple :data:`NOISE_MULTIPLE` of the
  gradient noise scale B_simple measured before (``noise_scale``, in units = sequences of a language model;
  McCandlish et al. 2018): with U = N units, grad_snr = 1 + U/B_simple, so N = 10·B_simple puts ~90 % of ‖G‖²
  in the signal.  The median over the run's layers is taken (the largest is printed beside it).
- **n, the exact sample** (h, h^GN): the micro-batches whose standard error of h is :data:`TARGET_REL_ERR` of h,
  from the per-micro-batch relative SD of h measured before (``h_unit_rel_sd``, median over directions, then the
  90th percentile over layers; :func:`curvdist.math.subsample.units_for` with the finite-population correction),
  in sequences of the planned micro-batch size.  A micro-batch of a different size changes the per-micro-batch SD
  (≈ 1/√size for independent sequences); the previous run's micro-batch size is scaled to the planned one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curvdist.config import RunConfig
from curvdist.math.subsample import units_for

NOISE_MULTIPLE = 10      # N = this × noise_scale
TARGET_REL_ERR = 0.05    # relative standard error of h the suggested exact sample aims at


@dataclass(frozen=True)
class SizeSuggestion:
    run_id: str                  # the previous run the figures come from
    noise_scale: float           # median over its layers, in sequences
    noise_scale_max: float
    sequences: int               # suggested data.sequences (N)
    h_unit_rel_sd: float | None  # per-micro-batch relative SD of h, scaled to the planned micro-batch size
    exact_sequences: int | None  # suggested data.exact_sequences (n), None without h_unit_rel_sd


def _same_model(prev: dict, cfg: RunConfig) -> bool:
    m = prev.get("model", {})
    return (m.get("name"), m.get("path")) == (cfg.model.name, cfg.model.path)


def suggest_sizes(cfg: RunConfig) -> SizeSuggestion | None:
    """N and n for ``cfg`` from the latest finished run of the same model (model.name and model.path) in
    ``cfg.out`` that measured ``noise_scale``; None when there is none."""
    from curvdist.io import query

    out = Path(cfg.out)
    if not query.is_dataset(out):
        return None
    con = query.open(out)
    try:
        runs = con.sql("select run_id, config_json from runs where status like 'complete%' "
                       "order by created_at desc").fetchall()
        for run_id, config_json in runs:
            prev = json.loads(config_json or "{}")
            if not _same_model(prev, cfg):
                continue
            cols = {r[0] for r in con.sql("describe layers").fetchall()}
            rel = "h_unit_rel_sd" if "h_unit_rel_sd" in cols else "NULL"
            rows = con.execute(f"select noise_scale, {rel} from layers where run_id = ?", [run_id]).fetchall()
            scales = np.array([r[0] for r in rows if r[0] is not None and r[0] > 0], dtype=float)
            if scales.size == 0:
                continue
            return _suggest(cfg, run_id, scales, [r[1] for r in rows if r[1] is not None],
                            prev.get("data", {}).get("micro_batch", cfg.data.micro_batch))
    finally:
        con.close()
    return None


def _suggest(cfg: RunConfig, run_id: str, scales: np.ndarray, rel_sds: list[float],
             prev_micro_batch: int) -> SizeSuggestion:
    scale = float(np.median(scales))
    mb = cfg.data.micro_batch
    N = max(mb, math.ceil(NOISE_MULTIPLE * scale / mb) * mb)
    rel = n = None
    if rel_sds:
        rel = float(np.percentile(rel_sds, 90)) * math.sqrt(prev_micro_batch / mb)
        M = math.ceil(N / mb)
        n = min(N, units_for(rel, TARGET_REL_ERR, population=M) * mb)
    return SizeSuggestion(run_id, scale, float(scales.max()), N, rel, n)
