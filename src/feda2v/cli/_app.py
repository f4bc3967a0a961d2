"""Shared plumbing of the Hydra apps: conf location, stable output dirs, legacy aliases, errors."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from feda2v.errors import Feda2vError

# Stable paths for pipeline runs: no date folders, no .hydra/ copies, logs on stdout only.
_HYDRA_DEFAULTS = {
    "hydra.run.dir": ".",
    "hydra.output_subdir": "null",
    "hydra.sweep.dir": "reports/multirun",
    "hydra.sweep.subdir": "${hydra.job.num}",
    "hydra/job_logging": "stdout",
}


def conf_dir() -> Path:
    """The repo's ``conf/``: FEDA2V_CONF, else ./conf, else the one beside the source tree."""
    env = os.environ.get("FEDA2V_CONF")
    if env:
        return Path(env).resolve()
    here = Path.cwd() / "conf"
    if (here / "config.yaml").is_file():
        return here.resolve()
    return (Path(__file__).resolve().parents[3] / "conf").resolve()


# Hydra flags that take a value (``--config-name params``, ``-cd .``).
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


def _argv_with_defaults(argv: list[str]) -> list[str]:
    """Flags first, then the user's overrides, then our defaults for those not given: argparse
    wants the overrides in one contiguous run."""
    flags, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-"):
            flags.append(a)
            if a in _VALUE_FLAGS and "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    given = {a.split("=", 1)[0].lstrip("+~") for a in overrides if "=" in a}
    extra = [f"{k}={v}" for k, v in _HYDRA_DEFAULTS.items() if k not in given]
    return flags + overrides + extra


def _precheck_overrides(argv: list[str]) -> None:
    """Reject an override of an unknown key in one line (Hydra's own message spans several)."""
    from omegaconf import OmegaConf

    from feda2v.config.schema import Feda2vConfig
    from feda2v.errors import ConfigError

    schema = OmegaConf.structured(Feda2vConfig)
    groups = {"data", "generator", "federation", "tracking", "profiler"}
    prev = ""
    for arg in argv:
        flag_value, prev = prev in _VALUE_FLAGS, arg
        if flag_value or arg.startswith("-") or "=" not in arg or arg[0] in "+~":
            continue
        key = arg.split("=", 1)[0]
        if key.startswith("hydra") or key in groups:
            continue
        node, *rest = key.split(".")
        cur = schema
        for part in [node, *rest]:
            if OmegaConf.is_dict(cur) and cur._metadata.element_type is not None and \
                    cur._metadata.object_type in (None, dict):  # a free-form map (class_groups)
                break
            if not OmegaConf.is_dict(cur) or part not in cur:
                raise ConfigError(f"unknown config key '{key}' (see conf/schema.yaml for every key)")
            cur = cur[part]


# Outputs that each job of a multirun (-m) gets its own copy of, under its sweep folder.
_PER_JOB = ("checkpoint.dir", "train.reports_dir", "evaluate.reports_dir", "evaluate.checkpoint",
            "profiler.dir")


def _per_job_outputs(raw):
    """In a multirun, put each job's relative output paths under its own sweep folder
    (reports/multirun/<job number>/...) so jobs never overwrite each other's checkpoints."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return raw
    plain = OmegaConf.to_container(raw, resolve=True)
    for dotted in _PER_JOB:
        *parents, leaf = dotted.split(".")
        node = plain
        for p in parents:
            node = node.get(p) or {}
        value = node.get(leaf)
        if isinstance(value, str) and value and not Path(value).is_absolute():
            node[leaf] = str(Path(hc.runtime.output_dir) / value)
    return plain


def fail(err: BaseException, code: int = 2) -> None:
    """Print one line and exit; full traceback only with FEDA2V_DEBUG=1."""
    if os.environ.get("FEDA2V_DEBUG") == "1":
        raise err
    msg = " ".join(str(err).split()) or type(err).__name__
    print(f"feda2v: error: {msg}", file=sys.stderr)
    sys.exit(code)


def run_app(task: Callable, config_name: str = "config") -> None:
    """Run ``task(cfg)`` as a Hydra app; ``cfg`` is validated against the schema first."""
    import hydra
    from omegaconf import DictConfig

    from feda2v.config import load_config

    from feda2v.config.validate import translate_legacy_override

    if os.environ.get("FEDA2V_DEBUG") == "1":
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # else Hydra shortens the re-raised traceback
    try:
        sys.argv[1:] = [translate_legacy_override(a) for a in sys.argv[1:]]
        _precheck_overrides(sys.argv[1:])
    except Feda2vError as e:
        fail(e, e.exit_code)
    sys.argv = [sys.argv[0], *_argv_with_defaults(sys.argv[1:])]

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _main(raw: DictConfig) -> None:
        try:
            task(load_config(_per_job_outputs(raw)))
        except Feda2vError as e:
            fail(e, e.exit_code)
        except KeyboardInterrupt:
            fail(KeyboardInterrupt("interrupted; the last complete checkpoint is kept"), 130)

    _main()
