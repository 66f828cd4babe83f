package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/internal/adminconn"
	"github.com/keyvault/keyvault/internal/bench"
	"github.com/keyvault/keyvault/internal/loadgen"
	"github.com/keyvault/keyvault/internal/server"
)

const benchHelp = `With --hsm (--op recover or enroll) it measures the raw ceiling: the HSM
operations one recover (or one enroll) needs, straight through the HSM pool
of FILE, with no HTTP and no store. Run it while no vault serves the same SoftHSM token.

With --url it loads a running vault over HTTP. It first enrolls --users users
(outside the measured window), gives each worker its own share of them, then:
  recover  recover with the right PIN; a wrong secret back is an error
  enroll   replace the backup with a new secret
  wrong    a wrong PIN, expected to answer 403; before a user's 5th wrong
           guess in a row, an untimed right recover resets its counter
  mixed    per request: 80% recover, 10% wrong, 10% enroll

--rate R sends R requests per second in all (open loop: latency counts from
each request's scheduled start); without it every worker sends its next
request as soon as the last one is answered.

The table (or --json) gives req/s, every answer, and succeeded/s, the
successes alone. It also gives what the work cost in CPU over the measured
window: cpu_us/op, the CPU time per successful operation of the process
doing it (with --hsm this process, where the HSM calls run; with --url the
vault, given --pid PID when it runs on this machine, read from
/proc/PID/stat, or --admin-url URL, read from process_cpu_seconds_total on
its admin listener's /metrics, under mTLS with the client certificate in
KEYVAULT_ADMIN_CERT and KEYVAULT_ADMIN_KEY), and gen_us/req, the bench's own CPU per
request (with --url). Divide a vault's cpu_us/op by the raw ceiling's for
the vault's overhead factor. The bench exits 1, naming the limit that bit, when nothing
succeeded, or when more than --max-errors percent of the requests failed
other than by shedding (a 503 unavailable is the vault protecting its HSMs
and counts as shedding; a 429 rate_limited is a refusal and does not). On a
terminal it prints a progress line a second on stderr.`

type benchFlags struct {
	hsm         bool
	config      string
	url         string
	tokenFile   string
	caFile      string
	op          string
	concurrency int
	duration    time.Duration
	warmup      time.Duration
	rate        float64
	users       int
	userPrefix  string
	json        bool
	maxErrors   float64 // percent
	pid         int
	adminURL    string
}

func cmdBench(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench", stderr)
	var f benchFlags
	fs.BoolVar(&f.hsm, "hsm", false, "measure the raw HSM ceiling through the pool of --config")
	fs.StringVar(&f.config, "config", "", "the vault's YAML config `file` (with --hsm)")
	fs.StringVar(&f.url, "url", "", "the vault's API base `URL`, such as http://127.0.0.1:8080")
	fs.StringVar(&f.tokenFile, "token-file", "", "`file` holding the bearer token")
	fs.StringVar(&f.caFile, "ca-file", "", "PEM `file` of the CA the vault's TLS certificate chains to (default: system roots)")
	fs.StringVar(&f.op, "op", "recover", "the `operation`: recover, enroll, wrong or mixed (--hsm: recover or enroll)")
	fs.IntVar(&f.concurrency, "concurrency", 32, "`N` concurrent workers")
	fs.DurationVar(&f.duration, "duration", 10*time.Second, "the measured window")
	fs.DurationVar(&f.warmup, "warmup", 2*time.Second, "unmeasured load before the window (connections, sessions, caches)")
	fs.Float64Var(&f.rate, "rate", 0, "`R` requests per second in all (open loop); 0: as fast as answers come")
	fs.IntVar(&f.users, "users", 1000, "`N` users to enroll and spread the load over (at least --concurrency)")
	fs.StringVar(&f.userPrefix, "user-prefix", "bench-", "`prefix` of the enrolled users' IDs (several bench processes on one store need one each)")
	fs.BoolVar(&f.json, "json", false, "print one JSON object instead of a table")
	fs.IntVar(&f.pid, "pid", 0, "with --url: the vault's process `ID` on this machine, whose CPU per operation to report (from /proc)")
	fs.StringVar(&f.adminURL, "admin-url", "", "with --url: the vault's admin listener base `URL` (or its /metrics URL), whose process_cpu_seconds_total gives its CPU per operation")
	fs.Float64Var(&f.maxErrors, "max-errors", 1, "the `percent` of requests that may fail other than by shedding (503) before the bench exits 1")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	switch {
	case f.concurrency < 1:
		return usageError{errors.New("--concurrency must be at least 1")}
	case f.duration <= 0:
		return usageError{errors.New("--duration must be positive")}
	case f.warmup < 0:
		return usageError{errors.New("--warmup must not be negative")}
	case f.rate < 0:
		return usageError{errors.New("--rate must not be negative")}
	case f.maxErrors < 0 || f.maxErrors > 100:
		return usageError{errors.New("--max-errors must be a percentage from 0 to 100")}
	case f.pid < 0:
		return usageError{errors.New("--pid must be a process ID")}
	case f.pid != 0 && f.adminURL != "":
		return usageError{errors.New("give --pid or --admin-url, not both: each reads the vault's CPU")}
	case f.hsm && (f.pid != 0 || f.adminURL != ""):
		return usageError{errors.New("--pid and --admin-url go with --url: with --hsm the HSM calls run in this process, whose CPU the bench reports")}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cpu, err := cpuReader(f)
	if err != nil {
		return err
	}
	var w bench.Workload
	switch {
	case f.hsm && f.url != "":
		return usageError{errors.New("give --hsm or --url, not both")}
	case f.hsm:
		w, err = newHSMWorkload(ctx, f, stderr)
	case f.url != "":
		w, err = newHTTPWorkload(ctx, f, stderr)
	default:
		return usageError{errors.New("give --hsm --config FILE, or --url URL --token-file FILE")}
	}
	if err != nil {
		return err
	}
	defer w.Close()

	o := bench.Options{Concurrency: f.concurrency, Rate: f.rate, Warmup: f.warmup, Duration: f.duration, CPU: cpu}
	if isTerminal(stderr) {
		o.Progress = func(phase string, total time.Duration) func(loadgen.Progress) {
			return progressLine(stderr, phase, total)
		}
	}
	res, limiters, err := bench.Run(ctx, w, o)
	if err != nil {
		return err
	}
	if f.hsm {
		// The HSM calls run in this process: its CPU is theirs, given as
		// cpu_us_per_op, not a load generator's.
		res.LoadgenCPUPerRequest, res.LoadgenCPUCores = 0, 0
	}
	if f.json {
		err = json.NewEncoder(stdout).Encode(res)
	} else {
		err = loadgen.WriteTable(stdout, res)
	}
	if err != nil {
		return err
	}
	return bench.Verdict(res, f.maxErrors, limiters)
}

// cpuReader reads the CPU time of the process doing the work: this one
// for --hsm, the vault by --pid or --admin-url, or none.
func cpuReader(f benchFlags) (bench.CPUReader, error) {
	switch {
	case f.hsm:
		return func() (time.Duration, error) { return loadgen.SelfCPU(), nil }, nil
	case f.pid != 0:
		r, err := bench.ProcCPU("/proc", f.pid)
		if err != nil {
			return nil, usageError{fmt.Errorf("--pid %d: %w", f.pid, err)}
		}
		return r, nil
	case f.adminURL != "":
		roots, err := readCAFile(f.caFile)
		if err != nil {
			return nil, err
		}
		certs, err := adminconn.ClientCert()
		if err != nil {
			return nil, usageError{fmt.Errorf("--admin-url: %w", err)}
		}
		tc := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, Certificates: certs}
		r, err := bench.MetricsCPU(bench.AdminMetricsURL(f.adminURL), tc)
		if err != nil {
			return nil, usageError{fmt.Errorf("--admin-url: %w", err)}
		}
		return r, nil
	}
	return nil, nil
}

// readCAFile reads the PEM certificates of --ca-file; nil without one.
func readCAFile(file string) (*x509.CertPool, error) {
	if file == "" {
		return nil, nil
	}
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, usageError{fmt.Errorf("--ca-file: %w", err)}
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, usageError{errors.New("--ca-file: no PEM certificate in it")}
	}
	return roots, nil
}

// isTerminal reports whether w is a terminal, for the progress line: a
// log file or a pipe gets the result alone.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// progressLine prints, each second, the requests and successes of the
// last second and so far.
func progressLine(w io.Writer, name string, total time.Duration) func(loadgen.Progress) {
	var last loadgen.Progress
	return func(p loadgen.Progress) {
		dt := (p.Elapsed - last.Elapsed).Seconds()
		fmt.Fprintf(w, "keyvault bench: %s %.0fs of %s: %.0f req/s, %.0f succeeded/s; %d requests, %d failed so far\n",
			name, p.Elapsed.Seconds(), total, float64(p.Requests-last.Requests)/dt, float64(p.Succeeded-last.Succeeded)/dt,
			p.Requests, p.Requests-p.Succeeded)
		last = p
	}
}

// newHSMWorkload opens the HSM pool of --config for the raw ceiling.
func newHSMWorkload(ctx context.Context, f benchFlags, stderr io.Writer) (bench.Workload, error) {
	if !slices.Contains(bench.HSMOps, f.op) {
		return nil, usageError{fmt.Errorf("--op %q: with --hsm, recover or enroll", f.op)}
	}
	if f.config == "" {
		return nil, usageError{errors.New("--hsm needs --config")}
	}
	cfg, err := loadConfig(f.config)
	if err != nil {
		return nil, err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	pool, err := server.OpenPool(cfg, prometheus.NewRegistry(), log)
	if err != nil {
		return nil, err
	}
	return bench.NewHSM(ctx, pool, f.op)
}

// newHTTPWorkload reads --token-file and --ca-file, and enrolls the
// bench's users at --url (outside the measured window).
func newHTTPWorkload(ctx context.Context, f benchFlags, stderr io.Writer) (bench.Workload, error) {
	if !slices.Contains(bench.HTTPOps, f.op) {
		return nil, usageError{fmt.Errorf("--op %q: recover, enroll, wrong or mixed", f.op)}
	}
	if f.tokenFile == "" {
		return nil, usageError{errors.New("--url needs --token-file")}
	}
	if f.users < f.concurrency {
		return nil, usageError{fmt.Errorf("--users %d: at least --concurrency (%d), so no two workers share a user", f.users, f.concurrency)}
	}
	raw, err := os.ReadFile(f.tokenFile)
	if err != nil {
		return nil, usageError{fmt.Errorf("--token-file: %w", err)}
	}
	o := bench.HTTPOptions{URL: f.url, Token: strings.TrimSpace(string(raw)), Op: f.op,
		Workers: f.concurrency, Users: f.users, UserPrefix: f.userPrefix}
	if o.RootCAs, err = readCAFile(f.caFile); err != nil {
		return nil, err
	}
	w, err := bench.NewHTTP(o)
	if err != nil {
		return nil, usageError{err}
	}
	fmt.Fprintf(stderr, "keyvault bench: enrolling %d users at %s\n", f.users, f.url)
	if err := w.EnrollAll(ctx); err != nil {
		w.Close()
		return nil, err
	}
	return w, nil
}
