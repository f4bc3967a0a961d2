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


def test_splice_replaces_only_the_re_run_sections(tmp_path):
    """`run.py --only NAME --splice`: the re-run section's JSON entry and Markdown section are
    replaced; every other section, and notes outside the sections, stay as they were."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    old = {"when": "then", "quick": False, "machine": {}, "results": {
        "generator": {"summary": "old generator", "table": [{"a": 1}]},
        "store": {"summary": "old store"}, "engine": {"summary": "old engine"}}}
    (tmp_path / "bench.json").write_text(json.dumps(old))
    md = run.to_markdown(old).replace("## store\n", "## store\n\nA hand-written note.\n", 1)
    md = md.replace("Mode: full\n", "Mode: full\nLoad note.\n")
    (tmp_path / "bench.md").write_text(md)
    run.splice(tmp_path, "bench", {"when": "now", "quick": False, "results": {"generator": {"summary": "new gen"}}})
    got = json.loads((tmp_path / "bench.json").read_text())
    assert list(got["results"]) == ["generator", "store", "engine"]
    assert got["results"]["generator"] == {"summary": "new gen", "remeasured": "now"}
    assert got["results"]["store"] == {"summary": "old store"} and got["when"] == "then"
    text = (tmp_path / "bench.md").read_text()
    assert "old generator" not in text and "new gen" in text and "Re-measured now" in text
    assert "A hand-written note." in text and "Load note." in text and "old engine" in text
    assert text.index("## generator") < text.index("new gen") < text.index("## store")
    # a re-run on another machine (or allocator setting) says so in its section, not in the header
    run.splice(tmp_path, "bench", {"when": "later", "quick": False, "machine": {"malloc": {"X": 1}},
                                   "results": {"store": {"summary": "new store"}}})
    got = json.loads((tmp_path / "bench.json").read_text())
    assert got["results"]["store"]["remeasured_on"] == {"malloc": {"X": 1}} and got["machine"] == {}
    assert 'Re-measured later on: {"malloc": {"X": 1}}' in (tmp_path / "bench.md").read_text()
