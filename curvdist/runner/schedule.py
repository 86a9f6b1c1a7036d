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

from curvdist.runner.transport import call_options

# ray.wait blocks in native code; with a timeout the driver's main thread returns to Python between waits, so a
# Ctrl-C or SIGTERM (KeyboardInterrupt) is handled at once even while no call finishes (a stage that is stuck)
WAIT_S = 1.0


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


def submission_order(per_stage: list[list[Op]], depends=None) -> list[Op]:
    """One sequence of all calls, each after its dependency, each stage's calls in its own order: round-robin
    over the stages, taking a stage's next call once its dependency is submitted.  ``depends(op, stages)``:
    :func:`dependency` by default (:func:`sweep_dependency` for the exact pass)."""
    depends = depends or dependency
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
                dep = depends(op, stages)
                if dep is not None and dep not in done:
                    break
                order.append(op)
                done.add(op)
                pos[j] += 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"schedule deadlock at positions {pos}: {[s[p] for s, p in zip(per_stage, pos)]}")
    return order


def sweep_orders(stages: int, sweeps: Sequence[tuple], in_flight: int) -> list[list[Op]]:
    """Each stage's calls of the exact pass (1F1B over sweeps).  A sweep ``(b, j, c)`` (micro-batch, source stage,
    chunk) passes stages j..S-1: F on j..S-2, L on the last, B on S-2..j.  Stage i runs the sweeps that pass it, in
    the given order, with ``in_flight − i`` forwards of warm-up (at least 1), then one backward, one forward; the
    last stage runs L in order.  The same argument as :func:`one_f_one_b` (and the dependency check of
    :func:`submission_order`) keeps it free of deadlock."""
    out = []
    for i in range(stages - 1):
        mine = [w for w in sweeps if w[1] <= i]
        w_i = max(1, min(len(mine), in_flight - i))
        seq = [Op("F", i, w) for w in mine[:w_i]]
        for n, w in enumerate(mine):
            seq.append(Op("B", i, w))
            if n + w_i < len(mine):
                seq.append(Op("F", i, mine[n + w_i]))
        out.append(seq)
    out.append([Op("L", stages - 1, w) for w in sweeps])
    return out


def sweep_dependency(op: Op, stages: int) -> Op | None:
    """The call whose result a sweep call consumes (None: the source stage's forward, seeded by ε)."""
    j = op.mb[1]
    if op.kind == "F":
        return Op("F", op.stage - 1, op.mb) if op.stage > j else None
    if op.kind == "L":
        return Op("F", stages - 2, op.mb) if stages - 2 >= j else None
    return Op("L", stages - 1, op.mb) if op.stage == stages - 2 else Op("B", op.stage + 1, op.mb)


def replica_of(mb: int, replicas: int) -> int:
    """Micro-batch ``mb`` goes to replica mb mod R (every replica gets ⌈M/R⌉ or ⌊M/R⌋ of them)."""
    return mb % replicas


def stream(pipelines: list[list], batches: list, in_flight: int, progress=None, task=None,
           transport: str = "object_store") -> None:
    """One pass (statistics or projections) over ``batches`` through R pipelines (``pipelines[r][j]``: the
    worker of stage j in replica r), 1F1B with ``in_flight`` micro-batches per pipeline; returns when every
    micro-batch has been closed on every stage.  References to intermediate results are dropped as soon as their
    consumer is submitted, so the object store holds only what is in flight.  Calls whose result the next stage
    consumes go by ``transport`` (:mod:`curvdist.runner.transport`)."""
    import ray

    send = call_options(transport)

    R, S = len(pipelines), len(pipelines[0])
    orders = []
    for r in range(R):
        mine = [b for b in range(len(batches)) if replica_of(b, R) == r]
        if mine:
            orders.append((r, submission_order(one_f_one_b(S, mine, in_flight))))
    refs: dict[tuple, object] = {}        # (replica, op) → result ref, until its consumer is submitted
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
                refs[(r, op)] = actor.forward.options(**send).remote(op.mb, x, mask)
                continue
            if op.kind == "L":
                call = actor.loss_backward.options(**send) if S > 1 else actor.loss_backward
                ref = call.remote(op.mb, x, mask, targets.numpy())
            else:
                call = actor.backward.options(**send) if op.stage > 0 else actor.backward
                ref = call.remote(op.mb, x)
            if op.stage > 0:                   # the message goes on to the stage below
                refs[(r, op)] = ref
            else:                              # stage 0 closed the micro-batch: N_b back to the driver
                final.append(ref)
    pending = list(final)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=WAIT_S)
        if not done:
            continue
        ray.get(done)
        if progress is not None:
            progress.advance(task)


def exact_pass(pipelines: list[list], microbatches: int, *, in_flight: int, chunk: int | None, progress=None,
               on_stage_done=None, transport: str = "object_store") -> list[dict]:
    """Exact curvature by stacked sweeps (:mod:`curvdist.runner.tangents`), every replica over the micro-batches it
    held in the statistics pass; returns each worker's figures (``finish_exact``).

    A sweep (b, j, c) carries chunk c of source stage j's directions for micro-batch b down stages j..S-1 and back.
    The sweeps of a replica are ordered micro-batch by micro-batch, source stages interleaved, and scheduled 1F1B
    (:func:`sweep_orders`): stage i holds at most ``in_flight − i`` sweeps and works while the others do.  Every
    call is submitted after the call it depends on, and every actor runs its calls in submission order.  The
    last stage measures its own layers first, in one go with the in-process route.  When every sweep of stage j's
    layers is done, its replicas combine their sums (``end_exact``, all at once; queued after every sweep call) and
    ``on_stage_done(j)`` is called (the driver commits that stage's exact rows)."""
    import ray

    R, S = len(pipelines), len(pipelines[0])
    last = S - 1
    send = call_options(transport)
    chunks = ray.get([a.begin_exact.remote(chunk) for actors in pipelines for a in actors])[:S]
    live = ray.get([a.live_layers.remote() for a in pipelines[0]])   # the same on every replica
    owned: dict[int, list] = {j: [] for j in range(S) if live[j]}
    if live[last]:
        owned[last] = [actors[last].exact_local.remote(live[last]) for actors in pipelines]
    orders = []
    for r in range(R):
        mine = [b for b in range(microbatches) if replica_of(b, R) == r]
        orders.append([(b, j, c) for b in mine for j in range(last) for c in range(chunks[j])])
    task = progress.add_task("pass exact", total=sum(len(o) for o in orders) + len(owned.get(last, []))) \
        if progress is not None else None

    refs: dict[tuple, object] = {}
    per_replica = [submission_order(sweep_orders(S, order, in_flight), sweep_dependency) if order else []
                   for order in orders]
    for i in range(max((len(o) for o in per_replica), default=0)):   # interleave the replicas
        for r, seq in enumerate(per_replica):
            if i >= len(seq):
                continue
            op = seq[i]
            b, j, c = op.mb
            actor = pipelines[r][op.stage]
            dep = sweep_dependency(op, S)
            x = refs.pop((r, dep)) if dep is not None else None
            if op.kind == "F":
                refs[(r, op)] = actor.sweep_forward.options(**send).remote(b, j, c, x)
            elif op.kind == "L":
                refs[(r, op)] = actor.sweep_loss.options(**send).remote(b, j, c, x)
            elif op.stage > j:
                refs[(r, op)] = actor.sweep_backward.options(**send).remote(b, j, c, x)
            else:   # back on the source stage: h of this sweep's directions
                owned[j].append(actor.sweep_backward.remote(b, j, c, x))
    stage_of = {ref: j for j, refs in owned.items() for ref in refs}
    left = {j: len(refs) for j, refs in owned.items()}
    combined: set[int] = set()

    def combine_ready():
        # the last stage runs every sweep's loss step after its own layers: its replicas would wait for each other
        # in end_exact behind all of them, so it combines only when every sweep is done
        for j in sorted(left):
            if left[j] == 0 and j not in combined and (j != last or all(n == 0 for n in left.values())):
                combined.add(j)
                ray.get([actors[j].end_exact.remote() for actors in pipelines])
                if on_stage_done is not None:
                    on_stage_done(j)

    combine_ready()
    remaining = list(stage_of)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1, timeout=WAIT_S)
        if not done:
            continue
        ray.get(done)
        if progress is not None:
            progress.advance(task)
        left[stage_of[done[0]]] -= 1
        combine_ready()
    return ray.get([a.finish_exact.remote() for actors in pipelines for a in actors])
