"""α over a training run: every checkpoint of ``model.checkpoints`` measured with the same settings, one dataset.

    cfg = load_config("run.yaml", ["model.checkpoints=[ckpt/global_step*]", "out=out/traj"])
    run_ids = main(cfg)      # <base>-step100, <base>-step200, …: each a run with a `step` column

Each checkpoint is one run (its own run id ``<base>-step<N>``, its own ``runs`` row, ``step`` in ``runs`` and
``layers``), so resume is per checkpoint: a rerun after a crash or a kill skips the checkpoints already complete and
finishes the one that was cut off, layer by layer.  The data, the directions and every other setting are the
trajectory's own, so the runs differ only in their weights.

Every checkpoint is checked before Ray starts (:func:`curvdist.preflight.check`), and all must have one architecture
(:func:`same_architecture`): the runs share one Ray cluster and one set of stage actors
(:class:`curvdist.runner.session.Session`).  The first checkpoint with work builds the stages; each later one only
has every actor read its own parameters of the new checkpoint into the module it holds.  Each run's timings say
which (``setup``: ``full`` or ``weights``) and how long (``load_s``, beside ``first_setup_s``).
"""
from __future__ import annotations

import dataclasses
import glob
import re
import time
from pathlib import Path

from curvdist import config as C

_STEP_NAMES = (re.compile(r"global_step(\d+)"), re.compile(r"checkpoint-(\d+)"), re.compile(r"step[_-]?(\d+)"))


def step_of(path: str | Path) -> int | None:
    """The training step in a checkpoint's name: ``global_step<N>``, ``checkpoint-<N>``, ``step<N>``, else the last
    number in its last path component, else None."""
    name = Path(str(path).rstrip("/")).name
    for rx in _STEP_NAMES:
        m = rx.search(name)
        if m:
            return int(m.group(1))
    nums = re.findall(r"\d+", name)
    return int(nums[-1]) if nums else None


def checkpoints(model: C.ModelConfig) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint named by ``model.checkpoints`` (globs expanded), in step order."""
    found: dict[Path, int] = {}
    for entry in model.checkpoints or []:
        paths = sorted(glob.glob(str(Path(entry).expanduser()))) if glob.has_magic(entry) else [entry]
        if not paths:
            raise FileNotFoundError(f"model.checkpoints: {entry!r} matches no checkpoint; fix the glob or the path")
        for p in paths:
            p = Path(p).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"model.checkpoints: {p} does not exist")
            step = step_of(p)
            if step is None:
                raise ValueError(f"model.checkpoints: no step number in the name {p.name!r}; rename it "
                                 f"(global_step<N> or checkpoint-<N>) or measure it alone with model.path and "
                                 f"model.step")
            found[p] = step
    steps = sorted(found.items(), key=lambda kv: kv[1])
    dup = {s for _, s in steps if [t for _, t in steps].count(s) > 1}
    if dup:
        raise ValueError(f"model.checkpoints: step {min(dup)} names more than one checkpoint "
                         f"({', '.join(str(p) for p, s in steps if s == min(dup))}); keep one per step")
    return [(s, p) for p, s in steps]


def base_run_id(cfg: C.RunConfig) -> str:
    return cfg.run_id or f"traj-{C.config_hash(cfg)[:10]}"


def step_configs(cfg: C.RunConfig) -> list[C.RunConfig]:
    """One run config per checkpoint: ``model.path`` and ``model.step`` set, run id ``<base>-step<N>``."""
    base = base_run_id(cfg)
    return [dataclasses.replace(cfg, run_id=f"{base}-step{step}",
                                model=dataclasses.replace(cfg.model, checkpoints=None, path=str(path), step=step))
            for step, path in checkpoints(cfg.model)]


#: config.json keys that do not describe the architecture (who saved it, in which dtype, with which library)
_NOT_ARCHITECTURE = frozenset({"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"})


def same_architecture(checked: list[tuple[str, object]]) -> None:
    """Every ``(path, CheckpointIndex)`` has the first one's architecture: its config.json (apart from
    :data:`_NOT_ARCHITECTURE`) and its tensors' names and shapes.  Raises ValueError naming both checkpoints."""
    def described(idx) -> tuple[dict, dict]:
        return ({k: v for k, v in idx.config.items() if k not in _NOT_ARCHITECTURE},
                {c: idx.tensors[s].shape for c, s in idx.names.items()})

    (p0, i0), rest = checked[0], checked[1:]
    arch0, shapes0 = described(i0)
    for p, idx in rest:
        arch, shapes = described(idx)
        diff = sorted(k for k in arch0.keys() | arch.keys() if arch0.get(k) != arch.get(k))
        what = f"config.json differs in {', '.join(diff[:5])}" if diff else \
            "tensor shapes differ" if shapes != shapes0 else ""
        if what:
            raise ValueError(f"model.checkpoints: {p} has another architecture than {p0} ({what}); the checkpoints "
                             f"of one trajectory share one architecture (its stage actors keep the model and reload "
                             f"only the weights): measure them as separate trajectories (one model.checkpoints list "
                             f"each, or model.path per checkpoint)")


def main(cfg: C.RunConfig) -> list[str]:
    """Measure every checkpoint of the trajectory in step order on one set of stage actors; returns the run ids."""
    from curvdist.io.lock import run_lock
    from curvdist.preflight import check as preflight
    from curvdist.runner import driver
    from curvdist.runner.session import Session

    t_start = time.perf_counter()
    checked = [(sub, *preflight(sub)) for sub in step_configs(cfg)]   # all inputs, before Ray starts
    same_architecture([(sub.model.path, index) for sub, _, index in checked])
    _, plans = driver.make_plan(checked[0][0], checked[0][2])
    ids = []
    with Session(checked[0][0], plans) as session:
        for sub, ckpt, index in checked:
            run_id = C.resolve_run_id(sub)
            with run_lock(sub.out, run_id):
                ids.append(driver.measure(session, sub, run_id, ckpt, index, t_start))
            t_start = time.perf_counter()
    return ids
