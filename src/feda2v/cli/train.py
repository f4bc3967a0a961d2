"""``feda2v-train``: the federated-train stage (Hydra app)."""
from feda2v.cli._app import run_app


def _task(cfg) -> None:
    from feda2v.pipeline.train import train

    train(cfg)


def main() -> None:
    run_app(_task)


if __name__ == "__main__":
    main()
