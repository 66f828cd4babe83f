package hsmpool

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// Sentinel errors.
var (
	// ErrUnavailable: no healthy member could perform the operation. It is
	// vault.ErrUnavailable, so the vault refunds the guess and answers 503.
	ErrUnavailable = vault.ErrUnavailable
	// ErrIntegrity: a GCM open failed authentication on a member that
	// passed its known-answer test; the ciphertext, not the HSM, is bad.
	ErrIntegrity = vault.ErrIntegrity
)

// Options configure a Pool.
type Options struct {
	Registerer prometheus.Registerer // default: a private registry
	// reopen lets the probe configure a failed member's token again; Open
	// sets it, tests that inject tokens leave it off.
	reopen bool
	Logger *slog.Logger // default: slog.Default()
	// ProbeBackoff is the first wait before re-probing a failed member; it
	// doubles, with jitter, up to ProbeBackoffMax. Defaults 250ms and 30s.
	ProbeBackoff, ProbeBackoffMax time.Duration
	// OpTimeout is how long one HSM operation may take before its member
	// counts as failed and the operation moves on (default 5s).
	OpTimeout time.Duration
}

// Pool balances HSM operations over its members. It implements vault.HSM.
type Pool struct {
	members  []*member
	versions map[vault.KeyRole]uint32
	log      *slog.Logger
	metrics  *metrics
	opts     Options

	mu     sync.Mutex // guards closed, and wg.Add against Close
	closed bool
	stop   chan struct{}
	wg     sync.WaitGroup
}

var _ vault.HSM = (*Pool)(nil)

// member is one HSM of the pool.
type member struct {
	name string
	// reopen configures the member's token again, from scratch; nil for
	// tokens a test injected.
	reopen func() (token, error)

	mu  sync.Mutex
	tok token // replaced by the probe when the member is re-opened

	sessions chan struct{} // one slot per allowed concurrent operation
	inFlight atomic.Int64
	healthy  atomic.Bool
	probing  atomic.Bool
	kcvs     map[vault.KeyID][]byte
	// selfTests are ciphertexts this member sealed at start, one under each
	// wrap key version, opened again to tell a bad record from a bad member.
	selfTests map[uint32]*knownAnswer
}

// knownAnswer is a GCM ciphertext whose plaintext the pool knows.
type knownAnswer struct {
	key                vault.KeyID
	nonce, ct, aad, pt []byte
}

// Open opens every member, one at a time, and checks that they hold the
// same keys. A member that fails to open (a wrong PIN included) is reported
// and left out; it is never retried here, since a token may lock itself
// after a few bad logins. Open fails if no member is usable.
func Open(cfgs []MemberConfig, opts Options) (*Pool, error) {
	toks := make([]token, len(cfgs))
	var errs []error
	for i, c := range cfgs {
		t, err := openToken(c)
		if err != nil {
			errs = append(errs, fmt.Errorf("member %s: %w", c.Name, err))
			continue
		}
		toks[i] = t
	}
	opts.reopen = true
	p, err := newPool(cfgs, toks, opts)
	if err != nil {
		return nil, errors.Join(append(errs, err)...)
	}
	for _, e := range errs {
		p.log.Error("HSM member left out", "error", e.Error())
	}
	return p, nil
}

// newPool builds a pool on opened tokens (nil for a member that failed to
// open). Tests call it with their own tokens.
func newPool(cfgs []MemberConfig, toks []token, opts Options) (*Pool, error) {
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.ProbeBackoff == 0 {
		opts.ProbeBackoff = 250 * time.Millisecond
	}
	if opts.ProbeBackoffMax == 0 {
		opts.ProbeBackoffMax = 30 * time.Second
	}
	if opts.OpTimeout == 0 {
		opts.OpTimeout = 5 * time.Second
	}
	p := &Pool{
		log:      opts.Logger,
		metrics:  newMetrics(opts.Registerer),
		opts:     opts,
		versions: map[vault.KeyRole]uint32{},
		stop:     make(chan struct{}),
	}
	var ref *member
	var errs []error
	for i, c := range cfgs {
		p.metrics.up.WithLabelValues(c.Name).Set(0)
		if toks[i] == nil {
			continue
		}
		m := &member{name: c.Name, tok: toks[i], sessions: make(chan struct{}, max(c.MaxSessions, 1))}
		if opts.reopen {
			c := c
			m.reopen = func() (token, error) { return openToken(c) }
		}
		if err := m.checkKeys(); err != nil {
			errs = append(errs, fmt.Errorf("member %s: %w", c.Name, err))
			toks[i].Close()
			continue
		}
		if ref == nil {
			ref = m
		} else if err := sameKeys(ref, m); err != nil {
			// The first usable member is the reference: a member that
			// disagrees would open nothing the others sealed.
			errs = append(errs, fmt.Errorf("member %s: %w; not used", c.Name, err))
			toks[i].Close()
			continue
		}
		m.healthy.Store(true)
		p.metrics.up.WithLabelValues(c.Name).Set(1)
		p.members = append(p.members, m)
	}
	if len(p.members) == 0 {
		return nil, fmt.Errorf("hsmpool: no usable member: %w", errors.Join(errs...))
	}
	for _, e := range errs {
		p.log.Error("HSM member left out", "error", e.Error())
	}
	for _, role := range vault.Roles {
		vs := p.members[0].tok.Versions(role)
		if len(vs) > 0 {
			p.versions[role] = vs[len(vs)-1]
		}
	}
	return p, nil
}

// token returns the member's current token.
func (m *member) token() token {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.tok
}

// keyCheckValues computes the check value of every key on a token.
func keyCheckValues(t token) (map[vault.KeyID][]byte, error) {
	kcvs := map[vault.KeyID][]byte{}
	for _, role := range vault.Roles {
		vs := t.Versions(role)
		if len(vs) == 0 {
			return nil, fmt.Errorf("no %s key (run keyvault keys init)", role)
		}
		for _, v := range vs {
			id := vault.KeyID{Role: role, Version: v}
			c, err := safe(func() ([]byte, error) { return kcv(t, id) })
			if err != nil {
				return nil, fmt.Errorf("check value of %s: %w", id.Label(), err)
			}
			kcvs[id] = c
		}
	}
	return kcvs, nil
}

// checkKeys computes the member's key check values and its self-test.
func (m *member) checkKeys() error {
	var err error
	if m.kcvs, err = keyCheckValues(m.tok); err != nil {
		return err
	}
	m.selfTests = map[uint32]*knownAnswer{}
	for _, v := range m.tok.Versions(vault.RoleWrap) {
		ka := &knownAnswer{
			key:   vault.KeyID{Role: vault.RoleWrap, Version: v},
			nonce: make([]byte, 12),
			pt:    make([]byte, 16),
			aad:   []byte("keyvault/v1/self-test"),
		}
		rand.Read(ka.nonce)
		rand.Read(ka.pt)
		if ka.ct, err = safe(func() ([]byte, error) { return m.tok.Seal(ka.key, ka.nonce, ka.pt, ka.aad) }); err != nil {
			return fmt.Errorf("self-test seal under %s: %w", ka.key.Label(), err)
		}
		m.selfTests[v] = ka
		if err := m.runSelfTest(m.tok, v); err != nil {
			return err
		}
	}
	return nil
}

// runSelfTest opens the member's known answer under the wrap key version on
// t; an error means the member, not the data, is at fault.
func (m *member) runSelfTest(t token, version uint32) error {
	ka := m.selfTests[version]
	if ka == nil {
		return fmt.Errorf("no self-test for wrap key version %d", version)
	}
	pt, err := safe(func() ([]byte, error) { return t.Open(ka.key, ka.nonce, ka.ct, ka.aad) })
	if err != nil {
		return fmt.Errorf("self-test open under %s: %w", ka.key.Label(), err)
	}
	if !bytes.Equal(pt, ka.pt) {
		return errors.New("self-test open: wrong plaintext")
	}
	return nil
}

// healthCheck is the probe's full test of a token: the self-test, and the
// check value of every key the member had at start, so that a token whose
// key handles went stale (a re-initialised or restored token) fails it.
func (m *member) healthCheck(t token) error {
	for v := range m.selfTests {
		if err := m.runSelfTest(t, v); err != nil {
			return err
		}
	}
	kcvs, err := keyCheckValues(t)
	if err != nil {
		return err
	}
	for id, want := range m.kcvs {
		if !bytes.Equal(kcvs[id], want) {
			return fmt.Errorf("check value of %s changed", id.Label())
		}
	}
	if len(kcvs) != len(m.kcvs) {
		return errors.New("the set of keys changed")
	}
	return nil
}

func sameKeys(ref, m *member) error {
	for id, want := range ref.kcvs {
		got, ok := m.kcvs[id]
		if !ok {
			return fmt.Errorf("lacks %s", id.Label())
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("%s differs from member %s's (check value %s, want %s)", id.Label(), ref.name, hex.EncodeToString(got), hex.EncodeToString(want))
		}
	}
	for id := range m.kcvs {
		if _, ok := ref.kcvs[id]; !ok {
			return fmt.Errorf("holds %s, which member %s lacks", id.Label(), ref.name)
		}
	}
	return nil
}

// Close stops probing and closes every member. It is safe to call twice.
func (p *Pool) Close() error {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil
	}
	p.closed = true
	close(p.stop)
	p.mu.Unlock()
	p.wg.Wait()
	var errs []error
	for _, m := range p.members {
		errs = append(errs, closeToken(m.token()))
	}
	return errors.Join(errs...)
}

// KeyVersion implements vault.HSM.
func (p *Pool) KeyVersion(role vault.KeyRole) uint32 { return p.versions[role] }

// Healthy reports how many members are serving; Ready uses it.
func (p *Pool) Healthy() int {
	n := 0
	for _, m := range p.members {
		if m.healthy.Load() {
			n++
		}
	}
	return n
}

// Ready returns nil if at least one member is healthy, else the reason.
func (p *Pool) Ready() error {
	if p.Healthy() == 0 {
		return errors.New("no healthy HSM member")
	}
	return nil
}

// MemberKeys describes one member's keys for `keys list`.
type MemberKeys struct {
	Member string
	Keys   []KeyCheck
}

// KeyCheck is one key version and its check value.
type KeyCheck struct {
	Label string
	KCV   string
}

// Keys lists every member's key versions and check values.
func (p *Pool) Keys() []MemberKeys {
	var out []MemberKeys
	for _, m := range p.members {
		mk := MemberKeys{Member: m.name}
		for _, role := range vault.Roles {
			for _, v := range m.token().Versions(role) {
				id := vault.KeyID{Role: role, Version: v}
				mk.Keys = append(mk.Keys, KeyCheck{Label: id.Label(), KCV: hex.EncodeToString(m.kcvs[id])})
			}
		}
		out = append(out, mk)
	}
	return out
}

// HMAC implements vault.HSM.
func (p *Pool) HMAC(ctx context.Context, key vault.KeyID, msg []byte) ([]byte, error) {
	return p.do(ctx, "hmac", func(_ *member, t token) ([]byte, error) {
		return t.HMAC(key, msg)
	})
}

// Seal implements vault.HSM.
func (p *Pool) Seal(ctx context.Context, key vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error) {
	return p.do(ctx, "seal", func(_ *member, t token) ([]byte, error) {
		return t.Seal(key, nonce, plaintext, aad)
	})
}

// Open implements vault.HSM. A failed open is retried on the same member's
// known answer: if that opens, the ciphertext is bad (ErrIntegrity) and the
// member stays; if not, the member is taken out and another one tries.
func (p *Pool) Open(ctx context.Context, key vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	return p.do(ctx, "open", func(m *member, t token) ([]byte, error) {
		pt, err := t.Open(key, nonce, ciphertext, aad)
		if err == nil {
			return pt, nil
		}
		if stErr := m.runSelfTest(t, key.Version); stErr != nil {
			return nil, fmt.Errorf("%w (and %w)", err, stErr)
		}
		return nil, fmt.Errorf("%w: GCM open failed on member %s, which passes its self-test", ErrIntegrity, m.name)
	})
}

// do is the one way to the HSMs: it picks the least-loaded healthy member,
// waits for one of its sessions within ctx, runs fn with a deadline,
// records metrics, turns a panic into an error, and on a member failure
// takes the member out and tries another. An open that fails
// authentication is tried on another healthy member too: failing on every
// member that passes its self-test, it is a damaged record (ErrIntegrity).
// It returns ErrUnavailable when no member could answer.
func (p *Pool) do(ctx context.Context, op string, fn func(*member, token) ([]byte, error)) ([]byte, error) {
	tried := map[*member]bool{}
	var lastErr, integrity error
	var suspect *member
	for {
		m := p.pick(tried)
		if m == nil {
			if integrity != nil {
				return nil, integrity
			}
			if lastErr == nil {
				lastErr = errors.New("no healthy member")
			}
			return nil, fmt.Errorf("%w: hsm %s: %w", ErrUnavailable, op, lastErr)
		}
		tried[m] = true
		select {
		case m.sessions <- struct{}{}:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: hsm %s: waiting for a session: %w", ErrUnavailable, op, ctx.Err())
		}
		out, err := p.run(ctx, m, op, fn)
		switch {
		case err == nil:
			if suspect != nil {
				// Another member opened what the suspect could not.
				p.fail(suspect, op, integrity)
			}
			return out, nil
		case errors.Is(err, errCaller):
			return nil, err
		case errors.Is(err, ErrIntegrity):
			integrity, suspect = err, m
			continue
		case errors.Is(err, errAbandoned):
			// The caller gave up; the member did nothing wrong.
			return nil, fmt.Errorf("%w: hsm %s: %w", ErrUnavailable, op, err)
		}
		lastErr = err
		p.fail(m, op, err)
	}
}

var (
	// errStalled: an operation did not return within OpTimeout.
	errStalled = errors.New("no answer in time")
	// errAbandoned: the caller's context ended while an operation ran.
	errAbandoned = errors.New("caller gave up")
)

// run calls fn on the member in a goroutine that holds the member's
// session slot until the HSM returns, and waits for it no longer than
// OpTimeout or ctx allows: a PKCS#11 call cannot be interrupted, but the
// request need not wait for a stalled one. The result of an operation given
// up on is dropped with its goroutine.
func (p *Pool) run(ctx context.Context, m *member, op string, fn func(*member, token) ([]byte, error)) ([]byte, error) {
	type result struct {
		out []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		defer func() { <-m.sessions }()
		out, err := p.call(m, op, fn)
		done <- result{out, err}
	}()
	timer := time.NewTimer(p.opts.OpTimeout)
	defer timer.Stop()
	select {
	case r := <-done:
		return r.out, r.err
	case <-timer.C:
		return nil, fmt.Errorf("hsm %s on member %s: %w (%v)", op, m.name, errStalled, p.opts.OpTimeout)
	case <-ctx.Done():
		return nil, fmt.Errorf("%w: %w", errAbandoned, ctx.Err())
	}
}

// call runs one operation, with its metrics, and recovers crypto11's
// panics (Seal and Sum panic on any PKCS#11 error).
func (p *Pool) call(m *member, op string, fn func(*member, token) ([]byte, error)) (out []byte, err error) {
	m.inFlight.Add(1)
	p.metrics.inFlight.WithLabelValues(m.name).Inc()
	start := time.Now()
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pkcs11 %s: %v", op, r)
		}
		m.inFlight.Add(-1)
		p.metrics.inFlight.WithLabelValues(m.name).Dec()
		p.metrics.ops.WithLabelValues(m.name, op).Inc()
		p.metrics.duration.WithLabelValues(m.name, op).Observe(time.Since(start).Seconds())
		if err != nil && !errors.Is(err, ErrIntegrity) && !errors.Is(err, errCaller) {
			p.metrics.errors.WithLabelValues(m.name, op).Inc()
		}
	}()
	return fn(m, m.token())
}

// pick returns the healthy member, not yet tried, with the fewest
// operations in flight relative to its session limit.
func (p *Pool) pick(tried map[*member]bool) *member {
	var best *member
	var bestLoad float64
	for _, m := range p.members {
		if tried[m] || !m.healthy.Load() {
			continue
		}
		load := float64(m.inFlight.Load()) / float64(cap(m.sessions))
		if best == nil || load < bestLoad {
			best, bestLoad = m, load
		}
	}
	return best
}

// fail takes a member out and starts probing it, unless the pool is
// closing or a probe already runs.
func (p *Pool) fail(m *member, op string, err error) {
	if m.healthy.CompareAndSwap(true, false) {
		p.metrics.up.WithLabelValues(m.name).Set(0)
		p.log.Error("HSM member taken out", "member", m.name, "op", op, "error", err.Error())
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed && m.probing.CompareAndSwap(false, true) {
		p.wg.Add(1)
		go p.probe(m)
	}
}

// probe tests the member with exponential backoff and jitter and puts it
// back once it passes. A member whose token fails is configured again from
// scratch: after a token is re-initialised or restored, every cached key
// handle is stale (CKR_OBJECT_HANDLE_INVALID), and SoftHSM only sees a token
// change after the library is finalised and initialised again, so the old
// context is closed before the new one opens. A wrong PIN stops the probe:
// logging in again and again could lock the token for every process.
func (p *Pool) probe(m *member) {
	defer p.wg.Done()
	wait := p.opts.ProbeBackoff
	for {
		jitter := time.Duration(mrand.Int64N(int64(wait)/2 + 1))
		select {
		case <-p.stop:
			return
		case <-time.After(wait/2 + jitter):
		}
		err := m.healthCheck(m.token())
		if err != nil && m.reopen != nil {
			err = p.reopen(m)
		}
		if err == nil {
			// Probing ends before the member is back, so that a failure
			// right after starts a new probe.
			m.probing.Store(false)
			m.healthy.Store(true)
			p.metrics.up.WithLabelValues(m.name).Set(1)
			p.log.Info("HSM member back in service", "member", m.name)
			return
		}
		if isPINError(err) {
			p.log.Error("HSM member left out until restart: its PIN is refused, and retrying could lock the token", "member", m.name, "error", err.Error())
			return
		}
		wait = min(2*wait, p.opts.ProbeBackoffMax)
	}
}

// isPINError reports a login refused for the PIN. crypto11 flattens
// PKCS#11 errors into text, so the codes are matched by name.
func isPINError(err error) bool {
	for _, code := range []string{"CKR_PIN_INCORRECT", "CKR_PIN_LOCKED", "CKR_PIN_EXPIRED", "CKR_PIN_INVALID", "CKR_PIN_LEN_RANGE"} {
		if strings.Contains(err.Error(), code) {
			return true
		}
	}
	return false
}

// closeTimeout bounds how long closing a token may block: crypto11's Close
// waits for every pooled session to come back, and a session stuck in a
// dead HSM never does.
const closeTimeout = 5 * time.Second

// closeToken closes t, abandoning it if Close does not return in time.
func closeToken(t token) error {
	done := make(chan error, 1)
	go func() { done <- t.Close() }()
	select {
	case err := <-done:
		return err
	case <-time.After(closeTimeout):
		return errors.New("token close did not return; abandoned")
	}
}

// reopen replaces a failed member's token with a freshly configured one
// that passes the health check.
func (p *Pool) reopen(m *member) error {
	m.mu.Lock()
	old := m.tok
	m.tok = brokenToken{}
	m.mu.Unlock()
	if err := closeToken(old); err != nil {
		p.log.Warn("closing a failed HSM member", "member", m.name, "error", err.Error())
	}
	t, err := m.reopen()
	if err == nil {
		if err = m.healthCheck(t); err != nil {
			closeToken(t)
		}
	}
	if err != nil {
		p.log.Warn("HSM member still failing", "member", m.name, "error", err.Error())
		return err
	}
	m.mu.Lock()
	m.tok = t
	m.mu.Unlock()
	return nil
}

// brokenToken stands in while a member's token is being re-opened.
type brokenToken struct{}

var errReopening = errors.New("member is being re-opened")

func (brokenToken) HMAC(vault.KeyID, []byte) ([]byte, error) { return nil, errReopening }
func (brokenToken) Seal(vault.KeyID, []byte, []byte, []byte) ([]byte, error) {
	return nil, errReopening
}
func (brokenToken) Open(vault.KeyID, []byte, []byte, []byte) ([]byte, error) {
	return nil, errReopening
}
func (brokenToken) Versions(vault.KeyRole) []uint32 { return nil }
func (brokenToken) Close() error                    { return nil }

// safe runs f, turning a crypto11 panic into an error.
func safe(f func() ([]byte, error)) (out []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pkcs11: %v", r)
		}
	}()
	return f()
}
