#!/usr/bin/env bash
# make bench: how much of the HSM's capacity survives the trip through HTTP,
# auth, the guess budget and durable storage, measured in one run.
#
# 1. "keyvault dev" sets up a fresh SoftHSM token, keys and store in a
#    temporary directory; its per-user and per-client limits are raised
#    far above the load (they stay in the path), everything else is as
#    shipped.
# 2. The raw ceiling: "keyvault bench --hsm" runs the HSM calls of one
#    recover, then of one enroll, through the pool, vault stopped.
# 3. The vault serves, rollback anchoring off, on a store of its own;
#    "keyvault bench --url" runs recover and enroll over HTTP at the same
#    concurrency on the same token, then recover at half the measured
#    recover rate (open loop) for its latency. Then the same three with
#    rollback anchoring on (the default), on the store keyvault dev made,
#    the last at the same rate as without, so the latencies compare
#    (BENCH_ANCHOR=0 skips them).
# 4. One table: successful requests/s (a shed 503 is fast and is not
#    capacity; errors are listed below the table), the ratio HTTP / raw,
#    for anchored runs the ratio to the same run without anchoring, and
#    latency percentiles of every request.
#
# Knobs (environment): BENCH_CONCURRENCY (32), BENCH_DURATION (10s),
# BENCH_WARMUP (2s, unmeasured load before each run),
# BENCH_USERS (2000), BENCH_API (127.0.0.1:18480), BENCH_ADMIN (127.0.0.1:18490),
# BENCH_KEEP=1 keeps the directory, BENCH_PROFILE=FILE saves a 10 s CPU
# profile of the vault taken during the recover run in FILE, and during the
# anchored one in FILE.anchor.
set -euo pipefail

BIN=${BIN:-bin/keyvault}
C=${BENCH_CONCURRENCY:-32}
D=${BENCH_DURATION:-10s}
W=${BENCH_WARMUP:-2s}
U=${BENCH_USERS:-2000}
API=${BENCH_API:-127.0.0.1:18480}
ADMIN=${BENCH_ADMIN:-127.0.0.1:18490}

dir=$(mktemp -d "${TMPDIR:-/tmp}/keyvault-bench.XXXXXX")
pid=
cleanup() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	if [ "${BENCH_KEEP:-}" = 1 ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

wait_ready() {
	for _ in $(seq 200); do
		if curl -fsS "http://$ADMIN/readyz" >/dev/null 2>&1; then return 0; fi
		if ! kill -0 "$pid" 2>/dev/null; then echo "the vault exited; its log:" >&2; cat "$dir/log" >&2; return 1; fi
		sleep 0.1
	done
	echo "the vault did not become ready; its log:" >&2; cat "$dir/log" >&2; return 1
}

stop_vault() {
	kill -TERM "$pid"; wait "$pid" || true; pid=
}

echo "== setting up $dir with keyvault dev"
"$BIN" dev --dir "$dir" --listen "$API" --admin-listen "$ADMIN" >"$dir/log" 2>&1 &
pid=$!
wait_ready
stop_vault
# Limits far above the load, so they are checked but never bite.
sed -i \
	-e 's/^  guesses_per_user: .*/  guesses_per_user: {per_second: 1000000, burst: 1000000}/' \
	-e 's/^  requests_per_client: .*/  requests_per_client: {per_second: 1000000, burst: 1000000}/' \
	-e 's/^  wrong_guesses_per_client: .*/  wrong_guesses_per_client: {per_second: 1000000, burst: 1000000}/' \
	-e "s/^listen: .*/listen: $API/" \
	-e "s/^admin_listen: .*/admin_listen: $ADMIN/" \
	-e 's/^admin_pprof: .*/admin_pprof: true/' \
	-e 's/^  rollback_anchor: .*/  rollback_anchor: false/' \
	-e 's|^  path: .*|  path: '"$dir"'/unanchored.db|' \
	"$dir/keyvault.yaml"
"$BIN" config check --config "$dir/keyvault.yaml" >/dev/null

results=$dir/results.jsonl
run() { "$BIN" bench --json --concurrency "$C" --duration "$D" --warmup "$W" "$@" | tee -a "$results" >/dev/null; }

echo "== raw HSM ceiling (concurrency $C, $D each)"
run --hsm --config "$dir/keyvault.yaml" --op recover
run --hsm --config "$dir/keyvault.yaml" --op enroll

echo "== over HTTP ($U users)"
"$BIN" serve --config "$dir/keyvault.yaml" >"$dir/log" 2>&1 &
pid=$!
wait_ready
if [ -n "${BENCH_PROFILE:-}" ]; then
	(sleep 4; curl -fsS -o "$BENCH_PROFILE" "http://$ADMIN/debug/pprof/profile?seconds=10") &
fi
run --url "http://$API" --token-file "$dir/token" --users "$U" --op recover
run --url "http://$API" --token-file "$dir/token" --users "$U" --op enroll
half=$(awk -F'"succeeded_per_second":' '/"op":"recover"/ { split($2, a, ","); printf "%d", a[1] / 2 }' "$results")
run --url "http://$API" --token-file "$dir/token" --users "$U" --op recover --rate "$half"
stop_vault

if [ "${BENCH_ANCHOR:-1}" != 0 ]; then
	echo "== over HTTP with rollback anchoring (on the store keyvault dev made, anchored since its first start)"
	sed -i -e 's|^  rollback_anchor: .*|  rollback_anchor: true|' -e 's|^  path: .*|  path: '"$dir"'/keyvault.db|' "$dir/keyvault.yaml"
	"$BIN" serve --config "$dir/keyvault.yaml" >"$dir/log" 2>&1 &
	pid=$!
	wait_ready
	if [ -n "${BENCH_PROFILE:-}" ]; then
		(sleep 4; curl -fsS -o "$BENCH_PROFILE.anchor" "http://$ADMIN/debug/pprof/profile?seconds=10") &
	fi
	results=$dir/results-anchor.jsonl
	run --url "http://$API" --token-file "$dir/token" --users "$U" --op recover
	run --url "http://$API" --token-file "$dir/token" --users "$U" --op enroll
	# The same offered load as the run without anchoring, so that the
	# latencies compare.
	run --url "http://$API" --token-file "$dir/token" --users "$U" --op recover --rate "$half"
	stop_vault
	results=$dir/results.jsonl
fi

echo
# The raw runs come first in the file, so each HTTP line finds its ceiling.
awk '
function field(name,    s) {
	if (!index($0, "\"" name "\":")) return ""
	s = $0; sub(".*\"" name "\":", "", s); sub("[,}].*", "", s); gsub("\"", "", s); return s
}
BEGIN { printf "%-11s %-8s %-9s %9s %6s %6s %7s %7s %7s %7s\n", "path", "op", "load", "ok/s", "ratio", "vs off", "p50 ms", "p90 ms", "p99 ms", "max ms" }
{
	op = field("op"); rps = field("succeeded_per_second"); rate = field("rate")
	load = (rate == "" ? "max" : rate "/s")
	path = (FILENAME ~ /anchor/ ? "http+anchor" : "http"); ratio = "-"; off = "-"
	if (op ~ /^hsm-/) { path = "raw"; op = substr(op, 5); raw[op] = rps }
	else if (raw[op] > 0) ratio = sprintf("%.2f", rps / raw[op])
	if (path == "http") plain[op, load] = rps
	else if (path == "http+anchor" && plain[op, load] > 0) off = sprintf("%.2f", rps / plain[op, load])
	printf "%-11s %-8s %-9s %9.0f %6s %6s %7s %7s %7s %7s\n", path, op, load, rps, ratio, off,
		field("p50_ms"), field("p90_ms"), field("p99_ms"), field("max_ms")
}' "$results" $(ls "$dir"/results-anchor.jsonl 2>/dev/null)
results="$dir/results.jsonl $(ls "$dir"/results-anchor.jsonl 2>/dev/null)"
if cat $results | grep -v '"errors":{}' >/dev/null; then
	echo
	echo "errors:"
	cat $results | grep -v '"errors":{}' | sed 's/.*"op":"\([^"]*\)".*"errors":\({[^}]*}\).*/  \1 \2/'
	# Shedding (503 unavailable) is the vault protecting itself under load;
	# any other error is a broken vault or bench.
	if cat $results | grep -v '"errors":{}' | sed 's/.*"errors":{\([^}]*\)}.*/\1/' | tr ',' '\n' | grep -v '^"unavailable":' >/dev/null; then
		echo "errors other than shedding: failing" >&2
		exit 1
	fi
fi
