#!/usr/bin/env bash
# Regenerate dvc.lock and the committed pipeline outputs (reports/*.json, report.md, plots CSVs,
# the .gitignore files DVC keeps) from a clean clone of HEAD, so nothing in this checkout (bytecode,
# caches, stale outputs, uncommitted edits) can reach them; copy them back here, then commit them.
# The clone caches its outputs in this checkout's DVC cache, so `dvc checkout` here restores them.
# CHECK=1 runs `dvc repro -f` a second time and fails unless dvc.lock comes out byte-identical.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
  echo "relock: error: tracked files differ from HEAD; commit (or stash) them first" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git clone -q "$here" "$tmp/clone"
cd "$tmp/clone"
export PATH="$here/.venv/bin:$PATH" PYTHONPATH="$tmp/clone/src" DVC_NO_ANALYTICS=1
mkdir -p "$here/.dvc/cache"
dvc cache dir --local "$here/.dvc/cache"
dvc repro
if [[ ${CHECK:-0} == 1 ]]; then
  cp dvc.lock "$tmp/first.lock"
  dvc repro -f
  cmp "$tmp/first.lock" dvc.lock || { echo "relock: error: a second repro wrote another dvc.lock" >&2; exit 1; }
  echo "relock: a second dvc repro -f wrote the same dvc.lock"
fi
# what the repro changed or added among the files git sees (tracked outputs, DVC's .gitignores)
git status --porcelain --untracked-files=all | cut -c4- | while read -r f; do
  if [[ ! -e $f ]]; then
    echo "relock: $f is no longer written: git rm it"
    continue
  fi
  mkdir -p "$here/$(dirname "$f")"
  cp "$f" "$here/$f"
  echo "relock: updated $f"
done
