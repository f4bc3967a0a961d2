"""``feda2v-ckpt``: inspect, verify, diff and migrate checkpoints (thin: the logic is in checkpoint/)."""
from __future__ import annotations

import argparse
import json
import sys

from feda2v.cli._app import fail, tolerant_output
from feda2v.errors import Feda2vError
from feda2v.fsutil import output_error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other feda2v error
        fail(Feda2vError(f"{message}; see 'feda2v-ckpt --help'"), 2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="feda2v-ckpt", description="Inspect, verify, compare and migrate feda2v checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    s = sub.add_parser("inspect", help="print a JSON summary of a checkpoint (verifies it first)")
    s.add_argument("path")
    s = sub.add_parser("verify", help="exit 0 only if the checkpoint is intact")
    s.add_argument("path")
    s = sub.add_parser("diff", help="exit 0 only if two checkpoints hold bit-identical state "
                                    "(the writing run's provenance aside; --strict: byte-identical files)")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--strict", action="store_true", help="compare the provenance header field too")
    s.add_argument("--nodes", nargs="+", metavar="STATE_DIR", default=None,
                   help="node state dirs (each holding node_NNN/): a node-resident Flower checkpoint "
                        "(sharing local/fedavg) is compared with its nodes' own checkpoints filled in")
    s = sub.add_parser(
        "migrate", help="convert published-system (FedA2V) checkpoint(s) to one federation checkpoint",
        description="feda2v-ckpt migrate LEGACY.pt [LEGACY2.pt ...] OUT [key=value ...] [flags]: several "
                    "client files (one generator each) merge into one store; overrides and flags may come "
                    "anywhere on the line.")
    s.add_argument("items", nargs="*", metavar="LEGACY... OUT [key=value...]",
                   help="legacy file(s), then the output path; key=value words are config overrides for what "
                        "the legacy files do not record, e.g. generator.granularity=per_group")
    s.add_argument("--prepared", default=None,
                   help="prepared data dir (feda2v-prepare output) whose classes and conditions the store uses")
    s.add_argument("--fresh-discriminator", action="store_true",
                   help="GAN files without a discriminator (the published client saves none): start it fresh")
    s.add_argument("--to-float32", action="store_true",
                   help="convert non-float32 legacy tensors (reports the largest rounding error)")
    return p


def _run(args: argparse.Namespace) -> int:
    from feda2v import checkpoint as ck

    if args.cmd == "inspect":
        print(json.dumps(ck.inspect_checkpoint(args.path), indent=2, sort_keys=True))
        return 0
    if args.cmd == "verify":
        h = ck.verify_checkpoint(args.path)
        print(f"ok: {args.path} (format {h['format_version']}, round {h.get('round')}, "
              f"{len(h['tensors'])} tensors, sha256 {h['sha256']})")
        return 0
    if args.cmd == "diff":
        if args.nodes:
            from feda2v.checkpoint.nodestate import diff_with_nodes

            diffs = diff_with_nodes(args.a, args.b, args.nodes, strict=args.strict)
        else:
            diffs = ck.diff_checkpoints(args.a, args.b, strict=args.strict)
        for d in diffs:
            print(d)
        note = None if args.strict else ck.provenance_note(args.a, args.b)
        if note:
            print(note)
        if diffs:
            print(f"feda2v-ckpt: {len(diffs)} difference(s)", file=sys.stderr)
            return 1
        print("identical")
        return 0
    if args.cmd == "migrate":
        return _migrate(args)
    raise AssertionError(args.cmd)


def _migrate(args: argparse.Namespace) -> int:
    import shlex

    from feda2v.checkpoint.legacy import OVERRIDES_SUFFIX, migrate_legacy
    from feda2v.cli._app import conf_dir
    from feda2v.config.files import compose_conf

    overrides = [a for a in args.items if "=" in a]
    paths = [a for a in args.items if "=" not in a]
    if len(paths) < 2:
        raise Feda2vError("migrate needs LEGACY.pt [LEGACY2.pt ...] OUT; see 'feda2v-ckpt migrate --help'")
    *legacy, out = paths
    done = migrate_legacy(legacy, out, overrides=overrides, prepared_dir=args.prepared,
                          fresh_discriminator=args.fresh_discriminator, to_float32=args.to_float32,
                          default_config=compose_conf(conf_dir()))
    h = done.header
    print(f"wrote {out}: keys {h['keys']}, roles {h['roles']}, round {h['round']}")
    for note in done.notes:
        print(f"note: {note}")
    if done.resumable:
        print(f"resume with (also in {out}{OVERRIDES_SUFFIX}): feda2v-train "
              + " ".join(shlex.quote(o) for o in [*done.overrides, f"train.resume={out}"]))
    else:
        print("note: to resume training from it, migrate with --prepared DIR (the prepared data the run "
              "continues on: a resume checks its manifest)")
    return 0


def main(argv: list[str] | None = None) -> None:
    tolerant_output()
    parser = _parser()
    # argparse stops filling a positional list at the first flag; words after it come back as
    # extras, so overrides and files may sit anywhere around the migrate flags.
    args, extra = parser.parse_known_args(argv)
    if extra:
        unknown = [e for e in extra if e.startswith("-")]
        if args.cmd != "migrate" or unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
        args.items = [*args.items, *extra]
    try:
        code = _run(args)
    except Feda2vError as e:
        fail(e, e.exit_code)
    except OSError as e:  # an OS condition no code path named: still one line
        fail(output_error(e.filename or "a file", e, "access"), 2)
    except KeyboardInterrupt:
        fail(KeyboardInterrupt("interrupted"), 130)
    sys.exit(code)


if __name__ == "__main__":
    main()
