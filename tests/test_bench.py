"""bench.py still runs (it is not imported by anything else, so nothing else would notice it breaking): tiny size,
one timed run. Timings are not checked (speed goals are met in benchmarks, not tests); its parity line is."""

import re

import pytest

from conftest import run_script


def test_bench_runs_and_agrees_with_transformers():
    pytest.importorskip("transformers")
    out = run_script("bench.py", ["--size=tiny", "--runs=1", "--warmup=0", "--threads=1"])
    diff = float(re.search(r"max \|ours - transformers\| over the features: (\S+)", out).group(1))
    assert diff < 1e-4, out
    for name in ("forward", "forward+backward"):
        assert re.search(rf"^\s*{re.escape(name)} speed-up of ours: [\d.]+x wall", out, re.M), out
    assert re.search(r"^forward: [\d.]+ GFLOP in matrix products and attention", out, re.M), out
    assert re.search(r"^forward: floor [\d.]+ s .* more than [\d.]+x here$", out, re.M), out
