#!/usr/bin/env bash
# One-time (idempotent) set-up: system packages, the .venv from requirements.lock, DVC offline.
# Fast when already done: each step checks before it works.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the headless browser of the MLflow UI test (tests/test_tracking_browser.py, Playwright
# drives it at /usr/bin/chromium; no browser is downloaded). iproute2: `ip netns` for the cross-site
# Flower deployment (scripts/flower_netns.sh, tests/test_flower_netns.py).
SYSTEM_PACKAGES=(fluid-soundfont-gm timgm6mb-soundfont libfluidsynth3 dataset-fashion-mnist chromium iproute2)
PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.feda2v-stamp

export DVC_NO_ANALYTICS=1 PIP_DISABLE_PIP_VERSION_CHECK=1

missing=()
for p in "${SYSTEM_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing system packages: ${missing[*]}"
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  # --no-install-recommends: libfluidsynth3's recommends drag in Qt and a sound server.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ -f $STAMP && $(cat "$STAMP") == "$want" && -x $VENV/bin/python ]]; then
  echo "setup: .venv is up to date"
else
  echo "setup: building .venv from requirements.lock"
  [[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
  links=(); [[ -d /opt/wheels ]] && links=(--find-links /opt/wheels)
  # torch is pinned to the CPU build, which only the on-disk wheel provides.
  # (the grep hides pip's noise about this machine's empty local index folders)
  "$VENV/bin/pip" install -q "${links[@]}" -r requirements.lock 2> >(grep -v "is ignored: it is neither" >&2)
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . 2> >(grep -v "is ignored: it is neither" >&2)
  # The lock includes the 'flower' extra (flwr[simulation], ray); neither may replace the CPU torch.
  "$VENV/bin/python" -c "import feda2v, torch, flwr, ray, mlflow; assert torch.__version__.endswith('+cpu'), torch.__version__"
  echo "$want" > "$STAMP"
fi

# DVC: initialised in the repo (committed .dvc/config has analytics off); never prompts or phones home.
if [[ ! -f .dvc/config ]]; then
  "$VENV/bin/dvc" init -q --force
  "$VENV/bin/dvc" config core.analytics false
fi
