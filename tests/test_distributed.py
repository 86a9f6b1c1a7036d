"""Distributed equals local (SPEC §4.4): the Ray pipeline with 1, 2 and 3 stages gives the in-process numbers."""
import json

import pytest
import torch

import curvdist
from curvdist import config as C
from curvdist.io import checkpoint, query, sources
from curvdist.io import data as D
from curvdist.runner import driver

pytestmark = [pytest.mark.ray, pytest.mark.slow]

COMMON = ["model.dtype=float64", "stat_dtype=float64", "top_k=6", "data.source=synthetic", "data.sequences=4",
          "data.seq_len=16", "data.micro_batch=2", "plots=false"]


def in_process(cfg, exact_keys=None):
    from transformers import AutoModelForCausalLM
    ck = sources.resolve_checkpoint(cfg.model)
    # loaded as stored (float32) and cast, as the stages do: transformers computes rotary frequencies at
    # construction in the default dtype, so building in float64 would shift cos/sin by float32 rounding
    model = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32, attn_implementation="sdpa")
    batches = D.make_batches(cfg.data, vocab_size=model.config.vocab_size)
    return curvdist.analyze(model, batches, top_k=cfg.top_k, dtype=torch.float64, fisher=cfg.fisher, exact=cfg.exact,
                            mc_samples=cfg.mc_samples, exact_layers=cfg.exact_layers, seed=cfg.data.seed,
                            gradient_labels=cfg.gradient_labels, factor_mode=cfg.factor_mode,
                            sketch_rank=cfg.sketch_rank,
                            exact_data=None if exact_keys is None else {b: batches[b] for b in exact_keys})


def read(out, run_id):
    con = query.open(out)
    layers = {r["layer"]: r for r in query.arrow(con.sql(f"select * from layers where run_id='{run_id}'")).to_pylist()}
    dirs = {(r["layer"], r["k"]): r for r in
            query.arrow(con.sql(f"select * from directions where run_id='{run_id}'")).to_pylist()}
    return layers, dirs


def close(a, b, rel=1e-6):
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def projections_passes(out, run_id):
    """How each group's projections pass went: "replayed" (the statistics pass's kept rows) or "streamed"."""
    timings = json.loads(query.read_run(out, run_id)["timings_json"])
    return [p["projections"] for p in timings["passes"] if p["kind"] == "projections"]


def assert_streamed_equal(over, replayed, tmp_path, row_cache_gb):
    """The run of ``over`` with ``row_cache_gb`` (0, or too small for the rows) streams its projections pass and
    gives every projected number of the ``replayed`` run's ``(layers, dirs)`` to 1e-12 in float64."""
    out = tmp_path / "streamed"
    run_id = driver.main(C.load_config(None, over + [f"row_cache_gb={row_cache_gb}", f"out={out}"]))
    assert projections_passes(out, run_id) == ["streamed"]
    layers, dirs = read(out, run_id)
    assert set(dirs) == set(replayed[1])
    for key, d in dirs.items():
        for col in ("h_kron", "h_sop", "rayleigh_delta", "rayleigh_A", "lambda_A", "lambda_delta", "rho_A",
                    "rho_delta", "phi"):
            assert close(replayed[1][key][col], d[col], 1e-12), (key, col, replayed[1][key][col], d[col])
    for name, r in layers.items():
        for col in ("alpha_kron", "beta", "phi", "lambda_rel_err_A", "lambda_rel_err_delta"):
            assert close(replayed[0][name][col], r[col], 1e-12), (name, col, replayed[0][name][col], r[col])


EXACT_SOME = "exact_layers=[transformer.h.0.*,transformer.h.2.mlp.*,lm_head]"
# (model, stages, replicas, fisher, exact_layers, gradient_labels): every layout with every fisher, with and without
# exact_layers, and the null run's sampled labels (drawn on the last stage).  type2 back-propagates one seed per
# vocabulary entry, so it runs on a GPT-2 with a 48-word vocabulary.
LAYOUTS = [
    ("tiny-gpt2", 1, 1, "empirical", None, "true"), ("tiny-gpt2", 1, 1, "mc", EXACT_SOME, "true"),
    ("gpt2-v48", 1, 1, "type2", None, "true"),
    ("tiny-gpt2", 2, 1, "empirical", EXACT_SOME, "true"), ("tiny-llama", 2, 1, "mc", None, "true"),
    ("gpt2-v48", 2, 1, "type2", EXACT_SOME, "true"), ("tiny-gpt2", 2, 1, "empirical", None, "sampled"),
    ("tiny-gpt2", 3, 1, "empirical", None, "true"), ("tiny-gpt2", 3, 1, "mc", EXACT_SOME, "true"),
    ("gpt2-v48", 3, 1, "type2", None, "true"),
    ("tiny-gpt2", 2, 2, "empirical", EXACT_SOME, "true"), ("tiny-gpt2", 2, 2, "mc", None, "sampled"),
    ("gpt2-v48", 2, 2, "type2", EXACT_SOME, "true"),
]


@pytest.fixture(scope="module")
def gpt2_v48(tmp_path_factory):
    import tiny
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2-v48")
    tiny.makers(4)["gpt2"]().save_pretrained(d)
    return d


@pytest.mark.parametrize("model,stages,replicas,fisher,exact,labels", LAYOUTS)
def test_distributed_equals_in_process(ray_local, gpt2_v48, tmp_path, model, stages, replicas, fisher, exact, labels):
    """Every layout (stages × replicas, several micro-batches in flight) gives the in-process numbers to 1e-9 in
    float64, for every fisher, with and without exact_layers; every number, the signal-or-noise ones included
    (per-unit noise, halves by micro-batch key, per-half h from the stage-chained exact pass).  Llama:
    transformers' LlamaRMSNorm computes in float32 whatever the input dtype, so its second derivatives by two AD
    routes (double backward in process, Taylor mode across stages) agree only to float32 rounding there
    (measured: h to 1.3e-7 of the largest, α_se, which divides by a small spread, to 1.1e-5)."""
    tol = 5e-5 if model == "tiny-llama" else 1e-9
    src = f"model.path={gpt2_v48}" if model == "gpt2-v48" else f"model.name={model}"
    over = COMMON + [src, f"stages={stages}", f"replicas={replicas}", f"fisher={fisher}",
                     f"out={tmp_path}", "data.sequences=6", "data.micro_batch=2", f"gradient_labels={labels}"]
    cfg = C.load_config(None, over + ([exact] if exact else []))
    run_id = driver.main(cfg)
    layers, dirs = read(tmp_path, run_id)
    ref = in_process(cfg)
    ref_layers = {r["layer"]: r for r in ref.layers.to_pylist()}
    assert set(layers) == set(ref_layers) and len(layers) >= 9
    for name, r in ref_layers.items():
        for key in ("alpha", "alpha_kron", "beta", "phi", "gamma", "s", "n_valid", "n_terms", "rows", "alpha_se",
                    "n_units", "grad_snr", "noise_scale", "grad_trace_cov", "stable_directions", "alpha_half_a",
                    "alpha_half_b"):
            # a half's σ along a full direction can be small next to the half's G (a difference of sums): its α
            # amplifies the rounding of the two routes
            rel = max(tol, 1e-7) if key in ("alpha_half_a", "alpha_half_b", "noise_scale") else tol
            assert close(r[key], layers[name][key], rel), (name, key, r[key], layers[name][key])
        assert r["status"] == layers[name]["status"]
        assert layers[name]["alpha_kron"] is None or \
            abs(layers[name]["alpha_kron"] - layers[name]["beta"] - layers[name]["phi"]) < 1e-9
    assert {r["stage"] for r in layers.values()} == set(range(stages))
    with_h = 0
    for r in ref.directions.to_pylist():
        d = dirs[(r["layer"], r["k"])]
        for key in ("sigma", "h", "h_gn", "h_kron", "h_sop", "lambda_A", "lambda_delta", "rayleigh_delta",
                    "stability", "kron_floor_ratio"):
            assert close(r[key], d[key], tol), (r["layer"], r["k"], key, r[key], d[key])
        with_h += d["h"] is not None
    assert with_h > 0 and (exact is None) == (with_h == len(dirs))
    timings = json.loads(query.read_run(tmp_path, run_id)["timings_json"])
    assert timings["layout"]["replicas"] == replicas and timings["layout"]["stages"] == stages
    assert {p["kind"] for p in timings["passes"]} == {"stats", "projections", "exact"}
    assert projections_passes(tmp_path, run_id) == ["replayed"]   # every worker's rows fit the default budget
    # one sweep per (source stage, micro-batch): the stages below the last that own exact layers, not per layer
    exact_pass = next(p for p in timings["passes"] if p["kind"] == "exact")
    sources = {layers[n]["stage"] for n in layers if layers[n]["stage"] < stages - 1
               and any(d["h"] is not None for (ln, _), d in dirs.items() if ln == n)}
    assert exact_pass["sweeps"] == len(sources) * timings["layout"]["microbatches"]
    assert exact_pass["exact_dtype"] == "float64" and (exact_pass["sent_bytes"] > 0) == bool(sources)
    if (stages, fisher) == (1, "mc"):   # one stage: the replayed projections are those of a second pass
        assert_streamed_equal(over + [exact], (layers, dirs), tmp_path, 0)


def test_exact_subset_distributed_equals_in_process(ray_local, tmp_path):
    """data.exact_sequences: exact h from a seeded sample of 3 of the 6 micro-batches, 2 stages × 2 replicas, gives
    the in-process numbers of analyze(exact_data=the same micro-batches): h, h^GN, their standard errors, α with
    alpha_se and alpha_se_h, α of each half (on the sampled micro-batches), to 1e-9 in float64."""
    from curvdist.math.sequence import exact_microbatches
    over = COMMON + ["model.name=tiny-gpt2", "stages=2", "replicas=2", f"out={tmp_path}", "data.sequences=12",
                     "data.micro_batch=2", "data.exact_sequences=5", EXACT_SOME]
    cfg = C.load_config(None, over)
    assert cfg.data.exact_microbatches == 3   # 5 sequences: rounded up to whole micro-batches of 2
    run_id = driver.main(cfg)
    layers, dirs = read(tmp_path, run_id)
    keys = exact_microbatches(6, 3, cfg.data.seed)
    assert keys != (0, 1, 2)
    ref = in_process(cfg, exact_keys=keys)
    measured = 0
    for r in ref.layers.to_pylist():
        got = layers[r["layer"]]
        for key in ("alpha", "alpha_se", "alpha_se_h", "h_unit_rel_sd", "exact_units", "alpha_half_a",
                    "alpha_half_b"):
            rel = 1e-7 if key.startswith("alpha_half") else 1e-9
            assert close(r[key], got[key], rel), (r["layer"], key, r[key], got[key])
        measured += r["exact_units"] == 3
    assert measured >= 3
    for r in ref.directions.to_pylist():
        d = dirs[(r["layer"], r["k"])]
        for key in ("sigma", "h", "h_gn", "h_se", "h_gn_se"):
            assert close(r[key], d[key], 1e-9), (r["layer"], r["k"], key, r[key], d[key])
    with_se = [d for d in dirs.values() if d["h_se"] is not None]
    assert with_se and all(d["h_se"] > 0 for d in with_se)
    timings = json.loads(query.read_run(tmp_path, run_id)["timings_json"])
    exact_pass = next(p for p in timings["passes"] if p["kind"] == "exact")
    assert exact_pass["sweeps"] == 3   # one source stage below the last, 3 sampled micro-batches


def test_sketch_mode_distributed_equals_in_process(ray_local, tmp_path):
    """factor_mode=sketch with 8 columns (the factors are 32- to 128-wide: genuinely approximated) on 2 stages × 2
    replicas: the seeded test matrices are the same on every replica, so the sketches and the projections pass's
    Rayleigh–Ritz products add across replicas and give the in-process λ, their error estimates, ρ, β and φ.  The
    projections pass replays every worker's rows; with a row cache too small for them it streams the batch again
    and gives the same numbers to 1e-12."""
    over = COMMON + ["model.name=tiny-gpt2", "stages=2", "replicas=2", "top_k=6", "factor_mode=sketch",
                     "sketch_rank=8", f"out={tmp_path}", "data.sequences=6", "exact=false"]
    cfg = C.load_config(None, over)
    run_id = driver.main(cfg)
    layers, dirs = read(tmp_path, run_id)
    ref = in_process(cfg)
    for r in ref.layers.to_pylist():
        got = layers[r["layer"]]
        assert (got["factor_mode_A"], got["factor_mode_delta"]) == ("sketch", "sketch")
        for key in ("beta", "phi", "alpha_kron", "lambda_rel_err_A", "lambda_rel_err_delta"):
            assert close(r[key], got[key], 1e-9), (r["layer"], key, r[key], got[key])
    for r in ref.directions.to_pylist():
        d = dirs[(r["layer"], r["k"])]
        for key in ("lambda_A", "lambda_delta", "rho_A", "rho_delta", "phi"):
            assert close(r[key], d[key], 1e-9), (r["layer"], r["k"], key, r[key], d[key])
    spectra = query.arrow(query.open(tmp_path).sql("select * from spectra")).to_pylist()
    assert {r["factor_mode"] for r in spectra} == {"sketch"}
    assert max(r["eigenvalue_err"] / r["eigenvalue"] for r in spectra if r["eigenvalue"] > 0) > 1e-6
    assert projections_passes(tmp_path, run_id) == ["replayed"]
    assert_streamed_equal(over, (layers, dirs), tmp_path, "0.0000001")   # ~100 bytes a worker: over at once


def test_stage_reads_only_its_tensors(ray_local, tmp_path):
    from curvdist.runner.spec import WorkerSpec
    from curvdist.runner.worker import Worker
    cfg = C.load_config(None, COMMON + ["model.name=tiny-llama", "stages=3", f"out={tmp_path}"])
    index, plans = driver.make_plan(cfg)
    mid = plans[1]
    checkpoint.reset_reads()
    w = Worker(WorkerSpec.build(cfg, index.path, mid, stages=3, replica=0, replicas=1, layers=mid.layers,
                                device="cpu", threads=1))
    loaded = set(w.info().loaded_tensors)
    expected = set(index.stage_tensors(mid.first_block, mid.last_block, has_embedding=False, has_head=False))
    assert loaded == expected
    assert not any("embed_tokens" in n or "lm_head" in n for n in loaded)
    blocks = {int(n.split(".")[2]) for n in loaded}
    assert blocks == set(range(mid.first_block, mid.last_block + 1))


def test_worker_replays_only_rows_it_holds(ray_local, tmp_path):
    """One stage worker in-process: its projections replayed from the rows it kept equal a streamed pass's exactly;
    a worker that has run no statistics pass since it started or was reset (a replacement) holds no rows, says so,
    and refuses to replay (the driver streams then)."""
    from curvdist.runner.spec import WorkerSpec
    from curvdist.runner.worker import Worker
    cfg = C.load_config(None, COMMON + ["model.name=tiny-gpt2", "fisher=mc", f"out={tmp_path}"])
    index, (plan,) = driver.make_plan(cfg)
    w = Worker(WorkerSpec.build(cfg, index.path, plan, stages=1, replica=0, replicas=1, layers=plan.layers,
                                device="cpu", threads=1))
    batches = D.make_batches(cfg.data, vocab_size=index.hf_config().vocab_size)

    def stream(kind, replay=False):
        w.begin_pass(kind, replay)
        for b, (x, y) in enumerate([] if replay else batches):
            w.loss_backward(b, x["input_ids"].numpy(), x["attention_mask"].numpy(), y.numpy())
        return w.end_pass()

    got = {}
    for replay in (True, False):
        stream("stats")
        state = w.row_cache()
        assert state.complete and state.nbytes > 0 and not state.reason
        report = stream("projections", replay)
        assert report.microbatches == (0 if replay else len(batches)) and w.rows is None   # freed either way
        got[replay] = w.projections
    assert set(got[True]) == set(got[False]) == set(plan.layers)
    for name, p in got[False].items():
        for key, want in vars(p).items():
            assert (want is None) == (getattr(got[True][name], key) is None)
            if want is not None:
                assert torch.equal(getattr(got[True][name], key), want), (name, key)
    w.reset()
    assert not w.row_cache().complete and "no statistics pass" in w.row_cache().reason
    with pytest.raises(RuntimeError, match="cannot replay"):
        w.begin_pass("projections", True)


def test_rerun_skips_written_layers(ray_local, tmp_path):
    cfg = C.load_config(None, COMMON + ["model.name=tiny-gpt2", "stages=2", f"out={tmp_path}", "exact=false"])
    run_id = driver.main(cfg)
    files = sorted(p.name for p in (tmp_path / "layers" / f"run_id={run_id}").iterdir())
    assert driver.main(cfg) == run_id
    assert sorted(p.name for p in (tmp_path / "layers" / f"run_id={run_id}").iterdir()) == files
    run = query.read_run(tmp_path, run_id)
    assert "nothing left" in run["status"]
    layers, dirs = read(tmp_path, run_id)
    assert all(d["h"] is None for d in dirs.values())   # exact=false leaves h null


def test_exact_dtype_on_a_bfloat16_model(ray_local, tmp_path):
    """A bfloat16 model through 2 stages: exact_dtype=float32 (the runner's default) and exact_dtype=model both
    run; the statistics and directions are the same, the layer rows say which dtype the HVPs used, and bfloat16
    HVPs differ from float32 ones by far more than float32 rounding (the difference is reported, not hidden)."""
    base = ["model.name=tiny-gpt2", "stages=2", "model.dtype=bfloat16", "top_k=6", "data.source=synthetic",
            "data.sequences=4", "data.seq_len=16", "data.micro_batch=2", "plots=false", f"out={tmp_path}",
            "exact_layers=[transformer.h.0.mlp.*,transformer.h.1.attn.*]"]
    runs = {xd: driver.main(C.load_config(None, base + [f"exact_dtype={xd}"])) for xd in ("float32", "model")}
    con = query.open(tmp_path)
    got = {}
    for xd, run_id in runs.items():
        got[xd] = {(r[0], r[1]): (r[2], r[3]) for r in con.sql(
            f"select layer, k, sigma, h from directions where run_id = '{run_id}' and h is not null").fetchall()}
        dtypes = {r[0] for r in con.sql(f"select exact_dtype from layers where run_id = '{run_id}' "
                                        "and exact_dtype is not null").fetchall()}
        assert dtypes == {"float32" if xd == "float32" else "bfloat16"}
    assert set(got["float32"]) == set(got["model"]) and len(got["float32"]) >= 12
    assert all(got["float32"][k][0] == got["model"][k][0] for k in got["float32"])   # same σ: same statistics
    rel = sorted(abs(got["model"][k][1] - v[1]) / abs(v[1]) for k, v in got["float32"].items())
    print(f"bfloat16 HVPs against float32 HVPs on a bfloat16 model: median relative difference "
          f"{rel[len(rel) // 2]:.2e}")
    assert rel[len(rel) // 2] > 1e-4


def test_gloo_transport_equals_object_store(ray_local, tmp_path):
    """ray.transport=gloo (Ray Direct Transport: stage outputs and tangents go actor to actor over a Gloo group, the
    object store carries references) gives bit-for-bit the numbers of the object-store route on 3 stages with
    exact layers on every stage, moves the same bytes, and says which transport it used."""
    base = COMMON + ["model.name=tiny-gpt2", "stages=3", EXACT_SOME]
    runs = {kind: driver.main(C.load_config(None, base + [f"ray.transport={kind}", f"out={tmp_path / kind}"]))
            for kind in ("object_store", "gloo")}
    got = {kind: read(tmp_path / kind, run_id) for kind, run_id in runs.items()}
    (la, da), (lb, db) = got["object_store"], got["gloo"]
    assert set(da) == set(db) and sum(d["h"] is not None for d in db.values()) > 0
    for key, d in da.items():
        for col in ("sigma", "h", "h_gn", "h_sop", "lambda_A", "lambda_delta"):
            assert d[col] == db[key][col], (key, col, d[col], db[key][col])
    assert all(la[n]["alpha"] == lb[n]["alpha"] for n in la)
    passes = {}
    for kind, run_id in runs.items():
        t = json.loads(query.read_run(tmp_path / kind, run_id)["timings_json"])
        assert t["layout"]["transport"] == kind
        passes[kind] = next(p for p in t["passes"] if p["kind"] == "exact")
    assert passes["gloo"]["transport"] == "gloo" and passes["gloo"]["sent_bytes"] == passes["object_store"]["sent_bytes"] > 0
