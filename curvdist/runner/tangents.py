"""The exact-curvature steps of a stage worker: stacked sweeps in Taylor mode across stages, no autograd graph
spanning actors (:mod:`curvdist.math.stage_tangents`).

One **sweep** per (source stage j, micro-batch b, chunk c): the directions of every exact layer of stage j (a
:class:`~curvdist.math.stage_tangents.DirectionSlice` of at most ``exact_chunk`` of them) travel together as the
T rows of a jet (first and second derivatives along each direction):

    stage j          sweep_forward(b, j, c)             (y, ẏ, ÿ) seeded at j's exact layers (ṡ_t = D_t a, s̈_t = 0)
    stage j<i<S-1    sweep_forward(b, j, c, (ẋ, ẍ))     (ẏ, ÿ) = second-order forward mode of the stage
    last stage       sweep_loss(b, j, c, (ẋ, ẍ))        h_t = ⟨z̄, z̈_t⟩ + ż_tᵀH_ℓż_t, h^GN_t = ż_tᵀH_ℓż_t
    stage i>j        sweep_backward(b, j, c, msg)       passes (h, h^GN, N_b) on: 2T numbers, no compute
    stage j          sweep_backward(b, j, c, msg)       accumulates N_b·h_b per (layer, k)

so a stage's layers share every downstream forward and message, and nothing is kept or recomputed between the
way up and the way back.  Layers on the last stage have their
whole downstream network there and use the in-process route (:func:`curvdist.math.curvature.exact_curvature`) on
the cached stage inputs.  Every stage input was cached by the statistics pass, so nothing upstream is recomputed.
The HVPs run in ``exact_dtype`` (the parameters are upcast for the pass, then cast back losslessly).

With R replicas each replica measures its own micro-batches; :meth:`ExactSteps.end_exact` adds the sums N_b·h_b
and N_b over the replicas before dividing, so R replicas give the numbers of one.  The exact pass may measure a
seeded sample of the micro-batches (``data.exact_sequences``, :func:`curvdist.math.sequence.exact_microbatches`);
each replica then measures the sampled ones among its own, and the per-micro-batch moments
(:class:`curvdist.math.subsample.ExactMoments`) are all-reduced with the sums, for h_se and h_gn_se.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from curvdist.math import noise, subsample
from curvdist.math.curvature import Curvature, exact_curvature
from curvdist.math.forward import exact_torch_dtype, parameters_in
from curvdist.math.stage_tangents import (
    HeadSplit,
    Perturbation,
    jet_slices,
    loss_jet,
    stage_jet,
    widest_after,
)
from curvdist.runner import transport


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


class ExactSteps:
    """Mixin of :class:`curvdist.runner.worker.Worker`: the exact pass.  Uses the worker's ``module``, ``spectra``,
    ``layers``, ``m`` (the measurement), ``spec``, ``group`` (replicas), ``_inputs``, ``_targets``, ``_n_terms``."""

    def reset_exact(self) -> None:
        self._h: dict[str, dict] = {}                # layer → sums over micro-batches (see _accumulate)
        self._local: dict[str, Curvature] = {}
        self._n_local = 0
        self._slices = []
        self._pert: Perturbation | None = None
        self._exact_ctx = None
        self._busy_exact, self._sent_bytes, self._sweeps = 0.0, 0, 0
        self._per_mb: dict[str, dict[int, list]] = {}  # layer → micro-batch → [N_b, h_b (K,), h^GN_b (K,)]
        self._exact_mbs: frozenset[int] | None = None   # the sampled micro-batches (None: all)
        self._population: int | None = None            # micro-batches of the whole batch

    def _measured(self, mbs) -> list[int]:
        """This replica's micro-batches that the exact pass measures, ascending."""
        return sorted(b for b in mbs if self._exact_mbs is None or b in self._exact_mbs)

    # ------------------------------------------------------------------ pass bracket
    def begin_exact(self, chunk: int | None, microbatches: tuple[int, ...] | None = None,
                    population: int | None = None) -> int:
        """Upcast the parameters to the exact dtype, hook the seeds onto this stage's exact layers (a non-last
        stage), cut their directions into slices of at most ``chunk`` tangents.  ``microbatches``: the sampled
        micro-batches the pass measures (None: all), out of ``population`` in the batch.  Returns the number of
        slices."""
        self.reset_exact()
        self._exact_mbs = None if microbatches is None else frozenset(int(b) for b in microbatches)
        self._chunk = chunk
        self._population = population
        self._xdtype = exact_torch_dtype(self.m.exact_dtype, self.dtype)
        self._exact_ctx = parameters_in(self.module, self._xdtype)
        self._exact_ctx.__enter__()
        self._t_exact = time.perf_counter()
        mine = self.live_layers()
        if mine and not self.spec.is_last:
            self._pert = Perturbation({n: self.layers[n] for n in mine})
            counts = [(n, self.spectra[n].k) for n in mine]
            # rows per jet by this stage's widest activation after each layer for a full micro-batch (one
            # sequence's forward, scaled: the same on every replica, whatever micro-batches it holds), at most chunk
            widest = {}   # a replica that holds no micro-batch runs no sweep: its slices are never used
            if self._inputs:
                x, mask = self._primal(min(self._inputs))
                x1, m1 = x[:1], (None if mask is None else mask[:1])
                widest = widest_after(self.module, lambda: self.module(x1, attention_mask=m1),
                                      {n: self.layers[n] for n in mine}, self.spec.micro_batch)
                # the sweep's rows reach the last stage's logits: cap them as there (4·JET_BUDGET over the logits
                # of a micro-batch, as runner.memory.jet_rows assumes), which this stage's own output does not show
                vocab = getattr(getattr(self.module, "config", None), "vocab_size", None) or 0
                logits = self.spec.micro_batch * x1.shape[1] * vocab
                widest = {n: (w, max(f, logits)) for n, (w, f) in widest.items()}
            self._slices = jet_slices(counts, widest, self.device, cap=chunk)
        return len(self._slices)

    def _restore_dtype(self) -> None:
        if self._pert is not None:
            self._pert.close()
            self._pert = None
        if self._exact_ctx is not None:
            self._exact_ctx.__exit__(None, None, None)
            self._exact_ctx = None

    # ------------------------------------------------------------------ sweeps
    def _primal(self, mb: int):
        x, mask = self._inputs[mb]
        mask = None if mask is None else torch.as_tensor(mask).to(self.device)
        xt = torch.as_tensor(x).to(self.device)
        if xt.is_floating_point():
            xt = xt.to(self._xdtype)
        return xt, mask

    def _tensor(self, a) -> torch.Tensor | None:
        return None if a is None else torch.as_tensor(a).to(self.device, self._xdtype)

    def _send(self, t: torch.Tensor | None):
        """What goes to the next stage (:func:`curvdist.runner.transport.wire`), its bytes counted."""
        if t is None:
            return None
        out = transport.wire(t, self.spec.transport)
        self._sent_bytes += transport.nbytes(out)
        return out

    def _jet(self, mb: int, src: int, chunk: int, msg: dict | None, head: HeadSplit | None = None):
        """(y, ẏ, ÿ) of this stage in sweep (src, chunk), seeded here on the source stage."""
        x, mask = self._primal(mb)
        T = msg["rows"] if msg is not None else len(self._slices[chunk])
        xd, xdd = (self._tensor(msg["first"]), self._tensor(msg["second"])) if msg is not None else (None, None)
        kwargs = {"attention_mask": mask}
        if src != self.spec.stage:
            return (*stage_jet(self.module, x, xd, xdd, T=T, kwargs=kwargs, head=head), T)
        sl = self._slices[chunk]
        with self._pert.of(sl, {n: (self.spectra[n].U, self.spectra[n].V) for n in sl.layers}):
            return (*stage_jet(self.module, x, xd, xdd, T=T, kwargs=kwargs), T)

    def sweep_forward(self, mb: int, src: int, chunk: int, msg: dict | None = None) -> dict:
        """(ẏ, ÿ) of this stage's output for the next: seeded on the source stage, carried from ``msg`` (the
        previous stage's) downstream."""
        t0 = time.perf_counter()
        if self.spec.sleep_s:   # schedule tests: the stage's compute replaced by a fixed time
            time.sleep(self.spec.sleep_s)
        self._sweeps += src == self.spec.stage
        _, first, second, T = self._jet(mb, src, chunk, msg)
        out = {"rows": T, "first": self._send(first), "second": self._send(second)}
        self._busy_exact += time.perf_counter() - t0
        return out

    def sweep_loss(self, mb: int, src: int, chunk: int, msg: dict) -> dict:
        """Last stage: the jet to the logits, then h_t and h^GN_t at the loss (2T numbers go back)."""
        t0 = time.perf_counter()
        if self.spec.sleep_s:
            time.sleep(self.spec.sleep_s)
        head = HeadSplit(self.module)
        try:
            z, zd, zdd, T = self._jet(mb, src, chunk, msg, head)
            tgt = torch.as_tensor(self._targets[mb]).to(self.device)
            h, h_gn, n_b = loss_jet(z, zd, zdd, tgt, self.m.loss, T, head=head.term())
        finally:
            head.close()
        out = {"n_terms": int(n_b), "h": to_numpy(h), "h_gn": to_numpy(h_gn) if self.m.gn else None}
        self._busy_exact += time.perf_counter() - t0
        return out

    def sweep_backward(self, mb: int, src: int, chunk: int, msg: dict) -> dict | int:
        """Pass (h, h^GN, N_b) upstream, or, on the source stage, accumulate them; returns the tangents measured
        there (so the driver can count finished sweeps)."""
        if src != self.spec.stage:
            return msg
        t0 = time.perf_counter()
        sl = self._slices[chunk]
        self._accumulate(mb, sl, torch.as_tensor(msg["h"]), msg)
        self._busy_exact += time.perf_counter() - t0
        return len(sl)

    def _accumulate(self, mb: int, sl, h: torch.Tensor, msg: dict) -> None:
        """Per (layer, k): N_b·h_b, N_b·h^GN_b, per half, and N_b (a layer's directions may span chunks)."""
        n_b, half = float(msg["n_terms"]), noise.half_of(mb)
        h_raw = h.double().cpu()
        gn_raw = torch.as_tensor(msg["h_gn"]).double() if msg["h_gn"] is not None else None
        h = h_raw * n_b
        h_gn = gn_raw * n_b if gn_raw is not None else torch.zeros_like(h)
        for t, (layer, k) in enumerate(sl.entries):
            K = self.spectra[layer].k
            unit = self._per_mb.setdefault(layer, {}).setdefault(
                mb, [n_b, torch.zeros(K, dtype=torch.float64), None if gn_raw is None else
                     torch.zeros(K, dtype=torch.float64)])
            unit[1][k] = h_raw[t]
            if gn_raw is not None:
                unit[2][k] = gn_raw[t]
            acc = self._h.setdefault(layer, {"n": torch.zeros(3, K, dtype=torch.float64),
                                             "h": torch.zeros(3, K, dtype=torch.float64),
                                             "h_gn": torch.zeros(K, dtype=torch.float64)})
            for row in (0, 1 + half):   # row 0: all micro-batches; rows 1, 2: halves a, b
                acc["n"][row, k] += n_b
                acc["h"][row, k] += h[t]
            acc["h_gn"][k] += h_gn[t]

    def exact_local(self, layers: list[str]) -> int:
        """Last stage: its own layers' downstream network is all here, so the in-process route applies
        (:func:`exact_curvature`'s default: one forward per micro-batch, one create_graph backward, a batched double
        backward per layer from the layer outputs) on the cached stage inputs of this replica's micro-batches.  Returns how many micro-batches it measured."""
        t0 = time.perf_counter()
        mbs = self._measured(self._inputs)
        self._local, self._n_local = {}, sum(self._n_terms[b] for b in mbs)
        if layers and mbs:
            data = []
            for mb in mbs:
                x, mask = self._primal(mb)
                inputs = {"x": x} if mask is None else {"x": x, "attention_mask": mask}
                data.append((inputs, torch.as_tensor(self._targets[mb]).to(self.device)))
            dirs = {n: (self.spectra[n].U, self.spectra[n].V) for n in layers}
            self._local = exact_curvature(self.module, data, self.m.loss, dirs,
                                          layers={n: self.layers[n] for n in layers}, gn=self.m.gn, keys=mbs,
                                          population=self._population)   # chunks by CHUNK_BUDGET (memory model)
        self._busy_exact += time.perf_counter() - t0
        self.timings["exact_local_s"] = time.perf_counter() - t0
        return len(mbs)

    # ------------------------------------------------------------------ combining
    def end_exact(self) -> list[str]:
        """Combine the replicas' sums and set ``self.curvature``; every replica of the stage calls it at once with
        the same layers (those :meth:`live_layers` names), so the all-reduce lines up.  Per layer the sums are
        (N, N_a, N_b) × K, (N·h, N_a·h_a, N_b·h_b) and N·h^GN.  The driver calls it when every sweep of this
        stage's layers is done (later sweeps of upstream stages may still pass through).  Returns the layers."""
        names = self.live_layers()
        mbs = self._measured(self._n_terms)
        n_half_local = [sum(self._n_terms[b] for b in mbs if noise.half_of(b) == i) for i in (0, 1)]
        parts, moments = [], []
        for n in names:
            K = self.spectra[n].k
            mom = subsample.ExactMoments.zeros(K)
            if n in self._local and self._local[n].moments is not None:
                mom = self._local[n].moments
            for n_b, h_b, gn_b in self._per_mb.get(n, {}).values():
                mom = mom + subsample.ExactMoments.of_unit(n_b, h_b, gn_b, K)
            moments += mom.to_tensors()
            n3 = torch.zeros(3, K, dtype=torch.float64)
            h3 = torch.zeros(3, K, dtype=torch.float64)
            h_gn = torch.zeros(K, dtype=torch.float64)
            if n in self._local:   # the in-process route returns means over this replica's micro-batches
                c = self._local[n]
                counts = [float(self._n_local)] + [float(x) for x in n_half_local]
                n3 += torch.tensor(counts, dtype=torch.float64)[:, None]
                h3[0] = c.h.double() * counts[0]
                for i in (0, 1):
                    if counts[1 + i]:
                        h3[1 + i] = c.h_half[i].double() * counts[1 + i] if c.h_half is not None else h3[0]
                if c.h_gn is not None:
                    h_gn = c.h_gn.double() * counts[0]
            elif n in self._h:
                a = self._h[n]
                n3, h3, h_gn = a["n"], a["h"], a["h_gn"]
            parts += [n3, h3, h_gn]
        parts = self.group.all_reduce_sum(parts + moments)
        parts, moments = parts[:3 * len(names)], parts[3 * len(names):]
        self.curvature = {}
        w = len(subsample.ExactMoments.zeros(1).to_tensors())
        for i, n in enumerate(names):
            n3, h3, h_gn = parts[3 * i:3 * i + 3]
            if float(n3[0].min()) > 0:
                N = n3[0]
                mom = subsample.ExactMoments.from_tensors(moments[w * i:w * (i + 1)])
                self.curvature[n] = Curvature(h=h3[0] / N, h_gn=(h_gn / N) if self.m.gn else None,
                                              h_half=noise.half_means(h3[1:], [float(n3[1, 0]), float(n3[2, 0])]),
                                              moments=mom, population=self._population or int(round(mom.units)))
        self._h, self._local, self._n_local, self._per_mb = {}, {}, 0, {}
        return list(self.curvature)

    def finish_exact(self) -> dict:
        """After every sweep: restore the parameters' dtype, drop the ε hooks; this worker's figures of the pass
        (busy seconds inside sweep calls, bytes of tangents sent, sweeps started here, the HVP dtype)."""
        self._restore_dtype()
        wall = time.perf_counter() - self._t_exact
        self.timings["exact_s"] = wall
        return {"stage": self.spec.stage, "replica": self.spec.replica, "busy_s": self._busy_exact, "wall_s": wall,
                "sent_bytes": self._sent_bytes, "sweeps": self._sweeps,
                "exact_dtype": str(self._xdtype).replace("torch.", "")}
