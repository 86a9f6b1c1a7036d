"""The bad-input corpus (docs/reliability.md): each case runs the real `curvdist` command on real files and expects
one line on stderr naming the problem and the fix, a non-zero exit status, no traceback, Ray never started and
nothing written to `out`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tiny
import yaml
from typer.testing import CliRunner

from curvdist.cli import app
from curvdist.io import store

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """$CURVDIST_CACHE with the builtin tiny-gpt2 materialised (its progress bar is not part of an error)."""
    from curvdist.config import ModelConfig
    from curvdist.io import sources

    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CURVDIST_CACHE", str(d))
        sources.resolve_checkpoint(ModelConfig(name="tiny-gpt2"))
    return d


@pytest.fixture(autouse=True)
def _cache(cache, monkeypatch):
    monkeypatch.setenv("CURVDIST_CACHE", str(cache))  # builtin models materialise here, never in ~/.cache


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny GPT-2 (2 blocks, vocab 48) in several safetensors shards with an index."""
    return tiny.save_sharded(tmp_path_factory, {"gpt2": tiny.makers(2)["gpt2"]})["gpt2"]


@pytest.fixture
def model(ckpt, tmp_path):
    """A private copy of the checkpoint, to damage."""
    return Path(shutil.copytree(ckpt, tmp_path / "model"))


def _tree(p: Path):
    return None if not p.exists() else sorted(str(f.relative_to(p)) for f in p.rglob("*"))


def config(tmp_path, model=None, **over) -> Path:
    """A run config YAML: the tiny checkpoint, synthetic tokens, out under tmp_path; ``over``: dotted keys."""
    d = {"model": {"path": str(model)} if model else {"name": "tiny-gpt2"},
         "data": {"source": "synthetic", "sequences": 2, "seq_len": 8, "micro_batch": 2},
         "stages": 1, "top_k": 2, "device": "cpu", "plots": False, "out": str(tmp_path / "out")}
    for k, v in over.items():
        *parents, last = k.split("__")
        sub = d
        for q in parents:
            sub = sub.setdefault(q, {})
        sub[last] = v
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def fails(args, *words, out=None):
    """`curvdist ARGS` exits 2 with one `error:` line holding ``words``; no traceback, no Ray, ``out`` untouched."""
    import ray

    before = _tree(out) if out else None
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not ray.is_initialized()
    if out is not None:
        assert _tree(out) == before, "something was written to out"
    return lines[0]


def run_fails(cfg: Path, *words, overrides=()):
    out = Path(yaml.safe_load(cfg.read_text())["out"])
    return fails(["run", cfg, *overrides], *words, out=out)


# ------------------------------------------------------------------------------------------------------ model
def test_missing_model_path(tmp_path):
    run_fails(config(tmp_path, tmp_path / "nowhere"), "model.path", "does not exist", "point model.path at")


def test_directory_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    run_fails(config(tmp_path, tmp_path / "empty"), "no config.json", "point model.path at the directory")


def test_truncated_shard(model, tmp_path):
    shard = max(model.glob("*.safetensors"), key=lambda f: f.stat().st_size)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    cfg = config(tmp_path, model)
    run_fails(cfg, shard.name, "is truncated", "download, copy or convert the checkpoint again")
    fails(["plan", cfg], shard.name, "is truncated")
    shard.write_bytes(data[:5])  # not even a header
    run_fails(cfg, shard.name, "truncated")


def test_index_names_a_missing_shard(model, tmp_path):
    shard = min(model.glob("*.safetensors"))
    shard.unlink()
    run_fails(config(tmp_path, model), "model.safetensors.index.json", "1 shard(s) that do not exist", shard.name,
              "download, copy or convert")


def test_unsupported_architecture(model, tmp_path):
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5ForConditionalGeneration"]}))
    line = run_fails(config(tmp_path, t5), "unsupported architecture", "'t5'", "T5ForConditionalGeneration")
    assert "gpt2" in line and "llama" in line  # says which architectures are supported
    fails(["plan", config(tmp_path, t5)], "unsupported architecture", "gpt2")
    c = json.loads((model / "config.json").read_text())  # a supported family, an unsupported head class
    (model / "config.json").write_text(json.dumps(dict(c, architectures=["GPT2ForSequenceClassification"])))
    run_fails(config(tmp_path, model), "unsupported architecture", "GPT2ForSequenceClassification", "ForCausalLM")


# ----------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("yaml_keys, override, words", [
    ({"top_kk": 3}, "top_kk=3", ["'top_kk'", "did you mean 'top_k'"]),
    ({"data__seqlen": 8}, "data.seqlen=8", ["'data.seqlen'", "did you mean 'seq_len'", "'data.seq_len'"]),
    ({"seq_len": 8}, "seq_len=8", ["'seq_len'", "did you mean 'data.seq_len'"]),
    ({"top_k": "ten"}, "top_k=ten", ["'top_k'", "expected an integer", "'ten'", "e.g. top_k: 20"]),
    ({"top_k": 0}, "top_k=0", ["'top_k'", "must be > 0", "got 0", "e.g. top_k: 20"]),
    ({"top_k": -3}, "top_k=-3", ["'top_k'", "must be > 0", "got -3"]),
    ({"fisher": "emprical"}, "fisher=emprical", ["'fisher'", "did you mean 'empirical'", "empirical, mc, type2"]),
    ({"fisher": "kfac"}, "fisher=kfac", ["'fisher'", "choose one of: empirical, mc, type2"]),
], ids=["unknown-key", "unknown-nested-key", "key-in-wrong-section", "wrong-type", "top_k-0", "top_k-negative",
        "fisher-typo", "fisher-unknown"])
def test_config_errors_in_yaml_and_override(tmp_path, yaml_keys, override, words):
    run_fails(config(tmp_path, **yaml_keys), *words, "`curvdist config` lists every key")
    run_fails(config(tmp_path), *words, overrides=[override])


def test_layer_pattern_matches_nothing(model, tmp_path):
    line = run_fails(config(tmp_path, model, layers=["h.9.*"]), "'h.9.*'", "matches no analysable layer",
                     "layers=null")
    assert "transformer.h.0." in line  # real names to copy from
    run_fails(config(tmp_path, model, exact_layers=["nothing.*"]), "exact_layers", "'nothing.*'", "transformer.h.")


def test_more_stages_than_blocks(model, tmp_path):
    run_fails(config(tmp_path, model, stages=5), "stages=5", "2 blocks", "stages<=2")


# ------------------------------------------------------------------------------------------------------- data
def test_missing_data_file(model, tmp_path):
    cfg = config(tmp_path, model, data__source="npy", data__path=str(tmp_path / "absent.npy"))
    run_fails(cfg, "data.path=", "absent.npy", "does not exist", "data.source=pydoc or synthetic")


@pytest.mark.parametrize("source, suffix", [("text", ".txt"), ("npy", ".npy"), ("jsonl", ".jsonl")])
def test_empty_data_file(model, tmp_path, source, suffix):
    (tmp_path / f"empty{suffix}").write_bytes(b"")
    cfg = config(tmp_path, model, data__source=source, data__path=str(tmp_path / f"empty{suffix}"))
    run_fails(cfg, "is empty (0 bytes", "data.source=pydoc or synthetic")


def test_data_file_too_short(model, tmp_path):
    np.save(tmp_path / "ids.npy", np.arange(30) % 48)
    cfg = config(tmp_path, model, data__source="npy", data__path=str(tmp_path / "ids.npy"), data__sequences=4,
                 data__seq_len=16)
    run_fails(cfg, "not enough tokens", "30 tokens", "needs 64", "lower data.sequences or data.seq_len")
    np.save(tmp_path / "ids.npy", np.zeros((3, 10), dtype=np.int64))  # (S, T) sequences
    run_fails(cfg, "not enough tokens", "3 sequences of 10 tokens", "data.sequences=4 × data.seq_len=16")
    np.save(tmp_path / "ids.npy", np.zeros(100, dtype=np.float32))
    run_fails(cfg, "float32", "token ids must be integers")
    np.save(tmp_path / "ids.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    run_fails(cfg, "not a .npy array of token ids", "numpy.save")


def _add_tokenizer(model: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<eos>": 1} | {w: i + 2 for i, w in enumerate(["the", "a", "cat", "dog", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]").save_pretrained(model)


def test_text_file_too_short(model, tmp_path):
    _add_tokenizer(model)
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n")
    cfg = config(tmp_path, model, data__source="text", data__path=str(tmp_path / "t.txt"))
    run_fails(cfg, "not enough tokens", "has 6 tokens", "needs 16", "give more text")


def test_missing_tokenizer(tmp_path):
    (tmp_path / "t.txt").write_text("some text\n" * 100)
    cfg = config(tmp_path, data__source="text", data__path=str(tmp_path / "t.txt"))  # builtin tiny-gpt2: no tokenizer
    run_fails(cfg, "needs the model's tokenizer", "data.source=npy", "synthetic", "add the model's tokenizer")


# ----------------------------------------------------------------------------------------------------- output
def test_run_over_device_memory(model, tmp_path):
    """A plan over the device memory is refused before Ray starts, with the fix; the CPU stages of a local cluster
    share the host's memory (here hardware.device_memory_gb stands in for it)."""
    cfg = config(tmp_path, model, hardware__device_memory_gb=1e-5)  # 10 kB: the tiny model needs more
    run_fails(cfg, "sharing this host need", "but a device has 1e-05 GB", "fix:")


def test_run_reads_the_gpu_memory_at_run_time(model, tmp_path, monkeypatch):
    from curvdist.runner import devices

    monkeypatch.setattr(devices, "cuda_memory_bytes", lambda index=0: 10**4)  # the GPU the driver sees: 10 kB
    cfg = config(tmp_path, model, device="cuda", hardware__gpu="H100-80")    # the table's 80 GB is not used
    run_fails(cfg, "stage 0 needs", "a device has 1e-05 GB", "fix:")


def test_output_is_a_file(model, tmp_path):
    (tmp_path / "f").write_text("x")
    run_fails(config(tmp_path, model, out=str(tmp_path / "f")), "is an existing file", "choose another out")
    run_fails(config(tmp_path, model, out=str(tmp_path / "f" / "sub")), "is a file", "choose another out")
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories anyway")
def test_output_not_writable(model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        run_fails(config(tmp_path, model, out=str(ro / "out")), "is not writable", "fix the directory's permissions")
        assert not (ro / "out").exists()
    finally:
        ro.chmod(0o700)


def test_output_not_writable_simulated(model, tmp_path, monkeypatch):
    """The same check where the suite runs as root (which writes anyway): the probe file is refused."""
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    run_fails(config(tmp_path, model), "is not writable", "Permission denied", "choose another out")


def test_output_not_created_by_a_failed_check(model, tmp_path):
    run_fails(config(tmp_path, model, stages=9, out=str(tmp_path / "a" / "b" / "out")), "stages=9")
    assert not (tmp_path / "a").exists()  # the writability probe creates nothing


def _dataset(out: Path) -> None:
    store.write_result(out, "r1", "p0", {"directions": [{"layer": "x", "k": 1}], "layers": [{"layer": "x"}]})


def test_output_of_another_schema_version(model, tmp_path):
    out = tmp_path / "out"
    _dataset(out)
    (out / store.MARKER).write_text(json.dumps({"format": "curvdist", "schema_version": 99}))
    cfg = config(tmp_path, model)
    run_fails(cfg, "schema version 99", f"writes schema version {store.SCHEMA_VERSION}", "use another out",
              store.MARKER)
    (out / store.MARKER).unlink()  # no marker: the Parquet metadata says which version wrote it
    f = next((out / "layers").rglob("*.parquet"))
    t = pq.read_table(f)
    pq.write_table(t.replace_schema_metadata({b"curvdist.schema_version": b"0"}), f)
    run_fails(cfg, "schema version 0", "use another out")


def test_errors_in_a_real_process_have_no_traceback(tmp_path):
    cfg = config(tmp_path, tmp_path / "nowhere")
    exe = Path(sys.executable).parent / "curvdist"
    r = subprocess.run([str(exe), "run", str(cfg)], capture_output=True, text=True, timeout=120, check=False,
                       env=dict(os.environ, CURVDIST_DEBUG=""))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["run", str(cfg), "--debug"])
    assert r.exit_code != 0 and isinstance(r.exception, ValueError)


# ------------------------------------------------------------------------------------------------ safe loading
def test_trust_remote_code_only_from_the_command_line(model, tmp_path):
    fails(["plan", config(tmp_path, model, model__trust_remote_code=True)], "'model.trust_remote_code'",
          "--trust-remote-code on the command line")
    fails(["plan", config(tmp_path, model), "model.trust_remote_code=true"], "--trust-remote-code")
    c = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(c, auto_map={"AutoConfig": "configuration_x.XConfig"})))
    cfg = config(tmp_path, model)
    run_fails(cfg, "asks for remote code", "auto_map", "AutoConfig", "--trust-remote-code")
    fails(["plan", cfg], "asks for remote code", "--trust-remote-code")
    r = runner.invoke(app, ["plan", str(cfg), "--trust-remote-code", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_blocks"] == 2
    r = runner.invoke(app, ["config", str(cfg)])
    assert "trust_remote_code: false" in r.stdout


def test_transformers_never_runs_remote_code_by_default(model, monkeypatch):
    import transformers

    from curvdist.io import checkpoint, sources

    ckpt = model
    (ckpt / "tokenizer_config.json").write_text("{}")

    seen = []

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", "absent"))
        raise OSError("stop")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", record)
    assert sources.load_tokenizer(ckpt) is None
    sources.load_tokenizer(ckpt, trust_remote_code=True)
    with pytest.raises(OSError):
        checkpoint.CheckpointIndex.open(ckpt).hf_config()
    with pytest.raises(OSError):
        checkpoint.convert(ckpt, ckpt.parent / "converted")
    assert seen == [False, True, False, False]


def test_local_ray_is_loopback_without_dashboard(monkeypatch):
    import ray

    from curvdist.config import RayConfig, load_config
    from curvdist.runner import cluster

    assert RayConfig().dashboard is False and RayConfig().address is None
    seen = {}

    class Stop(Exception):
        pass

    def init(**kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(Stop):
        cluster.start_ray(load_config(None, ["device=cpu"]))
    assert seen["_node_ip_address"] == "127.0.0.1" and seen["include_dashboard"] is False
    with pytest.raises(Stop):
        cluster.start_ray(load_config(None, ["ray.dashboard=true"]))
    assert seen["include_dashboard"] is True
