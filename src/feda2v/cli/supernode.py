"""``feda2v-supernode``: Flower's SuperNode with its idle waits capped (thin: federation/flower_supernode.py)."""
from __future__ import annotations

import sys

from feda2v.cli._app import fail
from feda2v.errors import Feda2vError


def main() -> None:
    from feda2v.federation.flower_supernode import run_supernode

    try:
        run_supernode(sys.argv[1:])
    except Feda2vError as e:
        fail(e, 2)


if __name__ == "__main__":
    main()
