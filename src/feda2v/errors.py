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
    """A loss became NaN/inf; the step was stopped before touching parameters or optimizer state."""

    def __init__(self, key: str, node: str, round_: int, what: str = "loss"):
        self.key, self.node, self.round = key, node, round_
        super().__init__(
            f"non-finite {what} for generator key '{key}' on node {node} in round {round_}; "
            "nothing was updated; lower generator.optimizer.lr or check the node's data"
        )


class TrackingError(Feda2vError):
    """The tracking server is required but cannot be reached."""


class OutputError(Feda2vError):
    """A report, metrics, plot or data file cannot be written (no space, read-only, a file in the way)."""


class RunDirError(Feda2vError):
    """An output directory belongs to another run: it is locked by a running one, or holds another
    run's checkpoints or reports and this run was not told to resume or to start over."""


class TrainingStopped(Feda2vError):
    """SIGTERM or SIGINT stopped training at a safe point; the last complete checkpoint is kept.
    Exits with the shell's code for the signal (128 + its number: 143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, message: str):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)
