"""Exact curvature across pipeline stages, orchestrated from the driver (no autograd graph spans actors).

For every layer l (owned by stage j) and micro-batch b, with the stage inputs cached from pass 1:

    stage j          tangent_forward(b, layer=l)        ẏ_j   = J_p ṗ            (ṗ_k = u_k v_kᵀ, K batched)
    stage j<i<S-1    tangent_forward(b, xdot=ẏ)         ẏ_i   = J_x ẋ
    last stage       tangent_loss(b, targets, xdot=ẏ)   ż, h^GN = żᵀH_ℓż, (z̄, z̄̇), then its tangent backward
    stage i>j        tangent_backward(b, msg)           (x̄, x̄̇) = (J_xᵀȳ, J_xᵀȳ̇ + ∂²f[ȳ]·ẋ)
    stage j          tangent_backward(b, msg, layer=l)  h_k += N_b ⟨ṗ_k, p̄̇_k⟩

Layers on the last stage have their whole downstream network there, so that stage measures them in one go with the
in-process route (:func:`curvdist.math.curvature.exact_curvature`, about 3× cheaper than forward-over-reverse).

All calls are submitted at once; each actor runs its calls in submission order and every dependency points to an
earlier submission, so layers on different stages proceed concurrently without deadlock.
"""
from __future__ import annotations


def exact_pass(actors: list, batches: list, *, progress=None) -> None:
    import ray

    last = len(actors) - 1
    refs = []
    live = ray.get([a.live_layers.remote() for a in actors])
    total = sum(len(ls) for ls in live[:-1]) * len(batches) + int(bool(live[-1]))
    task = progress.add_task("pass exact", total=total) if progress is not None else None
    for j, layers in enumerate(live):
        if j == last:   # the whole downstream network is on the last stage: the in-process route, all at once
            if layers:
                refs.append(actors[j].exact_local.remote(layers))
            continue
        for layer in layers:
            for b, (_, targets) in enumerate(batches):
                t = actors[j].tangent_forward.remote(b, None, layer)
                for i in range(j + 1, last):
                    t = actors[i].tangent_forward.remote(b, t)
                msg = actors[last].tangent_loss.remote(b, targets.numpy(), t)
                for i in range(last - 1, j, -1):
                    msg = actors[i].tangent_backward.remote(b, msg)
                refs.append(actors[j].tangent_backward.remote(b, msg, layer))
    remaining = list(refs)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        ray.get(done)
        if progress is not None:
            progress.advance(task)
    ray.get([a.end_exact.remote() for a in actors])
