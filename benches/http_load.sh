#!/usr/bin/env bash
# The HTTP layer end to end (issue 12): examples/axum_service, driven over
# loopback by wrk (Debian's package) with 256 connections, without the
# idempotency layer (--no-layer, the baseline) and with it on
# Durability::Sync. Each server gets four runs: a warm-up, fresh keys (a
# new Idempotency-Key per request), then replays (keys cycling over a set
# the fresh run completed). Prints req/s, p50 and p99 latency per run and
# the ratios layer / no layer. Fails if a run had a non-2xx response, a
# fresh run was replayed, or a replay run was not.
#
#   bash benches/http_load.sh
#
# Environment: SECS (10, seconds per measured run), WARMUP (2), CONNS (256),
# THREADS (2, wrk threads), USERS (64, bearer tokens the keys are spread
# over), REPLAY_KEYS (1000 per wrk thread), PORT (39100; PORT+1 is used
# too), DATA_DIR (parent of the engine's directory; default TMPDIR or /tmp).
# A manual benchmark: not part of .ci/run.
set -euo pipefail

SECS=${SECS:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-256}
THREADS=${THREADS:-2}
USERS=${USERS:-64}
REPLAY_KEYS=${REPLAY_KEYS:-1000}
PORT=${PORT:-39100}
DATA_DIR=${DATA_DIR:-${TMPDIR:-/tmp}}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lua="$root/benches/http_load.lua"
cd "$root"

if ! command -v wrk >/dev/null; then
    echo "== installing wrk (Debian package)"
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get install -y wrk || {
        "${sudo[@]}" apt-get update
        "${sudo[@]}" apt-get install -y wrk
    }
fi

echo "== building examples/axum_service (release)"
cargo build --release --features http --example axum_service
target=${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps |
    grep -o '"target_directory":"[^"]*"' | cut -d'"' -f4)}
bin="$target/release/examples/axum_service"

work=$(mktemp -d "$DATA_DIR/idemkv-http-load.XXXXXX")
server=""
stop_server() {
    if [ -n "$server" ]; then
        kill "$server" 2>/dev/null || true
        wait "$server" 2>/dev/null || true
        server=""
    fi
}
trap 'stop_server; rm -rf "$work"' EXIT

# Whether the server on port $1 answers GET /executions with 200.
answers() {
    (
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf 'GET /executions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
        read -r status <&3
        [[ $status == "HTTP/1.1 200"* ]]
    ) 2>/dev/null
}

# start NAME PORT FLAGS...: starts the example and waits until it answers.
start_server() {
    local name=$1 port=$2
    shift 2
    "$bin" --port "$port" "$@" </dev/null >"$work/$name.log" 2>&1 &
    server=$!
    for _ in $(seq 100); do
        if answers "$port"; then return 0; fi
        sleep 0.1
    done
    echo "the $name server did not answer on port $port:" >&2
    cat "$work/$name.log" >&2
    exit 1
}

# run NAME PORT MODE PREFIX SECS: one wrk run; leaves its RESULT line in
# $work/NAME.result.
run() {
    local name=$1 port=$2 mode=$3 prefix=$4 secs=$5
    MODE=$mode KEY_PREFIX=$prefix REPLAY_KEYS=$REPLAY_KEYS USERS=$USERS \
        wrk -t "$THREADS" -c "$CONNS" -d "${secs}s" --timeout 10s -s "$lua" \
        "http://127.0.0.1:$port/charge" >"$work/$name.out"
    if ! grep '^RESULT' "$work/$name.out" >"$work/$name.result"; then
        cat "$work/$name.out" >&2
        echo "wrk printed no RESULT line for $name" >&2
        exit 1
    fi
    echo "   $name: $(cut -d' ' -f2- "$work/$name.result")  (load: $(cut -d' ' -f1-3 /proc/loadavg))"
}

# field NAME KEY: a value of run NAME's RESULT line.
field() {
    tr ' ' '\n' <"$work/$1.result" | sed -n "s/^$2=//p"
}

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), Linux $(uname -r)"
echo "   commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2)"
echo "   engine data on $(df --output=fstype "$work" | tail -1) ($work); load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "   wrk: $THREADS threads, $CONNS connections, ${SECS}s per run, keys over $USERS users, replays over $REPLAY_KEYS keys per wrk thread"

echo "== without the layer (--no-layer)"
start_server bare "$PORT" --no-layer
run bare-warmup "$PORT" fresh w "$WARMUP"
run bare-fresh "$PORT" fresh f "$SECS"
run bare-replay "$PORT" replay f "$SECS"
stop_server

echo "== with the layer, Durability::Sync"
mkdir -p "$work/engine"
start_server layer "$((PORT + 1))" --dir "$work/engine"
run layer-warmup "$((PORT + 1))" fresh w "$WARMUP"
run layer-fresh "$((PORT + 1))" fresh f "$SECS"
run layer-replay "$((PORT + 1))" replay f "$SECS"
stop_server

failed=0
for name in bare-fresh bare-replay layer-fresh layer-replay; do
    if [ "$(field "$name" non2xx)" != 0 ]; then
        echo "FAIL: $name had $(field "$name" non2xx) non-2xx responses" >&2
        failed=1
    fi
done
for name in bare-fresh bare-replay layer-fresh; do
    if [ "$(field "$name" replayed)" != 0 ]; then
        echo "FAIL: $name had $(field "$name" replayed) replayed responses" >&2
        failed=1
    fi
done
if [ "$(field layer-replay replayed)" = 0 ] ||
    [ "$(field layer-replay replayed)" != "$(field layer-replay responses)" ]; then
    echo "FAIL: layer-replay replayed $(field layer-replay replayed) of $(field layer-replay responses) responses" >&2
    failed=1
fi

echo
echo "| run | req/s | p50 | p99 | responses | non-2xx | replayed |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for name in bare-fresh layer-fresh bare-replay layer-replay; do
    awk -v name="$name" -v rps="$(field "$name" rps)" -v p50="$(field "$name" p50_us)" \
        -v p99="$(field "$name" p99_us)" -v got="$(field "$name" responses)" \
        -v bad="$(field "$name" non2xx)" -v again="$(field "$name" replayed)" \
        'BEGIN { printf "| %s | %d | %.2f ms | %.2f ms | %d | %d | %d |\n", name, rps, p50 / 1000, p99 / 1000, got, bad, again }'
done
echo
for kind in fresh replay; do
    awk -v kind="$kind" -v with="$(field "layer-$kind" rps)" -v without="$(field "bare-$kind" rps)" \
        'BEGIN { r = with / without; printf "layer / no layer, %s keys: %.1f %% of the requests/s (target >= 50 %%: %s)\n", kind, 100 * r, (r >= 0.5 ? "met" : "NOT met") }'
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
exit "$failed"
