"""``feda2v-prepare [overrides]``: build data/prepared/ from cfg.data (the DVC stage ``prepare``)."""
from __future__ import annotations

from feda2v.cli._app import run_app


def task(cfg) -> None:
    from feda2v.data import prepare

    report: dict = {}
    path = prepare(cfg, report=report)
    m = report["manifest"]
    cache = report.get("cache") or {}
    cached = f", cache {cache.get('cached_classes', 0)} hit / {cache.get('rendered_classes', 0)} rendered" if cache else ""
    print(
        f"prepared {m['source']}: {len(m['classes'])} classes, {m['nodes']} nodes "
        f"({m['partition']['scheme']}), {m['sizes']['train']} train / {m['sizes']['test']} test, "
        f"features {m['feature_dim']}-d, condition {m['condition']} {m['condition_dim']}-d -> {path} "
        f"(hash {m['hash'][:12]}) in {report['seconds']:.1f} s{cached}"
    )
    if cfg.data.site_bundles_dir:  # what each site needs alone: its partition, conditions, entry
        from feda2v.data.sites import write_site_bundles

        sites = write_site_bundles(path, cfg.data.site_bundles_dir)
        print(f"site bundles: {len(sites) - 1} under {cfg.data.site_bundles_dir} (one per partition) and "
              "server/ (manifest, conditions, test splits: the Flower server's data.prepared_dir)")


def main() -> None:
    run_app(task)


if __name__ == "__main__":
    main()
