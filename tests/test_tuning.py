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



def _write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_the_override_file_comes_before_the_shipped_one_and_the_default_last(tmp_path, monkeypatch):
    """MOE_ENGINE_TUNING's entry wins over the shipped sm90 one (for the same key and for a less specific
    key); keys it lacks still come from the shipped file; a device with no file gets the heuristic default."""
    import torch
    from kernels import tuning
    monkeypatch.delenv("MOE_ENGINE_TUNING", raising=False)
    cpu = torch.device("cpu")
    monkeypatch.setattr(tuning, "device_key", lambda d: "sm90")
    shipped_router = tuning.linear_tuning(cpu, 8, 4096, torch.float32)
    shipped_mixtral = tuning.moe_tuning(cpu, 2, 8, torch.bfloat16, 4096, 14336)
    shipped_gemv = tuning.gemv_tuning(cpu, 4096, 14336)
    shipped_decode = tuning.decode_tuning(cpu, 128, 8)
    assert shipped_router.max_tokens == 8 and shipped_mixtral.gate_up.block_n == 128
    path = _write(tmp_path, "t.json", {
        "device": "NVIDIA H200",
        "linear": [{"device": "sm90", "n": 8, "k": 4096, "dtype": "float32", "tile": [2, 2048, 1, 8, 1],
                    "max_tokens": 3}],
        "gemv": [{"device": "sm90", "gate_up": [4, 1024, 1, 4, 2], "down": [4, 1024, 1, 4, 2], "max_tokens": 4}],
        "decode": [{"device": "sm90", "shape": "gqa", "block_n": 32, "block_h": 16}],
        "moe": [{"device": "sm80", "shape": "tiny", "block_m": 32, "gate_up": [32, 64], "down": [32, 64]}]})
    monkeypatch.setenv("MOE_ENGINE_TUNING", path)
    assert tuning.linear_tuning(cpu, 8, 4096, torch.float32) == tuning.LinearTuning(tuning.GemmTile(2, 2048, 1, 8, 1), 3)
    assert tuning.linear_tuning(cpu, 64, 2048, torch.float32) == tuning.shipped("sm90")[("linear", "sm90", 64, 2048, "float32")]
    # The override's device-wide gemv entry beats the shipped exact-shape one: the override file comes first.
    assert tuning.gemv_tuning(cpu, 4096, 14336) != shipped_gemv and tuning.gemv_tuning(cpu, 4096, 14336).max_tokens == 4
    assert tuning.decode_tuning(cpu, 128, 8) == tuning.DecodeTuning(32, 16) != shipped_decode
    assert tuning.moe_tuning(cpu, 2, 8, torch.bfloat16, 4096, 14336) == shipped_mixtral   # an sm80 entry: not ours
    monkeypatch.setattr(tuning, "device_key", lambda d: "sm80")
    assert tuning.moe_tuning(cpu, 2, 8, torch.bfloat16, 4096, 14336) == tuning.MoETuning(
        32, tuning.GemmTile(32, 64), tuning.GemmTile(32, 64))
    assert tuning.linear_tuning(cpu, 8, 4096, torch.float32) is None                      # no sm80 file
    assert tuning.moe_tuning(cpu, 4000, 8) == tuning._DEFAULT_MOE["large"]


TILE = [8, 64, 1, 4, 2]
LINEAR = {"device": "sm90", "n": 8, "k": 8, "dtype": "bfloat16", "tile": TILE, "max_tokens": 2}
BAD_FILES = {
    "not-json": ('{"moe": [}', "line 1 column 10"),
    "not-an-object": ("[1, 2]", "top level"),
    "empty": ({}, "top level"),
    "unknown-kernel": ({"gemm": []}, '"gemm"'),
    "section-not-a-list": ({"linear": LINEAR}, "linear"),
    "entry-not-an-object": ({"linear": [3]}, "linear[0]"),
    "unknown-field": ({"linear": [{**LINEAR, "max_token": 2}]}, "linear[0].max_token"),
    "missing-field": ({"linear": [{k: v for k, v in LINEAR.items() if k != "tile"}]}, "linear[0].tile"),
    "no-device": ({"linear": [{k: v for k, v in LINEAR.items() if k != "device"}]}, "linear[0].device"),
    "device-not-a-key": ({"linear": [{**LINEAR, "device": "NVIDIA H200"}]}, "linear[0].device"),
    "tile-a-string": ({"linear": [{**LINEAR, "tile": "8x64"}]}, "linear[0].tile"),
    "tile-too-short": ({"linear": [{**LINEAR, "tile": [8]}]}, "linear[0].tile"),
    "warps-not-power-of-2": ({"linear": [{**LINEAR, "tile": [8, 64, 1, 3, 2]}]}, "linear[0].tile[3] (num_warps)"),
    "dtype-unknown": ({"linear": [{**LINEAR, "dtype": "int8"}]}, "linear[0].dtype"),
    "n-a-float": ({"linear": [{**LINEAR, "n": 8.0}]}, "linear[0].n"),
    "two-entries-one-key": ({"linear": [LINEAR, LINEAR]}, "linear[1]"),
    "block-m-a-string": ({"moe": [{"device": "sm90", "shape": "tiny", "block_m": "16", "gate_up": TILE,
                                   "down": TILE}]}, "moe[0].block_m"),
    "shape-class-unknown": ({"moe": [{"device": "sm90", "shape": "huge", "block_m": 16, "gate_up": TILE,
                                      "down": TILE}]}, "moe[0].shape"),
    "half-an-expert-shape": ({"moe": [{"device": "sm90", "shape": "tiny", "experts": 8, "block_m": 16,
                                       "gate_up": TILE, "down": TILE}]}, "moe[0]"),
    "stacked-down-a-number": ({"gemv": [{"device": "sm90", "gate_up": TILE, "down": TILE, "stacked_down": 1}]},
                              "gemv[0].stacked_down"),
    "decode-block-h-small": ({"decode": [{"device": "sm90", "shape": "gqa", "block_n": 16, "block_h": 8}]},
                             "decode[0].block_h"),
    "about-a-list": ({"about": ["x"], "linear": [LINEAR]}, "about"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_malformed_tuning_file_is_one_line_naming_the_file_and_the_field(case, tmp_path, monkeypatch):
    import torch
    from kernels import tuning
    data, field = BAD_FILES[case]
    path = _write(tmp_path, f"{case}.json", data)
    monkeypatch.setenv("MOE_ENGINE_TUNING", path)
    with pytest.raises(tuning.TuningFileError) as err:
        tuning.moe_tuning(torch.device("cpu"), 2, 8)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"MOE_ENGINE_TUNING={path}: ") and f"({field}" in message, message


def test_a_missing_tuning_file_is_one_line(tmp_path, monkeypatch):
    from kernels import tuning
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(tmp_path / "none.json"))
    with pytest.raises(tuning.TuningFileError, match=r"none\.json: not a tuning file .*No such file"):
        tuning.enabled("gemv")


@pytest.fixture
def shipped_dir(tmp_path, monkeypatch):
    from kernels import tuning
    monkeypatch.setattr(tuning, "SHIPPED", tmp_path)
    tuning.shipped.cache_clear()
    yield tmp_path
    tuning.shipped.cache_clear()


def test_a_malformed_shipped_file_names_its_path(shipped_dir, monkeypatch):
    import torch
    from kernels import tuning
    monkeypatch.delenv("MOE_ENGINE_TUNING", raising=False)
    (shipped_dir / "interpreter.json").write_text(json.dumps({"linear": [{**LINEAR, "device": "interpreter",
                                                                           "max_tokens": "2"}]}))
    with pytest.raises(tuning.TuningFileError, match=r"interpreter\.json: .*\(linear\[0\]\.max_tokens: want a whole"):
        tuning.linear_tuning(torch.device("cpu"), 8, 8, torch.bfloat16)
    (shipped_dir / "interpreter.json").write_text(json.dumps({"linear": [LINEAR]}))    # an sm90 entry
    tuning.shipped.cache_clear()
    with pytest.raises(tuning.TuningFileError, match=r'linear\[0\]\.device: "sm90" in the file for interpreter'):
        tuning.linear_tuning(torch.device("cpu"), 8, 8, torch.bfloat16)


def test_the_shipped_files_are_package_data_and_read_cleanly():
    """Every shipped file parses (its entries all for the device it is named after) and pyproject's
    package-data ships it, so a non-editable install has it."""
    import tomllib
    from kernels import tuning
    files = sorted(tuning.SHIPPED.glob("*.json"))
    assert [f.stem for f in files] == ["interpreter", "sm90"]
    for f in files:
        table = tuning.shipped(f.stem)
        assert {k[1] for k in table if k != ("disable",)} == {f.stem} and table[("disable",)] == ()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["kernels"]
    assert all(any(f.relative_to(tuning.SHIPPED.parent).match(g) for g in globs) for f in files)


def test_bench_tunes_writer_makes_a_file_the_lookup_reads(tmp_path, monkeypatch):
    """moe_engine.bench.tune.write_tuning_file over fake tuner results (the fields tune_shape, tune_gemv,
    tune_linear and tune_absorb return, measurements included): every lookup then returns those entries."""
    import torch
    from kernels import tuning
    from moe_engine.bench.tune import write_tuning_file
    moe = {"device": "sm90", "shape": "tiny", "experts": 4, "dim": 32, "inter": 48, "block_m": 16,
           "gate_up": [32, 16, 1, 1, 1], "down": [16, 16, 1, 1, 1], "tokens": [1, 3], "best_times_s": [1e-5, 2e-5],
           "previous_times_s": [2e-5, 3e-5], "trials": [{"tuning": {}, "times_s": [1e-5], "rel_error": 0.0, "ok": True}]}
    gemv = {"device": "sm90", "dim": 40, "inter": 24, "shared": 2, "trials": [], "gate_up": [16, 32, 1, 1, 1],
            "down": [8, 16, 1, 1, 1], "stacked_down": True, "max_tokens": 2, "best_time_s": 1e-5,
            "versus": [{"T": 1, "ours_s": 1e-5, "theirs_s": 2e-5}]}
    linear = {"device": "sm90", "n": 64, "k": 32, "dtype": "bfloat16", "max_tokens": 0, "trials": [],
              "tile": [16, 256, 1, 4, 2]}
    absorb = {"device": "sm90", "heads": 4, "nope": 16, "lora": 32, "max_tokens": 2, "trials": [],
              "tile": [32, 16, 1, 4, 2], "versus": []}
    out = tmp_path / "results" / "moe_tuning.json"
    write_tuning_file(out, "NVIDIA H200", [moe], [gemv], [linear], [absorb])
    monkeypatch.setenv("MOE_ENGINE_TUNING", str(out))
    monkeypatch.setattr(tuning, "device_key", lambda d: "sm90")
    cpu, G = torch.device("cpu"), tuning.GemmTile
    assert tuning.moe_tuning(cpu, 2, 4, torch.bfloat16, 32, 48) == tuning.MoETuning(16, G(32, 16, 1, 1, 1), G(16, 16, 1, 1, 1))
    assert tuning.gemv_tuning(cpu, 40, 24) == tuning.GemvTuning(G(16, 32, 1, 1, 1), G(8, 16, 1, 1, 1), 2, True)
    assert tuning.linear_tuning(cpu, 64, 32, torch.bfloat16) == tuning.LinearTuning(G(16, 256, 1, 4, 2), 0)
    assert tuning.absorb_tuning(cpu, 4, 16, 32) == tuning.LinearTuning(G(32, 16, 1, 4, 2), 2)
    with pytest.raises(tuning.TuningFileError, match=r"moe\[0\]\.block_m"):    # checked before it is written
        write_tuning_file(tmp_path / "bad.json", "x", [{**moe, "block_m": 12}], [], [], [])
    assert not (tmp_path / "bad.json").exists()
