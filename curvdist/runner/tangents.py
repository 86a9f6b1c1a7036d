"""The exact-curvature steps of a stage worker: forward-over-reverse across stages, no autograd graph spanning
actors (:func:`curvdist.math.curvature.stage_forward_tangent` / :func:`~curvdist.math.curvature.stage_backward_tangent`).

The stage that owns layer l seeds the parameter tangents ṗ_k = u_k v_kᵀ; ẏ travels to the last stage, which forms
(z̄, z̄̇) at the loss and h^GN; (ȳ, ȳ̇) travel back; the owner reads h_k = ⟨ṗ_k, p̄̇_k⟩ and accumulates N_b·h_b.
Layers on the last stage have their whole downstream network there and use the in-process route
(:func:`curvdist.math.curvature.exact_curvature`) on the cached stage inputs.  Every stage input was cached by the
statistics pass, so nothing upstream is recomputed.

With R replicas each replica measures its own micro-batches; :meth:`ExactSteps.end_exact` adds the sums N_b·h_b
and N_b over the replicas before dividing, so R replicas give the numbers of one.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from curvdist.math import losses, noise
from curvdist.math.curvature import (
    Curvature,
    exact_curvature,
    layer_param_tangent,
    loss_tangent,
    stage_backward_tangent,
    stage_forward_tangent,
    tangent_quadratic,
)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


class ExactSteps:
    """Mixin of :class:`curvdist.runner.worker.Worker`: the exact pass.  Uses the worker's ``module``, ``spectra``,
    ``layers``, ``m`` (the measurement), ``group`` (replicas), ``_inputs``, ``_targets``, ``_n_terms``."""

    def reset_exact(self) -> None:
        self._tangent: dict[tuple, dict] = {}        # (micro-batch, layer) → what the tangent backward needs
        self._h: dict[str, dict] = {}                # layer → sums N_b·h_b (whole and per half) over micro-batches
        self._local: dict[str, Curvature] = {}
        self._n_local = 0

    def _fn(self, mask):
        from torch.func import functional_call
        return lambda params, x: functional_call(self.module, params, (x,), {"attention_mask": mask})

    def _primal(self, mb: int):
        x, mask = self._inputs[mb]
        mask = None if mask is None else torch.as_tensor(mask).to(self.device)
        xt = torch.as_tensor(x).to(self.device)
        if xt.is_floating_point():
            xt = xt.to(self.dtype)
        return xt, mask

    def _params(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.module.named_parameters()}

    def _param_tangent(self, layer: str | None) -> dict[str, torch.Tensor]:
        if layer is None:
            return {}
        U, V = self.spectra[layer].U, self.spectra[layer].V
        return {f"{layer}.weight": layer_param_tangent(self.layers[layer], U.to(self.dtype), V.to(self.dtype))}

    def microbatches(self) -> list[int]:
        """The micro-batches this worker saw in the statistics pass (its replica's share), in order."""
        return sorted(self._inputs)

    def tangent_forward(self, mb: int, xdot=None, layer: str | None = None) -> np.ndarray:
        """ẏ (K, *y.shape) of this stage for tangent ẋ of its input and/or the directions of its own ``layer``."""
        x, mask = self._primal(mb)
        xd = None if xdot is None else torch.as_tensor(xdot).to(self.device, self.dtype)
        pt = self._param_tangent(layer)
        _, ydot = stage_forward_tangent(self._fn(mask), self._params(), x, xd, pt)
        self._tangent[(mb, layer)] = {"xdot": xd, "pt": pt}
        return to_numpy(ydot)

    def tangent_loss(self, mb: int, xdot=None, layer: str | None = None) -> dict:
        """Last stage: forward tangents to the logits, (z̄, z̄̇) at the loss, h^GN, then the tangent backward."""
        x, mask = self._primal(mb)
        xd = None if xdot is None else torch.as_tensor(xdot).to(self.device, self.dtype)
        pt = self._param_tangent(layer)
        z, zdot = stage_forward_tangent(self._fn(mask), self._params(), x, xd, pt)
        tgt = torch.as_tensor(self._targets[mb]).to(self.device)
        h_gn = losses.hessian_quadratic(z, tgt, self.m.loss, zdot) if self.m.gn else None
        zbar, zbar_dot, n_b = loss_tangent(z.detach(), tgt, self.m.loss, zdot)
        self._tangent[(mb, layer)] = {"xdot": xd, "pt": pt}
        msg = {"n_terms": n_b, "h_gn": None if h_gn is None else to_numpy(h_gn)}
        return self._tangent_backward(mb, layer, zbar, zbar_dot, msg)

    def tangent_backward(self, mb: int, msg: dict, layer: str | None = None) -> dict:
        ybar = torch.as_tensor(msg["xbar"]).to(self.device, self.dtype)
        ybar_dot = torch.as_tensor(msg["xbar_dot"]).to(self.device, self.dtype)
        return self._tangent_backward(mb, layer, ybar, ybar_dot, msg)

    def _tangent_backward(self, mb, layer, ybar, ybar_dot, msg) -> dict:
        x, mask = self._primal(mb)
        saved = self._tangent.pop((mb, layer))
        xbar, xbar_dot, pbar_dot = stage_backward_tangent(self._fn(mask), self._params(), x, saved["xdot"],
                                                          saved["pt"], ybar, ybar_dot)
        out = {"n_terms": msg["n_terms"], "h_gn": msg["h_gn"]}
        if layer is not None:   # this stage owns the layer: accumulate N_b·h_b (and N_b·h^GN_b)
            acc = self._h.setdefault(layer, {"n": 0, "h": 0.0, "h_gn": 0.0, "h_half": 0.0, "n_half": [0, 0]})
            n_b, half = int(msg["n_terms"]), noise.half_of(mb)
            hq = n_b * tangent_quadratic(saved["pt"], pbar_dot).double().cpu()
            acc["n"] += n_b
            acc["h"] = acc["h"] + hq
            acc["h_half"] = acc["h_half"] + torch.stack([hq * (half == 0), hq * (half == 1)])
            acc["n_half"][half] += n_b
            if msg["h_gn"] is not None:
                acc["h_gn"] = acc["h_gn"] + n_b * torch.as_tensor(msg["h_gn"]).double()
            return out
        out["xbar"] = None if xbar is None else to_numpy(xbar)
        out["xbar_dot"] = None if xbar_dot is None else to_numpy(xbar_dot)
        return out

    def exact_local(self, layers: list[str]) -> int:
        """Last stage: its own layers' downstream network is all here, so the fast in-process route applies (one
        forward per micro-batch, one create_graph backward, a double backward per layer from the layer outputs)
        on the cached stage inputs of this replica's micro-batches.  Returns how many micro-batches it measured."""
        t0 = time.perf_counter()
        mbs = self.microbatches()
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
        self.timings["exact_local_s"] = time.perf_counter() - t0
        return len(mbs)

    def end_exact(self) -> list[str]:
        """Combine the replicas' sums and set ``self.curvature``; every replica calls it with the same layers
        (those :meth:`live_layers` names), so the all-reduce lines up.  Per layer the sums are N·h, N·h^GN, the
        per-half N_a·h_a, N_b·h_b (2, K), and N, N_a, N_b.  Returns the layers measured."""
        names = self.live_layers()
        n_half_local = [sum(n for b, n in self._n_terms.items() if noise.half_of(b) == i) for i in (0, 1)]
        parts = []
        for n in names:
            K = self.spectra[n].k
            zeros = torch.zeros(K, dtype=torch.float64)
            if n in self._local:   # the in-process route returns means over this replica's micro-batches
                c = self._local[n]
                counts = [float(self._n_local)] + [float(x) for x in n_half_local]
                h = c.h.double() * counts[0]
                h_gn = c.h_gn.double() * counts[0] if c.h_gn is not None else zeros
                h_half = torch.stack([c.h_half[i].double() * counts[1 + i] if c.h_half is not None and counts[1 + i]
                                      else zeros for i in (0, 1)])
                if c.h_half is None:   # one half empty here: its sum is all of h
                    h_half = torch.stack([h if counts[1 + i] else zeros for i in (0, 1)])
            elif n in self._h:
                a = self._h[n]
                counts = [float(a["n"])] + [float(x) for x in a["n_half"]]
                h = torch.as_tensor(a["h"], dtype=torch.float64).expand(K).clone()
                h_gn = torch.as_tensor(a["h_gn"], dtype=torch.float64).expand(K).clone()
                h_half = torch.as_tensor(a["h_half"], dtype=torch.float64).expand(2, K).clone()
            else:   # this replica measured no micro-batch of this layer
                counts, h, h_gn, h_half = [0.0, 0.0, 0.0], zeros, zeros, torch.zeros(2, K, dtype=torch.float64)
            parts += [torch.tensor(counts, dtype=torch.float64), h, h_gn, h_half]
        parts = self.group.all_reduce_sum(parts)
        self.curvature = {}
        for i, n in enumerate(names):
            counts, h, h_gn, h_half = parts[4 * i:4 * i + 4]
            N, N_a, N_b = (float(x) for x in counts.tolist())
            if N > 0:
                self.curvature[n] = Curvature(h=h / N, h_gn=(h_gn / N) if self.m.gn else None,
                                              h_half=noise.half_means(h_half, [N_a, N_b]))
        self._h, self._local, self._n_local = {}, {}, 0
        return list(self.curvature)
