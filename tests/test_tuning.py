"""Tuning lookups: every lookup over tests/tuning_lookups.py's grid returns what the Python tables gave
before the tables became data (tests/data/tuning_lookups.json, dumped from that code)."""

import json
from pathlib import Path

import pytest

from tests.tuning_lookups import lookups

BEFORE = Path(__file__).parent / "data" / "tuning_lookups.json"


def test_every_lookup_returns_what_the_python_tables_gave(monkeypatch):
    monkeypatch.delenv("MOE_ENGINE_TUNING", raising=False)
    want = json.loads(BEFORE.read_text())
    got = lookups()
    assert sorted(got) == sorted(want)
    wrong = [k for k in want if got[k] != want[k]]
    assert not wrong, f"{len(wrong)} lookups changed, e.g. {wrong[:3]}"
    # The grid reaches the measured entries, not only the defaults.
    assert want["linear|sm90|8|4096|float32"]["max_tokens"] == 8 and want["linear|sm80|8|4096|float32"] is None
    assert want["moe|sm90|1|8|bfloat16|4096|14336"] != want["moe|sm80|1|8|bfloat16|4096|14336"]


@pytest.mark.parametrize("kernel", ["gemv", "linear", "route", "latent_cache", "absorb_query"])
def test_disable_turns_off_exactly_that_kernel(kernel, tmp_path, monkeypatch):
    from kernels import tuning
    monkeypatch.delenv("MOE_ENGINE_TUNING", raising=False)
    path = tmp_path / f"no_{kernel}.json"
    path.write_text(json.dumps({"moe": [], "disable": [kernel]}))
    assert all(tuning.enabled(k) for k in tuning.DECODE_KERNELS)
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(path))
    assert [k for k in tuning.DECODE_KERNELS if not tuning.enabled(k)] == [kernel]
    with pytest.raises(ValueError, match="not one of"):
        tuning.enabled("gemm")
