"""``feda2v-evaluate [overrides]``: score the trained store and write reports (DVC stage ``evaluate``)."""
from __future__ import annotations

from feda2v.cli._app import run_app


def task(cfg) -> None:
    from feda2v.evaluate import evaluate

    result = evaluate(cfg)
    ov = result["metrics"]["overall"]
    shown = ", ".join(f"{k} {ov[k]:.4g}" for k in ("tstr_acc", "trtr_acc", "frechet", "mmd", "precision", "recall")
                      if k in ov)
    print(f"evaluate: {shown}")
    for note in result["notes"]:
        print(f"evaluate: note: {note}")
    print(f"evaluate: wrote {result['outputs']['metrics']} and {result['outputs']['report']}")


def main() -> None:
    run_app(task)


if __name__ == "__main__":
    main()
