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


def _argv_with_defaults(argv: list[str]) -> list[str]:
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    extra = [f"{k}={v}" for k, v in _HYDRA_DEFAULTS.items() if k not in given]
    return argv + extra  # after the user's flags: argparse takes overrides only at the end


def _precheck_overrides(argv: list[str]) -> None:
    """Reject an override of an unknown key in one line (Hydra's own message spans several)."""
    from omegaconf import OmegaConf

    from feda2v.config.schema import Feda2vConfig
    from feda2v.errors import ConfigError

    schema = OmegaConf.structured(Feda2vConfig)
    groups = {"data", "generator", "federation", "tracking", "profiler"}
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg[0] in "+~":
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

    try:
        sys.argv[1:] = [translate_legacy_override(a) for a in sys.argv[1:]]
        _precheck_overrides(sys.argv[1:])
    except Feda2vError as e:
        fail(e, e.exit_code)
    sys.argv = [sys.argv[0], *_argv_with_defaults(sys.argv[1:])]

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _main(raw: DictConfig) -> None:
        try:
            task(load_config(raw))
        except Feda2vError as e:
            fail(e, e.exit_code)
        except KeyboardInterrupt:
            fail(KeyboardInterrupt("interrupted; the last complete checkpoint is kept"), 130)

    _main()
