"""The default cVAE's and GAN's quality on the instruments defaults, the way `make
compare-generators` measures it (seed 0): the federation's rounds in-process, then
feda2v-evaluate's metrics with its seed.

Each floor sits between what the defaults reach for seed 0 and what the previous defaults reached
on the same data, so a change that loses the gain fails here: unified 0.928 with the decoder's
FiLM vs 0.887 without (0.859 sampling the last weights instead of their moving average, 0.793 at
width 128, 0.758 before the learned conditional prior); per class 0.914 vs 0.889 (0.742 with the
N(0, I) prior). README, "Generators compared", has the 3-seed numbers.
"""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from feda2v.config import load_config
from feda2v.config.files import compose_conf
from feda2v.data import load_prepared, prepare
from feda2v.evaluate.job import compute_metrics, derive_eval_seed
from feda2v.federation.server import Federation
from feda2v.pipeline.train import seed_globals

ROOT = Path(__file__).resolve().parents[1]
# seed 0, TSTR/TRTR at 30 rounds: unified 0.945 (0.945 at 20 rounds too: this seed's one draw does not
# tell them apart, six seeds of five draws do, README; 0.936 at a constant lr), per class 0.926 (0.914)
RATIO_FLOORS = {"unified": 0.92, "per_class": 0.9}
# The unified GAN, seed 0: TSTR 0.742 and recall 0.73 at 30 rounds; at 20, 0.758 and 0.68 with the
# generator's FiLM at width 256, 0.687 and 0.64 at width 128; 0.702 and 0.54 without FiLM (0.655 sampling the last weights, 0.598
# with one D update per batch; issue 17's recall target: 0.3). 3 seeds: README, the GAN.
GAN_TSTR_FLOOR, GAN_RECALL_FLOOR = 0.72, 0.6
# The comparison's unified cVAE on digits (below): TSTR 0.947 against TRTR 0.969 at seed 0; before the
# log-variance bound, no model (non-finite in round 6)
DIGITS_TSTR_FLOOR = 0.9


@pytest.mark.slow
@pytest.mark.parametrize("granularity", list(RATIO_FLOORS))
def test_default_cvae_tstr_over_trtr_on_instruments(tmp_path, granularity):
    overall = _train_and_evaluate(tmp_path, [f"generator.granularity={granularity}"], ("cvae", granularity))
    assert overall["tstr_trtr_ratio"] >= RATIO_FLOORS[granularity], overall


@pytest.mark.slow
def test_default_gan_tstr_and_recall_on_instruments(tmp_path):
    overall = _train_and_evaluate(tmp_path, ["generator=gan"], ("gan", "unified"))
    assert overall["tstr_acc"] >= GAN_TSTR_FLOOR and overall["recall"] >= GAN_RECALL_FLOOR, overall


def _train_and_evaluate(tmp_path, extra: list[str], want: tuple[str, str]) -> dict:
    overrides = ["tracking=none", "train.progress=off", "data.progress=off", "seed=0",
                 f"data.prepared_dir={tmp_path / 'prepared'}",
                 f"data.instruments.cache_dir={tmp_path / 'cache'}", *extra]
    cfg = load_config(OmegaConf.create(compose_conf(ROOT / "conf", overrides)))
    assert (cfg.generator.type, cfg.generator.granularity) == want
    prepare(cfg)
    data = load_prepared(cfg.data.prepared_dir)
    torch.set_num_threads(1)
    seed_globals(cfg.seed)
    fed = Federation(cfg, data)
    for r in range(1, cfg.federation.rounds + 1):
        fed.run_round(r)
    metrics, _ = compute_metrics(fed.stores[fed.primary_store], data,
                                 samples_per_class=int(cfg.evaluate.samples_per_class),
                                 knn_k=int(cfg.evaluate.knn_k), seed=int(derive_eval_seed(cfg)))
    return metrics["overall"]


@pytest.mark.slow
def test_the_comparisons_unified_cvae_trains_through_digits_outliers(tmp_path):
    # `make compare`'s first cell (scripts/compare.py): digits, Dirichlet 0.1 over 10 nodes, seed 0,
    # the default rounds. Its encoder's log-variance ran away (to 27 in the run diagnosed) and the
    # run went non-finite in round 6 (models/generators.py, LOGVAR_BOUNDS).
    digits = ["data=digits", "data.nodes=10", "data.partition.scheme=dirichlet", "data.partition.alpha=0.1",
              "federation=full", "federation.distill=false"]
    overall = _train_and_evaluate(tmp_path, digits, ("cvae", "unified"))  # NonFiniteLossError unbounded
    assert overall["tstr_acc"] >= DIGITS_TSTR_FLOOR, overall
