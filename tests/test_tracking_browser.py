"""The README's MLflow UI walk-through, in a real browser (issue 18): `mlflow ui` on 127.0.0.1 over
a store with two runs that differ in generator type and granularity; the runs table, tick both,
Compare; the common per-round loss chart and the eval metrics are on screen. The screenshots go
to the test's tmp folder; with FEDA2V_UPDATE_SCREENSHOTS=1 the chart also replaces
reports/mlflow_compare.png (the README's picture: a tracked file, so an ordinary test run must
not rewrite it and mark the checkout dirty). Headless Chromium is Debian's `chromium` package,
driven by Playwright's Python package (no `playwright install`)."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
mlflow = pytest.importorskip("mlflow")
sync_api = pytest.importorskip("playwright.sync_api")

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT  # noqa: E402
from mlflow_runs import RUNS, train_two_runs  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = ROOT / "reports" / "mlflow_compare.png"
COMMON_LOSS = "loss/generator"
EVAL_METRIC = "eval/overall/tstr_acc"
# scroll MLflow's virtual metric grid (react-virtualized, its own overflow-hidden scroller) by a
# few rows; true if it moved, false at its end, null if there is no such grid
SCROLL_METRIC_GRID = """px => {
  const link = document.querySelector('a[title="Plot chart"]');
  const grid = link && link.closest('.ReactVirtualized__Grid');
  if (!grid) return null;
  const before = grid.scrollTop;
  grid.scrollTop = before + px;
  return grid.scrollTop > before;
}"""
# true once the metric's link lies inside the grid's visible window; until then scroll it there
# (a row rendered below the window, clicked as it is, scrolls the grid under the pointer)
METRIC_ROW_IN_VIEW = """text => {
  const link = [...document.querySelectorAll('a[title="Plot chart"]')].find(a => a.innerText === text);
  if (!link) return false;
  const row = link.getBoundingClientRect();
  const grid = link.closest('.ReactVirtualized__Grid').getBoundingClientRect();
  if (row.top >= grid.top && row.bottom <= grid.bottom) return true;
  link.scrollIntoView({block: "center"});
  return false;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium; scripts/setup.sh does)")
    work = tmp_path_factory.mktemp("ui")
    out = train_two_runs(work)
    port = _free_port()
    log = open(work / "ui.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri",
         f"sqlite:///{out['db']}", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=work, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow ui exited: {(work / 'ui.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mlflow ui did not start: {(work / 'ui.log').read_text()[-2000:]}")
                time.sleep(0.5)
        client = mlflow.MlflowClient(f"sqlite:///{out['db']}")
        yield {"url": url, "client": client, "exp": client.get_experiment_by_name("compare")}
    finally:
        # stop the server by its PID (its own session: the workers go with it)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        log.close()


def test_compare_two_runs_shows_common_loss_chart_and_eval_metrics(ui, tmp_path):
    exp = ui["exp"]
    runs = ui["client"].search_runs([exp.experiment_id])
    assert len(runs) == len(RUNS)
    names = sorted(r.info.run_name for r in runs)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 1000})
            # 1. the README's link straight to the runs table (MLflow's "Model training" view)
            page.goto(f"{ui['url']}/#/experiments/{exp.experiment_id}/runs"
                      "?workflowType=machine_learning")
            page.get_by_text(f"{len(RUNS)} matching runs").wait_for(timeout=90_000)
            for name in names:
                page.get_by_text(name).first.wait_for(timeout=30_000)
            # 2. tick both runs, press Compare
            boxes = page.locator(".ag-selection-checkbox")
            assert boxes.count() == len(RUNS)
            for i in range(boxes.count()):
                boxes.nth(i).click()
            page.get_by_role("button", name="Compare").first.click()
            page.wait_for_url("**/compare-runs**", timeout=60_000)
            page.get_by_text(f"Comparing {len(RUNS)} Runs").first.wait_for(timeout=60_000)
            # 3. the eval metrics are in the comparison's metric table
            page.get_by_text(EVAL_METRIC).first.wait_for(timeout=60_000)
            metric_links = page.locator('a[title="Plot chart"]')
            shown = set(metric_links.all_inner_texts())
            assert EVAL_METRIC in shown and "eval/overall/frechet" in shown, shown
            page.screenshot(path=str(tmp_path / "compare_table.png"), full_page=True)
            # 4. the common per-round loss: the table is a virtual grid (7 rows on screen, ~17 in the
            # DOM). Scroll its own container three rows at a time and let each scroll render before
            # the next: queued wheel events on a loaded machine land together and jump past the row
            target = metric_links.filter(has_text=COMMON_LOSS)
            rendered = metric_links.all_inner_texts()
            while not target.count():
                moved = page.evaluate(SCROLL_METRIC_GRID, 135)
                assert moved is not None, "the comparison's metric table is no longer a virtual grid"
                if not moved:
                    break  # the grid's end
                page.wait_for_function(  # the grid renders further rows as it scrolls down
                    "last => [...document.querySelectorAll('a[title=\"Plot chart\"]')]"
                    ".pop().innerText !== last", arg=rendered[-1], timeout=60_000)
                rendered = metric_links.all_inner_texts()
            assert target.count(), f"{COMMON_LOSS} not in the comparison's metrics: {rendered}"
            page.wait_for_function(METRIC_ROW_IN_VIEW, arg=COMMON_LOSS, polling=500, timeout=60_000)
            target.first.click()
            page.wait_for_url("**/metric?**", timeout=60_000)
            assert "loss%2Fgenerator" in page.url, page.url  # the chart of the row clicked
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            # one chart, both runs on it (the legend names each run with the metric)
            for name in names:
                page.get_by_text(f"{name} ({COMMON_LOSS})").first.wait_for(timeout=30_000)
            assert page.get_by_text("Completed Runs").count()
            page.screenshot(path=str(tmp_path / "loss_chart.png"))
            assert (tmp_path / "loss_chart.png").stat().st_size > 10_000
            if os.environ.get("FEDA2V_UPDATE_SCREENSHOTS") == "1":
                SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(tmp_path / "loss_chart.png", SCREENSHOT)
        finally:
            browser.close()
