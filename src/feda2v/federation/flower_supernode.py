"""``feda2v-supernode``: Flower's own SuperNode, with its idle waits chosen on purpose.

Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) polls its SuperLink in a loop
with two fixed waits and no option for either: ``time.sleep(3)`` whenever a pull finds no message,
and ``time.sleep(0.5)`` steps while it waits for the ClientApp's reply or its objects. A relayed
visit meets both (the message lands in a 3 s idle, then the reply sits in the next one), which is
most of a deployed visit's cost (reports/flower/bench.md). This entry point runs the unchanged
SuperNode with every wait in that module capped at ``--idle-poll-s``: the node asks the SuperLink
more often, nothing else changes. The SuperExec the SuperNode starts (it launches a ClientApp
process per message) polls for tasks every 1 s unless Flower's own FLWR_SUPEREXEC_TASK_POLL_INTERVAL
says otherwise; it gets the same interval unless that is already set. All other arguments go to
``flower-supernode`` as they are.
"""
from __future__ import annotations

import os
import time
from typing import Callable

DEFAULT_IDLE_POLL_S = 0.1  # 10 pulls/s per node: negligible load on a SuperLink of a few sites
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's (1 s default, 0.01-60 s)


class CappedWaits:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: ``sleep(s)`` sleeps at
    most ``cap_s``; every other attribute is the real ``time``'s."""

    def __init__(self, cap_s: float, sleep: Callable[[float], None] = time.sleep):
        self.cap_s, self._sleep = float(cap_s), sleep

    def sleep(self, seconds: float) -> None:
        self._sleep(min(float(seconds), self.cap_s))

    def __getattr__(self, name: str):
        return getattr(time, name)


def cap_supernode_waits(cap_s: float) -> CappedWaits:
    """Install the cap in Flower's SuperNode loop module; returns the stand-in."""
    from flwr.supernode import start_client_internal

    waits = CappedWaits(cap_s)
    start_client_internal.time = waits  # the module calls time.sleep(...) through this name
    return waits


def run_supernode(argv: list[str]) -> None:
    """``[--idle-poll-s S] FLOWER_SUPERNODE_ARGS...``: Flower's SuperNode with its waits capped."""
    import argparse
    import sys

    from feda2v.errors import ConfigError

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line, like every feda2v error; --help is Flower's
            raise ConfigError(f"feda2v-supernode: {message}")

    p = _Parser(prog="feda2v-supernode", add_help=False)
    p.add_argument("--idle-poll-s", type=float, default=DEFAULT_IDLE_POLL_S)
    ours, rest = p.parse_known_args(argv)
    if not 0 < ours.idle_poll_s <= 3:
        raise ConfigError(f"--idle-poll-s={ours.idle_poll_s:g} must be in (0, 3] seconds "
                          "(3 is Flower's own idle wait)")
    cap_supernode_waits(ours.idle_poll_s)
    os.environ.setdefault(SUPEREXEC_POLL_ENV, f"{max(ours.idle_poll_s, 0.01):g}")  # inherited by SuperExec
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
