"""The tables `curvdist plan` prints: the stages, the memory of each stage per pass, and the cost estimate.

    from curvdist.planview import print_plan
    print_plan(console, cfg, plan, est)     # plan: runner.planning.Plan, est: runner.estimate.Estimate
"""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from curvdist.config import RunConfig
from curvdist.runner.cost import PASSES


def gb(b: float) -> str:
    v = b / 1e9
    return f"{v:.2f}" if v >= 0.01 or v == 0 else f"{v:.2g}"


def duration(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _flops(f: float) -> str:
    return f"{f / 1e15:.3g}"


def print_plan(c: Console, cfg: RunConfig, p, est, sizes=None) -> None:
    lay, work = est.layout, est.workload
    gpus = (f"{lay.gpus:g} GPUs ({lay.gpus_per_stage:g} per stage)" if lay.gpus_per_stage else "CPU only")
    c.print(f"[bold]{escape(p.model)}[/]: {p.family}, {p.num_blocks} blocks, {len(p.layers)} analysed layers "
            f"(planned from {p.source}); layout {lay.stages} stages × {lay.replicas} replica"
            f"{'s' if lay.replicas > 1 else ''} on {gpus}, {lay.in_flight} micro-batches in flight; "
            f"{-(-work.microbatches // lay.replicas)} micro-batches of {work.micro_batch} × {work.seq_len} tokens per "
            f"replica; parameters {p.dtype}, statistics {p.stat_dtype}, budget {cfg.factor_budget_gb:g} GiB per "
            f"worker and pass, factor_mode {cfg.factor_mode}")
    _stages(c, cfg, p)
    _memory(c, est)
    _cost(c, est)
    _sizes(c, cfg, est, sizes)


def _sizes(c: Console, cfg: RunConfig, est, s) -> None:
    """The statistics pass over N and the exact pass over n, and (``s``: runner.sizing.SizeSuggestion) the N and n
    a previous run of the model suggests."""
    work, rate = est.workload, est.cost.throughput
    by = {p.name: p for p in est.cost.passes}
    n_x = min(work.sequences, work.exact_microbatches * work.micro_batch)

    def t(*names: str) -> str:
        if rate is None:
            return "—"
        return duration(sum(by[n].seconds(rate, "pipelined") for n in names if n in by))

    line = (f"statistics over N = {work.sequences} sequences ({work.sequences * work.seq_len:,} tokens; statistics, "
            f"spectral and projections passes): {t('statistics', 'spectral', 'projections')}")
    if work.exact:
        line += (f"; exact pass over n = {n_x} sequences ({work.exact_microbatches} of {work.microbatches} "
                 f"micro-batches{', data.exact_sequences' if work.exact_sequences is not None else ''}): "
                 f"{t('exact')}")
    c.print(line + ".")
    if s is None:
        return
    msg = (f"previous run {escape(s.run_id)} of this model: median noise_scale {s.noise_scale:,.0f} sequences "
           f"(largest layer {s.noise_scale_max:,.0f}); for the signal regime set data.sequences={s.sequences} "
           f"(10 × noise_scale)")
    if s.exact_sequences is not None:
        msg += (f" and data.exact_sequences={s.exact_sequences} (h to ~5 % relative standard error: per-micro-batch "
                f"relative SD of h {s.h_unit_rel_sd:.2g}, 90th percentile over layers)")
    c.print(msg + ".")


def _stages(c: Console, cfg: RunConfig, p) -> None:
    t = Table(show_footer=True, header_style="bold", footer_style="bold")
    s = p.stages
    cols = [("stage", "total", "right"), ("blocks", str(p.num_blocks), "left"), ("embed", "", "center"),
            ("head", "", "center"), ("param GB", gb(p.total_param_bytes), "right"),
            ("factor GB", gb(p.total_factor_bytes), "right"),
            ("layers", str(sum(len(x.layers) for x in s)), "right"),
            ("passes", str(sum(len(x.passes) for x in s)), "right"),
            ("sketched", str(sum(m == "sketch" for l in p.layers for m in l.modes)), "right"),
            ("largest pass GB", "", "right"),
            ("worker GB", f"max {gb(max(p.worker_bytes(x) for x in s))}", "right")]
    for name, foot, just in cols:
        t.add_column(name, footer=foot, justify=just)
    for x in s:
        t.add_row(str(x.index), f"{x.first_block}-{x.last_block}", "yes" if x.has_embedding else "",
                  "yes" if x.has_head else "", gb(x.param_bytes), gb(x.factor_bytes),
                  str(len(x.layers)), str(len(x.passes)), str(x.as_dict()["sketched"]),
                  gb(max(p.pass_bytes(x), default=0)), gb(p.worker_bytes(x)))
    c.print(t)
    c.print("GB = 1e9 bytes. worker GB = the stage's parameters + its largest pass's statistics (G, C_A, C_δ); the "
            "memory table below adds activations, cached inputs and workspaces. sketched = factors (C_A, C_δ) held "
            f"as Nyström sketches of {cfg.sketch_rank} columns (factor_mode={cfg.factor_mode}): top-K eigenvalues "
            "with an error estimate instead of a d×d matrix.")
    skipped = p.over_budget()
    if skipped:
        fix = ("raise factor_budget_gb or set factor_mode=auto (sketches)" if cfg.factor_mode == "dense" else
               "raise factor_budget_gb or lower sketch_rank")
        c.print(f"[yellow]{len(skipped)} layer(s) have a factor over the {cfg.factor_budget_gb:g} GiB budget and are "
                f"measured without it: {escape(', '.join(skipped[:4]))}{' …' if len(skipped) > 4 else ''}; "
                f"{fix}[/]")


def _memory(c: Console, est) -> None:
    mem = est.memory
    host = "" if any(s.cached_on_device for s in mem.stages) else " (host)"
    t = Table(title="memory per stage and pass, GB (estimate)", header_style="bold", title_justify="left")
    heads = ["stage", "weights", "factors", "act/micro-batch", "in flight", "backward", f"cached inputs{host}",
             "row cache", "spectral ws", "exact ws", *PASSES, "peak"]
    for h in heads:
        t.add_column(h, justify="right")
    for s in mem.stages:
        pk = s.pass_peaks()
        t.add_row(str(s.stage), gb(s.weights), gb(s.factors), gb(s.activations), str(s.held), gb(s.backward),
                  gb(s.cached), gb(s.rows) + (" replay" if s.replay else " stream" if s.rows else ""),
                  gb(max(s.finalize, s.spectral)), gb(s.exact), *[gb(pk[k]) for k in PASSES],
                  f"{gb(s.peak)} ({s.peak_pass})")
    c.print(t)
    worst = max(mem.stages, key=lambda s: s.peak)
    dm = est.device_memory
    line = (f"activations: what autograd keeps per micro-batch (sdpa's MATH kernel: scores B·heads·T² in float32), "
            f"the layer outputs and input rows the collector keeps; row cache: the statistics pass's rows a worker "
            f"keeps on its device (row_cache_gb={est.workload.row_cache_bytes / 2**30:g}), replayed by the "
            f"projections pass when they fit (replay: no activations then), else emptied at the budget (stream: the "
            f"projections pass streams the batch again); spectral ws: the finalize copy of G and the "
            f"factors, or the SVD/eigensolver workspace; exact ws: one jet (the directions a sweep "
            f"carries together, as many as the jet budget and exact_chunk allow) for one micro-batch, in exact_dtype={est.workload.exact_dtype} (parameters upcast for the "
            f"pass included). ")
    if dm.bytes is None:
        line += f"Device memory {dm.source}: not checked."
    else:
        need = mem.host_total if dm.shared_host else worst.peak
        what = "all stages together" if dm.shared_host else f"largest stage peak (stage {worst.stage})"
        fits = need <= dm.bytes * est.fraction
        line += (f"Device memory {gb(dm.bytes)} GB ({escape(dm.source)}), {est.fraction:.0%} usable = "
                 f"{gb(dm.bytes * est.fraction)} GB; {what} {gb(need)} GB: "
                 + ("fits." if fits else "[bold red]does not fit[/]."))
    c.print(line)


def _cost(c: Console, est) -> None:
    cost, rate = est.cost, est.cost.throughput
    t = Table(title="cost per pass (estimate; one replica)", header_style="bold", title_justify="left",
              show_footer=True, footer_style="bold")

    def total(schedule: str) -> str:
        return duration(cost.total_s(schedule))

    cols = [("pass", "total"), ("PFLOP", _flops(sum(p.flops for p in cost.passes))),
            ("busiest stage PFLOP", ""), ("between stages GB", gb(sum(p.sent for p in cost.passes))),
            ("all-reduce GB", gb(sum(sum(w.reduced for w in p.stages) for p in cost.passes))),
            ("pipelined", total("pipelined")), ("one stage at a time", total("sequential"))]
    for name, foot in cols:
        t.add_column(name, footer=foot, justify="left" if name == "pass" else "right")
    for p in cost.passes:
        t.add_row(p.name, _flops(p.flops), _flops(max(w.flops for w in p.stages)), gb(p.sent),
                  gb(sum(w.reduced for w in p.stages)),
                  duration(p.seconds(rate, "pipelined")) if rate else "—",
                  duration(p.seconds(rate, "sequential")) if rate else "—")
    c.print(t)
    if rate is None:
        c.print("time: set hardware.gpu (a known GPU) or hardware.device_tflops for a time estimate.")
        return
    chunk = est.workload.exact_chunk
    c.print(f"[bold]estimated time: {total('pipelined')} pipelined (this runner: 1F1B passes and exact sweeps"
            f"{f' of up to {chunk} directions' if chunk else ''}), {total('sequential')} one stage at a time[/] "
            f"(an estimate: compute only, at {rate.utilization:.0%} of {escape(rate.source)}'s dense peak, "
            f"{rate.forward_tflops:g} TFLOP/s for the forward dtype, {rate.stat_tflops:g} for "
            f"the statistics and {rate.exact_tflops or rate.forward_tflops:g} for the exact HVPs (exact_dtype="
            f"{est.workload.exact_dtype}); dense SVD/eigh at {rate.solver_efficiency:.0%} of peak; transfers between stages and "
            f"replicas not included; pipelined: the slowest stage × (M + S − 1)/M per pass).")
