"""The ``curvdist`` command: a thin shell over ``driver.main(config)`` and the dataset readers.

    curvdist run configs/quickstart.yaml stages=3 top_k=10 data.sequences=16   # dotted key=value overrides
    curvdist plan configs/llama2-7b-8gpu.yaml      # stage plan and memory estimate, nothing run, no weights read
    curvdist summary out/quickstart                # α, α_Kron, β, φ by layer type
    curvdist query out/quickstart "select layer_type, avg(alpha) from layers group by 1" --format csv
    curvdist plot out/quickstart                   # PNG figures into out/quickstart/plots/<run_id>
    curvdist convert model.gguf out/model-hf       # any locally loadable model → sharded safetensors
    curvdist verify out/quickstart                 # Parquet files readable, schema versions, counts consistent
    curvdist config                                # every config key with its default and help

Bad input ends with one line on stderr that names the problem (and the fix) and exit status 2; ``--debug`` shows
the traceback instead.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(name="curvdist", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Layer-wise curvature exponents of neural networks, from one process to a Ray cluster.")

Debug = Annotated[bool, typer.Option("--debug", help="show the traceback of an error", envvar="CURVDIST_DEBUG")]
Overrides = Annotated[list[str] | None, typer.Argument(help="dotted key=value overrides, e.g. stages=2 "
                                                            "data.sequences=32 (`curvdist config` lists the keys)",
                                                       show_default=False, metavar="KEY=VALUE...")]
Config = Annotated[str, typer.Argument(help="run config YAML (see configs/)", show_default=False, metavar="CONFIG")]
Out = Annotated[str, typer.Argument(help="dataset directory: the `out` of a run", show_default=False, metavar="OUT")]
RunId = Annotated[str | None, typer.Option("--run-id", help="one run of the dataset (default: every run)")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="let transformers run Python code shipped "
                                               "with the checkpoint (config.json auto_map); off unless given here")]


def console(stderr: bool = False) -> Console:
    # wide when piped (rich would otherwise wrap tables at 80 columns)
    tty = (sys.stderr if stderr else sys.stdout).isatty()
    return Console(stderr=stderr, width=None if tty else 200, highlight=False, soft_wrap=stderr)


def _errors() -> tuple[type[BaseException], ...]:
    import duckdb

    from curvdist.runner.supervise import ClusterError
    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            KeyError, ImportError, NotImplementedError, ConnectionError, ClusterError, duckdb.Error)


def _message(e: BaseException) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split())  # one line
    if type(e).__name__ == "ConfigError":
        return f"{msg} (`curvdist config` lists every key)"
    if isinstance(e, ImportError):
        return f"{msg} (install the missing package into curvdist's environment)"
    import duckdb
    if isinstance(e, duckdb.Error):
        return f"SQL: {msg} (views: runs, layers, directions, spectra; e.g. `describe layers`)"
    return msg


@contextlib.contextmanager
def boundary(debug: bool):
    """Expected errors (bad config, missing file, SQL…) become one line on stderr and exit status 2."""
    try:
        yield
    except _errors() as e:
        if debug:
            raise
        console(stderr=True).print(f"[bold red]error:[/] {escape(_message(e))}")
        raise typer.Exit(2) from None


def _load(config: str, overrides: list[str] | None, trust_remote_code: bool = False):
    from curvdist.config import load_config
    if not os.path.isfile(config):
        raise FileNotFoundError(f"config file {config!r} does not exist; give a run config YAML (examples in "
                                f"configs/, e.g. configs/quickstart.yaml)")
    return load_config(config, overrides or [], trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------------------------------------------- commands
@app.command()
def run(config: Config, overrides: Overrides = None,
        out: Annotated[str | None, typer.Option("--out", help="output directory (same as out=DIR)")] = None,
        trust_remote_code: TrustRemoteCode = False, debug: Debug = False):
    """Plan the run, start or join a Ray cluster, analyse every selected layer, write the Parquet dataset.

    Bad input (a missing or truncated checkpoint, a data file too short, an unwritable `out`…) is reported before
    Ray starts, and nothing is written."""
    with boundary(debug):
        cfg = _load(config, [*(overrides or []), *([f"out={out}"] if out else [])], trust_remote_code)
        from curvdist.runner.driver import main
        from curvdist.runner.supervise import EXIT_TERMINATED, Terminated, raise_terminated
        # Ctrl-C stops the run even when the parent process ignores SIGINT (a job started in the background, or
        # by a parent that ignores it: children inherit an ignored SIGINT, and Python then installs no handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, raise_terminated)   # preemption (SLURM, Kubernetes): like Ctrl-C
        try:
            run_id = main(cfg)
        except Terminated:          # the driver stopped the actors and said what was kept
            raise typer.Exit(EXIT_TERMINATED) from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    console(stderr=True).print(f"run {escape(run_id)} → {escape(cfg.out)}")


@app.command()
def plan(config: Config, overrides: Overrides = None,
         fmt: Annotated[str, typer.Option("--format", help="table or json")] = "table",
         trust_remote_code: TrustRemoteCode = False, debug: Debug = False):
    """Print the stage plan (blocks, parameter and factor GB, passes), the stages × replicas layout, the memory of
    every stage per pass and a cost estimate, without running anything.

    Reads only config.json or the safetensors headers, so a cluster run can be planned on a laptop.  Exit status 2
    when a stage would not fit the device memory (hardware.gpu or hardware.device_memory_gb), with the fix."""
    with boundary(debug):
        _check_format(fmt, ("table", "json"))
        from curvdist.preflight import check_plan
        from curvdist.runner.estimate import estimate
        from curvdist.runner.planning import plan_from_config
        cfg = _load(config, overrides, trust_remote_code)
        check_plan(cfg)
        from curvdist.runner.sizing import suggest_sizes
        p = plan_from_config(cfg)
        est = estimate(cfg, p)
        sizes = suggest_sizes(cfg)
    if fmt == "json":
        import dataclasses
        typer.echo(json.dumps(p.as_dict() | est.as_dict() | {
            "sizes": None if sizes is None else dataclasses.asdict(sizes)}, indent=1))
    else:
        from curvdist.planview import print_plan
        print_plan(console(), cfg, p, est, sizes)
    with boundary(debug):
        est.check()


@app.command()
def summary(dataset: Out, run_id: RunId = None, debug: Debug = False):
    """α, α_Kron, β, φ by layer type (mean ± std / median over layers), with the median grad_snr and stable
    directions beside them (! marks a layer type whose gradient is mostly sampling noise), and α − α_null where
    the dataset holds the run's null run (the same config with gradient_labels=sampled)."""
    from curvdist.io import summary as S
    with boundary(debug):
        con = _open(dataset)
        tab = S.summary(con, run_id)
        if tab.num_rows == 0:
            raise ValueError(_no_layers(con, dataset, run_id))
    rows = tab.to_pylist()
    nulls = any(r["null_run_id"] for r in rows)
    t = Table(header_style="bold")
    for h in ("run_id", "layer_type"):
        t.add_column(h)
    t.add_column("n", justify="right")
    for q in S.SUMMARY_QUANTITIES:
        t.add_column(f"{q} mean ± std / median", justify="right")
    t.add_column("grad_snr median", justify="right")
    t.add_column("stable dirs median", justify="right")
    if nulls:
        t.add_column("α − α_null (null run)", justify="right")
    for r in rows:
        cells = [f"{_num(r[q + '_mean'])} ± {_num(r[q + '_std'])} / {_num(r[q + '_median'])}"
                 for q in S.SUMMARY_QUANTITIES]
        cells += [_num(r["grad_snr_median"]) + (" !" if r["low_snr"] else ""),
                  "—" if r["stable_directions_median"] is None else f"{r['stable_directions_median']:g}"]
        if nulls:
            cells.append("—" if r["null_run_id"] is None else
                         f"{_num(r['alpha_minus_null'])} ({escape(str(r['null_run_id']))})")
        t.add_row(escape(str(r["run_id"])), str(r["layer_type"]), str(r["n_layers"]), *cells)
    console().print(t)
    if any(r["low_snr"] for r in rows):
        console().print(escape(S.SNR_NOTE))


@app.command()
def query(dataset: Out, sql: Annotated[str, typer.Argument(help="DuckDB SQL over the views runs, layers, "
                                                                "directions, spectra", show_default=False)],
          fmt: Annotated[str, typer.Option("--format", help="table, csv or json")] = "table",
          limit: Annotated[int, typer.Option(help="most rows shown by --format table (0: all)")] = 200,
          debug: Debug = False):
    """Run SQL over the dataset's views and print the result."""
    from curvdist.io.query import arrow
    with boundary(debug):
        _check_format(fmt, ("table", "csv", "json"))
        rel = _open(dataset).sql(sql)
        if rel is None:  # a statement without a result (CREATE VIEW …)
            return
        tab = arrow(rel)
    rows = tab.to_pylist()
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(tab.column_names)
        w.writerows([["" if v is None else v for v in r.values()] for r in rows])
        typer.echo(buf.getvalue(), nl=False)
    elif fmt == "json":
        typer.echo(json.dumps([{k: _json(v) for k, v in r.items()} for r in rows], indent=1, default=str))
    else:
        t = Table(header_style="bold")
        for col in tab.column_names:
            t.add_column(escape(col), justify="right" if _numeric(tab.schema.field(col).type) else "left")
        for r in rows[: limit or None]:
            t.add_row(*[escape(_cell(v)) for v in r.values()])
        console().print(t)
        if limit and len(rows) > limit:
            console(stderr=True).print(f"{len(rows) - limit} more rows not shown (--limit 0 shows all; "
                                       f"--format csv exports)")


@app.command()
def plot(dataset: Out, run_id: RunId = None, debug: Debug = False):
    """Write the PNG figures of each run (or one) into OUT/plots/<run_id>/ and print their paths."""
    with boundary(debug):
        _open(dataset).close()  # dataset errors first, before matplotlib is imported
        from curvdist.plots import make_plots
        paths = make_plots(dataset, run_id)
    for p in paths:
        typer.echo(str(p))


@app.command()
def verify(dataset: Out, debug: Debug = False):
    """Check a dataset: Parquet files readable, schema versions, counts consistent across tables, leftovers.

    Exit status 0 with a one-line summary when it is sound; 1 with one line per problem otherwise (warnings, such
    as orphan rows of an interrupted write, are printed but do not fail)."""
    from curvdist.io.verify import verify as _verify
    with boundary(debug):
        if not os.path.exists(dataset):
            raise FileNotFoundError(f"dataset {dataset!r} does not exist; give the `out` directory of a run")
        report = _verify(dataset)
    err = console(stderr=True)
    for w in report.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}")
    for p in report.problems:
        err.print(f"[bold red]problem:[/] {escape(p)}")
    typer.echo(report.summary())
    if report.problems:
        raise typer.Exit(1)


@app.command()
def convert(src: Annotated[str, typer.Argument(help="a local Hugging Face directory or a .gguf file",
                                               show_default=False)],
            dst: Annotated[str, typer.Argument(help="new (or empty) directory for the sharded safetensors",
                                               show_default=False)],
            gguf_file: Annotated[str | None, typer.Option(help="GGUF file name inside SRC")] = None,
            max_shard_size: Annotated[str, typer.Option(help="largest shard, e.g. 2GB or 500MB")] = "2GB",
            dtype: Annotated[str | None, typer.Option(help="cast floating weights: float32, bfloat16, float16, "
                                                           "float64 (default: as stored; GGUF: float32)")] = None,
            trust_remote_code: TrustRemoteCode = False, debug: Debug = False):
    """Write any locally loadable model (HF directory, GGUF) as a sharded safetensors checkpoint."""
    with boundary(debug):
        if dtype is not None and dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"--dtype {dtype!r} is not valid; choose one of: float32, bfloat16, float16, float64")
        from curvdist.io.checkpoint import convert as _convert
        path = _convert(src, dst, gguf_file=gguf_file, max_shard_size=max_shard_size, dtype=dtype,
                        trust_remote_code=trust_remote_code)
    typer.echo(str(path))


@app.command("config")
def config_cmd(config: Annotated[str | None, typer.Argument(help="a config YAML: print it resolved, as YAML",
                                                           show_default=False)] = None,
               overrides: Overrides = None, debug: Debug = False):
    """Every config key (dotted) with its default, choices and help; with CONFIG, the resolved config."""
    from curvdist.config import config_help, to_dict
    if config is None:
        typer.echo(config_help())
        return
    import yaml
    with boundary(debug):
        cfg = _load(config, overrides)
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), nl=False)


# ----------------------------------------------------------------------------------------------------- helpers
def _check_format(fmt: str, choices: tuple[str, ...]) -> None:
    if fmt not in choices:
        raise ValueError(f"--format {fmt!r} is not valid; choose one of: {', '.join(choices)}")


def _open(dataset: str):
    from curvdist.io import query
    if not os.path.exists(dataset):
        raise FileNotFoundError(f"dataset {dataset!r} does not exist; give the `out` directory of a run "
                                f"(`curvdist run CONFIG out={dataset}` writes one)")
    return query.open(dataset)


def _no_layers(con, dataset: str, run_id: str | None) -> str:
    runs = [r[0] for r in con.sql("SELECT DISTINCT run_id FROM layers ORDER BY 1").fetchall()]
    if run_id is not None:
        return f"run_id {run_id!r} has no layers in {dataset!r}; runs with layers: {', '.join(runs) or 'none'}"
    return f"{dataset!r} has no layers yet; run `curvdist run CONFIG out={dataset}` (or wait for the first stage)"


def _numeric(tp) -> bool:
    import pyarrow as pa
    return pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_decimal(tp)


def _num(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _json(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def main() -> None:  # `python -m curvdist` and `python -m curvdist.cli`
    app(prog_name="curvdist")


if __name__ == "__main__":
    sys.exit(main())
