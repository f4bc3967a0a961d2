#!/usr/bin/env bash
# Deployment-mode run of federation.engine=flower on one machine: a SuperLink and two SuperNodes on
# 127.0.0.1 (started here, stopped here by PID), `flwr run` of feda2v's ServerApp/ClientApp, then a
# check that the checkpoint it wrote is bit-identical to the in-process engine's on the same config.
#
# TRANSPORT: INSECURE. Every Flower process runs with --insecure (plain gRPC/HTTP, no TLS, no node
# authentication) and binds 127.0.0.1 only. That is fine for this local demo and nothing else; across
# machines use TLS (--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile on the SuperLink,
# --root-certificates on SuperNodes, `insecure = false` + root-certificates in config.toml).
#
# Usage: scripts/flower_deploy.sh [WORKDIR]   (env: VENV=.venv LINK_PORT=18000 NODE_PORT0=19094)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
WORK=$(realpath -m "${1:-${TMPDIR:-/tmp}/feda2v-flower-deploy}")
LINK_PORT=${LINK_PORT:-18000}
NODE_PORT0=${NODE_PORT0:-19094}
ROUNDS=${ROUNDS:-2}

# flower-superlink spawns flower-superexec / flwr-serverapp / flwr-clientapp by name: the venv's bin
# must come first on PATH. FLWR_HOME keeps this demo's connection config away from ~/.flwr.
export PATH="$VENV/bin:$PATH" FLWR_HOME="$WORK/flwr_home" HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0
# shellcheck source=scripts/flower_common.sh
source "$ROOT/scripts/flower_common.sh"
flower_pin_numerics
command -v flower-superlink >/dev/null || { echo "flower_deploy: flower-superlink not in $VENV/bin; install the 'flower' extra" >&2; exit 2; }

rm -rf "$WORK"; mkdir -p "$WORK"/{logs,app,flwr_home,deploy,inprocess}
PIDS=()
stop_all() {  # stop exactly the processes this script started, by PID (children first)
  for pid in "${PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      pkill -TERM -P "$pid" 2>/dev/null || true
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  ((${#PIDS[@]})) && echo "flower_deploy: stopped PIDs ${PIDS[*]}"
}
trap stop_all EXIT

# 1. tiny federation: digits, 2 nodes (one per SuperNode), shared relay; absolute paths because the
#    ServerApp process runs elsewhere (flower-superexec's cwd)
"$VENV/bin/python" - "$WORK" "$ROUNDS" <<'EOF'
import json, sys
from feda2v.config import load_config, to_plain
from feda2v.data import prepare
work, rounds = sys.argv[1], int(sys.argv[2])
raw = {"seed": 0,
       "data": {"name": "digits", "nodes": 2, "condition": "onehot", "prepared_dir": f"{work}/prepared",
                "max_samples": 300, "partition": {"scheme": "classes_per_node", "classes_per_node": 5}},
       "generator": {"hidden_dim": 32, "latent_dim": 8},
       "federation": {"rounds": rounds, "sharing": "shared", "engine": "flower"},
       "checkpoint": {"dir": "ckpt"}, "train": {"progress": "lines"}, "tracking": {"enabled": False}}
from feda2v.data.sites import write_site_bundles
prepare(load_config(raw))
write_site_bundles(f"{work}/prepared", f"{work}/sites")  # what each SuperNode holds: its partition only
with open(f"{work}/config.json", "w") as f:
    json.dump(to_plain(load_config(raw)), f, indent=1)
EOF

# 2. the FAB `flwr run` ships and the CLI's connection (insecure, loopback)
flower_write_app "$WORK/app"
flower_write_connection "$FLWR_HOME" feda2v-local "127.0.0.1:$LINK_PORT"

# 3. SuperLink + two SuperNodes, all --insecure on 127.0.0.1
flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port "$LINK_PORT" \
  >"$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!); echo "flower_deploy: SuperLink PID $! on 127.0.0.1:$LINK_PORT (insecure)"
flower_wait_port 127.0.0.1 "$LINK_PORT" "$WORK/logs"
for i in 0 1; do
  feda2v-supernode --idle-poll-s "${IDLE_POLL_S:-0.1}" --insecure --superlink "127.0.0.1:$LINK_PORT" \
    --host 127.0.0.1 --port $((NODE_PORT0 + i)) \
    --node-config "partition-id=$i num-partitions=2 data-dir=\"$WORK/sites/node_00$i\"" \
    >"$WORK/logs/supernode$i.log" 2>&1 &
  PIDS+=($!); echo "flower_deploy: SuperNode $i PID $! (partition-id=$i, runtime port $((NODE_PORT0 + i)))"
done

# 4. the run: the whole training job (rounds, checkpoints, reports) runs inside the ServerApp
flower_run_job "$WORK/app" feda2v-local "$WORK/config.json" "$WORK/deploy" "$WORK/logs/flwr_run.log" || exit 1
grep -E "^round [0-9]+/" "$WORK/logs/flwr_run.log" || true

# 5. the same config in-process, then compare (exit non-zero unless bit-identical)
(cd "$WORK/inprocess" && "$VENV/bin/python" - "$WORK" <<'EOF'
import json, sys
from feda2v.config import load_config
from feda2v.pipeline.train import train
raw = json.load(open(f"{sys.argv[1]}/config.json")); raw["federation"]["engine"] = "inprocess"
train(load_config(raw))
EOF
)
"$VENV/bin/feda2v-ckpt" verify "$WORK/deploy/ckpt/latest.ckpt"
"$VENV/bin/feda2v-ckpt" diff "$WORK/inprocess/ckpt/latest.ckpt" "$WORK/deploy/ckpt/latest.ckpt"
echo "flower_deploy: OK: deployment checkpoint is bit-identical to the in-process engine's ($WORK)"
