"""The measurement sequence, written once and run by both routes (in-process :func:`curvdist.analyze` and the Ray
stage workers).  Pure: torch in, tensors and rows out; no Ray, no IO.

    m = Measurement(loss="cross_entropy", fisher="mc", mc_samples=1, top_k=20, seed=0, exact=True, gn=True,
                    exact_layers=None, gradient_labels="true", exact_dtype="float32", sketch_rank=512)
    for kind, s in measurement_seeds(logits, targets, m, "stats", 3): ...   # back-propagate s as `kind`
    spectra = spectral_steps(stats, m)                                          # {layer: measure.LayerSpectra}
    names = exact_layer_names(spectra, m)                                       # layers that get exact h
    layer_rows, direction_rows, spectra_rows = assemble_rows(spectra, m, ...)  # the output rows

What it fixes, so that every route and every layout computes the same numbers:

- **Seed schedule.**  The true-label seed ∂(Σ_t ℓ_t)/∂z gives G (and, for ``fisher=empirical``, C_δ in the same
  backward: kind ``both``).  For ``mc`` the labels of micro-batch ``b`` are drawn from a CPU generator seeded with
  ``(seed, b)`` alone (:func:`microbatch_generator`), so they do not depend on the order in which micro-batches are
  processed: a pipeline with several micro-batches in flight, R replicas over disjoint micro-batches, and the
  in-process loop draw identical labels.  The projections pass draws the same labels as the statistics pass
  (the true seed consumes no random numbers), so its Rayleigh quotients equal diag(U C_δ Uᵀ) exactly.
- **Exact-layer selection.**  Exact h and h^GN are measured for the layers with at least one direction that
  ``exact_layers`` selects (:func:`curvdist.vocab.matches`).
- **Exact subset.**  Exact h and h^GN may be measured on a seeded simple random sample of the micro-batches
  (:func:`exact_microbatches`, a function of (number of micro-batches, sample size, seed) alone), the same in
  process and on every stage and replica; directions, σ and the Kronecker quantities always come from all of
  them (:mod:`curvdist.math.subsample` for the estimates and their standard errors).
- **Row assembly.**  :func:`curvdist.math.measure.layer_rows` per layer, in the spectra's order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from curvdist.math import losses, measure
from curvdist.math.forward import exact_torch_dtype
from curvdist.vocab import matches

PASS_KINDS = ("stats", "projections")


@dataclass(frozen=True)
class Measurement:
    """What is measured (not where): the same object drives the in-process route and every stage worker.
    Built from a :class:`curvdist.config.RunConfig` by the driver, from its arguments by :func:`curvdist.analyze`;
    no field has a default here (the defaults live in the config and in ``analyze``'s signature)."""

    loss: str                                # "cross_entropy" or "mse", mean over loss terms
    fisher: str                              # errors of C_δ: "empirical", "mc", "type2"
    mc_samples: int                          # sampled labels per loss term (fisher="mc")
    top_k: int                               # K directions per layer
    seed: int                                # seeds the randomized linear algebra and the mc labels
    exact: bool                              # measure exact h (HVPs)
    gn: bool                                 # and h^GN (JVPs)
    exact_layers: tuple[str, ...] | None     # globs of the layers that get exact h; None: every analysed layer
    gradient_labels: str                     # "true", or "sampled" from the model (the null measurement)
    exact_dtype: str                         # minimum precision of the exact HVPs: float32, float64 or model
    sketch_rank: int                         # Nyström columns l of a sketched factor (curvdist.math.sketch)

    def __post_init__(self) -> None:
        losses.check_loss(self.loss)
        losses.check_fisher(self.fisher)
        losses.check_gradient_labels(self.gradient_labels)
        exact_torch_dtype(self.exact_dtype, torch.float32)   # raises on an unknown name
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be ≥ 1")
        if self.mc_samples < 1:
            raise ValueError(f"mc_samples={self.mc_samples} must be ≥ 1")
        if self.sketch_rank < self.top_k + 2:
            raise ValueError(f"sketch_rank={self.sketch_rank} must be ≥ top_k + 2 = {self.top_k + 2}")
        if self.exact_layers is not None and not isinstance(self.exact_layers, tuple):
            object.__setattr__(self, "exact_layers", tuple(self.exact_layers))


def microbatch_generator(seed: int, microbatch: int) -> torch.Generator:
    """The CPU generator of micro-batch ``microbatch``'s sampled labels: a function of (seed, micro-batch) only."""
    # an odd-multiplier mix of both (no two (seed, micro-batch) pairs of practical size share a stream)
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B97F4A7C15 + (int(microbatch) + 1) * 0xBF58476D1CE4E5B9)
                                         % (2**63 - 1))


def exact_microbatches(total: int, count: int | None, seed: int) -> tuple[int, ...]:
    """The micro-batches (indices into the batch's 0..total−1, ascending) that the exact pass measures: all of
    them when ``count`` is None or ≥ total, else ``count`` drawn without replacement by a CPU generator seeded with
    ``seed`` alone (so every route and layout picks the same ones)."""
    if total < 1:
        raise ValueError(f"the batch has {total} micro-batches: nothing to choose exact micro-batches from")
    if count is None or count >= total:
        return tuple(range(total))
    if count < 1:
        raise ValueError(f"exact micro-batches: count={count} must be ≥ 1 (or None for all {total})")
    g = torch.Generator().manual_seed(int(seed) * 0x2545F4914F6CDD1D % (2**63 - 1) + 17)
    return tuple(sorted(int(i) for i in torch.randperm(total, generator=g)[:count]))


def seed_kinds(fisher: str, pass_kind: str) -> tuple[str, ...]:
    """The backward passes of one micro-batch, in order: ``both`` (empirical: G and C_δ from the true seed);
    otherwise ``true`` (G; statistics pass only) then ``fisher`` (one per fisher seed)."""
    if pass_kind not in PASS_KINDS:
        raise ValueError(f"pass {pass_kind!r} is not one of {PASS_KINDS}")
    if fisher == "empirical":
        return ("both",)
    return (("true",) if pass_kind == "stats" else ()) + ("fisher",)


def error_seeds(logits: torch.Tensor, targets: torch.Tensor, *, loss: str, fisher: str, mc_samples: int, seed: int,
                pass_kind: str, microbatch: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``(kind, seed)`` pairs to back-propagate from ``logits`` for micro-batch ``microbatch`` (see module doc);
    each seed has the logits' shape and is zero on ignored loss terms."""
    for kind in seed_kinds(fisher, pass_kind):
        if kind in ("both", "true"):
            yield kind, next(losses.error_seeds(logits, targets, loss, "empirical"))
        else:
            gen = microbatch_generator(seed, microbatch)
            for s in losses.error_seeds(logits, targets, loss, fisher, generator=gen, mc_samples=mc_samples):
                yield "fisher", s


def measurement_seeds(logits: torch.Tensor, targets: torch.Tensor, m: Measurement, pass_kind: str,
                      microbatch: int) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`error_seeds` with the loss, fisher, mc_samples and seed of ``m``."""
    return error_seeds(logits, targets, loss=m.loss, fisher=m.fisher, mc_samples=m.mc_samples, seed=m.seed,
                       pass_kind=pass_kind, microbatch=microbatch)


def spectral_steps(stats: Mapping, m: Measurement) -> dict[str, measure.LayerSpectra]:
    """:func:`curvdist.math.measure.spectral_step` of every layer's statistics, in order."""
    return {name: measure.spectral_step(st, m.top_k, seed=m.seed) for name, st in stats.items()}


def exact_layer_names(spectra: Mapping[str, measure.LayerSpectra], m: Measurement) -> list[str]:
    """The layers that get exact h and h^GN: ``m.exact``, at least one direction, selected by ``exact_layers``."""
    if not m.exact:
        return []
    return [n for n, sp in spectra.items() if sp.k > 0 and matches(n, m.exact_layers)]


def assemble_rows(spectra: Mapping[str, measure.LayerSpectra], m: Measurement, *,
                  classify: Callable[[str], tuple[str, int | None]], projections: Mapping | None = None,
                  curvature: Mapping | None = None, extra: Callable[[str], dict] | None = None
                  ) -> tuple[list[dict], list[dict], list[dict]]:
    """Output rows of every layer: ``(layer_rows, direction_rows, spectra_rows)``.  ``classify(name)`` gives
    (layer_type, block); ``extra(name)`` adds route-specific layer columns (family, stage, device, timings)."""
    layer_rows, direction_rows, spectra_rows = [], [], []
    for name, sp in spectra.items():
        layer_type, block = classify(name)
        row, d, s = measure.layer_rows(sp, layer_type=layer_type, block=block, fisher=m.fisher,
                                       projections=(projections or {}).get(name),
                                       curvature=(curvature or {}).get(name),
                                       extra=extra(name) if extra else None)
        layer_rows.append(row)
        direction_rows += d
        spectra_rows += s
    return layer_rows, direction_rows, spectra_rows
