"""`curvdist plan` with a previous run (curvdist.runner.sizing): N from the measured noise_scale, n from the
per-micro-batch relative SD of h, read from a real dataset written by the store; the plan prints both passes."""
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curvdist import config as C
from curvdist.cli import app
from curvdist.io import store
from curvdist.runner import sizing

ROOT = Path(__file__).resolve().parents[1]


def write_previous(out, run_id, model_name, scales, rel_sds, micro_batch=2):
    cfg = C.load_config(None, [f"model.name={model_name}", f"data.micro_batch={micro_batch}", f"out={out}"])
    rows = [{"layer": f"l{i}", "noise_scale": s, "h_unit_rel_sd": r, "phase": "exact"}
            for i, (s, r) in enumerate(zip(scales, rel_sds))]
    store.write_result(out, run_id, "exact-s0-g0", {"layers": rows, "directions": [], "spectra": []})
    store.write_run(out, run_id, {"config_json": json.dumps(C.to_dict(cfg)), "status": "complete"})


def test_suggestion_from_a_previous_run(tmp_path):
    write_previous(tmp_path, "prev", "tiny-gpt2", [90.0, 100.0, 400.0], [0.4, 0.5, 0.6])
    write_previous(tmp_path, "other", "tiny-llama", [5.0], [0.1])
    cfg = C.load_config(None, ["model.name=tiny-gpt2", "data.micro_batch=4", f"out={tmp_path}"])
    s = sizing.suggest_sizes(cfg)
    assert s.run_id == "prev" and s.noise_scale == 100.0 and s.noise_scale_max == 400.0
    assert s.sequences == 1000                                    # 10 × the median, a multiple of micro_batch 4
    assert s.h_unit_rel_sd == pytest.approx(0.58 * (2 / 4) ** 0.5)  # 90th percentile, scaled to micro-batches of 4
    n0 = (s.h_unit_rel_sd / sizing.TARGET_REL_ERR) ** 2           # units for 5 %, with the FPC over 250 micro-batches
    assert s.exact_sequences == 4 * math.ceil(n0 / (1 + n0 / 250)) == 4 * 54
    assert sizing.suggest_sizes(C.load_config(None, ["model.name=minilm-l6", f"out={tmp_path}"])) is None
    assert sizing.suggest_sizes(C.load_config(None, ["model.name=tiny-gpt2", f"out={tmp_path / 'none'}"])) is None


def test_plan_prints_both_passes_and_the_suggestion(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    write_previous(tmp_path, "prev", "tiny-gpt2", [30.0], [0.2])
    yaml = tmp_path / "run.yaml"
    yaml.write_text("model:\n  name: tiny-gpt2\n")
    r = CliRunner().invoke(app, ["plan", str(yaml), f"out={tmp_path}", "data.sequences=16", "data.micro_batch=2",
                                 "data.exact_sequences=4"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "statistics over N = 16 sequences" in text and "exact pass over n = 4 sequences (2 of 8" in text
    assert "data.sequences=300" in text and "data.exact_sequences=" in text
