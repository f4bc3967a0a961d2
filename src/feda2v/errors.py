"""User-facing errors: each carries one line that says what is wrong and what to do.

The command-line layer prints ``feda2v: error: <message>`` on stderr and exits non-zero; a
traceback is shown only with ``FEDA2V_DEBUG=1``.
"""


class Feda2vError(Exception):
    """Base of every error meant for the user (not a bug)."""

    exit_code = 2


class ConfigError(Feda2vError):
    """A config value is unknown, of the wrong type or out of range."""


class DataError(Feda2vError):
    """Input data is missing, corrupted or cannot be partitioned as asked."""


class CheckpointError(Feda2vError):
    """A checkpoint is missing, corrupted, unsafe, of an unknown version or of another config."""


class NonFiniteLossError(Feda2vError):
    """A loss or gradient became NaN/inf; no update landed from that step on (parameters and
    optimizer state are as before it). ``keys``: every key the failing check flagged; ``key``: the
    first; ``step``: the failing step of the node's visit (1-based) out of ``steps``."""

    def __init__(self, key, node: str, round_: int, what: str = "loss", *, step: int | None = None,
                 steps: int | None = None):
        self.keys = [key] if isinstance(key, str) else list(key)
        self.key, self.node, self.round, self.step = self.keys[0], node, round_, step
        names = ", ".join(f"'{k}'" for k in self.keys[:5]) + (f" (+{len(self.keys) - 5} more)" if len(self.keys) > 5 else "")
        where = f" (step {step} of {steps} of the visit)" if step is not None and (steps or 0) > 1 else ""
        super().__init__(
            f"non-finite {what} for generator key{'s' if len(self.keys) > 1 else ''} {names} on node {node} "
            f"in round {round_}{where}; nothing was updated from that step on; lower "
            "generator.optimizer.lr or check the node's data"
        )


class TrackingError(Feda2vError):
    """The tracking server is required but cannot be reached."""


class OutputError(Feda2vError):
    """A report, metrics, plot or data file cannot be written (no space, read-only, a file in the way)."""


class RunDirError(Feda2vError):
    """An output directory belongs to another run: it is locked by a running one, or holds another
    run's checkpoints or reports and this run was not told to resume or to start over."""


class TrainingStopped(BaseException):
    """SIGTERM or SIGINT stopped training at a safe point; the last complete checkpoint is kept.
    Exits with the shell's code for the signal (128 + its number: 143 for SIGTERM, 130 for SIGINT).

    A BaseException, like KeyboardInterrupt, because the signal handler raises it wherever the main
    thread happens to be: library code that catches ``Exception`` there would swallow or re-wrap it
    (OmegaConf's attribute access re-raises what it catches as ``type(e)(message)``; a tracking call
    would count it as a tracking failure). Not a Feda2vError for the same reason; the command line
    prints it as one line all the same."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)
