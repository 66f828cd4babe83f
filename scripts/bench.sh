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
# 3. Rounds over HTTP (BENCH_ROUNDS, 3). In each, the vault serves with
#    rollback anchoring off, on a store of its own, and "keyvault bench
#    --url" runs recover and enroll at the same concurrency on the same
#    token, then recover at half the first round's recover rate (open
#    loop) for its latency; then the same three with rollback anchoring on
#    (the default), on the store keyvault dev made (BENCH_ANCHOR=0 skips
#    them). Even rounds run the anchored vault first: this shared machine
#    drifts by more than the difference measured, so each round is one
#    pair taken close together, in turn in either order.
# 4. One table: successful requests/s (a shed 503 is fast and is not
#    capacity; errors are listed below the table), the ratio HTTP / raw,
#    for anchored runs the ratio to the same round's run without
#    anchoring, latency percentiles of every request, and the cost: the
#    CPU per successful operation of the process doing the work (the
#    vault, read from /proc by its PID; for the raw runs the bench
#    itself, where the HSM calls run), the vault's overhead factor (its
#    CPU per operation over the raw ceiling's, for the same operation)
#    and the load generator's own CPU per request. Then, over the rounds,
#    the median of each of these, and the median anchored / off ratio and
#    p50 and p99 difference.
#
# Knobs (environment): BENCH_CONCURRENCY (32), BENCH_DURATION (10s),
# BENCH_WARMUP (2s, unmeasured load before each run), BENCH_ROUNDS (3),
# BENCH_USERS (2000), BENCH_API and BENCH_ADMIN (the vault's listeners;
# 127.0.0.1:0, ports the kernel picks, read back from the vault's log),
# BENCH_KEEP=1 keeps the directory, BENCH_PROFILE=FILE saves a 10 s CPU
# profile of the vault taken during the first round's recover run in FILE,
# and during the anchored one in FILE.anchor.
set -euo pipefail

BIN=${BIN:-bin/keyvault}
C=${BENCH_CONCURRENCY:-32}
D=${BENCH_DURATION:-10s}
W=${BENCH_WARMUP:-2s}
U=${BENCH_USERS:-2000}
API=${BENCH_API:-127.0.0.1:0}
ADMIN=${BENCH_ADMIN:-127.0.0.1:0}
R=${BENCH_ROUNDS:-3}
A=${BENCH_ANCHOR:-1}

dir=$(mktemp -d "${TMPDIR:-/tmp}/keyvault-bench.XXXXXX")
pid=
cleanup() {
	if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
	if [ "${BENCH_KEEP:-}" = 1 ]; then echo "kept $dir"; else rm -rf "$dir"; fi
}
trap cleanup EXIT

# wait_ready waits for the vault to log "keyvault serving", reads the
# addresses it bound into api and admin, then waits for /readyz.
wait_ready() {
	api= admin=
	for _ in $(seq 200); do
		if [ -z "$admin" ]; then
			line=$(grep -m1 '"msg":"keyvault serving"' "$dir/log" || true)
			api=$(printf '%s' "$line" | sed -n 's/.*"api":"\([^"]*\)".*/\1/p')
			admin=$(printf '%s' "$line" | sed -n 's/.*"admin":"\([^"]*\)".*/\1/p')
		fi
		if [ -n "$admin" ] && curl -fsS --max-time 2 "http://$admin/readyz" >/dev/null 2>&1; then return 0; fi
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

results=$dir/raw.jsonl
run() { "$BIN" bench --json --concurrency "$C" --duration "$D" --warmup "$W" "$@" | tee -a "$results" >/dev/null; }

echo "== raw HSM ceiling (concurrency $C, $D each)"
run --hsm --config "$dir/keyvault.yaml" --op recover
run --hsm --config "$dir/keyvault.yaml" --op enroll

# serve_runs NAME ANCHOR STORE: serve with rollback anchoring ANCHOR
# (true|false) on STORE, and run recover and enroll at full load, then
# recover at the half rate, into $dir/NAME.jsonl.
serve_runs() {
	sed -i -e "s|^  rollback_anchor: .*|  rollback_anchor: $2|" -e 's|^  path: .*|  path: '"$3"'|' "$dir/keyvault.yaml"
	"$BIN" serve --config "$dir/keyvault.yaml" >"$dir/log" 2>&1 &
	pid=$!
	wait_ready
	if [ -n "${BENCH_PROFILE:-}" ] && [ "$round" = 1 ]; then
		(sleep 4; curl -fsS -o "$BENCH_PROFILE$([ "$2" = true ] && echo .anchor)" "http://$admin/debug/pprof/profile?seconds=10") &
	fi
	results=$dir/$1.jsonl
	run --url "http://$api" --token-file "$dir/token" --pid "$pid" --users "$U" --op recover
	run --url "http://$api" --token-file "$dir/token" --pid "$pid" --users "$U" --op enroll
	if [ -z "$half" ]; then
		half=$(awk -F'"succeeded_per_second":' '/"op":"recover"/ { split($2, a, ","); printf "%d", a[1] / 2 }' "$results")
	fi
	# Every half-rate run offers the same load, so that the latencies
	# compare.
	run --url "http://$api" --token-file "$dir/token" --pid "$pid" --users "$U" --op recover --rate "$half"
	stop_vault
}

# Rounds alternate which of the two goes first, so that a machine getting
# faster or slower during the run does not favour either.
half=
for round in $(seq "$R"); do
	echo "== round $round of $R over HTTP ($U users): rollback anchoring off, on a store of its own$([ "$A" != 0 ] && echo ", and on, on the store keyvault dev made")"
	if [ "$A" = 0 ] || [ $((round % 2)) = 1 ]; then
		serve_runs "off-$round" false "$dir/unanchored.db"
		[ "$A" = 0 ] || serve_runs "on-$round" true "$dir/keyvault.db"
	else
		serve_runs "on-$round" true "$dir/keyvault.db"
		serve_runs "off-$round" false "$dir/unanchored.db"
	fi
done

echo
# The raw runs come first, then each round's run without anchoring before
# its run with, so each line finds its ceiling and its baseline.
files="$dir/raw.jsonl"
for round in $(seq "$R"); do
	files="$files $dir/off-$round.jsonl"
	[ "$A" = 0 ] || files="$files $dir/on-$round.jsonl"
done
awk '
function field(name,    s) {
	if (!index($0, "\"" name "\":")) return ""
	s = $0; sub(".*\"" name "\":", "", s); sub("[,}].*", "", s); gsub("\"", "", s); return s
}
# median of the n values in v[1..n] (n is small: an insertion sort)
function median(v, n,    i, j, x) {
	for (i = 2; i <= n; i++) { x = v[i]; for (j = i - 1; j > 0 && v[j] > x; j--) v[j + 1] = v[j]; v[j + 1] = x }
	return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
}
# med is the median of the values of column c of every run of key k, or
# "" when a run did not measure it.
function med(k, c,    i, v) {
	for (i = 1; i <= runs[k]; i++) { if (val[k, c, i] == "") return ""; v[i] = val[k, c, i] }
	return median(v, runs[k])
}
BEGIN {
	printf "%-5s %-11s %-8s %-9s %9s %6s %6s %7s %7s %7s %7s %9s %7s %10s\n", "round", "path", "op", "load", "ok/s", "ratio", "vs off",
		"p50 ms", "p90 ms", "p99 ms", "max ms", "cpu us/op", "x raw", "gen us/req"
}
{
	op = field("op"); rps = field("succeeded_per_second"); rate = field("rate")
	cpu = field("cpu_us_per_op"); gen = field("loadgen_cpu_us_per_request")
	load = (rate == "" ? "max" : rate "/s")
	n = split(FILENAME, parts, "/"); name = parts[n]; sub(/\.jsonl$/, "", name)
	round = name; sub(/^[a-z]+-?/, "", round); if (round == "") round = "-"
	path = (name ~ /^on-/ ? "http+anchor" : "http"); ratio = "-"; off = "-"; factor = "-"
	if (op ~ /^hsm-/) { path = "raw"; op = substr(op, 5); raw[op] = rps; rawCPU[op] = cpu }
	else {
		if (raw[op] > 0) ratio = sprintf("%.2f", rps / raw[op])
		if (cpu != "" && rawCPU[op] > 0) factor = sprintf("%.2f", cpu / rawCPU[op])
	}
	if (path == "http") { plain[op, load] = rps; plainP50[op, load] = field("p50_ms"); plainP99[op, load] = field("p99_ms") }
	else if (path == "http+anchor" && plain[op, load] > 0) {
		off = sprintf("%.2f", rps / plain[op, load])
		k = op SUBSEP load
		if (!(k in cnt)) order[++nkeys] = k
		keys[k] = op " " load; cnt[k]++
		vsoff[k, cnt[k]] = rps / plain[op, load]
		dp50[k, cnt[k]] = field("p50_ms") - plainP50[op, load]
		dp99[k, cnt[k]] = field("p99_ms") - plainP99[op, load]
	}
	# Each path, operation and load, for the medians over the rounds.
	k = path SUBSEP op SUBSEP load
	if (!(k in runs)) { korder[++nk] = k; kpath[k] = path; kop[k] = op; kload[k] = load }
	i = ++runs[k]
	val[k, "rps", i] = rps; val[k, "p50", i] = field("p50_ms"); val[k, "p99", i] = field("p99_ms")
	val[k, "ratio", i] = (ratio == "-" ? "" : ratio); val[k, "cpu", i] = cpu
	val[k, "factor", i] = (factor == "-" ? "" : factor); val[k, "gen", i] = gen
	printf "%-5s %-11s %-8s %-9s %9.0f %6s %6s %7s %7s %7s %7s %9s %7s %10s\n", round, path, op, load, rps, ratio, off,
		field("p50_ms"), field("p90_ms"), field("p99_ms"), field("max_ms"), (cpu == "" ? "-" : sprintf("%.0f", cpu)), factor,
		(gen == "" ? "-" : sprintf("%.0f", gen))
}
END {
	printf "\nmedians over the rounds (raw: its one run); x raw is the vault'"'"'s overhead factor, its CPU per operation over the raw ceiling'"'"'s:\n"
	printf "  %-11s %-8s %-9s %9s %6s %7s %7s %9s %7s %10s\n", "path", "op", "load", "ok/s", "ratio", "p50 ms", "p99 ms", "cpu us/op", "x raw", "gen us/req"
	for (j = 1; j <= nk; j++) {
		k = korder[j]; r = med(k, "ratio"); cc = med(k, "cpu"); f = med(k, "factor"); g = med(k, "gen")
		printf "  %-11s %-8s %-9s %9.0f %6s %7.2f %7.2f %9s %7s %10s\n", kpath[k], kop[k], kload[k], med(k, "rps"),
			(r == "" ? "-" : sprintf("%.2f", r)), med(k, "p50"), med(k, "p99"), (cc == "" ? "-" : sprintf("%.0f", cc)),
			(f == "" ? "-" : sprintf("%.2f", f)), (g == "" ? "-" : sprintf("%.0f", g))
	}
	for (j = 1; j <= nkeys; j++) {
		k = order[j]
		if (cnt[k] == 1) break
		if (!printed++) printf "\nanchored against off, median of %d rounds (each round its own pair):\n", cnt[k]
		for (i = 1; i <= cnt[k]; i++) { a[i] = vsoff[k, i]; b[i] = dp50[k, i]; c[i] = dp99[k, i] }
		printf "  %-18s ok/s %.2f, p50 %+.1f ms, p99 %+.1f ms\n", keys[k], median(a, cnt[k]), median(b, cnt[k]), median(c, cnt[k])
	}
}' $files
results=$files
if cat $results | grep -v '"errors":{}' >/dev/null; then
	echo
	echo "errors:"
	cat $results | grep -v '"errors":{}' | while read -r line; do
		echo "$line" | sed 's/.*"op":"\([^"]*\)".*"errors":\({[^}]*}\).*/  \1 \2/'
		# first_errors, without the cost fields that follow it.
		echo "$line" | sed -n '/"first_errors":/{
			s/.*"first_errors":\(.*\)}$/\1/
			s/,"\(cpu_us_per_op\|cpu_cores\|loadgen_cpu_us_per_request\|loadgen_cpu_cores\)":.*$//
			s/^/    the first of each: /p
		}'
	done
	# Shedding (503 unavailable) is the vault protecting itself under load;
	# any other error is a broken vault or bench.
	if cat $results | grep -v '"errors":{}' | sed 's/.*"errors":{\([^}]*\)}.*/\1/' | tr ',' '\n' | grep -v '^"unavailable":' >/dev/null; then
		echo "errors other than shedding: failing" >&2
		exit 1
	fi
fi
