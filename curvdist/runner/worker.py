"""One pipeline stage: a slice of the checkpoint, its layers' statistics, spectral work and curvature.

``Worker`` is a plain class (no Ray import) so that the same code runs as a Ray actor
(``ray.remote(Worker)``, see :mod:`curvdist.runner.driver`) and in-process in tests.  The driver streams every
micro-batch through the stages:

    forward:   y_0 = stage_0.forward(b, input_ids)  →  y_1 = stage_1.forward(b, y_0)  → …
    loss:      grads = last.loss_backward(b, y_{S-2}, targets)   {seed id: ∂/∂x of the last stage's input}
    backward:  grads = stage_j.backward(b, grads)  for j = S-2 … 0
    close:     stage_j.end_microbatch(b, n_terms)

Seeds (the true-label seed for G, the fisher seeds for C_δ) are created on the last stage, in the same order and
with the same CPU generator as the in-process :func:`curvdist.math.factors.collect_statistics`, so a run with any
number of stages computes the same numbers.  Tensors travel between stages as numpy arrays (zero-copy in Ray's
object store); bfloat16 hidden states travel as float32 and are cast back.
"""
from __future__ import annotations

import os
import resource
import time
from typing import Any

import numpy as np
import torch

from curvdist.io import checkpoint
from curvdist.io.slice import build_slice
from curvdist.math import families, forward, losses, measure, noise
from curvdist.math.factors import StatisticsCollector
from curvdist.runner.supervise import fault_point
from curvdist.vocab import matches

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.cpu().numpy()


class Worker:
    """Holds blocks ``first_block..last_block`` of the checkpoint and the statistics of its selected layers.

    ``spec`` keys: checkpoint (dir), stage (index), first_block, last_block, has_embedding, has_head, layers (the
    names this stage analyses), dtype, stat_dtype, device, loss, fisher, mc_samples, top_k, seed,
    factor_budget_bytes, threads, attn_implementation, exact, gn.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        self.device = torch.device(spec.get("device", "cpu"))
        self.dtype = DTYPES[spec.get("dtype", "float32")]
        self.stat_dtype = DTYPES[spec.get("stat_dtype", "float32")]
        t0 = time.perf_counter()
        index = checkpoint.CheckpointIndex.open(spec["checkpoint"])
        fault_point(spec, "load")
        self.module = build_slice(index, spec["first_block"], spec["last_block"], has_embedding=spec["has_embedding"],
                                  has_head=spec["has_head"], dtype=self.dtype, device=self.device,
                                  attn_implementation=spec.get("attn_implementation", "sdpa"))
        for p in self.module.parameters():
            p.requires_grad_(True)   # so that layer outputs carry a graph; gradients are taken w.r.t. outputs only
        self.family = index.family
        self._all_layers = families.select_layers(self.module, None, self.family)
        self.set_layers(list(spec.get("layers") or []))
        self.loaded_tensors = list(getattr(self.module, "loaded_tensors", []))
        self.timings: dict[str, float] = {"load_s": time.perf_counter() - t0}
        self.collector: StatisticsCollector | None = None
        self.spectra: dict[str, measure.LayerSpectra] = {}
        self.projections: dict = {}
        self.curvature: dict = {}
        self._mb: dict[int, dict[str, Any]] = {}
        self._inputs: dict[int, tuple] = {}          # micro-batch → (stage input, attention mask), from pass 1
        self._targets: dict[int, Any] = {}           # last stage: micro-batch → targets, from pass 1
        self._tangent: dict[tuple, dict] = {}        # (micro-batch, layer) → what the tangent backward needs
        self._h: dict[str, dict[str, torch.Tensor]] = {}
        self._pass = ""
        self._generator: torch.Generator | None = None

    def set_layers(self, names: list[str]) -> None:
        """The layers analysed by the next passes (one group of the plan's passes); clears earlier results."""
        missing = [n for n in names if n not in self._all_layers]
        if missing:
            raise ValueError(f"stage {self.spec.get('stage')}: layers {missing[:4]} are not in blocks "
                             f"{self.spec['first_block']}..{self.spec['last_block']}")
        self.layers = {n: self._all_layers[n] for n in names}
        self.spectra, self.projections, self.curvature = {}, {}, {}

    def reset(self) -> None:
        """Forget everything of the current group (hooks, cached micro-batches, partial results), so that the
        driver can replay the group from its start after another stage was replaced."""
        if self.collector is not None:
            self.collector.detach()
        self.collector = None
        self._mb, self._inputs, self._targets, self._tangent, self._h = {}, {}, {}, {}, {}
        self._local = {}
        self.spectra, self.projections, self.curvature = {}, {}, {}
        self._pass = ""

    # ------------------------------------------------------------------ info
    def ping(self) -> int:
        return os.getpid()

    def info(self) -> dict:
        out = {"stage": self.spec.get("stage"), "layers": list(self.layers), "loaded_tensors": self.loaded_tensors,
               "device": str(self.device), "timings": dict(self.timings), "pid": os.getpid(),
               "peak_rss_bytes": peak_rss_bytes()}
        if self.device.type == "cuda":
            out["peak_cuda_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
        return out

    # ------------------------------------------------------------------ passes over the batch
    def begin_pass(self, kind: str) -> None:
        """``kind`` = "stats" (G, C_A, C_δ) or "projections" (Rayleigh quotients and h^SoP along the directions)."""
        self._pass = kind
        self._t_pass = time.perf_counter()
        self._generator = torch.Generator().manual_seed(int(self.spec.get("seed", 0)))
        if kind == "stats":
            self.collector = StatisticsCollector(
                self.layers, stat_dtype=self.stat_dtype, factor_budget_bytes=self.spec.get("factor_budget_bytes"))
        else:
            dirs = {n: sp.directions for n, sp in self.spectra.items() if sp.directions is not None}
            self.collector = StatisticsCollector({n: self.layers[n] for n in dirs}, stat_dtype=self.stat_dtype,
                                                 dense=False, directions=dirs)
        self.collector.attach()

    def _input(self, x, requires_grad: bool) -> torch.Tensor:
        t = torch.as_tensor(x)
        if t.is_floating_point():
            t = t.to(self.device, self.dtype).requires_grad_(requires_grad)
        else:
            t = t.to(self.device)
        return t

    def forward(self, mb: int, x, attention_mask=None) -> np.ndarray:
        y = self._forward(mb, x, attention_mask)
        return to_numpy(y)

    def _forward(self, mb: int, x, attention_mask) -> torch.Tensor:
        if self._pass == "stats":   # the exact pass reuses every stage's inputs: no upstream recomputation
            self._inputs[mb] = (x, attention_mask)
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).to(self.device)
        xt = self._input(x, requires_grad=True)
        self.collector.begin_microbatch(mask, key=mb)
        with torch.enable_grad(), forward.second_order_attention():
            y = self.module(xt, attention_mask=mask)
        self._mb[mb] = {"x": xt, "y": y}
        return y

    def _grad(self, mb: int, y: torch.Tensor, grad_y: torch.Tensor, kind: str) -> np.ndarray | None:
        st = self._mb[mb]
        outs = self.collector.outputs(mb)
        x = st["x"]
        wrt = outs + ([x] if x.is_floating_point() and x.requires_grad else [])
        if not wrt:
            return None
        self.collector.seed_kind(kind)
        grads = torch.autograd.grad(y, wrt, grad_y.to(y.dtype), retain_graph=True, allow_unused=True)
        self.collector.seed_kind(None)
        gx = grads[-1] if wrt and wrt[-1] is x else None
        return None if gx is None else to_numpy(gx)

    def _kinds(self) -> list[str]:
        fisher = self.spec.get("fisher", "empirical")
        if fisher == "empirical":
            return ["both"]
        return (["true"] if self._pass == "stats" else []) + ["fisher"]

    def loss_backward(self, mb: int, x, attention_mask, targets) -> tuple[dict[str, np.ndarray | None], int]:
        """Last stage: forward to the logits, the loss terms, and every seed back to this stage's input."""
        logits = self._forward(mb, x, attention_mask)
        tgt = torch.as_tensor(targets).to(self.device)
        loss, fisher = self.spec.get("loss", "cross_entropy"), self.spec.get("fisher", "empirical")
        sampled = self.spec.get("gradient_labels", "true") == "sampled"
        if sampled:   # the null run's labels: drawn from the model in pass 1, reused by the later passes
            tgt = self._targets[mb] if self._pass != "stats" else losses.sampled_targets(
                logits, tgt, loss, losses.label_generator(int(self.spec.get("seed", 0)), mb))
        if self._pass == "stats":
            self._targets[mb] = tgt if sampled else targets
        _, n_terms, _ = losses.loss_terms(logits, tgt, loss)
        out: dict[str, np.ndarray | None] = {}
        i = 0
        for kind in self._kinds():
            if kind in ("both", "true"):
                seeds = [next(losses.error_seeds(logits, tgt, loss, "empirical"))]
            else:
                seeds = losses.error_seeds(logits, tgt, loss, fisher, generator=self._generator,
                                           mc_samples=int(self.spec.get("mc_samples", 1)))
            for s in seeds:
                out[f"{i}:{kind}"] = self._grad(mb, logits, s, kind)
                i += 1
        return out, n_terms

    def backward(self, mb: int, grads: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
        """Middle and first stages: back-propagate every seed's gradient of this stage's output."""
        y = self._mb[mb]["y"]
        out = {}
        for key, g in grads.items():
            kind = key.split(":", 1)[1]
            out[key] = None if g is None else self._grad(mb, y, torch.as_tensor(g).to(self.device), kind)
        return out

    def end_microbatch(self, mb: int, n_terms: int) -> None:
        self.collector.end_microbatch(n_terms, key=mb)
        self._mb.pop(mb, None)   # this micro-batch's activations and graph are freed here
        if self._pass == "stats" and mb == 1:
            fault_point(self.spec, "stats")

    def end_pass(self) -> dict:
        col, self.collector = self.collector, None
        col.detach()
        self.timings[f"{self._pass}_s"] = time.perf_counter() - self._t_pass
        if self._pass == "stats":
            t0 = time.perf_counter()
            stats = col.finalize()
            del col
            fault_point(self.spec, "spectral")
            self.spectra = {n: measure.spectral_step(st, int(self.spec.get("top_k", 20)),
                                                     seed=int(self.spec.get("seed", 0))) for n, st in stats.items()}
            self.timings["spectral_s"] = time.perf_counter() - t0
        else:
            self.projections = col.projections()
        return {"stage": self.spec.get("stage"), "timings": dict(self.timings)}

    # ------------------------------------------------------------------ results
    def live_layers(self) -> list[str]:
        """Layers that get exact curvature: at least one direction, and selected by ``exact_layers``."""
        pats = self.spec.get("exact_layers")
        return [n for n, sp in self.spectra.items()
                if sp.k > 0 and matches(n, pats)]

    def directions(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {n: (to_numpy(sp.U), to_numpy(sp.V)) for n, sp in self.spectra.items() if sp.k > 0}

    def rows(self) -> tuple[list[dict], list[dict], list[dict]]:
        layer_rows, dir_rows, spec_rows = [], [], []
        for name, sp in self.spectra.items():
            layer_type, block = families.classify(name, self.family, self.module)
            row, d, s = measure.layer_rows(
                sp, layer_type=layer_type, block=block, fisher=self.spec.get("fisher", "empirical"),
                projections=self.projections.get(name), curvature=self.curvature.get(name),
                extra={"family": self.family, "stage": self.spec.get("stage"), "device": str(self.device),
                       "t_factors_s": self.timings.get("stats_s"), "t_spectral_s": self.timings.get("spectral_s"),
                       "t_exact_s": self.timings.get("exact_s")})
            layer_rows.append(row)
            dir_rows += d
            spec_rows += s
        return layer_rows, dir_rows, spec_rows

    # ------------------------------------------------------------------ exact curvature across stages
    # Forward-over-reverse, stage by stage (curvdist.math.curvature.stage_forward_tangent / stage_backward_tangent):
    # the stage that owns layer l seeds the parameter tangents ṗ_k = u_k v_kᵀ; ẏ travels to the last stage, which
    # forms (z̄, z̄̇) at the loss and h^GN; (ȳ, ȳ̇) travel back; the owner reads h_k = ⟨ṗ_k, p̄̇_k⟩.
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
        from curvdist.math.curvature import layer_param_tangent
        if layer is None:
            return {}
        U, V = self.spectra[layer].U, self.spectra[layer].V
        mod = self.layers[layer]
        return {f"{layer}.weight": layer_param_tangent(mod, U.to(self.dtype), V.to(self.dtype))}

    def tangent_forward(self, mb: int, xdot=None, layer: str | None = None) -> np.ndarray:
        """ẏ (K, *y.shape) of this stage for tangent ẋ of its input and/or the directions of its own ``layer``."""
        from curvdist.math.curvature import stage_forward_tangent
        x, mask = self._primal(mb)
        xd = None if xdot is None else torch.as_tensor(xdot).to(self.device, self.dtype)
        pt = self._param_tangent(layer)
        _, ydot = stage_forward_tangent(self._fn(mask), self._params(), x, xd, pt)
        self._tangent[(mb, layer)] = {"xdot": xd, "pt": pt}
        return to_numpy(ydot)

    def tangent_loss(self, mb: int, targets, xdot=None, layer: str | None = None) -> dict:
        """Last stage: forward tangents to the logits, (z̄, z̄̇) at the loss, h^GN, then the tangent backward."""
        from curvdist.math.curvature import loss_tangent, stage_forward_tangent
        x, mask = self._primal(mb)
        xd = None if xdot is None else torch.as_tensor(xdot).to(self.device, self.dtype)
        pt = self._param_tangent(layer)
        fn, params = self._fn(mask), self._params()
        z, zdot = stage_forward_tangent(fn, params, x, xd, pt)
        tgt = torch.as_tensor(self._targets[mb] if self.spec.get("gradient_labels", "true") == "sampled"
                              else targets).to(self.device)
        loss = self.spec.get("loss", "cross_entropy")
        h_gn = losses.hessian_quadratic(z, tgt, loss, zdot) if self.spec.get("gn", True) else None
        zbar, zbar_dot, n_b = loss_tangent(z.detach(), tgt, loss, zdot)
        self._tangent[(mb, layer)] = {"xdot": xd, "pt": pt}
        msg = {"n_terms": n_b, "h_gn": None if h_gn is None else to_numpy(h_gn)}
        return self._tangent_backward(mb, layer, zbar, zbar_dot, msg)

    def tangent_backward(self, mb: int, msg: dict, layer: str | None = None) -> dict:
        ybar = torch.as_tensor(msg["xbar"]).to(self.device, self.dtype)
        ybar_dot = torch.as_tensor(msg["xbar_dot"]).to(self.device, self.dtype)
        return self._tangent_backward(mb, layer, ybar, ybar_dot, msg)

    def _tangent_backward(self, mb, layer, ybar, ybar_dot, msg) -> dict:
        from curvdist.math.curvature import stage_backward_tangent, tangent_quadratic
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

    def exact_local(self, layers: list[str]) -> dict:
        """Last stage: its own layers' downstream network is all here, so the fast in-process route applies (one
        forward per micro-batch, one create_graph backward, a double backward per layer from the layer outputs;
        :func:`curvdist.math.curvature.exact_curvature`) on the cached stage inputs."""
        from curvdist.math.curvature import exact_curvature
        t0 = time.perf_counter()
        data, keys = [], sorted(self._inputs)
        for mb in keys:
            x, mask = self._primal(mb)
            inputs = {"x": x} if mask is None else {"x": x, "attention_mask": mask}
            data.append((inputs, torch.as_tensor(self._targets[mb]).to(self.device)))
        dirs = {n: (self.spectra[n].U, self.spectra[n].V) for n in layers}
        self._local = exact_curvature(self.module, data, self.spec.get("loss", "cross_entropy"), dirs,
                                      layers={n: self.layers[n] for n in layers}, gn=self.spec.get("gn", True),
                                      keys=keys)
        self.timings["exact_local_s"] = time.perf_counter() - t0
        return {"stage": self.spec.get("stage"), "layers": len(layers)}

    def end_exact(self) -> dict:
        from curvdist.math.curvature import Curvature
        gn = self.spec.get("gn", True)
        self.curvature = {n: Curvature(h=a["h"] / a["n"], h_gn=(a["h_gn"] / a["n"]) if gn else None,
                                       h_half=noise.half_means(a["h_half"], a["n_half"]))
                          for n, a in self._h.items()}
        self.curvature.update(getattr(self, "_local", {}))
        self._h, self._local = {}, {}
        return {"stage": self.spec.get("stage")}
