"""``feda2v-ckpt``: inspect, verify, diff and migrate checkpoints (thin: the logic is in checkpoint/)."""
from __future__ import annotations

import argparse
import json
import sys

from feda2v.cli._app import fail
from feda2v.errors import Feda2vError


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
    s = sub.add_parser("migrate", help="convert a published-system (FedA2V) checkpoint to this format")
    s.add_argument("legacy")
    s.add_argument("out")
    s.add_argument(
        "--prepared",
        default=None,
        help="prepared data dir (feda2v-prepare output) whose class conditions the store should use",
    )
    s.add_argument(
        "overrides",
        nargs="*",
        help="config overrides for what the legacy file does not record, e.g. generator.granularity=per_group",
    )
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
        header = ck.migrate_legacy(args.legacy, args.out, overrides=args.overrides, prepared_dir=args.prepared)
        print(f"wrote {args.out}: keys {header['keys']}, roles {header['roles']}, round {header['round']}")
        for note in header["migration"]["notes"]:
            print(f"note: {note}")
        return 0
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = _run(args)
    except Feda2vError as e:
        fail(e, e.exit_code)
    except KeyboardInterrupt:
        fail(KeyboardInterrupt("interrupted"), 130)
    sys.exit(code)


if __name__ == "__main__":
    main()
