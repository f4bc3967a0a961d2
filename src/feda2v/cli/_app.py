"""Shared plumbing of the Hydra apps: conf location, stable output dirs, legacy aliases, errors."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from feda2v.errors import Feda2vError, TrainingStopped
from feda2v.fsutil import output_error

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


# Hydra's own command-line options: those that take a value (``--config-name params``, ``-cd .``),
# the one whose value is optional, and the switches.
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                "--config-dir", "-cd", "--experimental-rerun"}
_OPTIONAL_VALUE_FLAGS = {"--info": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath"),
                         "-i": ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")}
_SWITCHES = {"--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r", "--multirun", "-m",
             "--shell-completion", "-sc"}


def _split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra options with their values, overrides); an unknown option is a ConfigError."""
    from feda2v.errors import ConfigError

    flags, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("-") and a != "-":
            name = a.split("=", 1)[0]
            if name not in _VALUE_FLAGS and name not in _OPTIONAL_VALUE_FLAGS and name not in _SWITCHES:
                prog = Path(sys.argv[0]).name
                raise ConfigError(f"unknown option '{a}'; {prog} takes key=value overrides and Hydra's "
                                  "options (--cfg job, -m, --config-name NAME, ...; see --help)")
            flags.append(a)
            takes = (name in _VALUE_FLAGS or
                     name in _OPTIONAL_VALUE_FLAGS and i + 1 < len(argv)
                     and argv[i + 1] in _OPTIONAL_VALUE_FLAGS[name])
            if takes and "=" not in a and i + 1 < len(argv):
                flags.append(argv[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags, overrides


def _with_defaults(flags: list[str], overrides: list[str]) -> list[str]:
    """Flags first, then the user's overrides, then our defaults for those not given: argparse
    wants the overrides in one contiguous run."""
    given = {a.split("=", 1)[0].lstrip("+~") for a in overrides if "=" in a}
    extra = [f"{k}={v}" for k, v in _HYDRA_DEFAULTS.items() if k not in given]
    return flags + overrides + extra


def _shown(text: str) -> str:
    """Text as the user typed it: undecodable argv bytes (surrogates) as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _schema_leaves() -> dict:
    from omegaconf import OmegaConf

    from feda2v.config import flatten_dotted
    from feda2v.config.schema import Feda2vConfig

    return flatten_dotted(OmegaConf.to_container(OmegaConf.structured(Feda2vConfig)))


def _example(key: str) -> str:
    """``key=<its default>`` in Hydra's override syntax, for "expected form" hints."""
    leaves = _schema_leaves()
    if key not in leaves:
        return "federation.rounds=5"
    v = leaves[key]
    if isinstance(v, dict):
        return f"{key}={{strings:[violin,cello],rest:[piano]}}"
    if isinstance(v, list):
        return f"{key}=[{','.join(str(x) for x in v)}]"
    if v is None:
        return f"{key}=null"
    if isinstance(v, bool):
        return f"{key}={str(v).lower()}"
    return f"{key}={v}"


def _bad_override(arg: str, err: Exception):
    """The ConfigError for an override Hydra's grammar refuses: what is wrong, the expected form."""
    from feda2v.errors import ConfigError

    shown = _shown(arg)
    key, sep, value = arg.partition("=")
    key = key.lstrip("+~")
    if not sep and not arg.startswith("~"):
        matches = [k for k in _schema_leaves() if k == arg or k.endswith("." + arg)]
        hint = f"did you mean {_example(matches[0])}?" if matches else f"e.g. {_example('federation.rounds')}"
        return ConfigError(f"override '{shown}' has no value; write key=value ({hint}), or ~key to delete a key")
    if any(ord(ch) > 127 for ch in value) and value[:1] not in ("'", '"'):
        return ConfigError(
            f"override '{shown}': an unquoted value may hold only ASCII letters, digits and "
            f"_-+./:\\$%*@?|; quote the value for Hydra (and the whole override for the shell): '{_shown(key)}=\"{_shown(value)}\"'")
    detail = "; ".join(line.strip() for line in str(err).splitlines()
                       if line.strip() and not line.startswith(("See https://", "Error parsing override")))
    return ConfigError(
        f"cannot parse override '{shown}' ({detail}); expected key=value, e.g. {_example(key)} (lists "
        f"[a,b], maps {{k:v}}); quote a value with other characters: '{_shown(key)}=\"...\"'")


def _group_options() -> dict[str, list[str]]:
    """Config groups of conf/ and their options (conf/<group>/<option>.yaml)."""
    root = conf_dir()
    if not root.is_dir():
        return {}
    return {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in sorted(root.iterdir()) if d.is_dir()}


def _free_maps() -> list[str]:
    """Dotted names of the schema's free-form maps (``Dict[str, ...]`` fields, e.g. class_groups)."""
    from omegaconf import OmegaConf

    from feda2v.config.schema import Feda2vConfig

    found = []

    def walk(node, prefix):
        for k in node.keys():
            child = node._get_node(k)
            if OmegaConf.is_dict(child):
                if child._metadata.object_type in (None, dict):
                    found.append(prefix + k)
                else:
                    walk(child, prefix + k + ".")

    walk(OmegaConf.structured(Feda2vConfig), "")
    return found


def prepare_overrides(overrides: list[str]) -> list[str]:
    """Check each override before Hydra sees it, so every mistake is one line naming it:
    grammar, unknown key, unknown group option. Rewrites a free-form map override
    (``generator.class_groups={...}``) into the form Hydra accepts for a map the schema leaves
    empty: delete, then add (so it replaces, as documented)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from feda2v.config.schema import Feda2vConfig
    from feda2v.errors import ConfigError

    parser = OverridesParser.create()
    schema = OmegaConf.structured(Feda2vConfig)
    groups = _group_options()
    maps = _free_maps()
    out: list[str] = []
    for arg in overrides:
        try:
            o = parser.parse_override(arg)
        except HydraException as e:  # the grammar's errors (OverrideParseException is one)
            raise _bad_override(arg, e) from None
        key = o.key_or_group
        if key.startswith("hydra") or o.package is not None:
            out.append(arg)
            continue
        if key in groups:
            if not o.is_delete():
                values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
                for v in values:
                    if str(v) not in groups[key]:
                        raise ConfigError(f"{key}={_shown(str(v))}: no such {key} option; choose one of "
                                          f"{', '.join(groups[key])} (conf/{key}/)")
            out.append(arg)
            continue
        the_map = next((m for m in maps if key == m or key.startswith(m + ".")), None)
        if the_map is not None and not o.is_delete():
            value = arg.split("=", 1)[1]
            out += [f"~{key}", f"+{key}={value}"] if key == the_map else [f"++{key}={value}"]
            continue
        if not (o.is_add() or o.is_force_add() or o.is_delete()):
            cur = schema
            for part in key.split("."):
                if not OmegaConf.is_dict(cur) or part not in cur:
                    raise ConfigError(f"unknown config key '{_shown(key)}' (see conf/schema.yaml for every key)")
                cur = cur[part]
        out.append(arg)
    return out


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


def tolerant_output() -> None:
    """Paths may hold bytes that are not UTF-8 (they reach Python as surrogates): print those as
    \\xNN escapes instead of failing with UnicodeEncodeError in the middle of a run."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def fail(err: BaseException, code: int = 2) -> None:
    """Print one line and exit; full traceback only with FEDA2V_DEBUG=1."""
    if os.environ.get("FEDA2V_DEBUG") == "1":
        raise err
    msg = " ".join(str(err).split()) or type(err).__name__
    print(f"feda2v: error: {msg}", file=sys.stderr)
    sys.exit(code)


def _hydra_error(err: BaseException):
    """One line from a Hydra composition error (its message spans several)."""
    from hydra.errors import MissingConfigException

    from feda2v.errors import ConfigError

    text = str(err).split("\nConfig search path")[0]
    if isinstance(err, MissingConfigException) and err.options:
        text = text.split("\n\nAvailable options")[0] + f"; choose one of {', '.join(err.options)}"
    return ConfigError("; ".join(line.strip() for line in text.splitlines() if line.strip()))


def run_app(task: Callable, config_name: str = "config") -> None:
    """Run ``task(cfg)`` as a Hydra app; ``cfg`` is validated against the schema first. Every user
    error, Hydra's own included, ends as one line and exit code 2."""
    import hydra
    from hydra.errors import HydraException
    from omegaconf import DictConfig
    from omegaconf.errors import OmegaConfBaseException

    from feda2v import malloc
    from feda2v.config import load_config
    from feda2v.config.validate import translate_legacy_override

    malloc.apply()  # this process is ours: keep freed heap for the next training step (malloc.py)
    tolerant_output()
    try:
        flags, overrides = _split_argv(sys.argv[1:])
        overrides = prepare_overrides([translate_legacy_override(a) for a in overrides])
    except Feda2vError as e:
        fail(e, e.exit_code)
    sys.argv = [sys.argv[0], *_with_defaults(flags, overrides)]
    in_task = False

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=config_name)
    def _main(raw: DictConfig) -> None:
        nonlocal in_task
        in_task = True
        try:
            task(load_config(_per_job_outputs(raw)))
        except (Feda2vError, TrainingStopped) as e:
            fail(e, e.exit_code)
        except OSError as e:  # an OS condition no write path named: still one line
            fail(output_error(e.filename or "a file", e, "access"), 2)
        except KeyboardInterrupt:
            fail(KeyboardInterrupt("interrupted; the last complete checkpoint is kept"), 130)

    # Hydra prints its own errors over several lines and exits 1; with HYDRA_FULL_ERROR it raises
    # them instead, so they can be told apart from the task's and turned into one line here.
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except (HydraException, OmegaConfBaseException) as e:
        if in_task:
            raise
        fail(_hydra_error(e), 2)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
