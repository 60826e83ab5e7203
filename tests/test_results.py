"""Recorded sweeps in results/: well formed, and a sampled record reproduces from its command."""

import json
import math

import pytest

from edgellm.cli import run_command
from edgellm.measure import check_speed_keys
from edgellm.paths import results_dir
from edgellm.results import sweep_names

RESULTS_DIR = results_dir()

SWEEPS = sweep_names()
METRICS = ("ppl", "nll", "n_tokens", "kl_mean", "bpw", "size_bytes")


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_is_well_formed(name):
    sweep = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    assert sweep["name"] == name and sweep["description"] and sweep["commands"]
    if sweep.get("pending"):  # specified, not run yet: no partial records
        assert sweep["records"] == [], "a pending sweep has no records; run `make results`"
        return
    assert [r["command"] for r in sweep["records"]] == sweep["commands"], "run `make results`"
    for rec in sweep["records"]:
        assert rec["command"].startswith("edgellm ") and "versions" in rec and "seed" in rec
        assert not any(s in json.dumps(rec) for s in ("/work/", "/root/", "/home/", "/tmp/"))


@pytest.mark.parametrize("name", SWEEPS)
def test_speed_figures_name_their_protocol(name):
    """No bare ``tokens_per_s``; every speed key names a protocol of edgellm.measure."""
    sweep = json.loads((RESULTS_DIR / f"{name}.json").read_text())
    for rec in sweep["records"]:
        check_speed_keys(rec)
        # memory_bytes is held memory, never a copy of the packed size
        if rec["command"].startswith("edgellm quantize"):
            assert "memory_bytes" not in rec


@pytest.mark.integration
def test_a_sampled_record_reproduces():
    """Re-run the cheapest recorded point of every sweep family and compare its metrics."""
    records = [r for n in SWEEPS for r in json.loads((RESULTS_DIR / f"{n}.json").read_text())["records"]]
    if not records:
        pytest.fail("no recorded results: run `make results`")
    rec = min(records, key=lambda r: r.get("seconds", math.inf) + r.get("seconds_quantize", 0))
    again = run_command(rec["command"])
    for key in METRICS:
        if key in rec:
            assert again[key] == pytest.approx(rec[key], rel=1e-4, abs=1e-9), key
