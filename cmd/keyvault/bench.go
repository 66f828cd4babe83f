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
	mrand "math/rand/v2"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/internal/loadgen"
	"github.com/keyvault/keyvault/vault"
)

const benchHelp = `bench --hsm --config FILE [--op recover|enroll] [flags]
       keyvault bench --url URL --token-file FILE [--op recover|enroll|wrong|mixed] [flags]

The first form measures the raw ceiling: the HSM operations one recover (or
one enroll) needs, straight through the HSM pool of FILE, with no HTTP and
no store. Run it while no vault serves the same SoftHSM token.

The second loads a running vault over HTTP. It first enrolls --users users
(outside the measured window), gives each worker its own share of them, then:
  recover  recover with the right PIN; a wrong secret back is an error
  enroll   replace the backup with a new secret
  wrong    a wrong PIN, expected to answer 403; before a user's 5th wrong
           guess in a row, an untimed right recover resets its counter
  mixed    per request: 80% recover, 10% wrong, 10% enroll

--rate R sends R requests per second in all (open loop: latency counts from
each request's scheduled start); without it every worker sends its next
request as soon as the last one is answered.`

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
}

func cmdBench(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("bench", stderr, benchHelp)
	var f benchFlags
	fs.BoolVar(&f.hsm, "hsm", false, "measure the raw HSM ceiling through the pool of --config")
	fs.StringVar(&f.config, "config", "", "the vault's YAML config `file` (with --hsm)")
	fs.StringVar(&f.url, "url", "", "the vault's API base `URL`, such as http://127.0.0.1:8080")
	fs.StringVar(&f.tokenFile, "token-file", "", "`file` holding the bearer token")
	fs.StringVar(&f.caFile, "ca-file", "", "PEM `file` of the CA the vault's TLS certificate chains to (default: system roots)")
	fs.StringVar(&f.op, "op", "recover", "the `operation`: recover, enroll, wrong or mixed (--hsm: recover or enroll)")
	fs.IntVar(&f.concurrency, "concurrency", 32, "concurrent `workers`")
	fs.DurationVar(&f.duration, "duration", 10*time.Second, "the measured `window`")
	fs.DurationVar(&f.warmup, "warmup", 2*time.Second, "unmeasured load before the window (connections, sessions, caches)")
	fs.Float64Var(&f.rate, "rate", 0, "requests per `second` in all (open loop); 0: as fast as answers come")
	fs.IntVar(&f.users, "users", 1000, "`number` of users to enroll and spread the load over (at least --concurrency)")
	fs.StringVar(&f.userPrefix, "user-prefix", "bench-", "`prefix` of the enrolled users' IDs (several bench processes on one store need one each)")
	fs.BoolVar(&f.json, "json", false, "print one JSON object instead of a table")
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

	o := loadgen.Options{Name: w.name(), Concurrency: f.concurrency, Rate: f.rate, Before: w.before}
	if f.warmup > 0 {
		wo := o
		wo.Duration = f.warmup
		if _, err := loadgen.Run(ctx, wo, w.op); err != nil {
			return fmt.Errorf("warm-up: %w", err)
		}
	}
	o.Duration = f.duration
	res, err := loadgen.Run(ctx, o, w.op)
	if err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("interrupted: %w", err)
	}
	if f.json {
		enc := json.NewEncoder(stdout)
		return enc.Encode(res)
	}
	return loadgen.WriteTable(stdout, res)
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
	pool, err := openPool(cfg, prometheus.NewRegistry(), log)
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
	secret []byte
	wrongs int // consecutive wrong guesses counted
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

func enroll(ctx context.Context, c *client.Client, u *benchUser) error {
	rand.Read(u.secret)
	_, _, err := c.Enroll(ctx, u.id, u.secret, u.pin, client.EnrollOptions{})
	if err == nil {
		u.wrongs = 0
	}
	return benchError(err, "")
}

func (w *httpWorkload) recover(ctx context.Context, u *benchUser) error {
	secret, _, err := w.c.Recover(ctx, u.id, u.pin)
	if err != nil {
		return benchError(err, "")
	}
	u.wrongs = 0
	if subtle.ConstantTimeCompare(secret, u.secret) != 1 {
		return benchError(nil, "wrong_secret")
	}
	return nil
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
	code string
	err  error
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
