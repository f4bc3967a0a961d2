"""scripts/cvae_ceiling.py's report: its markdown tables keep one cell per column whatever a row's name holds."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cvae_ceiling.py"


def _script():
    spec = importlib.util.spec_from_file_location("cvae_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cells(row: str) -> list[str]:
    return re.split(r"(?<!\\)\|", row.strip())[1:-1]  # a markdown row's cells; "\|" stays inside one


def test_every_table_row_has_its_headers_cells_even_with_a_pipe_in_a_name():
    cc = _script()
    diag = {"tstr_trtr_ratio": [0.9, 0.8], "active_latent_dims": [7, 8], "spectrum_ratio_top3": [0.8, 0.8],
            "spectrum_ratio_4_16": [0.4, 0.5], "gaussian_sample_mean_and_cov": [0.8, 0.8],
            "gaussian_real_mean_sample_cov": [0.8, 0.9], "gaussian_sample_mean_real_cov": [0.9, 0.9],
            "latents: the model's own samples": [0.89, 0.88],
            "latents: the train split's posteriors q(z | x)": [0.93, 0.92]}
    text = cc.render([0, 1], {"per-class diagonal": [0.41, 0.42]}, {"cvae unified": diag, "cvae, N(0, I) prior": diag})
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    assert len(tables) == 3
    for table in tables:
        width = len(_cells(table[0]))
        assert all(len(_cells(row)) == width for row in table), table
    assert any("q(z \\| x)" in row for row in tables[2])
