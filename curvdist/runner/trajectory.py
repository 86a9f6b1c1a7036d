"""α over a training run: every checkpoint of ``model.checkpoints`` measured with the same settings, one dataset.

    cfg = load_config("run.yaml", ["model.checkpoints=[ckpt/global_step*]", "out=out/traj"])
    run_ids = main(cfg)      # <base>-step100, <base>-step200, …: each a run with a `step` column

Each checkpoint is one run of :func:`curvdist.runner.driver.main` (its own run id ``<base>-step<N>``, its own
``runs`` row, ``step`` in ``runs`` and ``layers``), so resume is per checkpoint: a rerun after a crash or a kill
skips the checkpoints already complete and finishes the one that was cut off, layer by layer.  The data, the
directions and every other setting are the trajectory's own, so the runs differ only in their weights.
"""
from __future__ import annotations

import dataclasses
import glob
import re
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


def main(cfg: C.RunConfig) -> list[str]:
    """Measure every checkpoint of the trajectory in step order; returns the run ids."""
    from curvdist.runner import driver

    return [driver.main(sub) for sub in step_configs(cfg)]
