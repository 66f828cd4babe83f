package main

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/internal/loadgen"
	"github.com/keyvault/keyvault/internal/server"
	"github.com/keyvault/keyvault/vault"
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
successes alone. The bench exits 1, naming the limit that bit, when nothing
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
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var w benchWorkload
	var err error
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
	defer w.close()

	var limits *limiterTally
	op := func(ctx context.Context, i int) error {
		err := w.op(ctx, i)
		limits.add(err)
		return err
	}
	o := loadgen.Options{Name: w.name(), Concurrency: f.concurrency, Rate: f.rate, Before: w.before}
	if f.warmup > 0 {
		wo := o
		wo.Duration = f.warmup
		if isTerminal(stderr) {
			wo.Progress = progressLine(stderr, "warm-up", f.warmup)
		}
		limits = &limiterTally{}
		if _, err := loadgen.Run(ctx, wo, op); err != nil {
			return fmt.Errorf("warm-up: %w%s", err, setupHint(err))
		}
	}
	o.Duration = f.duration
	if isTerminal(stderr) {
		o.Progress = progressLine(stderr, w.name(), f.duration)
	}
	limits = &limiterTally{}
	res, err := loadgen.Run(ctx, o, op)
	if err != nil {
		return fmt.Errorf("%w%s", err, setupHint(err))
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("interrupted: %w", err)
	}
	if f.json {
		err = json.NewEncoder(stdout).Encode(res)
	} else {
		err = loadgen.WriteTable(stdout, res)
	}
	if err != nil {
		return err
	}
	return benchVerdict(res, f.maxErrors, limits.counts())
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

// benchWorkload is one kind of load: its operation, an optional untimed
// step before each one, and what to release afterwards.
type benchWorkload interface {
	name() string
	op(ctx context.Context, w int) error
	before(ctx context.Context, w int) error
	close()
}

// hsmWorkload performs exactly the HSM calls of one recover (the PIN
// HMAC, then the GCM open of the outer layer) or of one enroll (the HMAC,
// then a GCM seal), with inputs the size the vault sends.
type hsmWorkload struct {
	kind    string
	pool    vault.HSM
	release func()
	pin     vault.KeyID
	wrap    vault.KeyID
	msg     []byte // a PIN MAC input: label, namespace, user, generation, salt, PIN
	aad     []byte
	pt      []byte // an inner layer: nonce, 32-byte secret, tag
	nonce   []byte
	ct      []byte
}

// hsmInputs sizes the calls as the vault makes them for a 32-byte secret
// and a 6-digit PIN (see vault/crypto.go and docs/format.md).
const (
	benchPINMACBytes = 20 + 1 + 4 + 3 + 4 + 12 + 8 + 4 + 16 + 4 + 6
	benchAADBytes    = 18 + 1 + 4 + 3 + 4 + 12 + 8 + 4 + 4
	benchInnerBytes  = 12 + 32 + 16
)

func newHSMWorkload(ctx context.Context, f benchFlags, stderr io.Writer) (benchWorkload, error) {
	if f.op != "recover" && f.op != "enroll" {
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
	w := &hsmWorkload{
		kind:    f.op,
		pool:    pool,
		release: func() { pool.Close() },
		pin:     vault.KeyID{Role: vault.RolePIN, Version: pool.KeyVersion(vault.RolePIN)},
		wrap:    vault.KeyID{Role: vault.RoleWrap, Version: pool.KeyVersion(vault.RoleWrap)},
		msg:     make([]byte, benchPINMACBytes),
		aad:     make([]byte, benchAADBytes),
		pt:      make([]byte, benchInnerBytes),
		nonce:   make([]byte, 12),
	}
	rand.Read(w.msg)
	rand.Read(w.aad)
	rand.Read(w.pt)
	rand.Read(w.nonce)
	if w.ct, err = pool.Seal(ctx, w.wrap, w.nonce, w.pt, w.aad); err != nil {
		pool.Close()
		return nil, fmt.Errorf("seal the ciphertext to open: %w", err)
	}
	return w, nil
}

func (w *hsmWorkload) name() string                      { return "hsm-" + w.kind }
func (w *hsmWorkload) before(context.Context, int) error { return nil }
func (w *hsmWorkload) close()                            { w.release() }

func (w *hsmWorkload) op(ctx context.Context, _ int) error {
	if _, err := w.pool.HMAC(ctx, w.pin, w.msg); err != nil {
		return hsmError{err}
	}
	var err error
	if w.kind == "recover" {
		_, err = w.pool.Open(ctx, w.wrap, w.nonce, w.ct, w.aad)
	} else {
		nonce := make([]byte, 12)
		rand.Read(nonce)
		_, err = w.pool.Seal(ctx, w.wrap, nonce, w.pt, w.aad)
	}
	if err != nil {
		return hsmError{err}
	}
	return nil
}

// hsmError codes a raw HSM call's error as the API would: an operation the
// pool shed (no session free within its queue timeout) is "unavailable",
// the 503 the vault answers for it, and not a failure of the bench; any
// other is "error".
type hsmError struct{ error }

func (e hsmError) Unwrap() error { return e.error }
func (e hsmError) Code() string {
	if errors.Is(e.error, vault.ErrUnavailable) {
		return "unavailable"
	}
	return ""
}

// benchUser is one enrolled user as the load generator knows it. Each
// user belongs to one worker, so its state needs no lock.
type benchUser struct {
	id     string
	pin    string
	secret []byte   // what the vault holds, as far as the answers tell
	maybe  [][]byte // secrets of enrolls whose outcome was not learnt
	wrongs int      // consecutive wrong guesses counted
}

// httpWorkload loads a running vault through the Go client, with retries
// off: the bench measures the vault's answers, not the client's patience.
type httpWorkload struct {
	kind   string
	c      *client.Client
	tr     *http.Transport
	owned  [][]*benchUser // per worker
	cursor []int          // per worker: index of the next user
	cur    []*benchUser   // per worker: the user of the operation under way
	mix    []string       // per worker: the mixed operation under way
}

// escalatingFree stays below the default escalating delay's free guesses
// (5) and below any max_attempts of 5 or more, so "wrong" never trips them.
const escalatingFree = 4

func newHTTPWorkload(ctx context.Context, f benchFlags, stderr io.Writer) (benchWorkload, error) {
	switch f.op {
	case "recover", "enroll", "wrong", "mixed":
	default:
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
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = f.concurrency * 2
	if f.caFile != "" {
		pem, err := os.ReadFile(f.caFile)
		if err != nil {
			return nil, usageError{fmt.Errorf("--ca-file: %w", err)}
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return nil, usageError{errors.New("--ca-file: no PEM certificate in it")}
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	}
	newClient := func(retries int) (*client.Client, error) {
		return client.New(f.url, strings.TrimSpace(string(raw)),
			client.WithHTTPClient(&http.Client{Transport: tr, Timeout: 30 * time.Second}),
			client.WithRetry(retries, 50*time.Millisecond), client.WithUserAgent("keyvault-bench/1"))
	}
	// Set-up may retry a shed request; the measured load never does.
	setup, err := newClient(5)
	if err != nil {
		return nil, usageError{err}
	}
	c, err := newClient(0)
	if err != nil {
		return nil, usageError{err}
	}
	w := &httpWorkload{
		kind:   f.op,
		c:      c,
		tr:     tr,
		owned:  make([][]*benchUser, f.concurrency),
		cursor: make([]int, f.concurrency),
		cur:    make([]*benchUser, f.concurrency),
		mix:    make([]string, f.concurrency),
	}
	for i := range f.users {
		u := &benchUser{id: fmt.Sprintf("%s%07d", f.userPrefix, i), pin: fmt.Sprintf("%06d", mrand.IntN(1e6)), secret: make([]byte, 32)}
		w.owned[i%f.concurrency] = append(w.owned[i%f.concurrency], u)
	}
	fmt.Fprintf(stderr, "keyvault bench: enrolling %d users at %s\n", f.users, f.url)
	if err := w.enrollAll(ctx, setup); err != nil {
		return nil, err
	}
	return w, nil
}

// enrollAll enrolls every user, each worker its own, with a fresh counter.
func (w *httpWorkload) enrollAll(ctx context.Context, c *client.Client) error {
	var wg sync.WaitGroup
	errs := make([]error, len(w.owned))
	for i, users := range w.owned {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, u := range users {
				if errs[i] = enroll(ctx, c, u); errs[i] != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("enroll the bench users: %w", err)
	}
	return nil
}

func (w *httpWorkload) name() string { return w.kind }
func (w *httpWorkload) close()       { w.tr.CloseIdleConnections() }

// before picks the worker's next user and, when the next guess could be
// its escalatingFree+1-th wrong one in a row, resets it with an untimed
// right recover.
func (w *httpWorkload) before(ctx context.Context, i int) error {
	users := w.owned[i]
	u := users[w.cursor[i]%len(users)]
	w.cursor[i]++
	w.cur[i] = u
	kind := w.kind
	if kind == "mixed" {
		switch n := mrand.IntN(10); {
		case n == 0:
			kind = "wrong"
		case n == 1:
			kind = "enroll"
		default:
			kind = "recover"
		}
		w.mix[i] = kind
	}
	if kind == "wrong" && u.wrongs >= escalatingFree {
		if err := w.recover(ctx, u); err != nil {
			return fmt.Errorf("reset %s before a wrong guess: %w", u.id, err)
		}
	}
	return nil
}

func (w *httpWorkload) op(ctx context.Context, i int) error {
	u, kind := w.cur[i], w.kind
	if kind == "mixed" {
		kind = w.mix[i]
	}
	switch kind {
	case "enroll":
		return enroll(ctx, w.c, u)
	case "wrong":
		_, _, err := w.c.Recover(ctx, u.id, wrongPIN(u.pin))
		if errors.Is(err, client.ErrWrongPIN) {
			u.wrongs++
			return nil
		}
		return benchError(err, "right_pin_accepted")
	default:
		return w.recover(ctx, u)
	}
}

// enroll replaces u's backup with a new secret. The bench expects the new
// secret only once the vault has taken it (200 or 201): a refused enroll
// (a 4xx such as 429) leaves the old one. One with no answer, or a 5xx,
// may have been written or not; the next recover tells which.
func enroll(ctx context.Context, c *client.Client, u *benchUser) error {
	next := make([]byte, 32)
	rand.Read(next)
	_, _, err := c.Enroll(ctx, u.id, next, u.pin)
	var ce *client.Error
	switch {
	case err == nil:
		u.secret, u.maybe, u.wrongs = next, nil, 0
	case errors.As(err, &ce) && ce.Status >= 400 && ce.Status < 500:
	default:
		u.maybe = append(u.maybe, next)
	}
	return benchError(err, "")
}

func (w *httpWorkload) recover(ctx context.Context, u *benchUser) error {
	secret, _, err := w.c.Recover(ctx, u.id, u.pin)
	if err != nil {
		return benchError(err, "")
	}
	u.wrongs = 0
	if subtle.ConstantTimeCompare(secret, u.secret) == 1 {
		u.maybe = nil
		return nil
	}
	for _, m := range u.maybe {
		if subtle.ConstantTimeCompare(secret, m) == 1 {
			u.secret, u.maybe = m, nil
			return nil
		}
	}
	return benchError(nil, "wrong_secret")
}

// wrongPIN is a PIN of the same length that differs from pin in its last
// digit.
func wrongPIN(pin string) string {
	last := pin[len(pin)-1]
	return pin[:len(pin)-1] + string('0'+(last-'0'+1)%10)
}

// codedError names a failed request by the vault's problem code (or the
// HTTP status, or "transport" when no answer came) for the error table.
type codedError struct {
	code    string
	err     error
	limiter string // for rate_limited: the limit that refused, if the answer says
}

func (e *codedError) Error() string {
	if e.err == nil {
		return e.code
	}
	return e.code + ": " + e.err.Error()
}
func (e *codedError) Code() string  { return e.code }
func (e *codedError) Unwrap() error { return e.err }

// benchError classifies err; with a nil err it reports the given code (an
// answer that succeeded but was wrong), or nothing.
func benchError(err error, otherwise string) error {
	if err == nil {
		if otherwise == "" {
			return nil
		}
		return &codedError{code: otherwise}
	}
	var ce *client.Error
	switch {
	case errors.As(err, &ce) && ce.Code == client.CodeRateLimited:
		return &codedError{code: ce.Code, err: err, limiter: limiterOf(ce.Detail)}
	case errors.As(err, &ce) && ce.Code != "":
		return &codedError{code: ce.Code, err: err}
	case errors.As(err, &ce) && ce.Status != 0:
		return &codedError{code: fmt.Sprintf("http_%d", ce.Status), err: err}
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return &codedError{code: "timeout", err: err}
	default:
		return &codedError{code: "transport", err: err}
	}
}

// The limits a rate_limited answer can name (ratelimit's limiter names):
// its detail says which one refused.
var benchLimiters = []string{"wrong_guesses_per_client", "guesses_per_user", "requests_per_client"}

// limiterOf reads the limiter from a rate_limited problem's detail; ""
// when it names none the bench knows.
func limiterOf(detail string) string {
	for _, l := range benchLimiters { // wrong_guesses_per_client before its suffix
		if strings.Contains(detail, "("+l+")") {
			return l
		}
	}
	if strings.Contains(detail, "wrong guesses in a row") {
		return "escalating_delay"
	}
	return ""
}

// limitHint says what to do about a limit that refused the bench's load.
func limitHint(limiter string) string {
	switch limiter {
	case "guesses_per_user":
		return "ratelimit.guesses_per_user allows each user a few guesses a minute: for a bench, raise it in the vault's config, or spread the load over more users with --users N"
	case "requests_per_client":
		return "ratelimit.requests_per_client caps the bench's client: for a bench, raise it in the vault's config, or send less with --rate R"
	case "wrong_guesses_per_client":
		return "ratelimit.wrong_guesses_per_client caps the wrong guesses of the bench's client: for a bench, raise it in the vault's config, or send fewer (--rate R, --op recover)"
	case "escalating_delay":
		return "ratelimit.escalating_delay holds back a user's wrong guesses in a row, and the bench sends up to 4 in a row: for a bench, raise its free_guesses above 4 or set its base to 0s"
	default:
		return "the vault's per-user and per-client limits apply to the bench as to any client: for a bench, raise ratelimit.* in the vault's config, or spread the load with --users N and --rate R"
	}
}

// limiterTally counts rate_limited answers by the limit that refused.
// A nil tally counts nothing.
type limiterTally struct {
	mu sync.Mutex
	m  map[string]int64
}

func (t *limiterTally) add(err error) {
	var ce *codedError
	if t == nil || !errors.As(err, &ce) || ce.code != client.CodeRateLimited {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[string]int64{}
	}
	t.m[ce.limiter]++
}

func (t *limiterTally) counts() map[string]int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.m)
}

// setupHint is the hint for a run that stopped on an error of its
// untimed steps (a reset recover before a wrong guess): "" unless a limit
// refused it.
func setupHint(err error) string {
	var ce *codedError
	if !errors.As(err, &ce) || ce.code != client.CodeRateLimited {
		return ""
	}
	return "\n  " + limitHint(ce.limiter)
}

// benchVerdict fails a run in which nothing succeeded, or in which more
// than maxErrors percent of the requests failed other than by shedding (a
// 503 unavailable: the vault protecting its HSMs under overload). The
// error says what failed and, for each refusing limit, what to change.
func benchVerdict(res loadgen.Result, maxErrors float64, limiters map[string]int64) error {
	var failed int64 // other than by shedding
	for code, n := range res.Errors {
		if code != client.CodeUnavailable {
			failed += n
		}
	}
	share := 0.0
	if res.Requests > 0 {
		share = 100 * float64(failed) / float64(res.Requests)
	}
	var head string
	switch {
	case res.Requests == 0:
		return errors.New("no request was answered in the window: lengthen --duration")
	case res.Succeeded == 0 && failed == 0:
		head = fmt.Sprintf("nothing succeeded: every request was shed (%d unavailable, 503): the HSMs are saturated or down; lower --concurrency or --rate, or check /readyz", res.Requests)
	case res.Succeeded == 0 && res.Errors[client.CodeRateLimited] == res.Requests:
		head = fmt.Sprintf("nothing succeeded: every request was refused rate_limited (%d)", res.Requests)
	case res.Succeeded == 0:
		head = fmt.Sprintf("nothing succeeded: %d requests, errors %s", res.Requests, errorCounts(res.Errors))
	case share > maxErrors:
		head = fmt.Sprintf("%d of %d requests (%.1f%%) failed other than by shedding, above --max-errors %g%%: %s",
			failed, res.Requests, share, maxErrors, errorCounts(res.Errors))
	default:
		return nil
	}
	lines := []string{head}
	if n := res.Errors[client.CodeRateLimited]; n > 0 {
		names := slices.Sorted(maps.Keys(limiters))
		var by []string
		for _, l := range names {
			name := l
			if name == "" {
				name = "a limit the answer did not name"
			}
			by = append(by, fmt.Sprintf("%s %d", name, limiters[l]))
		}
		lines = append(lines, fmt.Sprintf("rate_limited (429) by: %s", strings.Join(by, ", ")))
		for _, l := range names {
			lines = append(lines, limitHint(l))
		}
	}
	for _, code := range slices.Sorted(maps.Keys(res.Errors)) {
		if code == client.CodeRateLimited || code == client.CodeUnavailable {
			continue
		}
		if text := res.FirstErrors[code]; text != "" {
			lines = append(lines, fmt.Sprintf("the first %s: %s", code, text))
		}
	}
	return errors.New(strings.Join(lines, "\n  "))
}

// errorCounts lists error counts by code, sorted: "a=1, b=2".
func errorCounts(errs map[string]int64) string {
	var parts []string
	for _, c := range slices.Sorted(maps.Keys(errs)) {
		parts = append(parts, fmt.Sprintf("%s=%d", c, errs[c]))
	}
	return strings.Join(parts, ", ")
}
