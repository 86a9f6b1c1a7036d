"""DeepSpeed checkpoints read in place (issue 13), with checkpoints written by real DeepSpeed.

The fixture (``ds_runs``, tests/conftest.py) trains a tiny Llama (ZeRO-2) and a tiny GPT-2 (ZeRO-3) a few steps
with ``deepspeed.initialize`` at world size 2 (gloo, CPU, two spawned processes: tests/ds_train.py) and saves them
with ``engine.save_checkpoint``; beside them it writes DeepSpeed's own consolidation of the same weights
(``zero_to_fp32``) as safetensors, the reference every test compares against.  Universal checkpoints are made from
those by DeepSpeed's own converter (``ds_to_universal``).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ds_train import RUN, launch
from safetensors.torch import load_file

from curvdist import config as C
from curvdist.io import checkpoint as ckpt
from curvdist.io import query, zero
from curvdist.io.slice import build_slice
from curvdist.runner import driver

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
PY = sys.executable


@pytest.mark.parametrize("kind,tag", [("zero2", "global_step3"), ("zero3", "global_step2")])
def test_index_without_weights_and_fragments_equal_deepspeed(ds_runs, kind, tag):
    """The index (names, shapes, dtypes) comes from metadata alone (no byte of a weight read); reading every
    tensor from its fragments gives exactly DeepSpeed's own fp32 consolidation; ``latest`` picks the last tag."""
    zero.BYTES_READ.clear()
    idx = ckpt.CheckpointIndex.open(ds_runs[kind])
    assert idx.zero.kind == kind and idx.zero.world_size == 2 and idx.zero.path.name == tag
    assert sum(zero.BYTES_READ.values()) == 0
    ref = load_file(str(ds_runs[kind] / f"hf-{tag}" / "model.safetensors"))
    ref_idx = ckpt.CheckpointIndex.open(ds_runs[kind] / f"hf-{tag}")
    assert {n: t.shape for n, t in idx.tensors.items()} == {n: t.shape for n, t in ref_idx.tensors.items()}
    assert idx.tied == ref_idx.tied and idx.block_bytes == ref_idx.block_bytes and idx.family == ref_idx.family
    got = ckpt.load_tensors(idx, list(idx.tensors))
    assert all(torch.equal(got[n], ref[n]) for n in ref)
    assert sum(zero.BYTES_READ.values()) == sum(t.nbytes for t in idx.tensors.values())


@pytest.mark.parametrize("kind", ["zero2", "zero3"])
def test_each_stage_reads_only_its_fragments(ds_runs, kind):
    """Two stages of the same checkpoint: each reads exactly the bytes of its own tensors (counted at the file
    reads), none of the other stage's, and less than the whole model."""
    idx = ckpt.CheckpointIndex.open(ds_runs[kind])
    total = sum(t.nbytes for t in idx.tensors.values())
    read = []
    for first, last, emb, head in ((0, 1, True, False), (2, idx.num_blocks - 1, False, True)):
        zero.BYTES_READ.clear()
        stage = build_slice(idx, first, last, has_embedding=emb, has_head=head)
        own = set(idx.stage_tensors(first, last, has_embedding=emb, has_head=head))
        assert set(zero.BYTES_READ) == own == set(stage.loaded_tensors)
        assert sum(zero.BYTES_READ.values()) == sum(idx.tensors[n].nbytes for n in own) < total
        read.append(own)
    tied = set(idx.tied.values())   # the last stage reads the tied embedding for its head, the only overlap
    assert read[0] & read[1] <= {idx.names[s] for s in tied}
    assert not any(".layers.2." in n or ".h.2." in n for n in read[0])


@pytest.fixture(scope="module")
def universal(ds_runs, tmp_path_factory):
    """{"zero2": universal checkpoint of the ZeRO-2 Llama at step 3, "zero3": of the ZeRO-3 GPT-2 at step 2}, each
    written by DeepSpeed's own converter (``python -m deepspeed.checkpoint.ds_to_universal``, CPU) into a folder of
    its own (the converter writes ``latest_universal`` beside its output) with the model's config.json.  The
    Hugging Face models DeepSpeed trains here carry no ``universal_checkpoint_info`` (Megatron-DeepSpeed writes it),
    so the converter is run with ``--inject_missing_state``, which adds the minimal one."""
    root = tmp_path_factory.mktemp("universal")
    out = {}
    for kind, tag in (("zero2", "global_step3"), ("zero3", "global_step2")):
        dst = root / kind
        r = subprocess.run([PY, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            str(ds_runs[kind] / tag), "--output_folder", str(dst / f"{tag}_universal"),
                            "--inject_missing_state", "--num_extract_workers", "1", "--num_merge_workers", "1"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert (dst / "latest_universal").read_text().strip() == f"{tag}_universal"
        shutil.copy(ds_runs[kind] / "config.json", dst)
        out[kind] = dst
    return out


@pytest.mark.parametrize("kind,tag", [("zero2", "global_step3"), ("zero3", "global_step2")])
def test_universal_index_stage_reads_and_weights(ds_runs, universal, kind, tag):
    """A universal checkpoint (ZeRO-2 or ZeRO-3 origin: shaped ``{"param": t}`` or flat files): the index comes from
    metadata alone; a stage reads exactly its own parameters' ``fp32.pt`` bytes; every tensor equals DeepSpeed's
    own consolidation of the original checkpoint."""
    zero.BYTES_READ.clear()
    idx = ckpt.CheckpointIndex.open(universal[kind])   # latest_universal → <tag>_universal
    assert idx.zero.kind == "universal" and idx.zero.path.name == f"{tag}_universal"
    assert sum(zero.BYTES_READ.values()) == 0
    ref_idx = ckpt.CheckpointIndex.open(ds_runs[kind] / f"hf-{tag}")
    assert {n: t.shape for n, t in idx.tensors.items()} == {n: t.shape for n, t in ref_idx.tensors.items()}
    assert idx.tied == ref_idx.tied and idx.family == ref_idx.family
    assert {fr.file.parent.name for t in idx.zero.tensors.values() for fr in t.fragments} == set(idx.tensors)
    stage = build_slice(idx, 0, 1, has_embedding=True, has_head=False)
    own = set(idx.stage_tensors(0, 1, has_embedding=True, has_head=False))
    assert set(zero.BYTES_READ) == own == set(stage.loaded_tensors)
    assert sum(zero.BYTES_READ.values()) == sum(idx.tensors[n].nbytes for n in own) < idx.total_bytes
    ref = load_file(str(ds_runs[kind] / f"hf-{tag}" / "model.safetensors"))
    got = ckpt.load_tensors(idx, list(idx.tensors))
    assert set(got) == set(ref) and all(torch.equal(got[n], ref[n]) for n in ref)


def test_universal_pickled_callable_is_refused(universal, tmp_path):
    """A universal checkpoint whose ``fp32.pt`` of one parameter carries a pickled call to os.system: opening the
    index raises a clear error naming the file, and the call never runs."""
    bad = tmp_path / "bad"
    shutil.copytree(universal["zero2"], bad)
    f = next((bad / "global_step3_universal" / "zero").glob("*.layers.1.mlp.up_proj.weight")) / "fp32.pt"
    held = torch.load(f, weights_only=True)
    marker = tmp_path / "ran"
    torch.save(dict(held, evil=_Evil(marker)), f)
    with pytest.raises(zero.UnsafeCheckpointError, match=r"up_proj.*system.*code, not weights"):
        ckpt.CheckpointIndex.open(bad)
    assert not marker.exists()


def _runs_equal(a: Path, b: Path, tmp_path: Path, *, exact: bool) -> None:
    """`curvdist run` on ``a`` and on ``b`` (2 stages, exact h on block 1) give the same rows to 1e-6."""
    res = {}
    for name, path in (("a", a), ("b", b)):
        cfg = C.load_config(None, RUN + [f"model.path={path}", "stages=2", f"out={tmp_path / name}",
                                            "exact_layers=['*.1.*']"])
        assert driver.main(cfg)
        con = query.open(tmp_path / name)
        res[name] = ({r["layer"]: r for r in query.arrow(con.sql("select * from layers")).to_pylist()},
                     {(r["layer"], r["k"]): r for r in query.arrow(con.sql("select * from directions")).to_pylist()})
    (a_l, a_d), (b_l, b_d) = res["a"], res["b"]
    assert set(a_l) == set(b_l) and len(a_l) >= 8 and {r["stage"] for r in a_l.values()} == {0, 1}

    def same(x, y):
        return (x is None and y is None) or (x is not None and y is not None
                                             and x == pytest.approx(y, rel=1e-6, abs=1e-300, nan_ok=True))
    for n, r in b_l.items():
        for key in ("alpha", "alpha_kron", "beta", "phi", "gamma", "grad_snr"):
            assert same(r[key], a_l[n][key]), (n, key, r[key], a_l[n][key])
    assert sum(r["alpha_kron"] is not None for r in a_l.values()) > 0
    assert set(a_d) == set(b_d)
    for k, r in b_d.items():
        for key in ("sigma", "h", "h_kron"):
            assert same(r[key], a_d[k][key]), (k, key, r[key], a_d[k][key])
    if exact:   # the Llama measures exact h on block 1 (the trained GPT-2's block-1 h give too few valid points
        assert sum(r["h"] is not None for r in a_d.values()) > 0   # for α, in both routes)
        assert sum(r["alpha"] is not None for r in a_l.values()) > 0


@pytest.mark.ray
@pytest.mark.parametrize("kind,tag", [("zero2", "global_step3"), ("zero3", "global_step2")])
def test_run_on_deepspeed_equals_safetensors(ray_local, ds_runs, tmp_path, kind, tag):
    """`curvdist run` with model.path at the DeepSpeed folder equals the run on the same weights saved as
    safetensors (DeepSpeed's own consolidation), 2 stages, to 1e-6."""
    _runs_equal(ds_runs[kind], ds_runs[kind] / f"hf-{tag}", tmp_path, exact=kind == "zero2")


@pytest.mark.ray
@pytest.mark.parametrize("kind,tag", [("zero2", "global_step3"), ("zero3", "global_step2")])
def test_run_on_universal_equals_safetensors(ray_local, ds_runs, universal, tmp_path, kind, tag):
    """`curvdist run` on DeepSpeed's universal conversion equals the run on the same weights saved as
    safetensors, 2 stages, to 1e-6."""
    _runs_equal(universal[kind], ds_runs[kind] / f"hf-{tag}", tmp_path, exact=kind == "zero2")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_callable_is_refused(ds_runs, tmp_path):
    """A checkpoint whose model-states file carries a pickled call to os.system: opening it raises a clear error,
    the call never runs, and `curvdist run` exits non-zero with nothing written."""
    bad = tmp_path / "bad"
    shutil.copytree(ds_runs["zero2"] / "global_step3", bad / "global_step3")
    (bad / "latest").write_text("global_step3")
    shutil.copy(ds_runs["zero2"] / "config.json", bad)
    f = bad / "global_step3" / "mp_rank_00_model_states.pt"
    states = torch.load(f, weights_only=False)   # our own fixture file, trusted
    marker = tmp_path / "ran"
    states["evil"] = _Evil(marker)
    torch.save(states, f)
    with pytest.raises(zero.UnsafeCheckpointError, match=r"system.*code, not weights"):
        ckpt.CheckpointIndex.open(bad)
    out = tmp_path / "out"
    (tmp_path / "run.yaml").write_text("plots: false\n")
    r = subprocess.run([PY, "-m", "curvdist", "run", str(tmp_path / "run.yaml"), f"model.path={bad}", f"out={out}",
                        "data.source=synthetic"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parent), RAY_AUTH_MODE="disabled"))
    assert r.returncode != 0 and "code, not weights" in r.stderr + r.stdout
    assert not marker.exists() and not out.exists()


def test_missing_config_json_names_the_fix(ds_runs, tmp_path):
    """A DeepSpeed folder without config.json anywhere near: the error names model.config_json; with it, the
    index opens and reads the same tensors."""
    d = tmp_path / "noconfig"
    shutil.copytree(ds_runs["zero3"] / "global_step2", d / "global_step2")
    with pytest.raises(FileNotFoundError, match="model.config_json"):
        ckpt.CheckpointIndex.open(d / "global_step2")
    idx = ckpt.CheckpointIndex.open(d / "global_step2", ds_runs["zero3"] / "config.json")
    assert idx.family == "gpt2" and idx.config_dir == ds_runs["zero3"]


_PEAK = """
import json, sys
from curvdist.io import checkpoint as ckpt
from curvdist.io.slice import build_slice
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
idx = ckpt.CheckpointIndex.open(sys.argv[1])
last = idx.num_blocks // 2 - 1
warm = build_slice(idx, last + 1, last + 1, has_embedding=False, has_head=False)  # imports the model code
del warm
open("/proc/self/clear_refs", "w").write("5")   # VmHWM := VmRSS
r0 = status("VmRSS")
stage = build_slice(idx, 0, last, has_embedding=True, has_head=False)
own = sum(idx.tensors[n].nbytes for n in stage.loaded_tensors)
print(json.dumps({"peak": status("VmHWM") - r0, "own": own, "total": idx.total_bytes}))
"""


def test_stage_peak_memory_below_the_whole_model(tmp_path):
    """A 19M-parameter Llama (75 MB in fp32) saved by DeepSpeed ZeRO-2: building the first of two stages raises
    the process's peak resident memory by about its own half, well below the whole model's fp32 size (reading
    the rank files never maps or copies the other stage's bytes, nor the optimizer moments beside them)."""
    import json
    job = launch(tmp_path / "big", "--family", "llama-big", "--stage", "2", "--world", "1", "--steps", "1",
                 "--no-consolidate")
    log, _ = job.communicate(timeout=600)
    assert job.returncode == 0, log[-3000:]
    r = subprocess.run([PY, "-c", _PEAK, str(tmp_path / "big")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parent), MALLOC_MMAP_THRESHOLD_="65536",
                                MALLOC_TRIM_THRESHOLD_="0"))
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["total"] > 70e6 and m["own"] < 0.55 * m["total"]
    assert 0.9 * m["own"] < m["peak"] < 0.75 * m["total"], m
