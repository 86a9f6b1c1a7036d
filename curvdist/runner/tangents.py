"""The exact-curvature steps of a stage worker: stacked sweeps of forward-over-reverse across stages, no autograd
graph spanning actors (:mod:`curvdist.math.stage_tangents`).

One **sweep** per (source stage j, micro-batch b, chunk c): the directions of every exact layer of stage j (a
:class:`~curvdist.math.stage_tangents.DirectionSlice` of at most ``exact_chunk`` of them) travel together as
one-hot tangents of the stage's ε parameters:

    stage j          sweep_forward(b, j, c)             ẏ_j = ∂y/∂ε · e_t   for every tangent t of the slice
    stage j<i<S-1    sweep_forward(b, j, c, ẏ)          ẏ_i = J_x ẋ
    last stage       sweep_loss(b, j, c, ẏ)             ż, h^GN_t = ż_tᵀH_ℓż_t, (z̄, z̄̇), its tangent backward
    stage i>j        sweep_backward(b, j, c, msg)       (x̄, x̄̇) = (J_xᵀȳ, J_xᵀȳ̇ + ∂²f[ȳ]·ẋ)
    stage j          sweep_backward(b, j, c, msg)       h_t = ε̄̇_tt ; accumulates N_b·h_b per (layer, k)

so a stage's layers share every downstream forward, adjoint and message.  Layers on the last stage have their
whole downstream network there and use the in-process route (:func:`curvdist.math.curvature.exact_curvature`) on
the cached stage inputs.  Every stage input was cached by the statistics pass, so nothing upstream is recomputed.
The HVPs run in ``exact_dtype`` (the parameters are upcast for the pass, then cast back losslessly).

With R replicas each replica measures its own micro-batches; :meth:`ExactSteps.end_exact` adds the sums N_b·h_b
and N_b over the replicas before dividing, so R replicas give the numbers of one.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from curvdist.math import losses, noise
from curvdist.math.curvature import Curvature, exact_curvature
from curvdist.math.forward import exact_torch_dtype, parameters_in
from curvdist.math.stage_tangents import (
    PerturbedStage,
    chunk_directions,
    eps_params,
    eps_quadratic,
    loss_tangent,
    slice_directions,
    stage_backward_tangent,
    stage_forward_tangent,
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
        self._saved: dict[tuple, tuple] = {}         # (micro-batch, source, chunk) → what the tangent backward needs
        self._h: dict[str, dict] = {}                # layer → sums over micro-batches (see _accumulate)
        self._local: dict[str, Curvature] = {}
        self._n_local = 0
        self._slices = []
        self._pert: PerturbedStage | None = None
        self._exact_ctx = None
        self._busy_exact, self._sent_bytes, self._sweeps = 0.0, 0, 0

    # ------------------------------------------------------------------ pass bracket
    def begin_exact(self, chunk: int | None) -> int:
        """Upcast the parameters to the exact dtype, hook ε onto this stage's exact layers (a non-last stage), cut
        their directions into slices of at most ``chunk`` tangents.  Returns the number of slices (chunks)."""
        self.reset_exact()
        self._xdtype = exact_torch_dtype(self.m.exact_dtype, self.dtype)
        self._exact_ctx = parameters_in(self.module, self._xdtype)
        self._exact_ctx.__enter__()
        self._t_exact = time.perf_counter()
        mine = self.live_layers()
        if mine and not self.spec.is_last:
            self._pert = PerturbedStage(self.module, {n: self.layers[n] for n in mine})
            self._slices = chunk_directions([(n, self.spectra[n].k) for n in mine], chunk)
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

    def _params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.module.named_parameters()}

    def _stage_fn(self, mb: int, src: int, chunk: int):
        """(fn, params, param_tangent) of this stage in sweep (src, chunk): perturbed by ε on the source stage."""
        x, mask = self._primal(mb)
        kwargs = {"attention_mask": mask}
        if src == self.spec.stage:
            sl = self._slices[chunk]
            dirs = {n: (self.spectra[n].U, self.spectra[n].V) for n in sl.layers}
            eps, eps_dot = eps_params(sl, self._xdtype, self.device)
            return x, self._pert.fn(slice_directions(sl, dirs), kwargs), {**self._params(), **eps}, eps_dot
        from torch.func import functional_call
        return x, (lambda p, xx: functional_call(self.module, p, (xx,), kwargs)), self._params(), None

    def _tensor(self, a) -> torch.Tensor | None:
        return None if a is None else torch.as_tensor(a).to(self.device, self._xdtype)

    def _send(self, t: torch.Tensor | None):
        """What goes to the next stage (:func:`curvdist.runner.transport.wire`), its bytes counted."""
        if t is None:
            return None
        out = transport.wire(t, self.spec.transport)
        self._sent_bytes += transport.nbytes(out)
        return out

    def sweep_forward(self, mb: int, src: int, chunk: int, xdot=None):
        """ẏ (T, *y.shape) of this stage: seeded by ε on the source stage, carried from ``xdot`` downstream."""
        t0 = time.perf_counter()
        if self.spec.sleep_s:   # schedule tests: the stage's compute replaced by a fixed time
            time.sleep(self.spec.sleep_s)
        x, fn, params, pt = self._stage_fn(mb, src, chunk)
        xd = self._tensor(xdot)
        self._sweeps += src == self.spec.stage
        _, ydot = stage_forward_tangent(fn, params, x, xd, pt)
        self._saved[(mb, src, chunk)] = (xd,)
        out = self._send(ydot)
        self._busy_exact += time.perf_counter() - t0
        return out

    def sweep_loss(self, mb: int, src: int, chunk: int, xdot) -> dict:
        """Last stage: forward tangents to the logits, h^GN, (z̄, z̄̇) at the loss, then its tangent backward."""
        t0 = time.perf_counter()
        if self.spec.sleep_s:
            time.sleep(self.spec.sleep_s)
        x, fn, params, _ = self._stage_fn(mb, src, chunk)
        xd = self._tensor(xdot)
        z, zdot = stage_forward_tangent(fn, params, x, xd, None)
        tgt = torch.as_tensor(self._targets[mb]).to(self.device)
        h_gn = losses.hessian_quadratic(z, tgt, self.m.loss, zdot) if self.m.gn else None
        zbar, zbar_dot, n_b = loss_tangent(z.detach(), tgt, self.m.loss, zdot)
        xbar, xbar_dot, _ = stage_backward_tangent(fn, params, x, xd, None, zbar, zbar_dot)
        msg = {"n_terms": int(n_b), "h_gn": None if h_gn is None else to_numpy(h_gn),
               "xbar": self._send(xbar), "xbar_dot": self._send(xbar_dot)}
        self._busy_exact += time.perf_counter() - t0
        return msg

    def sweep_backward(self, mb: int, src: int, chunk: int, msg: dict) -> dict | int:
        """Pass (x̄, x̄̇) upstream, or, on the source stage, read h_t = ε̄̇_tt and accumulate; returns the tangents
        measured there (so the driver can count finished sweeps)."""
        t0 = time.perf_counter()
        x, fn, params, pt = self._stage_fn(mb, src, chunk)
        (xd,) = self._saved.pop((mb, src, chunk))
        xbar, xbar_dot, pbar_dot = stage_backward_tangent(fn, params, x, xd, pt, self._tensor(msg["xbar"]),
                                                          self._tensor(msg["xbar_dot"]),
                                                          input_adjoint=src != self.spec.stage)
        if src == self.spec.stage:
            sl = self._slices[chunk]
            self._accumulate(mb, sl, eps_quadratic(sl, pbar_dot), msg)
            self._busy_exact += time.perf_counter() - t0
            return len(sl)
        out = {"n_terms": msg["n_terms"], "h_gn": msg["h_gn"], "xbar": self._send(xbar),
               "xbar_dot": self._send(xbar_dot)}
        self._busy_exact += time.perf_counter() - t0
        return out

    def _accumulate(self, mb: int, sl, h: torch.Tensor, msg: dict) -> None:
        """Per (layer, k): N_b·h_b, N_b·h^GN_b, per half, and N_b (a layer's directions may span chunks)."""
        n_b, half = float(msg["n_terms"]), noise.half_of(mb)
        h = h.double().cpu() * n_b
        h_gn = torch.as_tensor(msg["h_gn"]).double() * n_b if msg["h_gn"] is not None else torch.zeros_like(h)
        for t, (layer, k) in enumerate(sl.entries):
            K = self.spectra[layer].k
            acc = self._h.setdefault(layer, {"n": torch.zeros(3, K, dtype=torch.float64),
                                             "h": torch.zeros(3, K, dtype=torch.float64),
                                             "h_gn": torch.zeros(K, dtype=torch.float64)})
            for row in (0, 1 + half):   # row 0: all micro-batches; rows 1, 2: halves a, b
                acc["n"][row, k] += n_b
                acc["h"][row, k] += h[t]
            acc["h_gn"][k] += h_gn[t]

    def exact_local(self, layers: list[str]) -> int:
        """Last stage: its own layers' downstream network is all here, so the in-process route applies (one forward
        per micro-batch, one create_graph backward, a double backward per layer from the layer outputs) on the
        cached stage inputs of this replica's micro-batches.  Returns how many micro-batches it measured."""
        t0 = time.perf_counter()
        mbs = sorted(self._inputs)
        self._local, self._n_local = {}, sum(self._n_terms[b] for b in mbs)
        if layers and mbs:
            data = []
            for mb in mbs:
                x, mask = self._primal(mb)
                inputs = {"x": x} if mask is None else {"x": x, "attention_mask": mask}
                data.append((inputs, torch.as_tensor(self._targets[mb]).to(self.device)))
            dirs = {n: (self.spectra[n].U, self.spectra[n].V) for n in layers}
            self._local = exact_curvature(self.module, data, self.m.loss, dirs,
                                          layers={n: self.layers[n] for n in layers}, gn=self.m.gn, keys=mbs)
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
        n_half_local = [sum(n for b, n in self._n_terms.items() if noise.half_of(b) == i) for i in (0, 1)]
        parts = []
        for n in names:
            K = self.spectra[n].k
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
        parts = self.group.all_reduce_sum(parts)
        self.curvature = {}
        for i, n in enumerate(names):
            n3, h3, h_gn = parts[3 * i:3 * i + 3]
            if float(n3[0].min()) > 0:
                N = n3[0]
                self.curvature[n] = Curvature(h=h3[0] / N, h_gn=(h_gn / N) if self.m.gn else None,
                                              h_half=noise.half_means(h3[1:], [float(n3[1, 0]), float(n3[2, 0])]))
        self._h, self._local, self._n_local = {}, {}, 0
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
