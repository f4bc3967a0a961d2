"""`make plots`: the dvc.yaml plots as one HTML page that renders without a network.

`dvc plots show` writes a page that loads vega, vega-lite and vega-embed from a CDN, so it is blank
offline. This fetches those three packages once through npm (the versions DVC's page names), keeps
their built scripts in data/cache/vega/, and passes DVC an HTML template with them inlined:
reports/dvc_plots/index.html then works from disk, offline, in any browser.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / "cache" / "vega"
# The versions dvc-render's page loads (dvc_render/vega.py, VegaRenderer.SCRIPTS).
PACKAGES = (("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2"))

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>feda2v: DVC plots</title>
{inline}
<style>table {{ border-spacing: 15px; }} body {{ font-family: sans-serif; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def die(msg: str) -> None:
    print(f"plots: error: {msg}", file=sys.stderr)
    sys.exit(2)


def vega_scripts() -> list[Path]:
    """The three built scripts, fetched with `npm pack` the first time."""
    paths = [CACHE / f"{name}-{version}.min.js" for name, version in PACKAGES]
    missing = [(n, v, p) for (n, v), p in zip(PACKAGES, paths) if not p.is_file()]
    if missing:
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            specs = [f"{n}@{v}" for n, v, _ in missing]
            try:
                subprocess.run(["npm", "pack", "--silent", *specs], cwd=tmp, check=True,
                               capture_output=True, text=True, timeout=300)
            except FileNotFoundError:
                die("npm is not installed (Debian: apt-get install npm); it fetches the vega scripts once")
            except subprocess.CalledProcessError as e:
                die(f"npm pack {' '.join(specs)} failed: {e.stderr.strip().splitlines()[-1:]}")
            for name, version, path in missing:
                with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                    data = tar.extractfile(f"package/build/{name}.min.js").read()
                tmp_path = path.with_suffix(".part")
                tmp_path.write_bytes(data)
                tmp_path.replace(path)
    return paths


def template() -> Path:
    # </script> cannot occur inside an inline script; the built bundles escape it, checked here.
    parts = []
    for p in vega_scripts():
        js = p.read_text(encoding="utf-8")
        if "</script" in js.lower():
            die(f"{p} contains '</script' and cannot be inlined; delete it and re-run")
        parts.append(f"<script>{js}</script>")
    path = CACHE / "offline_template.html"
    path.write_text(PAGE.format(inline="\n".join(parts)), encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-C", "--repo", type=Path, default=ROOT, help="the DVC project (default: this one)")
    ap.add_argument("-o", "--out", default="reports/dvc_plots", help="output folder (index.html), in the project")
    ap.add_argument("targets", nargs="*", help="plot ids or files (default: every dvc.yaml plot)")
    args = ap.parse_args()
    dvc = Path(sys.executable).parent / "dvc"
    r = subprocess.run([str(dvc), "plots", "show", "--html-template", str(template()), "-o", args.out,
                        *args.targets], cwd=args.repo, capture_output=True, text=True)
    if r.returncode != 0:
        die(f"dvc plots show failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}; "
            "run `dvc repro` first")
    print(f"plots: {args.repo / args.out / 'index.html'} (works offline)")


if __name__ == "__main__":
    main()
