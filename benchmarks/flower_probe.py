"""The ClientApp benchmarks/bench_flower.py ships in its FAB for the deployed measurement: feda2v's
own ClientApp handlers, unchanged, with the time of each phase of the ``flwr-clientapp`` process
written to ``$FEDA2V_FLOWER_PROBE/<pid>.json`` (one file per process: Flower starts one per message).

Phases (wall-clock, seconds since the epoch): ``process_start`` (the kernel's start time of this
process), ``module_start`` (Flower has started the runtime and loads this app), ``feda2v_imported``
(after importing feda2v's ClientApp module: torch and feda2v, ours), ``handler_start`` /
``handler_end`` (feda2v's handler: read the partition, decode, train, encode; ours), plus the
handler's own training seconds, its partition read + verify seconds and the message bytes in/out.
"""
import json
import os
import time

T_MODULE = time.time()
from flwr.clientapp import ClientApp  # noqa: E402  (already loaded by Flower's runtime)

from feda2v.federation import flower_app as feda2v_app  # noqa: E402

T_IMPORTED = time.time()
_PARTITION_S = [0.0]  # seconds in feda2v's partition read + verify (flower_app._node_data) this process


def _timed_node_data(read):
    def run(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return read(*args, **kwargs)
        finally:
            _PARTITION_S[0] += time.perf_counter() - t0
    return run


feda2v_app._node_data = _timed_node_data(feda2v_app._node_data)  # looked up at call time by the handlers


def _process_start() -> float:
    """This process's start (from /proc: clock ticks since boot, 10 ms resolution)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def _bytes(rd) -> int:
    try:
        return len(rd["state"]["ckpt"].data)
    except KeyError:
        return 0


def _timed(kind: str, handler):
    def run(msg, context):
        start = time.time()
        reply = handler(msg, context)
        end = time.time()
        rec = {"kind": kind, "pid": os.getpid(), "process_start": _process_start(), "module_start": T_MODULE,
               "feda2v_imported": T_IMPORTED, "handler_start": start, "handler_end": end,
               "bytes_in": _bytes(msg.content), "bytes_out": _bytes(reply.content),
               "partition": context.node_config.get("partition-id"), "partition_read_s": _PARTITION_S[0]}
        if kind == feda2v_app.MSG_TRAIN:
            rec["train_seconds"] = float(feda2v_app._unpack(reply.content)[1]["node_result"]["train_seconds"])
        out = os.environ.get("FEDA2V_FLOWER_PROBE")
        if out:
            with open(os.path.join(out, f"{os.getpid()}-{int(start * 1e6)}.json"), "w") as f:
                json.dump(rec, f)
        return reply
    return run


client_app = ClientApp()
client_app.train("generators")(_timed(feda2v_app.MSG_TRAIN, feda2v_app.handle_train))
client_app.train("classifier")(_timed(feda2v_app.MSG_CLASSIFIER, feda2v_app.handle_classifier))
client_app.query("partition")(_timed(feda2v_app.MSG_QUERY, feda2v_app.handle_query))
