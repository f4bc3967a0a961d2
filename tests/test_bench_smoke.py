"""CI smoke of the benchmark code (`make bench` numbers come from a full run, not from this)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_every_benchmark_runs_and_writes_its_report(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "bench_quick.json").read_text())
    expected = {"generator", "store", "engine", "flower", "checkpoint", "tracking", "scale", "profiler", "prepare"}
    assert expected <= set(report["results"])
    for name, res in report["results"].items():
        assert "error" not in res, (name, res)
        assert res.get("summary"), name
    md = (tmp_path / "bench_quick.md").read_text()
    assert "quick smoke" in md and "## store" in md
