"""Reproducibility: pinned CPU numerics (same bytes whatever code paths the CPU would pick), git_dirty
that ignores pipeline outputs, and DVC bookkeeping (.dvcignore, no run-specific values in outputs)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# What another x86-64 machine's libraries would choose by themselves: every switch the pins cover,
# set to a different code path (scalar ATen, SSE-only MKL, SSE4.1 oneDNN, pre-AVX OpenBLAS,
# numpy without AVX2/FMA) - and the natives of this machine (AVX-512 where it has it).
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41",
             "OPENBLAS_CORETYPE": "Prescott", "NPY_DISABLE_CPU_FEATURES": "AVX2 FMA3 AVX512F AVX512CD "
             "AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"}
NATIVE = {"ATEN_CPU_CAPABILITY": "avx512"}

PIPELINE = [
    ("feda2v-prepare", ["data=digits", "data.nodes=3", "data.condition=text", "data.max_samples=450"]),
    ("feda2v-train", ["data=digits", "data.nodes=3", "data.condition=text", "data.max_samples=450",
                      "federation.rounds=2", "federation.local_epochs=1", "generator.hidden_dim=32",
                      "tracking.enabled=false", "train.progress=off"]),
    ("feda2v-evaluate", ["data=digits", "data.nodes=3", "data.condition=text", "data.max_samples=450",
                         "tracking.enabled=false", "evaluate.samples_per_class=20", "evaluate.knn_k=3"]),
]
OUTPUTS = ("data/prepared", "checkpoints", "reports/train", "reports/train_metrics.json",
           "reports/metrics.json", "reports/evaluation.json", "reports/plots", "reports/report.md")


def run_pipeline(cwd: Path, env_extra: dict, native: bool = False) -> dict[str, str]:
    """prepare -> 2 rounds -> evaluate as subprocesses in ``cwd``; sha256 of every output file."""
    env = {k: v for k, v in os.environ.items() if k not in OTHER_CPU and k != "FEDA2V_DEBUG"}
    env.update(env_extra, HF_HUB_OFFLINE="1", FEDA2V_CONF=str(REPO / "conf"),
               FEDA2V_NATIVE_NUMERICS="1" if native else "0")
    cwd.mkdir(parents=True, exist_ok=True)
    for exe, overrides in PIPELINE:
        r = subprocess.run([str(BIN / exe), *overrides], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, f"{exe}: {r.stderr[-2000:]}"
    hashes = {}
    for out in OUTPUTS:
        p = cwd / out
        for f in sorted([p] if p.is_file() else p.rglob("*") if p.is_dir() else []):
            if f.is_file() and f.name != "provenance.json":
                hashes[str(f.relative_to(cwd))] = hashlib.sha256(f.read_bytes()).hexdigest()
    assert any(k.startswith("checkpoints/") for k in hashes) and "reports/metrics.json" in hashes
    return hashes


@pytest.mark.slow
def test_pipeline_bytes_do_not_depend_on_the_cpu_code_paths(tmp_path):
    """The pins override whatever the environment (or the CPU) would choose: the same bytes.
    Unpinned (FEDA2V_NATIVE_NUMERICS=1) the same switches change the bytes - so this test can
    fail - while the metrics stay within the README's tolerance (scripts/compare_outputs.py)."""
    a = run_pipeline(tmp_path / "native", NATIVE)
    b = run_pipeline(tmp_path / "other", OTHER_CPU)
    assert a == b, sorted(k for k in a if a[k] != b.get(k))
    c = run_pipeline(tmp_path / "unpinned", OTHER_CPU, native=True)
    changed = sorted(k for k in a if a[k] != c.get(k))
    assert "checkpoints/latest.ckpt" in changed and "reports/metrics.json" in changed, changed
    r = subprocess.run([sys.executable, str(REPO / "scripts/compare_outputs.py"), str(tmp_path / "native"),
                        str(tmp_path / "unpinned")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------ git_dirty


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(cwd), *args],
                          check=True, capture_output=True, text=True).stdout


def test_git_dirty_counts_source_not_pipeline_outputs(tmp_path):
    from feda2v.tracking import git_info

    (tmp_path / "src").mkdir()
    (tmp_path / "reports/plots").mkdir(parents=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  evaluate:\n    cmd: x\n    outs:\n      - reports/plots:\n          cache: false\n"
        "    metrics:\n      - reports/metrics.json:\n          cache: false\n")
    files = {"src/a.py": "1", "dvc.lock": "lock", "reports/plots/p.csv": "a", "reports/metrics.json": "{}",
             "reports/plots.md": "not an output: only its prefix matches", "notes.txt": "n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "x")
    assert git_info(tmp_path)["git_dirty"] == "false"
    for name in ("dvc.lock", "reports/plots/p.csv", "reports/metrics.json"):  # what dvc repro rewrites
        (tmp_path / name).write_text("rewritten")
    info = git_info(tmp_path / "src")  # from a subfolder too: paths are the repo's
    assert info["git_dirty"] == "false" and info["git_dirty_files"] == ""
    (tmp_path / "src/a.py").write_text("2")
    (tmp_path / "reports/plots.md").write_text("changed")
    _git(tmp_path, "mv", "notes.txt", "notes.md")  # a rename counts by its new name
    info = git_info(tmp_path)
    assert info["git_dirty"] == "true"
    assert info["git_dirty_files"] == "notes.md,reports/plots.md,src/a.py"


# ------------------------------------------------------------------------------------ DVC


def _clone(tmp_path: Path) -> tuple[Path, dict]:
    """A fresh clone of this checkout's commit, with bytecode compiled into its source folders (as
    any import leaves it), and the environment that runs the clone's own code."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(clone / "src")], check=True)
    env = {**os.environ, "PYTHONPATH": str(clone / "src"), "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("FEDA2V_CONF", None)
    return clone, env


def _dvc(clone: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_fresh_clone_dvc_status_reports_no_changed_dependency(tmp_path):
    """The committed dvc.lock matches the committed source and params (bytecode is not hashed:
    .dvcignore). Outputs are absent in a fresh clone; only dependencies and commands count here.
    After a code change, `make lock` (the lead, from a clean clone) brings the lock up to date."""
    clone, env = _clone(tmp_path)
    r = _dvc(clone, env, "status", "--json")
    assert r.returncode == 0, r.stderr
    from feda2v.tracking.tags import pipeline_outputs

    produced = set(pipeline_outputs(clone))  # an upstream stage's output is absent, not changed
    changed = {}
    for stage, changes in json.loads(r.stdout or "{}").items():
        for c in changes:
            if not isinstance(c, dict):
                continue
            deps = {k: v for k, v in (c.get("changed deps") or {}).items()
                    if not (k in produced and v == "deleted")}
            if deps or "changed command" in c:
                changed[stage] = deps or c
    assert not changed, f"dvc.lock is stale, run `make lock`: {changed}"


@pytest.mark.slow
def test_two_identical_repros_write_identical_dvc_lock(tmp_path):
    """`dvc repro`, then `dvc repro -f` from scratch in the same clone: the same dvc.lock (no
    timing, run id or host in any output), with MLflow tracking on (its runs differ, the lock not)."""
    clone, env = _clone(tmp_path)
    small = {"data": {"name": "digits", "nodes": 3, "condition": "text", "max_samples": 450},
             "federation": {"rounds": 2, "local_epochs": 1}, "generator": {"hidden_dim": 32},
             "train": {"progress": "off"}, "evaluate": {"samples_per_class": 20, "knn_k": 3}}
    import yaml

    params = yaml.safe_load((clone / "params.yaml").read_text())
    for section, values in small.items():
        params[section].update(values)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    locks = []
    for args in (["repro"], ["repro", "-f"]):
        r = _dvc(clone, env, *args)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        locks.append((clone / "dvc.lock").read_text())
    assert locks[0] == locks[1]
    runs = subprocess.run([sys.executable, "-c", "import sqlite3; print(sqlite3.connect('mlflow.db')"
                           ".execute('select count(*) from runs').fetchone()[0])"],
                          cwd=clone, capture_output=True, text=True, check=True).stdout
    assert int(runs) == 2  # both repros trained and were tracked


# ------------------------------------------------------------------------------------ plots


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render_offline(html: Path) -> str:
    """The page's DOM after its scripts ran in headless Chromium with every network request
    sent to a dead proxy: what a reader without a network sees."""
    r = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                        "--virtual-time-budget=15000", "--dump-dom", html.as_uri()],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _vega_reachable() -> bool:
    import shutil

    return shutil.which("npm") is not None or len(list((REPO / "data/cache/vega").glob("*.min.js"))) == 3


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (scripts/setup.sh installs it)")
@pytest.mark.skipif(not _vega_reachable(), reason="needs npm (nodejs) once, to fetch the vega scripts")
def test_plots_page_renders_offline_with_one_series_per_key_and_metric(tmp_path):
    """`make plots` (scripts/plots_offline.py) on this project's loss-plot template: every plot
    renders with no network, the loss plot has a panel per metric and a line per key; DVC's own
    page (scripts from a CDN) stays blank under the same conditions, so the check can fail."""
    import shutil

    proj = tmp_path / "proj"
    proj.mkdir()
    _git(proj, "init", "-q")
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=proj, check=True)
    (proj / ".dvc/plots").mkdir()
    shutil.copy(REPO / ".dvc/plots/losses_per_key.json", proj / ".dvc/plots")
    (proj / "reports/train").mkdir(parents=True)
    rows = ["round,key,metric,value"] + [f"{r},{k},{m},{v + r}" for r in (1, 2, 3)
                                         for k, v in (("class/piano", 1.0), ("class/violin", 2.0))
                                         for m in ("loss", "kl")]
    (proj / "reports/train/round_losses.csv").write_text("\n".join(rows) + "\n")
    (proj / "reports/tstr.csv").write_text("class,tstr\npiano,0.5\nviolin,0.75\n")
    spec = (REPO / "dvc.yaml").read_text()
    assert "template: losses_per_key" in spec
    yaml_plots = ("plots:\n  - Losses:\n      template: losses_per_key\n      x: round\n      y:\n"
                  "        reports/train/round_losses.csv: value\n  - TSTR:\n      template: bar_horizontal\n"
                  "      x: tstr\n      y:\n        reports/tstr.csv: class\n")
    (proj / "dvc.yaml").write_text(yaml_plots)
    r = subprocess.run([sys.executable, str(REPO / "scripts/plots_offline.py"), "-C", str(proj)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    dom = _render_offline(proj / "reports/dvc_plots/index.html")
    assert dom.count('class="vega-embed') == 2, dom[-3000:]
    for label in ("class/piano", "class/violin", "loss", "kl"):  # legend entries and panel titles
        assert f">{label}<" in dom, label
    assert "<canvas" in dom  # the bar chart: vega-embed's default canvas renderer drew it

    subprocess.run([str(BIN / "dvc"), "plots", "show", "-o", "cdn"], cwd=proj, check=True,
                   capture_output=True)
    assert 'class="vega-embed' not in _render_offline(proj / "cdn/index.html")


def test_compare_outputs_holds_the_stated_tolerance(tmp_path):
    def write(root: Path, frechet: float, tstr: float, loss: float):
        (root / "reports").mkdir(parents=True)
        (root / "reports/evaluation.json").write_text(json.dumps(
            {"overall": {"frechet": frechet}, "round": 2,
             "per_class": {"piano": {"n_real": 20, "tstr_acc": tstr}, "violin": {"n_real": 20, "tstr_acc": 0.5}}}))
        (root / "reports/train_metrics.json").write_text(json.dumps({"gen/loss": loss}))

    def compare(a: str, b: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "scripts/compare_outputs.py"), str(tmp_path / a),
                               str(tmp_path / b)], capture_output=True, text=True)

    write(tmp_path / "a", 15.0, 0.80, 31.0)
    write(tmp_path / "b", 15.0 * (1 + 5e-5), 0.85, 31.0 * (1 - 5e-5))  # one sample of 20 = 0.05
    write(tmp_path / "c", 15.0 * (1 + 5e-4), 0.90, 31.0)  # over rtol; two samples
    assert compare("a", "b").returncode == 0
    r = compare("a", "c")
    assert r.returncode == 1
    assert "overall/frechet" in r.stdout and "per_class/piano/tstr_acc" in r.stdout and "gen/loss" not in r.stdout
    assert compare("a", "missing").returncode == 2
