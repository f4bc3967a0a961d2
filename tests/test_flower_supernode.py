"""feda2v-supernode: Flower's SuperNode with its fixed idle waits capped. The deployed end-to-end
runs (tests/test_flower_netns.py, benchmarks/bench_flower.py) start their SuperNodes with it."""
import inspect
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip("flwr")
from feda2v.federation import flower_supernode  # noqa: E402


def test_capped_waits_cap_sleep_and_pass_everything_else_through():
    slept = []
    waits = flower_supernode.CappedWaits(0.1, sleep=slept.append)
    waits.sleep(3)
    waits.sleep(0.5)
    waits.sleep(0.05)
    assert slept == [0.1, 0.1, 0.05]
    assert waits.time is time.time and waits.monotonic is time.monotonic


def test_flower_supernode_loop_still_waits_through_its_module_time(monkeypatch):
    """The cap works by replacing the name ``time`` in Flower's SuperNode loop module; this fails
    when a Flower upgrade moves or renames those waits (then feda2v-supernode would cap nothing)."""
    from flwr.supernode import start_client_internal as loop

    src = inspect.getsource(loop)
    assert "time.sleep(3)" in src and "time.sleep(0.5)" in src
    assert "from time import" not in src
    monkeypatch.setattr(loop, "time", loop.time)  # undone after the test
    waits = flower_supernode.cap_supernode_waits(0.2)
    assert loop.time is waits and waits.cap_s == 0.2


@pytest.mark.parametrize("value", ["0", "-1", "3.5", "abc"])
def test_bad_idle_poll_is_one_line_and_exit_2(value):
    p = subprocess.run([sys.executable, "-m", "feda2v.cli.supernode", "--idle-poll-s", value],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("feda2v: error: ") and p.stderr.count("\n") == 1, p.stderr
    assert "--idle-poll-s" in p.stderr


def test_run_supernode_hands_flower_its_arguments_and_the_superexec_interval(monkeypatch):
    import flwr.supernode.cli as cli
    from flwr.supernode import start_client_internal as loop

    seen = {}
    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.delenv(flower_supernode.SUPEREXEC_POLL_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(cli, "flower_supernode", lambda: seen.update(
        argv=list(sys.argv), env=os.environ.get(flower_supernode.SUPEREXEC_POLL_ENV), waits=loop.time))
    flower_supernode.run_supernode(["--insecure", "--idle-poll-s", "0.25", "--superlink", "127.0.0.1:1"])
    assert seen["argv"] == ["flower-supernode", "--insecure", "--superlink", "127.0.0.1:1"]
    assert seen["env"] == "0.25" and seen["waits"].cap_s == 0.25
    monkeypatch.setenv(flower_supernode.SUPEREXEC_POLL_ENV, "2")  # an operator's own setting wins
    flower_supernode.run_supernode([])
    assert seen["env"] == "2" and seen["waits"].cap_s == flower_supernode.DEFAULT_IDLE_POLL_S
