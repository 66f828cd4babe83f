package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// benchJSON is the result object of keyvault bench --json.
type benchJSON struct {
	Op                 string           `json:"op"`
	Concurrency        int              `json:"concurrency"`
	DurationS          float64          `json:"duration_s"`
	Requests           int64            `json:"requests"`
	PerSecond          float64          `json:"requests_per_second"`
	Succeeded          int64            `json:"succeeded"`
	SucceededPerSecond float64          `json:"succeeded_per_second"`
	P50                *float64         `json:"p50_ms"`
	P90                *float64         `json:"p90_ms"`
	P99                *float64         `json:"p99_ms"`
	Max                *float64         `json:"max_ms"`
	Errors             map[string]int64 `json:"errors"`
	CPUPerOp           float64          `json:"cpu_us_per_op"`
	LoadgenCPU         float64          `json:"loadgen_cpu_us_per_request"`
}

func runBench(t *testing.T, args ...string) benchJSON {
	t.Helper()
	code, out := runCLI(t, append([]string{"bench", "--json", "--duration", "1s", "--warmup", "0s"}, args...)...)
	if code != 0 {
		t.Fatalf("bench %v: exit %d:\n%s", args, code, out)
	}
	// stderr (progress) and stdout (the object) come back together.
	line := out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:]
	var r benchJSON
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		t.Fatalf("bench %v: output is not one JSON object: %v\n%s", args, err, out)
	}
	if r.Requests == 0 || r.PerSecond <= 0 || r.P50 == nil || r.P90 == nil || r.P99 == nil || r.Max == nil ||
		*r.P50 > *r.P90 || *r.P90 > *r.P99 || *r.P99 > *r.Max || r.Errors == nil {
		t.Fatalf("bench %v: %+v", args, r)
	}
	return r
}

// keyvault bench against the real binary: each HTTP workload gets the
// answers it expects (a wrong PIN is a 403, a recovered secret is the
// enrolled one), and the raw HSM ceiling runs on the vault's own config.
func TestBench(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	v := startDev(t, dir)
	token := filepath.Join(dir, "token")
	for _, op := range []string{"recover", "enroll", "wrong", "mixed"} {
		r := runBench(t, "--url", v.API, "--token-file", token, "--op", op, "--concurrency", "4", "--users", "40")
		if r.Op != op || r.Concurrency != 4 || len(r.Errors) != 0 || r.Succeeded != r.Requests {
			t.Errorf("bench --op %s: %+v", op, r)
		}
		if r.CPUPerOp != 0 || r.LoadgenCPU <= 0 {
			t.Errorf("bench --op %s without --pid or --admin-url: the vault's CPU per operation %v, the bench's per request %v", op, r.CPUPerOp, r.LoadgenCPU)
		}
	}
	// The vault's CPU per operation, from /proc or from its admin
	// listener's process_cpu_seconds_total.
	for _, how := range [][]string{{"--pid", fmt.Sprint(v.Pid())}, {"--admin-url", v.Admin}} {
		r := runBench(t, append([]string{"--url", v.API, "--token-file", token, "--concurrency", "4", "--users", "40"}, how...)...)
		if r.CPUPerOp <= 0 || r.LoadgenCPU <= 0 {
			t.Errorf("bench %s: the vault's CPU per operation %v, the bench's per request %v", how[0], r.CPUPerOp, r.LoadgenCPU)
		}
	}
	// An open-loop run at a fixed rate sends about that many requests.
	if r := runBench(t, "--url", v.API, "--token-file", token, "--concurrency", "4", "--users", "40", "--rate", "100"); r.Requests < 90 || r.Requests > 110 {
		t.Errorf("bench --rate 100 for 1s sent %d requests", r.Requests)
	}
	v.Stop()
	// The raw ceiling opens the token itself: the vault must be stopped.
	for _, op := range []string{"recover", "enroll"} {
		if r := runBench(t, "--hsm", "--config", filepath.Join(dir, "keyvault.yaml"), "--op", op, "--concurrency", "4"); r.Op != "hsm-"+op || len(r.Errors) != 0 ||
			r.CPUPerOp <= 0 || r.LoadgenCPU != 0 {
			t.Errorf("bench --hsm --op %s: %+v", op, r)
		}
	}
	for _, args := range [][]string{
		{"bench"},
		{"bench", "--url", v.API},
		{"bench", "--url", v.API, "--token-file", token, "--op", "bogus"},
		{"bench", "--url", v.API, "--token-file", token, "--users", "2", "--concurrency", "4"},
		{"bench", "--hsm", "--url", v.API},
		{"bench", "--hsm", "--config", filepath.Join(dir, "keyvault.yaml"), "--op", "wrong"},
		{"bench", "--url", v.API, "--token-file", token, "--duration", "0s"},
		{"bench", "--hsm", "--config", filepath.Join(dir, "keyvault.yaml"), "--pid", "1"},
		{"bench", "--url", v.API, "--token-file", token, "--pid", "1", "--admin-url", v.Admin},
		{"bench", "--url", v.API, "--token-file", token, "--pid", "999999999"},
	} {
		if code, out := runCLI(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2:\n%s", args, code, out)
		}
	}
}

// A bench against a vault with the default rate limits is refused most of
// the time: it must say so and exit 1, with succeeded/s beside req/s and a
// hint naming the limits that bit.
func TestBenchRefusedByLimits(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	v := startDevLimited(t, dir)
	token := filepath.Join(dir, "token")
	code, out := runCLI(t, "bench", "--url", v.API, "--token-file", token, "--duration", "2s", "--warmup", "0s",
		"--concurrency", "4", "--users", "40")
	if code != 1 {
		t.Errorf("bench against the default limits: exit %d, want 1:\n%s", code, out)
	}
	for _, want := range []string{
		"req/s  succeeded/s", "failed other than by shedding, above --max-errors 1%", "rate_limited (429) by: ",
		"ratelimit.guesses_per_user allows each user a few guesses a minute: for a bench, raise it in the vault's config, or spread the load over more users with --users N",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("bench against the default limits: the output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "kvdev_") {
		t.Errorf("the bench printed the bearer token:\n%s", out)
	}
	// --json: the same verdict, and succeeded_per_second below requests_per_second.
	// Four users have 20 guesses between them: refused however slow the
	// machine.
	code, out = runCLI(t, "bench", "--json", "--url", v.API, "--token-file", token, "--duration", "1s", "--warmup", "0s",
		"--concurrency", "4", "--users", "4", "--user-prefix", "json-")
	var r benchJSON
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "{") {
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("bench --json: %v\n%s", err, out)
			}
		}
	}
	if code != 1 || r.Errors["rate_limited"] == 0 || r.SucceededPerSecond >= r.PerSecond || !strings.Contains(out, "rate_limited (429) by: ") {
		t.Errorf("bench --json against the default limits: exit %d, %+v:\n%s", code, r, out)
	}
	// A threshold that allows the refusals lets the run pass.
	if code, out := runCLI(t, "bench", "--url", v.API, "--token-file", token, "--duration", "1s", "--warmup", "0s",
		"--concurrency", "4", "--users", "40", "--user-prefix", "lenient-", "--max-errors", "100"); code != 0 {
		t.Errorf("bench --max-errors 100: exit %d, want 0:\n%s", code, out)
	}
	v.Stop()
}

// Under --op mixed with the client's request limit biting, refused
// enrolls must not make the bench expect a secret the vault never took:
// every recovered secret is the one the vault holds, so no wrong_secret.
func TestBenchMixedRefusedEnrolls(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop() // limits off
	setRateLimits(t, filepath.Join(dir, "keyvault.yaml"), `ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 200, burst: 20}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 0s
`)
	v := startDevLimited(t, dir)
	code, out := runCLI(t, "bench", "--json", "--url", v.API, "--token-file", filepath.Join(dir, "token"), "--op", "mixed",
		"--duration", "3s", "--warmup", "0s", "--concurrency", "4", "--users", "40", "--max-errors", "100")
	line := out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:]
	var r benchJSON
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		t.Fatalf("bench --op mixed: exit %d, no JSON object: %v\n%s", code, err, out)
	}
	if code != 0 || r.Errors["rate_limited"] == 0 || r.Succeeded == 0 {
		t.Errorf("bench --op mixed at 200/s: exit %d, %+v; want 0, with both refusals and successes:\n%s", code, r, out)
	}
	for c, n := range r.Errors {
		if c != "rate_limited" {
			t.Errorf("bench --op mixed: %s=%d, want rate_limited alone:\n%s", c, n, out)
		}
	}
	v.Stop()
}

// On a terminal the bench prints a progress line a second on stderr; into
// a pipe, none. The terminal is util-linux's script(1).
func TestBenchProgress(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	script, err := exec.LookPath("script")
	if err != nil {
		t.Fatalf("script(1) from util-linux is needed for a terminal: %v", err)
	}
	dir := t.TempDir()
	v := startDev(t, dir)
	args := []string{keyvaultBin, "bench", "--url", v.API, "--token-file", filepath.Join(dir, "token"),
		"--duration", "2500ms", "--warmup", "1100ms", "--concurrency", "2", "--users", "10"}
	cmd := exec.Command(script, "-qec", strings.Join(args, " "), "/dev/null")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("bench on a terminal: %v\n%s", err, out)
	}
	progress := regexp.MustCompile(`keyvault bench: (warm-up|recover) ([0-9]+)s of [0-9.m]+s: [0-9]+ req/s, [0-9]+ succeeded/s; [0-9]+ requests, 0 failed so far`)
	var seen []string
	for _, m := range progress.FindAllStringSubmatch(string(out), -1) {
		seen = append(seen, m[1]+" "+m[2])
	}
	if want := []string{"warm-up 1", "recover 1", "recover 2"}; !slices.Equal(seen, want) {
		t.Errorf("progress lines %q, want %q:\n%s", seen, want, out)
	}
	if _, out := runCLI(t, args[1:]...); strings.Contains(out, "so far") {
		t.Errorf("bench into a pipe printed progress:\n%s", out)
	}
	v.Stop()
}

// bench --help names each flag's value by what it is.
func TestBenchHelp(t *testing.T) {
	t.Parallel()
	code, out := runCLI(t, "bench", "--help")
	if code != 0 {
		t.Fatalf("bench --help: exit %d:\n%s", code, out)
	}
	for _, want := range []string{"-rate R\n", "-concurrency N\n", "-users N\n", "-duration duration\n", "-warmup duration\n",
		"-max-errors percent\n", "-url URL\n", "-token-file file\n", "succeeded/s", "-pid ID\n", "-admin-url URL\n", "cpu_us/op", "gen_us/req"} {
		if !strings.Contains(out, want) {
			t.Errorf("bench --help lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "-rate second") {
		t.Errorf("bench --help still says -rate second:\n%s", out)
	}
}

// benchScriptRecover is the summary line of a round's HTTP recover run.
var benchScriptRecover = regexp.MustCompile(`(?m)^1\s+http\s+recover\s+max\s+[1-9][0-9]*\s`)

// make bench's script binds ports the kernel picks: two runs at once on
// one machine (or beside another vault) do not collide.
func TestBenchScriptFreePorts(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			cmd := exec.Command(filepath.Join(moduleRoot, "scripts", "bench.sh"))
			cmd.Dir = moduleRoot
			cmd.Env = append(os.Environ(), "BIN="+keyvaultBin, "TMPDIR="+t.TempDir(), "BENCH_ROUNDS=1", "BENCH_ANCHOR=0",
				"BENCH_DURATION=1s", "BENCH_WARMUP=0s", "BENCH_USERS=40", "BENCH_CONCURRENCY=4")
			out, err := cmd.CombinedOutput()
			if err == nil && !benchScriptRecover.Match(out) {
				err = errors.New("no HTTP recover line with successes in the table")
			}
			if err != nil {
				err = fmt.Errorf("%w:\n%s", err, out)
			}
			errs <- err
		}()
	}
	for range 2 {
		if err := <-errs; err != nil {
			t.Errorf("scripts/bench.sh, two at once: %v", err)
		}
	}
}
