"""Pipeline schedules: which stage does what, in which order, with several micro-batches in flight.

A pass streams M micro-batches through S stages (R replicas of the pipeline, each over its own micro-batches:
micro-batch b goes to replica b mod R).  Per micro-batch b of a pipeline:

    F(j, b)   stage j < S-1: forward                            needs F(j-1, b)
    L(b)      stage S-1: forward, loss, every seed backward     needs F(S-2, b)
    B(j, b)   stage j < S-1: backward, closes b on stage j      needs L(b) (j = S-2) or B(j+1, b)

A Ray actor runs the calls it receives from one caller in submission order, so the order of submission is the
schedule.  :func:`one_f_one_b` gives each stage its order (1F1B: stage j runs ``w_j = in_flight − j`` forwards,
then alternates one backward and one forward), which keeps every stage busy once the pipeline is full and bounds
what stage j holds to w_j micro-batches; :func:`submission_order` merges the stages' orders into one submission
sequence in which every call comes after the calls it depends on.  With a fixed time t per forward the pass takes
(M + S − 1)·t instead of M·S·t (see ``tests/test_schedule.py``, ``benchmarks/bench_pipeline.py``).

Pure except :func:`stream` (Ray calls).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One call of a pass: ``kind`` F (forward), L (last stage: loss and backward), B (backward)."""
    kind: str
    stage: int
    mb: int


def warmup(stage: int, stages: int, in_flight: int, microbatches: int) -> int:
    """Forwards stage ``stage`` runs before its first backward: in_flight − stage, at least 1, at most M.  Stage j
    then holds at most this many micro-batches (their activations and graphs) at once."""
    return max(1, min(microbatches, in_flight - stage))


def one_f_one_b(stages: int, microbatches: Sequence[int], in_flight: int) -> list[list[Op]]:
    """Each stage's calls in order (1F1B).  Deadlock-free for any ``in_flight`` ≥ 1: w_j ≥ w_{j+1} and
    w_j ≤ w_{j+1} + 1, so every forward a stage waits for lies in its predecessor's warm-up or follows one of its
    backwards that was already satisfied."""
    if stages < 1 or in_flight < 1:
        raise ValueError(f"stages={stages} and in_flight={in_flight} must be ≥ 1")
    mbs = list(microbatches)
    M = len(mbs)
    out = []
    for j in range(stages - 1):
        w = warmup(j, stages, in_flight, M)
        seq = [Op("F", j, b) for b in mbs[:w]]
        for i, b in enumerate(mbs):
            seq.append(Op("B", j, b))
            if i + w < M:
                seq.append(Op("F", j, mbs[i + w]))
        out.append(seq)
    out.append([Op("L", stages - 1, b) for b in mbs])
    return out


def dependency(op: Op, stages: int) -> Op | None:
    """The call whose result ``op`` consumes (None: it needs only the micro-batch's inputs)."""
    if op.kind == "F":
        return Op("F", op.stage - 1, op.mb) if op.stage > 0 else None
    if op.kind == "L":
        return Op("F", stages - 2, op.mb) if stages > 1 else None
    return Op("L", stages - 1, op.mb) if op.stage == stages - 2 else Op("B", op.stage + 1, op.mb)


def submission_order(per_stage: list[list[Op]]) -> list[Op]:
    """One sequence of all calls, each after its dependency, each stage's calls in its own order: round-robin
    over the stages, taking a stage's next call once its dependency is submitted."""
    stages = len(per_stage)
    pos = [0] * stages
    done: set[Op] = set()
    order: list[Op] = []
    total = sum(len(s) for s in per_stage)
    while len(order) < total:
        progressed = False
        for j in range(stages):
            while pos[j] < len(per_stage[j]):
                op = per_stage[j][pos[j]]
                dep = dependency(op, stages)
                if dep is not None and dep not in done:
                    break
                order.append(op)
                done.add(op)
                pos[j] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule deadlock at positions {pos}: {[s[p] for s, p in zip(per_stage, pos)]}")
    return order


def replica_of(mb: int, replicas: int) -> int:
    """Micro-batch ``mb`` goes to replica mb mod R (every replica gets ⌈M/R⌉ or ⌊M/R⌋ of them)."""
    return mb % replicas


def stream(pipelines: list[list], batches: list, in_flight: int, progress=None, task=None) -> None:
    """One pass (statistics or projections) over ``batches`` through R pipelines (``pipelines[r][j]``: the
    worker of stage j in replica r), 1F1B with ``in_flight`` micro-batches per pipeline; returns when every
    micro-batch has been closed on every stage.  References to intermediate results are dropped as soon as their
    consumer is submitted, so the object store holds only what is in flight."""
    import ray

    R, S = len(pipelines), len(pipelines[0])
    orders = []
    for r in range(R):
        mine = [b for b in range(len(batches)) if replica_of(b, R) == r]
        if mine:
            orders.append((r, submission_order(one_f_one_b(S, mine, in_flight))))
    refs: dict[tuple, object] = {}        # (replica, op) → result ref, until its consumer is submitted
    n_refs: dict[tuple, object] = {}      # (replica, mb) → N_b ref, until stage 0 closes the micro-batch
    final = []
    # interleave the replicas' sequences so that every pipeline starts at once
    for i in range(max((len(o) for _, o in orders), default=0)):
        for r, order in orders:
            if i >= len(order):
                continue
            op = order[i]
            actor = pipelines[r][op.stage]
            inputs, targets = batches[op.mb]
            mask = inputs.get("attention_mask")
            mask = None if mask is None else mask.numpy()
            dep = dependency(op, S)
            x = refs.pop((r, dep)) if dep is not None else inputs["input_ids"].numpy()
            if op.kind == "F":
                refs[(r, op)] = actor.forward.remote(op.mb, x, mask)
            elif op.kind == "L":
                grads, n = actor.loss_backward.options(num_returns=2).remote(op.mb, x, mask, targets.numpy())
                if S > 1:
                    refs[(r, op)] = grads
                    n_refs[(r, op.mb)] = n
                else:
                    final.append(n)
            else:
                n = n_refs[(r, op.mb)] if op.stage > 0 else n_refs.pop((r, op.mb))
                ref = actor.backward.remote(op.mb, x, n)
                if op.stage > 0:
                    refs[(r, op)] = ref
                else:
                    final.append(ref)
    pending = list(final)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
        if progress is not None:
            progress.advance(task)


def exact_pass(pipelines: list[list], microbatches: int, *, progress=None, on_stage_done=None) -> None:
    """Exact curvature across stages (forward-over-reverse, :mod:`curvdist.runner.tangents`), every replica over the
    micro-batches it held in the statistics pass.  For every layer l (owned by stage j) and micro-batch b:

        stage j          tangent_forward(b, layer=l)        ẏ_j   = J_p ṗ            (ṗ_k = u_k v_kᵀ, K batched)
        stage j<i<S-1    tangent_forward(b, xdot=ẏ)         ẏ_i   = J_x ẋ
        last stage       tangent_loss(b, xdot=ẏ)            ż, h^GN = żᵀH_ℓż, (z̄, z̄̇), then its tangent backward
        stage i>j        tangent_backward(b, msg)           (x̄, x̄̇) = (J_xᵀȳ, J_xᵀȳ̇ + ∂²f[ȳ]·ẋ)
        stage j          tangent_backward(b, msg, layer=l)  h_k += N_b ⟨ṗ_k, p̄̇_k⟩

    The last stage measures its own layers first, in one go with the in-process route (their whole downstream
    network is there), while the sweeps of the other stages start.  When every sweep of stage j's layers is done,
    its replicas combine their sums (``end_exact``, all at once) and ``on_stage_done(j)`` is called (the driver
    commits that stage's exact rows), so a run stopped mid-way keeps the stages already finished.  An actor runs
    ``end_exact`` after every call queued before it, so no sweep is ever blocked behind a collective."""
    import ray

    R, S = len(pipelines), len(pipelines[0])
    last = S - 1
    live = ray.get([a.live_layers.remote() for a in pipelines[0]])   # the same on every replica
    owned: dict[int, list] = {j: [] for j in range(S) if live[j]}
    task = None
    if progress is not None:
        task = progress.add_task("pass exact", total=sum(len(ls) for ls in live[:-1]) * microbatches
                                 + R * int(bool(live[-1])))
    if live[last]:
        owned[last] = [actors[last].exact_local.remote(live[last]) for actors in pipelines]
    for r, actors in enumerate(pipelines):
        mine = [b for b in range(microbatches) if replica_of(b, R) == r]
        for j in range(last):
            for layer in live[j]:
                for b in mine:
                    t = actors[j].tangent_forward.remote(b, None, layer)
                    for i in range(j + 1, last):
                        t = actors[i].tangent_forward.remote(b, t)
                    msg = actors[last].tangent_loss.remote(b, t)
                    for i in range(last - 1, j, -1):
                        msg = actors[i].tangent_backward.remote(b, msg)
                    owned[j].append(actors[j].tangent_backward.remote(b, msg, layer))
    stage_of = {ref: j for j, refs in owned.items() for ref in refs}
    left = {j: len(refs) for j, refs in owned.items()}
    remaining = list(stage_of)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        ray.get(done)
        if progress is not None:
            progress.advance(task)
        j = stage_of[done[0]]
        left[j] -= 1
        if left[j] == 0:
            ray.get([actors[j].end_exact.remote() for actors in pipelines])
            if on_stage_done is not None:
                on_stage_done(j)
