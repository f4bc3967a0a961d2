#!/usr/bin/env bash
# A cross-site Flower deployment on one Linux machine (root): a SuperLink and one SuperNode per site
# bundle, each in its own network namespace, joined by veth pairs to a bridge that lives inside the
# SuperLink's namespace (nothing is added to, or listens in, the host's namespace). TLS from a CA
# made here; SuperNode authentication (--enable-supernode-auth, each SuperNode's key registered with
# `flwr supernode register` before it starts). Each SuperNode also runs in its own mount namespace
# in which the server's folder and every other site's bundle are hidden (empty tmpfs over them): it
# can read only its own partition. The SuperLink's namespace hides the site bundles.
#
#   flower_netns.sh up WORK SERVER_DIR SITES_DIR   start everything (SITES_DIR/node_NNN = one site each,
#                                                  as feda2v-prepare data.site_bundles_dir writes them;
#                                                  SERVER_DIR holds the prepared data, configs, run dirs;
#                                                  the two folders must not contain each other). Site I
#                                                  keeps its own store (local/fedavg) in WORK/state/siteI
#                                                  (node config state-dir; hidden from the other sites)
#   flower_netns.sh run WORK CONFIG RUN_DIR        `flwr run` of a resolved feda2v config, the job's
#                                                  working directory RUN_DIR; exit status = the run's
#   flower_netns.sh kill-node WORK I               SIGKILL SuperNode I (its PID only)
#   flower_netns.sh start-node WORK I              (re)start SuperNode I
#   flower_netns.sh pid WORK I                     SuperNode I's PID
#   flower_netns.sh down WORK                      stop every process in the namespaces by PID, delete them
#
# Env: VENV (default .venv of this checkout), PORT (SuperLink, default 9093), SUPERNODE (feda2v:
# feda2v-supernode --idle-poll-s IDLE_POLL_S, default 0.1 | flower: plain flower-supernode).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
# shellcheck source=scripts/flower_common.sh
source "$ROOT/scripts/flower_common.sh"

die() { echo "feda2v: error: $*" >&2; exit 2; }
(($# >= 2)) || die "usage: flower_netns.sh up|run|kill-node|start-node|pid|down WORK ...; see the script's header"
cmd=$1 WORK=$(realpath -m "$2"); shift 2
STATE=$WORK/state.env
export PATH="$VENV/bin:$PATH" FLWR_HOME="$WORK/flwr_home" HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
CONN=feda2v-netns
flower_pin_numerics

load_state() {
  [[ -f $STATE ]] || die "$WORK holds no deployment (run 'flower_netns.sh up' first)"
  # shellcheck disable=SC1090
  source "$STATE"
}
ns_link() { echo "f2v${TAG}L"; }
ns_node() { echo "f2v${TAG}N$1"; }
link_ip() { echo "$NET.1"; }

node_state() { echo "$WORK/state/site$1"; }
supernode_command() {  # feda2v-supernode: Flower's SuperNode with its fixed 3 s / 0.5 s waits capped
  case ${SUPERNODE:-feda2v} in
    feda2v) echo "$(command -v feda2v-supernode) --idle-poll-s ${IDLE_POLL_S:-0.1}" ;;
    flower) command -v flower-supernode ;;  # Flower's own timing, for comparison (bench_flower)
    *) die "SUPERNODE=$SUPERNODE: use feda2v or flower" ;;
  esac
}
start_node() {  # I: in its namespace, with the server's folder and the other sites (data, state) hidden
  local i=$1 ns site hide=("$SERVER_DIR") d
  ns=$(ns_node "$i"); site=$(printf '%s/node_%03d' "$SITES_DIR" "$i")
  for d in "$SITES_DIR"/*; do [[ -d $d && $d != "$site" ]] && hide+=("$d"); done  # incl. the server's bundle
  for d in "$WORK"/state/site*; do [[ $d == "$(node_state "$i")" ]] || hide+=("$d"); done
  # data-dir: its site bundle; state-dir: where it keeps its own store (sharing local/fedavg)
  FLOWER_CA=$WORK/tls/ca.crt FLOWER_LINK="$(link_ip):$PORT" FLOWER_KEY=$WORK/keys/node$i \
  FLOWER_NODE_CONFIG="partition-id=$i num-partitions=$NODES data-dir=\"$site\" state-dir=\"$(node_state "$i")\"" \
  FLOWER_SUPERNODE=$(supernode_command) \
  ip netns exec "$ns" sh -c 'for d in "$@"; do mount -t tmpfs -o size=1m,mode=0700 feda2v-hidden "$d" || exit 2; done
      exec $FLOWER_SUPERNODE --root-certificates "$FLOWER_CA" --superlink "$FLOWER_LINK" \
        --auth-supernode-private-key "$FLOWER_KEY" --node-config "$FLOWER_NODE_CONFIG" --host 127.0.0.1 --port 9094' \
    sh "${hide[@]}" \
    >>"$WORK/logs/supernode$i.log" 2>&1 &
  echo $! >"$WORK/pids/node$i"
}

case $cmd in
up)
  (($# == 2)) || die "usage: flower_netns.sh up WORK SERVER_DIR SITES_DIR"
  command -v ip >/dev/null || die "'ip' (iproute2) is not installed; run scripts/setup.sh"
  [[ $(id -u) == 0 ]] || die "network namespaces need root"
  command -v flower-superlink >/dev/null || die "flower-superlink is not in $VENV/bin; install the 'flower' extra"
  command -v feda2v-supernode >/dev/null || die "feda2v-supernode is not in $VENV/bin; run scripts/setup.sh"
  [[ -f $STATE ]] && die "$WORK already holds a deployment; 'flower_netns.sh down $WORK' first"
  SERVER_DIR=$(realpath "$1") SITES_DIR=$(realpath "$2")
  [[ $SITES_DIR/ == "$SERVER_DIR"/* || $SERVER_DIR/ == "$SITES_DIR"/* ]] && die "SERVER_DIR and SITES_DIR must not contain each other"
  NODES=$(find "$SITES_DIR" -maxdepth 1 -name 'node_[0-9][0-9][0-9]' -type d | wc -l)
  ((NODES > 0)) || die "$SITES_DIR holds no site bundle (node_NNN/; feda2v-prepare data.site_bundles_dir=DIR)"
  TAG=$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')
  NET="10.$((200 + 0x${TAG:0:2} % 50)).$((0x${TAG:2:2}))"
  PORT=${PORT:-9093}
  mkdir -p "$WORK"/{logs,pids}
  printf 'TAG=%s\nNET=%s\nPORT=%s\nNODES=%s\nSERVER_DIR=%q\nSITES_DIR=%q\n' \
    "$TAG" "$NET" "$PORT" "$NODES" "$SERVER_DIR" "$SITES_DIR" >"$STATE"
  L=$(ns_link)
  ip netns add "$L"
  ip -n "$L" link set lo up
  ip -n "$L" link add br0 type bridge
  ip -n "$L" addr add "$(link_ip)/24" dev br0
  ip -n "$L" link set br0 up
  for ((i = 0; i < NODES; i++)); do
    N=$(ns_node "$i")
    ip netns add "$N"
    ip -n "$N" link set lo up
    ip link add "v$i" netns "$L" type veth peer name eth0 netns "$N"  # both ends born in namespaces
    ip -n "$L" link set "v$i" master br0
    ip -n "$L" link set "v$i" up
    ip -n "$N" addr add "$NET.$((10 + i))/24" dev eth0
    ip -n "$N" link set eth0 up
  done
  flower_make_credentials "$WORK" "$NODES" "$(link_ip)" 127.0.0.1
  flower_write_app "$WORK/app"
  flower_write_connection "$FLWR_HOME" "$CONN" "$(link_ip):$PORT" "$WORK/tls/ca.crt"
  ip netns exec "$L" sh -c 'mount -t tmpfs -o size=1m,mode=0700 feda2v-hidden "$1" || exit 2; shift; exec "$@"' \
    sh "$SITES_DIR" flower-superlink --ssl-ca-certfile "$WORK/tls/ca.crt" --ssl-certfile "$WORK/tls/server.crt" \
    --ssl-keyfile "$WORK/tls/server.key" --enable-supernode-auth --disable-runtime-dependency-installation \
    --host "$(link_ip)" --port "$PORT" >"$WORK/logs/superlink.log" 2>&1 &
  echo $! >"$WORK/pids/link"
  flower_wait_port "$(link_ip)" "$PORT" "$WORK/logs/superlink.log" "$L"
  for ((i = 0; i < NODES; i++)); do
    ip netns exec "$L" flwr supernode register "$WORK/keys/node$i.pub" "$CONN" --name "site$i" \
      >>"$WORK/logs/register.log" 2>&1 || die "registering SuperNode $i's key failed; see $WORK/logs/register.log"
  done
  for ((i = 0; i < NODES; i++)); do mkdir -p "$(node_state "$i")"; done
  for ((i = 0; i < NODES; i++)); do start_node "$i"; done
  for ((i = 0; i < NODES; i++)); do
    flower_wait_port 127.0.0.1 9094 "$WORK/logs/supernode$i.log" "$(ns_node "$i")"
  done
  echo "flower_netns: SuperLink $(link_ip):$PORT (PID $(cat "$WORK/pids/link"), namespace $L, TLS, SuperNode auth);" \
    "$NODES SuperNodes (PIDs $(cat "$WORK"/pids/node* | tr '\n' ' ')) in $(ns_node 0)..$(ns_node $((NODES - 1)))"
  ;;
run)
  (($# == 2)) || die "usage: flower_netns.sh run WORK CONFIG RUN_DIR"
  load_state
  mkdir -p "$2"
  FLOWER_RUN_PREFIX="ip netns exec $(ns_link)" flower_run_job "$WORK/app" "$CONN" "$(realpath "$1")" \
    "$(realpath "$2")" "$(realpath "$2")/flwr_run.log"
  ;;
kill-node)
  load_state
  kill -KILL "$(cat "$WORK/pids/node$1")"
  ;;
start-node)
  load_state
  start_node "$1"
  flower_wait_port 127.0.0.1 9094 "$WORK/logs/supernode$1.log" "$(ns_node "$1")"
  ;;
pid)
  load_state
  cat "$WORK/pids/node$1"
  ;;
down)
  [[ -f $STATE ]] || exit 0
  load_state
  spaces=()
  for ((i = 0; i < NODES; i++)); do spaces+=("$(ns_node "$i")"); done
  spaces+=("$(ns_link)")
  # every process in our namespaces is one this script started (or a child of one): by PID
  for ns in "${spaces[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -TERM 2>/dev/null || true
  done
  for _ in $(seq 50); do
    left=$(for ns in "${spaces[@]}"; do ip netns pids "$ns" 2>/dev/null; done)
    [[ -z $left ]] && break
    sleep 0.1
  done
  for ns in "${spaces[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
  done
  for ns in "${spaces[@]}"; do
    for _ in $(seq 30); do [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break; sleep 0.1; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -f "$STATE"
  echo "flower_netns: stopped and deleted ${spaces[*]}"
  ;;
*) die "unknown command '$cmd' (up|run|kill-node|start-node|pid|down)" ;;
esac
