"""The stop signal raised inside library code that catches ``Exception`` still stops the run.

The handler raises TrainingStopped wherever the main thread is. Seen in CI: SIGTERM arrived inside
OmegaConf's attribute access (``cfg.federation.fraction``), which re-raises what it catches as
``type(e)(message)``: TrainingStopped(signum, message) could not be rebuilt, and the run ended with
a TypeError traceback and exit 1 instead of one line and 143.
"""
from __future__ import annotations

import os
import signal

import pytest
from omegaconf import OmegaConf

from feda2v.errors import TrainingStopped
from feda2v.pipeline.stopping import StopOnSignal


def _describe(signum: int) -> str:
    return f"stopped by {signal.Signals(signum).name}"


@pytest.fixture
def sends_sigterm_when_read():
    """A config value whose resolution sends SIGTERM: the handler then runs inside OmegaConf."""
    OmegaConf.register_new_resolver("sigterm_now", lambda: os.kill(os.getpid(), signal.SIGTERM) or 1,
                                    replace=True)
    yield OmegaConf.create({"federation": {"fraction": "${sigterm_now:}"}})
    OmegaConf.clear_resolver("sigterm_now")


def test_a_signal_inside_omegaconf_attribute_access_stops_with_its_exit_code(sends_sigterm_when_read):
    cfg = sends_sigterm_when_read
    with StopOnSignal(_describe), pytest.raises(TrainingStopped) as e:
        cfg.federation.fraction
    assert e.value.exit_code == 143 and str(e.value) == "stopped by SIGTERM"


def test_a_signal_passes_through_code_that_catches_exception():
    def guarded():  # what a tracking call or a library does with its own failures
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
        except Exception:  # noqa: BLE001
            return "swallowed"
        return "not stopped"

    with StopOnSignal(_describe), pytest.raises(TrainingStopped) as e:
        guarded()
    assert e.value.exit_code == 130
