package hsmpool

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keyvault/keyvault/vault"
)

// Traits of commercial HSMs, emulated over real SoftHSM tokens: every
// operation still runs on the token; the emulation adds what the vendor's
// HSM does on top (a session limit, latency, a restart, an HSM-chosen GCM
// IV).

// servingDefaults are the pool options `keyvault serve` passes with the
// config's defaults (rate_limit.hsm_queue_timeout 50ms,
// admitted_per_hsm_session 4).
func servingDefaults(reg prometheus.Registerer, log *slog.Logger) Options {
	return Options{Registerer: reg, Logger: log, QueueTimeout: 50 * time.Millisecond, AdmitPerSession: 4}
}

// unshed are servingDefaults with no queue timeout, for tests under a
// load that saturates the pool on purpose: a queue deeper than 50 ms of
// work is shed by design (TestQueueTimeoutSheds), and how deep 32 looping
// clients make it depends on the machine, not on the trait under test.
func unshed(reg prometheus.Registerer, log *slog.Logger) Options {
	o := servingDefaults(reg, log)
	o.QueueTimeout = 0
	return o
}

// request does what one recover or enroll asks of the HSMs: an admission,
// a PIN HMAC, a seal and an open of what it sealed.
func request(ctx context.Context, p *Pool) error { return requestOf(ctx, p, 32) }

// requestOf is request with a secret of size bytes.
func requestOf(ctx context.Context, p *Pool, size int) error {
	release, err := p.Admit(ctx)
	if err != nil {
		return err
	}
	defer release()
	if _, err := p.HMAC(ctx, pin1, []byte("pin check")); err != nil {
		return err
	}
	nonce := make([]byte, 12)
	rand.Read(nonce)
	secret := bytes.Repeat([]byte{'s'}, size)
	ct, err := p.Seal(ctx, wrap1, nonce, secret, []byte("aad"))
	if err != nil {
		return err
	}
	pt, err := p.Open(ctx, wrap1, nonce, ct, []byte("aad"))
	if err != nil {
		return err
	}
	if !bytes.Equal(pt, secret) {
		return errors.New("opened something else than was sealed")
	}
	return nil
}

// load runs workers goroutines that make requests until stop is closed
// (or each has made n, if stop is nil), and returns every error.
func load(p *Pool, workers, n int, stop <-chan struct{}) []error {
	return loadOf(p, workers, n, 32, stop)
}

// loadOf is load with secrets of size bytes.
func loadOf(p *Pool, workers, n, size int, stop <-chan struct{}) []error {
	var mu sync.Mutex
	var errs []error
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for i := 0; stop != nil || i < n; i++ {
				if stop != nil {
					select {
					case <-stop:
						return
					default:
					}
				}
				if err := requestOf(context.Background(), p, size); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	return errs
}

// provisioned returns a fresh member with keys of the gcm profile (the
// profile that runs every operation in the token), opened.
func provisioned(t *testing.T, name string, maxSessions int) (MemberConfig, *p11Token) {
	t.Helper()
	m := newMember(t, name)
	m.MaxSessions = maxSessions
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	tok, err := NewModules().openToken(m)
	if err != nil {
		t.Fatal(err)
	}
	return m, tok
}

func logTo(buf *bytes.Buffer, mu *sync.Mutex) *slog.Logger {
	return slog.New(slog.NewTextHandler(&lockedWriter{w: buf, mu: mu}, nil))
}

// sessionCap emulates a token that gives at most n sessions to the
// member's operations and answers CKR_SESSION_COUNT past them, as HSMs
// with a session limit below the member's max_sessions do. It counts the
// sessions it opened that the token still knows (C_GetSessionInfo): the
// sessions are real SoftHSM sessions.
type sessionCap struct {
	p       *pkcs11.Ctx
	n       int
	mu      sync.Mutex
	opened  []pkcs11.SessionHandle
	refused atomic.Int64
	most    int // the most sessions open at once
}

func (c *sessionCap) install(t *p11Token) {
	c.p = t.raw.p
	// Close the session openToken left idle, so that every session of
	// the raw pool is one the emulation counts.
	for len(t.raw.idle) > 0 {
		s := <-t.raw.idle
		t.raw.mu.Lock()
		t.raw.closeLocked(s)
		t.raw.mu.Unlock()
	}
	open := t.raw.openSession
	t.raw.openSession = func(slot uint) (pkcs11.SessionHandle, error) {
		c.mu.Lock()
		defer c.mu.Unlock()
		live := c.opened[:0]
		for _, h := range c.opened {
			if _, err := c.p.GetSessionInfo(h); err == nil {
				live = append(live, h)
			}
		}
		c.opened = live
		if len(live) >= c.n {
			c.refused.Add(1)
			return 0, pkcs11.Error(pkcs11.CKR_SESSION_COUNT)
		}
		h, err := open(slot)
		if err == nil {
			c.opened = append(c.opened, h)
			c.most = max(c.most, len(c.opened))
		}
		return h, err
	}
}

// A token that gives 2 sessions to a member configured for 8: the member
// serves with 2, says so once in the log and in
// keyvault_hsm_member_sessions_max, and no request fails.
func TestSessionLimitSizesTheMemberDown(t *testing.T) {
	cfg, tok := provisioned(t, "limited", 8)
	limit := &sessionCap{n: 2}
	limit.install(tok)
	var logs bytes.Buffer
	var mu sync.Mutex
	reg := prometheus.NewRegistry()
	p, err := newPool([]MemberConfig{cfg}, []token{tok}, make([]error, 1), unshed(reg, logTo(&logs, &mu)))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()

	// Seals and opens of 64 KiB hold their sessions long enough that
	// the member wants more than 2 at once.
	errs := loadOf(p, 32, 25, 64<<10, nil)
	if len(errs) > 0 {
		t.Fatalf("%d of %d requests failed at a token limit of 2 sessions; the first: %v", len(errs), 32*25, errs[0])
	}
	if limit.refused.Load() == 0 {
		t.Fatal("the token never refused a session: the test did not meet the limit")
	}
	if got := testutil.ToFloat64(p.metrics.sessionsMax.WithLabelValues("limited")); got != 2 {
		t.Fatalf("keyvault_hsm_member_sessions_max{member=limited} = %v, want 2", got)
	}
	if !p.members[0].healthy.Load() || testutil.ToFloat64(p.metrics.ejections.WithLabelValues("limited")) != 0 {
		t.Fatal("the session limit took the member out")
	}
	mu.Lock()
	out := logs.String()
	mu.Unlock()
	if n := strings.Count(out, "CKR_SESSION_COUNT"); n != 1 {
		t.Fatalf("the session limit is logged %d times, want once:\n%s", n, out)
	}
	// Admission counts the sessions the token gives: 2 × 4 per session.
	p.opts.QueueTimeout = time.Millisecond
	var releases []func()
	for range 8 {
		release, err := p.Admit(context.Background())
		if err != nil {
			t.Fatalf("admission within 2 sessions × 4: %v", err)
		}
		releases = append(releases, release)
	}
	if _, err := p.Admit(context.Background()); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("a ninth admission at 2 sessions × 4: %v, want ErrUnavailable", err)
	}
	for _, r := range releases {
		r()
	}
	if problems, err := testutil.CollectAndLint(reg, "keyvault_hsm_member_sessions_max"); err != nil || len(problems) > 0 {
		t.Fatalf("metric lint: %v %+v", err, problems)
	}
}

// slowToken answers every operation 1 to 2 ms late, as a network HSM does.
type slowToken struct{ token }

func (s slowToken) wait() { time.Sleep(time.Millisecond + mrand.N(time.Millisecond)) }

func (s slowToken) HMAC(k vault.KeyID, m []byte) ([]byte, error) {
	s.wait()
	return s.token.HMAC(k, m)
}

func (s slowToken) Seal(k vault.KeyID, n, p, a []byte) ([]byte, error) {
	s.wait()
	return s.token.Seal(k, n, p, a)
}

func (s slowToken) Open(k vault.KeyID, n, c, a []byte) ([]byte, error) {
	s.wait()
	return s.token.Open(k, n, c, a)
}

// With 1-2 ms per operation and the serving defaults, a modest load (16
// concurrent requests on one member of 4 sessions, as many as it admits)
// is served whole: nothing times out, nothing is shed, the member stays
// in.
func TestLatencyAtDefaults(t *testing.T) {
	cfg, tok := provisioned(t, "slow", 4)
	reg := prometheus.NewRegistry()
	p, err := newPool([]MemberConfig{cfg}, []token{slowToken{tok}}, make([]error, 1), servingDefaults(reg, nil))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if errs := load(p, 16, 10, nil); len(errs) > 0 {
		t.Fatalf("%d of %d requests failed with 1-2 ms per operation; the first: %v", len(errs), 16*10, errs[0])
	}
	for _, stage := range []string{"admission", "session"} {
		if n := testutil.ToFloat64(p.metrics.shed.WithLabelValues(stage)); n != 0 {
			t.Fatalf("%v requests shed at %s", n, stage)
		}
	}
	if !p.members[0].healthy.Load() || testutil.ToFloat64(p.metrics.ejections.WithLabelValues("slow")) != 0 {
		t.Fatal("a slow member was taken out")
	}
}

// A request that waits for an admission gets the next one that comes
// free, before a request that arrives after it: a client that loops must
// not take every admission from the waiters, which are shed after
// QueueTimeout with the HSMs far from full.
func TestAdmitFirstComeFirst(t *testing.T) {
	p, err := newPool([]MemberConfig{{Name: "a", MaxSessions: 1}}, []token{latencyToken{}}, make([]error, 1),
		Options{AdmitPerSession: 1, QueueTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx := context.Background()
	first, err := p.Admit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	waiter := make(chan func())
	go func() {
		release, err := p.Admit(ctx)
		if err != nil {
			t.Error(err)
		}
		waiter <- release
	}()
	waitFor(t, "the second request waits", func() bool {
		p.admitMu.Lock()
		defer p.admitMu.Unlock()
		return len(p.admitQueue) == 1
	})
	first()
	// The admission first gave up went to the waiter: a newcomer waits.
	short, cancel := context.WithTimeout(ctx, time.Millisecond)
	defer cancel()
	if release, err := p.Admit(short); !errors.Is(err, vault.ErrUnavailable) {
		if release != nil {
			release()
		}
		t.Fatalf("a newcomer while a request waited: %v, want it queued (and given up at 1ms)", err)
	}
	(<-waiter)()
	if release, err := p.Admit(ctx); err != nil {
		t.Fatalf("with nobody waiting and the admission free: %v", err)
	} else {
		release()
	}
}

// device is an HSM that restarts: while it is away every operation
// answers CKR_DEVICE_REMOVED and it cannot be opened; once back, the
// sessions of before the restart answer CKR_USER_NOT_LOGGED_IN until the
// vault opens the token and logs in again.
type device struct {
	away   atomic.Bool
	epoch  atomic.Int64 // restarts so far
	logins atomic.Int64
}

func (d *device) restart() { d.epoch.Add(1); d.away.Store(true) }

// open logs in to the device: a real token opened afresh.
func (d *device) open(cfg MemberConfig) (token, error) {
	if d.away.Load() {
		return nil, fmt.Errorf("open token %q: %w", cfg.TokenLabel, pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED))
	}
	t, err := NewModules().openToken(cfg)
	if err != nil {
		return nil, err
	}
	d.logins.Add(1)
	return &restarting{token: t, dev: d, epoch: d.epoch.Load()}, nil
}

// restarting is one login to a device.
type restarting struct {
	token
	dev   *device
	epoch int64
}

func (r *restarting) check() error {
	switch {
	case r.dev.away.Load():
		return pkcs11.Error(pkcs11.CKR_DEVICE_REMOVED)
	case r.epoch < r.dev.epoch.Load():
		return pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN)
	}
	return nil
}

func (r *restarting) HMAC(k vault.KeyID, m []byte) ([]byte, error) {
	if err := r.check(); err != nil {
		return nil, fmt.Errorf("hmac under %s: %w", k.Label(), err)
	}
	return r.token.HMAC(k, m)
}

func (r *restarting) Seal(k vault.KeyID, n, p, a []byte) ([]byte, error) {
	if err := r.check(); err != nil {
		return nil, fmt.Errorf("seal under %s: %w", k.Label(), err)
	}
	return r.token.Seal(k, n, p, a)
}

func (r *restarting) Open(k vault.KeyID, n, c, a []byte) ([]byte, error) {
	if err := r.check(); err != nil {
		return nil, fmt.Errorf("open under %s: %w", k.Label(), err)
	}
	return r.token.Open(k, n, c, a)
}

// restartPool builds a pool whose first member is on a restarting device,
// re-opened (logged in again) through it, as Open's members are.
func restartPool(t *testing.T, reg prometheus.Registerer, others int) (*Pool, *device) {
	t.Helper()
	var cfgs []MemberConfig
	for i := range others + 1 {
		m := newMember(t, fmt.Sprintf("m%d", i))
		m.MaxSessions = 4
		cfgs = append(cfgs, m)
	}
	if _, err := Provision(cfgs, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	dev := &device{}
	toks := make([]token, len(cfgs))
	var err error
	if toks[0], err = dev.open(cfgs[0]); err != nil {
		t.Fatal(err)
	}
	for i := 1; i < len(cfgs); i++ {
		if toks[i], err = NewModules().openToken(cfgs[i]); err != nil {
			t.Fatal(err)
		}
	}
	opts := unshed(reg, nil)
	opts.ProbeBackoff, opts.ProbeBackoffMax = 20*time.Millisecond, 200*time.Millisecond
	p, err := newPool(cfgs, toks, make([]error, len(cfgs)), opts)
	if err != nil {
		t.Fatal(err)
	}
	p.members[0].reopen = func() (token, error) { return dev.open(cfgs[0]) }
	t.Cleanup(func() { p.Close() })
	return p, dev
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after 10s: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A member whose HSM restarts under load is taken out, probed, logged in
// again and put back, and the other member serves every request
// meanwhile.
func TestHSMRestartTwoMembers(t *testing.T) {
	reg := prometheus.NewRegistry()
	p, dev := restartPool(t, reg, 1)
	stop := make(chan struct{})
	done := make(chan []error)
	go func() { done <- load(p, 16, 0, stop) }()

	waitFor(t, "member m0 serves", func() bool { return testutil.ToFloat64(p.metrics.ops.WithLabelValues("m0", "hmac")) > 20 })
	dev.restart()
	waitFor(t, "member m0 taken out", func() bool { return !p.members[0].healthy.Load() })
	time.Sleep(100 * time.Millisecond) // the device is away: probes fail
	dev.away.Store(false)
	waitFor(t, "member m0 logged in again and back", func() bool { return p.members[0].healthy.Load() })
	before := testutil.ToFloat64(p.metrics.ops.WithLabelValues("m0", "hmac"))
	waitFor(t, "member m0 serves again", func() bool { return testutil.ToFloat64(p.metrics.ops.WithLabelValues("m0", "hmac")) > before+20 })
	close(stop)
	if errs := <-done; len(errs) > 0 {
		t.Fatalf("%d requests failed while member m1 was healthy; the first: %v", len(errs), errs[0])
	}
	if dev.logins.Load() != 2 {
		t.Fatalf("%d logins to the device, want 2 (at start, after the restart)", dev.logins.Load())
	}
	if n := testutil.ToFloat64(p.metrics.errors.WithLabelValues("m0", "hmac", "CKR_DEVICE_REMOVED")) +
		testutil.ToFloat64(p.metrics.errors.WithLabelValues("m0", "seal", "CKR_DEVICE_REMOVED")) +
		testutil.ToFloat64(p.metrics.errors.WithLabelValues("m0", "open", "CKR_DEVICE_REMOVED")); n < 1 {
		t.Fatal("the restart's CKR_DEVICE_REMOVED is not counted")
	}
}

// A one-member pool whose HSM restarts: requests during the outage are
// refused with ErrUnavailable (503 with Retry-After over HTTP), and once
// the HSM is back and the probe has logged in again, it serves, with no
// restart of the vault.
func TestHSMRestartOneMember(t *testing.T) {
	p, dev := restartPool(t, nil, 0)
	ctx := context.Background()
	if err := request(ctx, p); err != nil {
		t.Fatal(err)
	}
	dev.restart()
	// The first request meets the restart and takes the member out;
	// every later one is refused at admission until it is back.
	var refused int
	for range 20 {
		err := request(ctx, p)
		if err == nil {
			t.Fatal("a request succeeded on a device that is away")
		}
		if !errors.Is(err, vault.ErrUnavailable) {
			t.Fatalf("a request during the outage: %v, want ErrUnavailable", err)
		}
		refused++
	}
	dev.away.Store(false)
	// Back, but not logged in: the old sessions answer
	// CKR_USER_NOT_LOGGED_IN, so only a new login brings the member back.
	waitFor(t, "the member logged in again and back", func() bool { return p.Healthy() == 1 })
	if dev.logins.Load() != 2 {
		t.Fatalf("%d logins, want 2", dev.logins.Load())
	}
	if errs := load(p, 8, 10, nil); len(errs) > 0 {
		t.Fatalf("%d requests failed after the HSM came back; the first: %v", len(errs), errs[0])
	}
}

// Closing a token (as the probe does to re-open a member after a
// restart) waits for the calls running on its sessions: closing the last
// crypto11 context finalises the module, and a call in flight would then
// crash the process.
func TestCloseWaitsForCallsInFlight(t *testing.T) {
	_, tok := provisioned(t, "closing", 2)
	running, finish := make(chan struct{}), make(chan struct{})
	callDone := make(chan error, 1)
	go func() {
		callDone <- tok.raw.with(func(s pkcs11.SessionHandle) error {
			close(running)
			<-finish
			_, err := tok.raw.mod.Sign(s, tok.handles[pin1], pkcs11.CKM_SHA256_HMAC, []byte("m"), 32)
			return err
		})
	}()
	<-running
	closed := make(chan error, 1)
	go func() { closed <- tok.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a call ran on one of the token's sessions", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(finish)
	if err := <-callDone; err != nil {
		t.Fatalf("the call in flight: %v", err)
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if _, err := tok.HMAC(pin1, []byte("m")); !errors.Is(err, errNoToken) {
		t.Fatalf("HMAC on a closed token: %v, want errNoToken", err)
	}
}
