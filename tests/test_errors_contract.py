"""The error contract, table-driven: every bad input or OS fault given to one of the four commands
(feda2v-prepare, -train, -evaluate, -ckpt) ends with exit code 2, exactly one line on stderr
(``feda2v: error: ...``), no traceback, and every file that existed before unchanged (sha256).

Each case runs in a fresh copy of a small project (prepared digits, a 2-round run, its evaluation),
in-process (the console scripts' ``main``), so the table stays fast. The OS faults are real: a full
tmpfs, a read-only bind mount, a file where a directory should be (mounts need root, as CI has; the
cases skip elsewhere).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import cli

# The small project every case starts from: tracking off, tiny generator, 2 rounds.
BASE = ["data=digits", "data.nodes=3", "data.condition=onehot", "data.max_samples=300",
        "data.partition.scheme=iid", "generator.hidden_dim=16", "generator.latent_dim=4",
        "federation.rounds=2", "federation.local_epochs=1", "tracking=none", "train.progress=off",
        "evaluate.samples_per_class=20", "evaluate.knn_k=3",
        # the cVAE's cosine lr over 3 rounds: the cases resume the project's 2 rounds to 3
        "generator.optimizer.decay_rounds=3"]


LATE = ["checkpoint.dir=ck_new", "train.reports_dir=rep_new/train", "train.metrics_path=rep_new/m.json",
        "train.timing_path=rep_new/t.json"]


def _main(cmd: str):
    if cmd == "prepare":
        from feda2v.cli.prepare import main
    elif cmd == "train":
        from feda2v.cli.train import main
    elif cmd == "evaluate":
        from feda2v.cli.evaluate import main
    else:
        from feda2v.cli.ckpt import main
    return main


def run_cli(cmd: str, argv: list[str], cwd: Path, capsys) -> tuple[int, str, str]:
    """Run ``feda2v-<cmd> argv`` in-process in ``cwd``: (exit code, stdout, stderr)."""
    here, saved_argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    capsys.readouterr()
    try:
        if cmd == "ckpt":
            sys.argv = ["feda2v-ckpt", *argv]
            call = lambda: _main(cmd)(argv)  # noqa: E731
        else:
            sys.argv = [f"feda2v-{cmd}", *(BASE if cmd != "prepare" or argv[:1] != ["--raw"] else []), *argv]
            call = _main(cmd)
        try:
            call()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(here)
        sys.argv = saved_argv
    out = capsys.readouterr()
    return code, out.out, out.err


def digest(roots: list[Path]) -> dict[str, str]:
    found = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                p = Path(dirpath) / name
                if p.is_file() and not p.is_symlink():
                    found[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return found


# ------------------------------------------------------------------------------ the project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """prepare -> train (2 rounds) -> evaluate, once; each case gets a copy."""
    root = tmp_path_factory.mktemp("project")
    cap = _Capture()
    for cmd in ("prepare", "train", "evaluate"):
        code, out, err = run_cli(cmd, [], root, cap)
        assert code == 0, (cmd, out, err)
    assert (root / "checkpoints" / "latest.ckpt").is_file()
    assert (root / "reports" / "train" / "losses.csv").is_file()
    assert (root / "reports" / "metrics.json").is_file()
    return root


class _Capture:
    """capsys for a module-scoped fixture: output goes to a throwaway buffer."""

    def readouterr(self):
        return type("R", (), {"out": "", "err": ""})()


class Mounts:
    """Real OS faults for one case: a full tmpfs, a read-only bind mount; undone afterwards."""

    def __init__(self):
        self._undo: list[Callable] = []

    def _mount(self, *args):
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mount faults need root")
        r = subprocess.run(["mount", *args], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount here: {r.stderr.strip()}")

    def full(self, where: Path, keep: dict[str, Path] | None = None, size: str = "4m") -> Path:
        """A tmpfs at ``where`` holding copies of ``keep`` (name -> source), then filled up."""
        where.mkdir(parents=True, exist_ok=True)
        self._mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        self._undo.append(lambda: subprocess.run(["umount", "-l", str(where)], check=False))
        for name, src in (keep or {}).items():
            dst = where / name
            if src.is_dir():
                shutil.copytree(src, dst)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        with contextlib.suppress(OSError), open(where / ".filler", "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
                os.fsync(f.fileno())
        with contextlib.suppress(OSError), open(where / ".filler2", "wb") as f:  # the last blocks
            while True:
                f.write(b"\0" * 512)
                f.flush()
        return where

    def read_only(self, where: Path) -> Path:
        """Bind-mount ``where`` over itself, read-only (its files stay readable)."""
        self._mount("--bind", str(where), str(where))
        self._undo.append(lambda: subprocess.run(["umount", "-l", str(where)], check=False))
        self._mount("-o", "remount,ro,bind", str(where))
        return where

    def close(self):
        for undo in reversed(self._undo):
            undo()


@dataclass
class Case:
    id: str
    cmd: str
    argv: list[str] | Callable  # a callable gets (sandbox, mounts) and returns the argv
    needle: str = ""  # a piece of the one error line
    slow: bool = False


def _write(p: Path, data: bytes | str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    return p


def _file(name: str) -> Callable:
    """The argv ``key=<a plain file>``: a file where a directory should be."""
    def setup(s: Path, m: Mounts):
        _write(s / "a_file", "not a directory\n")
        return [f"{name}={s / 'a_file'}"]
    return setup


def _under_file(name: str, leaf: str = "x") -> Callable:
    def setup(s: Path, m: Mounts):
        _write(s / "a_file", "not a directory\n")
        return [f"{name}={s / 'a_file' / leaf}"]
    return setup


def _ckpt(s: Path) -> Path:
    return s / "checkpoints" / "latest.ckpt"


def _damaged(kind: str) -> Callable:
    """A damaged copy of the run's checkpoint as ``evaluate.checkpoint`` / ``train.resume``."""
    def bytes_of(s: Path) -> bytes:
        good = _ckpt(s).read_bytes()
        if kind == "truncated":
            return good[: len(good) // 2]
        if kind == "flipped":
            b = bytearray(good)
            b[-10] ^= 0xFF
            return bytes(b)
        if kind == "empty":
            return b""
        if kind == "text":
            return b"hello\n"
        if kind == "pickle":
            import io
            buf = io.BytesIO()
            torch.save({"state_dict": {"w": torch.zeros(2)}}, buf)
            return buf.getvalue()
        raise AssertionError(kind)
    return bytes_of


def _bad_ckpt(key: str, kind: str) -> Callable:
    def setup(s: Path, m: Mounts):
        p = _write(s / f"bad_{kind}.ckpt", _damaged(kind)(s))
        return [f"{key}={p}"]
    return setup


def _ckpt_cmd(sub: str, kind: str, *extra: str) -> Callable:
    def setup(s: Path, m: Mounts):
        p = _write(s / f"bad_{kind}.ckpt", _damaged(kind)(s))
        return [sub, str(p), *[e.replace("{good}", str(_ckpt(s))) for e in extra]]
    return setup


def _full(key: str, keep: str | None = None) -> Callable:
    """``key`` on a full tmpfs (holding a copy of the sandbox's ``keep`` if given)."""
    def setup(s: Path, m: Mounts):
        src = s / keep if keep else None
        where = m.full(s / "full", {Path(keep).name: src} if src else None)
        return [f"{key}={where / (Path(keep).name if keep else 'out')}"]
    return setup


def _read_only(key: str, rel: str, leaf: str | None = None) -> Callable:
    """``key`` in the sandbox's existing folder ``rel``, mounted read-only."""
    def setup(s: Path, m: Mounts):
        m.read_only(s / rel)
        return [f"{key}={s / rel / leaf if leaf else s / rel}"]
    return setup


def _losses(text: str) -> Callable:
    def setup(s: Path, m: Mounts):
        _write(s / "reports" / "train" / "losses.csv", text)
        return []
    return setup


CASES: list[Case] = [
    # --- Hydra's grammar and composition (train) -------------------------------------------
    Case("unknown-group-option", "train", ["generator=transformer"], "choose one of cvae, gan, vae"),
    Case("unknown-data-option", "train", ["data=cifar"], "choose one of digits, fashion_mnist, instruments"),
    Case("unknown-federation-option", "train", ["federation=sharded"], "no such federation option"),
    Case("sweep-with-unknown-option", "train", ["-m", "generator=vae,transformer"], "generator=transformer"),
    Case("unclosed-list", "train", ["federation.rounds=[1"], "federation.rounds=30"),
    Case("unclosed-map", "train", ["generator.class_groups={a:[x]"], "cannot parse override"),
    Case("unclosed-quote", "train", ["federation.rounds='3"], "cannot parse override"),
    Case("stray-paren", "train", ["seed=("], "cannot parse override"),
    Case("bare-word", "train", ["rounds"], "did you mean federation.rounds=30"),
    Case("bare-unknown-word", "train", ["sharding"], "has no value"),
    Case("non-ascii-unquoted", "train", ["train.resume=/tmp/é.ckpt"], "quote the value"),
    Case("byte-xff-unquoted", "train", ["train.resume=/tmp/\udcff.ckpt"], "\\xff"),
    Case("non-ascii-unquoted-evaluate", "evaluate", ["evaluate.checkpoint=ckpt/ü.ckpt"], "quote the value"),
    Case("unknown-key", "train", ["federation.roundz=3"], "unknown config key 'federation.roundz'"),
    Case("unknown-section", "train", ["feder.rounds=3"], "unknown config key"),
    Case("unknown-option-flag", "train", ["--bogus"], "unknown option '--bogus'"),
    Case("unknown-short-flag", "evaluate", ["-z"], "unknown option '-z'"),
    Case("append-existing-key", "train", ["+federation.rounds=3"], "federation.rounds"),
    Case("add-unknown-key", "train", ["+federation.shards=3"], "shards"),
    Case("missing-primary-config", "train", ["--config-name=nonexist"], "nonexist"),
    # --- config values (train) ----------------------------------------------------------------
    Case("rounds-not-a-number", "train", ["federation.rounds=many"], "federation.rounds"),
    Case("rounds-empty", "train", ["federation.rounds="], "federation.rounds"),
    Case("rounds-zero", "train", ["federation.rounds=0"], "federation.rounds must be >= 1"),
    Case("threads-negative", "train", ["train.threads=-1"], "train.threads"),
    Case("seed-negative", "train", ["seed=-1"], "seed"),
    Case("fraction-above-one", "train", ["federation.fraction=1.5"], "federation.fraction"),
    Case("fraction-zero", "train", ["federation.fraction=0"], "federation.fraction"),
    Case("lr-negative", "train", ["generator.optimizer.lr=-1"], "generator.optimizer.lr"),
    Case("lr-nan", "train", ["generator.optimizer.lr=nan"], "generator.optimizer.lr"),
    Case("eps-zero", "train", ["generator.optimizer.eps=0"], "generator.optimizer.eps"),
    Case("weight-decay-negative", "train", ["generator.optimizer.weight_decay=-0.1"], "weight_decay"),
    Case("betas-one-number", "train", ["generator.optimizer.betas=[0.9]"], "betas"),
    Case("betas-above-one", "train", ["generator.optimizer.betas=[0.9,1.5]"], "betas"),
    Case("optimizer-unknown", "train", ["generator.optimizer.name=sgd"], "adamw, adam"),
    Case("granularity-unknown", "train", ["generator.granularity=per_klass"], "generator.granularity"),
    Case("per-group-without-groups", "train", ["generator.granularity=per_group"], "class_groups"),
    Case("empty-class-group", "train", ["generator.granularity=per_group", "generator.class_groups={a:[]}"],
         "group 'a' is empty"),
    Case("empty-class-group-alias", "train", ["generator_granularity=per_group", "generator_class_groups={a:[]}"],
         "group 'a' is empty"),
    Case("class-in-two-groups", "train", ["generator.granularity=per_group",
                                          "generator.class_groups={a:[digit_0],b:[digit_0]}"], "two groups"),
    Case("class-group-not-a-list", "train", ["generator.class_groups={a:3}"], "class_groups"),
    Case("alias-not-a-bool", "train", ["generator_only_mode=maybe"], "generator_only_mode"),
    Case("full-mode-local-sharing", "train", ["federation.mode=full", "federation.sharing=local"], "sharing"),
    Case("checkpoint-every-zero", "train", ["checkpoint.every=0"], "checkpoint.every"),
    Case("keep-last-zero", "train", ["checkpoint.keep_last=0"], "checkpoint.keep_last"),
    Case("progress-unknown", "train", ["train.progress=fancy"], "train.progress"),
    Case("experiment-empty", "train", ["tracking.experiment=''"], "tracking.experiment"),
    Case("profiler-active-zero", "train", ["profiler.active=0"], "profiler.active"),
    Case("synthetic-per-class-word", "train", ["federation.synthetic_per_class=many"], "synthetic_per_class"),
    Case("resume-empty", "train", ["train.resume=''"], "train.resume"),
    Case("latent-dim-zero", "train", ["generator.latent_dim=0"], "generator.latent_dim"),
    # --- data and checkpoints given to train ----------------------------------------------------
    Case("prepared-missing", "train", ["data.prepared_dir=nowhere"], "nowhere"),
    Case("prepared-is-a-file", "train", _file("data.prepared_dir"), "a_file"),
    Case("prepared-manifest-damaged", "train",
         lambda s, m: (_write(s / "data" / "prepared" / "manifest.json", "{not json"), [])[1], "manifest"),
    Case("resume-latest-without-checkpoint", "train", ["train.resume=latest", "checkpoint.dir=empty"], "latest"),
    Case("resume-missing-file", "train", ["train.resume=nowhere.ckpt"], "nowhere.ckpt"),
    Case("resume-truncated", "train", _bad_ckpt("train.resume", "truncated"), "bad_truncated.ckpt"),
    Case("resume-bit-flip", "train", _bad_ckpt("train.resume", "flipped"), "bad_flipped.ckpt"),
    Case("resume-pickle", "train", _bad_ckpt("train.resume", "pickle"), "bad_pickle.ckpt"),
    Case("resume-other-config", "train", ["train.resume=latest", "generator.hidden_dim=32"], "hidden_dim"),
    Case("resume-other-data", "train", lambda s, m: [
        "train.resume=latest", "data.max_samples=200", f"data.prepared_dir={_prepare_other(s)}"], "data"),
    # --- train's write paths ------------------------------------------------------------------
    Case("reports-dir-is-a-file", "train", _file("train.reports_dir"), "a_file"),
    Case("reports-dir-under-a-file", "train", _under_file("train.reports_dir"), "a_file"),
    Case("profiler-dir-is-a-file-enabled", "train",
         lambda s, m: [*LATE, "profiler=enabled", *_file("profiler.dir")(s, m)],
         "a_file"),
    Case("checkpoint-dir-is-a-file", "train", _file("checkpoint.dir"), "a_file"),
    Case("reports-on-full-disk", "train", _full("train.reports_dir"), "No space left on device"),
    Case("checkpoints-on-full-disk", "train", _full("checkpoint.dir", "checkpoints"), "No space left on device"),
    Case("reports-read-only", "train", _read_only("train.reports_dir", "reports/train"), "Read-only file system"),
    Case("checkpoints-read-only", "train", _read_only("checkpoint.dir", "checkpoints"), "Read-only file system"),
    Case("resume-read-only-checkpoints", "train",
         lambda s, m: ["federation.rounds=3", "train.resume=latest", *_read_only("checkpoint.dir", "checkpoints")(s, m)],
         "Read-only file system"),
    # (these fail after training: the run's own checkpoints and reports go to new folders)
    Case("profiler-on-full-disk", "train", lambda s, m: [
        *LATE, "profiler=enabled", "profiler.wait=0", "profiler.warmup=1", "profiler.active=1",
        f"profiler.dir={m.full(s / 'full')}"], "No space left on device"),
    Case("metrics-path-under-a-file", "train", lambda s, m: [*LATE, *_under_file("train.metrics_path", "m.json")(s, m)],
         "a_file"),
    Case("timing-path-is-a-directory", "train", lambda s, m: [*LATE, f"train.timing_path={s / 'reports'}"],
         "Is a directory"),
    # --- evaluate -------------------------------------------------------------------------------
    Case("evaluate-missing-checkpoint", "evaluate", ["evaluate.checkpoint=nowhere.ckpt"], "nowhere.ckpt"),
    Case("evaluate-checkpoint-is-a-dir", "evaluate", ["evaluate.checkpoint=reports"], "reports"),
    Case("evaluate-truncated", "evaluate", _bad_ckpt("evaluate.checkpoint", "truncated"), "bad_truncated"),
    Case("evaluate-empty-file", "evaluate", _bad_ckpt("evaluate.checkpoint", "empty"), "bad_empty"),
    Case("evaluate-text-file", "evaluate", _bad_ckpt("evaluate.checkpoint", "text"), "bad_text"),
    Case("evaluate-pickle", "evaluate", _bad_ckpt("evaluate.checkpoint", "pickle"), "bad_pickle"),
    Case("evaluate-knn-zero", "evaluate", ["evaluate.knn_k=0"], "evaluate.knn_k"),
    Case("evaluate-knn-above-samples", "evaluate", ["evaluate.knn_k=50"], "evaluate.samples_per_class"),
    Case("evaluate-samples-one", "evaluate", ["evaluate.samples_per_class=1"], "samples_per_class"),
    Case("evaluate-other-data", "evaluate", lambda s, m: [
        "data.max_samples=200", f"data.prepared_dir={_prepare_other(s)}"], "data"),
    Case("evaluate-reports-dir-is-a-file", "evaluate", _file("evaluate.reports_dir"), "a_file"),
    Case("evaluate-reports-under-a-file", "evaluate", _under_file("evaluate.reports_dir"), "a_file"),
    Case("evaluate-reports-on-full-disk", "evaluate", _full("evaluate.reports_dir"), "No space left on device"),
    Case("evaluate-reports-read-only", "evaluate", lambda s, m: [
        f"train.reports_dir={s / 'reports' / 'train'}", *_read_only("evaluate.reports_dir", "reports")(s, m)],
         "Read-only file system"),
    Case("evaluate-plots-dir-is-a-file", "evaluate", lambda s, m: (
        shutil.rmtree(s / "reports" / "plots"), _write(s / "reports" / "plots", "x"), [])[2], "plots"),
    Case("evaluate-torn-losses", "evaluate",
         _losses("round,node,key,metric,value\n1,node_0,unified,loss,0.5\n1,node_1,unif"), "losses.csv"),
    Case("evaluate-losses-other-columns", "evaluate", _losses("a,b\n1,2\n"), "losses.csv"),
    # --- prepare --------------------------------------------------------------------------------
    Case("prepare-unknown-source", "prepare", ["data.name=cifar"], "data.name"),
    Case("prepare-nodes-zero", "prepare", ["data.nodes=0"], "data.nodes"),
    Case("prepare-too-many-nodes", "prepare", ["data.nodes=400"], "data.nodes"),
    Case("prepare-classes-per-node-above-classes", "prepare",
         ["data.partition.scheme=classes_per_node", "data.partition.classes_per_node=11"], "classes_per_node"),
    Case("prepare-alpha-zero", "prepare", ["data.partition.alpha=0"], "data.partition.alpha"),
    Case("prepare-max-samples-negative", "prepare", ["data.max_samples=-1"], "data.max_samples"),
    Case("prepare-test-fraction-one", "prepare", ["data.test_fraction=1"], "data.test_fraction"),
    Case("prepare-condition-unknown", "prepare", ["data.condition=image"], "data.condition"),
    Case("prepare-scheme-unknown", "prepare", ["data.partition.scheme=random"], "data.partition.scheme"),
    Case("prepare-sample-rate", "prepare", ["data.instruments.sample_rate=100"], "sample_rate"),
    Case("prepare-instrument-classes", "prepare", ["data=instruments", "data.instruments.classes=999"],
         "data.instruments.classes"),
    Case("prepare-skew-above-nodes", "prepare", ["data.instruments.feature_skew_nodes=9"], "feature_skew_nodes"),
    Case("prepare-dir-is-a-file", "prepare", _file("data.prepared_dir"), "a_file"),
    Case("prepare-dir-under-a-file", "prepare", _under_file("data.prepared_dir"), "a_file"),
    Case("prepare-on-full-disk-keeps-old", "prepare", _full("data.prepared_dir", "data/prepared"),
         "No space left on device"),
    Case("prepare-read-only-keeps-old", "prepare", _read_only("data.prepared_dir", "data", "prepared"),
         "Read-only file system"),
    # --- feda2v-ckpt ----------------------------------------------------------------------------
    Case("ckpt-no-command", "ckpt", [], "feda2v-ckpt --help"),
    Case("ckpt-unknown-command", "ckpt", ["explode"], "explode"),
    Case("ckpt-inspect-missing", "ckpt", ["inspect", "nowhere.ckpt"], "nowhere.ckpt"),
    Case("ckpt-inspect-dir", "ckpt", ["inspect", "reports"], "reports"),
    Case("ckpt-inspect-truncated", "ckpt", _ckpt_cmd("inspect", "truncated"), "bad_truncated"),
    Case("ckpt-verify-flipped", "ckpt", _ckpt_cmd("verify", "flipped"), "bad_flipped"),
    Case("ckpt-verify-empty", "ckpt", _ckpt_cmd("verify", "empty"), "bad_empty"),
    Case("ckpt-verify-pickle", "ckpt", _ckpt_cmd("verify", "pickle"), "bad_pickle"),
    Case("ckpt-diff-with-damaged", "ckpt", _ckpt_cmd("diff", "text", "{good}"), "bad_text"),
    Case("ckpt-diff-one-argument", "ckpt", ["diff", "a.ckpt"], "b"),
    Case("ckpt-migrate-missing", "ckpt", ["migrate", "nowhere.pt", "out.ckpt"], "nowhere.pt"),
    Case("ckpt-migrate-not-legacy", "ckpt", _ckpt_cmd("migrate", "text", "out.ckpt"), "bad_text"),
    Case("ckpt-migrate-bad-override", "ckpt",
         lambda s, m: ["migrate", str(_legacy(s)), str(s / "out.ckpt"), "generator.granularity=per_klass"],
         "granularity"),
    Case("ckpt-migrate-out-under-a-file", "ckpt",
         lambda s, m: ["migrate", str(_legacy(s)), str(_write(s / "a_file", "x") / "out.ckpt")], "a_file"),
    Case("ckpt-migrate-out-read-only", "ckpt",
         lambda s, m: ["migrate", str(_legacy(s)), str(m.read_only(s / "reports") / "out.ckpt")], "out.ckpt"),
    Case("ckpt-migrate-existing-out", "ckpt",
         lambda s, m: ["migrate", str(_legacy(s)), str(_write(s / "precious.ckpt", "precious"))], "precious.ckpt"),
    Case("ckpt-migrate-out-full", "ckpt",
         lambda s, m: ["migrate", str(_legacy(s)), str(m.full(s / "full") / "out.ckpt")], "out.ckpt"),
]


def _prepare_other(s: Path) -> Path:
    """Prepared data of another config (the checkpoint was not trained on it)."""
    from feda2v.config import load_config
    from feda2v.data import prepare

    out = s / "other_prepared"
    prepare(load_config({"data": {"name": "digits", "nodes": 3, "condition": "onehot", "max_samples": 200,
                                  "partition": {"scheme": "iid"}, "prepared_dir": str(out)}}))
    return out


def _legacy(s: Path) -> Path:
    """A published-system checkpoint: the torch.save dict of a server's unified VAE (the
    published layer layout: Linear, ReLU, Dropout, ... in encoder and decoder)."""
    from torch import nn

    def mlp(i, o):
        return nn.Sequential(nn.Linear(i, 6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 6), nn.ReLU(),
                             nn.Dropout(0.2), nn.Linear(6, o))

    torch.manual_seed(0)
    g = nn.Module()
    g.encoder, g.decoder = mlp(12, 2 * 3), mlp(3, 12)
    opt = torch.optim.AdamW(g.parameters(), lr=1e-3)
    sum((p ** 2).sum() for p in g.parameters()).backward()
    opt.step()
    obj = {"checkpoint_type": "server", "is_global": True, "round": 1, "generator_type": "vae",
           "federated_classes": ["piano", "violin"], "generator_state_dict": g.state_dict(),
           "optimizer_state_dict": opt.state_dict()}
    p = s / "legacy.pt"
    torch.save(obj, p)
    return p


def test_cases_are_distinct_and_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len({(c.cmd, str(c.argv)) for c in CASES if isinstance(c.argv, list)}) == \
        len([c for c in CASES if isinstance(c.argv, list)])
    assert len(CASES) >= 80
    assert {c.cmd for c in CASES} == {"prepare", "train", "evaluate", "ckpt"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_one_line_exit_2_nothing_lost(case: Case, project, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDA2V_DEBUG", raising=False)
    sandbox = tmp_path / "p"
    shutil.copytree(project, sandbox, symlinks=True)
    mounts = Mounts()
    try:
        argv = case.argv(sandbox, mounts) if callable(case.argv) else list(case.argv)
        before = digest([sandbox])
        code, out, err = run_cli(case.cmd, argv, sandbox, capsys)
        after = digest([sandbox])
    finally:
        mounts.close()
    lines = err.splitlines()
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert len(lines) == 1, err
    assert lines[0].startswith("feda2v: error: ") and "Traceback" not in err, err
    assert case.needle in lines[0], lines[0]
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, changed


# ------------------------------------------------------------------- what must work, not fail


@pytest.mark.parametrize("dirname", ["é", "\udcff"], ids=["non-ascii", "byte-xff"])
def test_quoted_non_ascii_and_byte_paths_work(dirname, project, tmp_path, capsys):
    """Quoted as Hydra expects (``key='...'``), a path with any character or byte works: resume
    from it, evaluate it, write reports into it. ('\\udcff' is how Python hands over argv's 0xFF.)"""
    sandbox = tmp_path / "p"
    shutil.copytree(project, sandbox)
    odd = Path(os.fsdecode(os.fsencode(str(sandbox / dirname))))
    odd.mkdir()
    shutil.copy2(_ckpt(sandbox), odd / "latest.ckpt")
    code, out, err = run_cli("train", ["federation.rounds=3", f"train.resume='{odd / 'latest.ckpt'}'",
                                       f"checkpoint.dir='{odd / 'ck'}'"], sandbox, capsys)
    assert code == 0, err
    assert "resuming from" in out and (odd / "ck" / "latest.ckpt").is_file()
    code, out, err = run_cli("evaluate", [f"evaluate.checkpoint='{odd / 'ck' / 'latest.ckpt'}'",
                                          f"evaluate.reports_dir='{odd / 'rep'}'"], sandbox, capsys)
    assert code == 0, err
    assert os.fsencode(str(odd)) in (odd / "rep" / "report.md").read_bytes()


@pytest.mark.slow
def test_byte_path_in_a_real_process_with_a_strict_stdout(project, tmp_path):
    """The real argv bytes, and a UTF-8 stdout that refuses surrogates (PYTHONIOENCODING=utf-8)."""
    sandbox = tmp_path / "p"
    shutil.copytree(project, sandbox)
    odd = os.fsencode(str(sandbox)) + b"/\xff"
    os.mkdir(odd)
    shutil.copy2(_ckpt(sandbox), os.fsdecode(odd + b"/latest.ckpt"))
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    argv = [os.fsencode(cli("feda2v-train")), *map(os.fsencode, BASE), b"federation.rounds=3",
            b"train.resume='" + odd + b"/latest.ckpt'"]
    r = subprocess.run(argv, cwd=sandbox, capture_output=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
    bad = subprocess.run([*argv[:-1], b"train.resume=" + odd + b"/latest.ckpt"], cwd=sandbox,
                         capture_output=True, env=env, timeout=300)
    err = bad.stderr.decode()
    assert bad.returncode == 2 and len(err.splitlines()) == 1 and "quote the value" in err, err


def _rows(p: Path) -> list[str]:
    return p.read_text().splitlines()


def test_resume_over_a_torn_loss_report_rebuilds_it(project, tmp_path, capsys):
    """A damaged row in reports/train/losses.csv (what a crash mid-write or a bad disk leaves) is
    dropped with a note; resume continues and the report holds every row it could verify."""
    straight = tmp_path / "straight"
    shutil.copytree(project, straight)
    code, _, err = run_cli("train", ["federation.rounds=3", "checkpoint.dir=ck3", "train.start_over=true"],
                           straight, capsys)
    assert code == 0, err
    want = _rows(straight / "reports" / "train" / "losses.csv")

    sandbox = tmp_path / "p"
    shutil.copytree(project, sandbox)
    losses = sandbox / "reports" / "train" / "losses.csv"
    lines = _rows(losses)
    damaged_at = 3
    torn = lines[damaged_at][: len(lines[damaged_at]) // 2]
    lines[damaged_at] = torn
    losses.write_text("\n".join(lines[:-1] + ["2,node_"]) + "\n")  # and a torn last row
    code, out, err = run_cli("train", ["federation.rounds=3", "train.resume=latest"], sandbox, capsys)
    assert code == 0, err
    assert "2 damaged row(s) dropped" in out
    got = _rows(losses)
    assert got == [r for i, r in enumerate(want) if i not in (damaged_at, len(lines) - 1)]


def test_a_failed_fresh_run_keeps_the_previous_reports(project, tmp_path, capsys):
    """A new run whose first checkpoint cannot be written leaves the last run's reports whole."""
    sandbox = tmp_path / "p"
    shutil.copytree(project, sandbox)
    before = digest([sandbox / "reports"])
    code, _, err = run_cli("train", [f"checkpoint.dir={_write(sandbox / 'f', 'x')}"], sandbox, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert digest([sandbox / "reports"]) == before


@pytest.mark.parametrize("argv, want", [
    (["generator.class_groups={low:[digit_0,digit_1],high:[digit_2]}"],
     {"low": ["digit_0", "digit_1"], "high": ["digit_2"]}),
    (["generator_class_groups={low:[digit_0]}"], {"low": ["digit_0"]}),
    (["generator.class_groups.low=[digit_0]"], {"low": ["digit_0"]}),
    (["generator.class_groups.low=[digit_0]", "generator.class_groups={b:[digit_1]}"], {"b": ["digit_1"]}),
], ids=["map", "alias", "one-group", "later-map-replaces"])
def test_class_groups_override_works_as_documented(argv, want, tmp_path, capsys):
    import yaml

    code, out, err = run_cli("train", [*argv, "--cfg", "job"], tmp_path, capsys)
    assert code == 0, err
    assert yaml.safe_load(out)["generator"]["class_groups"] == want


@pytest.mark.slow
def test_mlflow_staging_on_a_full_tmpdir_is_one_line_when_required(project, tmp_path, capsys, monkeypatch):
    """Artifacts are staged (hard link or copy) in TMPDIR before upload: TMPDIR full is a tracking
    failure like any other: one line with tracking.required=true, and the run's files are kept."""
    import tempfile

    sandbox = tmp_path / "p"
    shutil.copytree(project, sandbox)
    uri = f"sqlite:///{sandbox / 'mlflow.db'}"
    from feda2v.config import load_config
    from feda2v.tracking import make_tracker

    before = digest([sandbox])  # the MLflow store below records this run: it is meant to change
    make_tracker(load_config({"tracking": {"uri": uri}}))  # the store exists (its INFO lines are not this case's)
    capsys.readouterr()
    mounts = Mounts()
    try:
        full = mounts.full(tmp_path / "tmpdir")
        monkeypatch.setattr(tempfile, "tempdir", str(full))
        code, out, err = run_cli("train", ["tracking=sqlite", "tracking.required=true",
                                           f"tracking.uri={uri}", *LATE], sandbox, capsys)
        after = digest([sandbox])
    finally:
        mounts.close()
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and "staging artifact" in lines[0], err
    assert "No space left on device" in lines[0], lines[0]
    assert not [p for p, h in before.items() if after.get(p) != h]
    assert (sandbox / "ck_new" / "latest.ckpt").is_file()  # training's own output is kept
