package hsmpool

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	mrand "math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/hsmpool/internal/p11raw"
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
	// QueueTimeout is the longest an operation waits for a session before
	// it is shed with ErrUnavailable (0: as long as its context allows).
	QueueTimeout time.Duration
	// RefusedProbeInterval is how often a member refused for its token's
	// capabilities is probed again (default 10m): the answer changes only
	// when someone changes the token.
	RefusedProbeInterval time.Duration
	// Profile is how new records are sealed (vault.ProfileGCM,
	// ProfileHMAC or ProfileGCMHSMIV): the pool refuses to start, and
	// Reload refuses, if the newest wrap key is of another profile, and a
	// member's token must have what the profile needs. "" (the default) follows the keys: the
	// newest wrap key's profile.
	Profile vault.Profile
	// AdmitPerSession is how many requests Admit lets in per session of
	// the healthy members (default 1). A request spends most of its time
	// in the store, not the HSM, so one per session leaves the HSMs idle
	// while admitted requests wait for their commits.
	AdmitPerSession int
	// Modules are what the members' tokens are opened through, and own
	// what those tokens share (see Modules): pass the command's own to
	// share it with its other passes. Default: a set of the pool's own.
	// The pool never closes it.
	Modules *Modules
}

// Pool balances HSM operations over its members. It implements vault.HSM.
type Pool struct {
	members []*member
	// keys is what every member must hold; Reload and Retire replace it,
	// one at a time (rotateMu).
	keys     atomic.Pointer[keySet]
	rotateMu sync.Mutex
	log      *slog.Logger
	metrics  *metrics
	opts     Options

	admitted atomic.Int64 // requests holding an admission (see Admit)
	// admitQueue holds the waiters for an admission, first come first;
	// each is handed its admission on its channel.
	admitMu    sync.Mutex
	admitQueue []chan struct{}

	// jobs are the operations' jobs for reuse (run).
	jobs sync.Pool

	mu     sync.Mutex // guards closed, and wg.Add against Close
	closed bool
	stop   chan struct{}
	wg     sync.WaitGroup
}

var _ vault.HSM = (*Pool)(nil)

// token is the subset of HSM calls the pool makes on one member: the swap
// point where a test can put a member that fails, stalls or answers slowly.
// Implementations are safe for concurrent use. p11Token (token.go) is the
// token of a configured member; a token may also offer what the pool's
// other jobs call, each through an interface declared where it is used:
// anchorKeeper and anchorProber (anchors.go), capabilityProber
// (refusal.go), refresher (reload.go), sessionLimiter (admit.go) and
// blockEncrypter (member.go).
type token interface {
	HMAC(key vault.KeyID, msg []byte) ([]byte, error)
	Seal(key vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error)
	Open(key vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error)
	// Versions lists the versions of role held by the token, ascending.
	Versions(role vault.KeyRole) []uint32
	// WrapProfile is the profile of a wrap key version the token holds,
	// by the kind of the key: gcm for AES, hmac for a generic secret.
	// Seal and Open take gcm versions only; HMAC takes hmac ones (the
	// pool derives their per-record keys).
	WrapProfile(version uint32) vault.Profile
	Close() error
}

// copyReporter is a token that may serve from session copies of its keys
// (p11Token): sessionCopies is nil when it does, else why not.
type copyReporter interface {
	sessionCopies() error
}

// noteCopies logs, at info, whether the member's token serves from
// session copies of its keys or from its token keys, and why: once, and
// again whenever that changes (a re-open, a reload).
func (p *Pool) noteCopies(m *member, t token) {
	c, ok := t.(copyReporter)
	if !ok {
		return
	}
	err := c.sessionCopies()
	said := "yes"
	if err != nil {
		said = err.Error()
	}
	if old := m.copiesSaid.Swap(&said); old != nil && *old == said {
		return
	}
	if err == nil {
		p.log.Info("HSM member serves from session copies of its keys", "member", m.name)
		return
	}
	p.log.Info("HSM member serves from its token keys, not from session copies", "member", m.name, "reason", said)
}

// Open opens every member, one at a time, and admits those whose keys
// match the first admitted member's. A member that fails to open or to be
// admitted is reported and probed in the background, except after a
// refused PIN, which is never retried: a token may lock itself after a few
// bad logins. Open fails if no member is usable.
func Open(cfgs []MemberConfig, opts Options) (*Pool, error) {
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	// crypto11 keeps one library instance per module path, and SoftHSM
	// rescans its tokens only when the library is initialised: a member
	// that shares its module with another cannot be re-opened after a
	// failure while the other serves (docs/reliability.md).
	byModule := map[string]string{}
	for _, c := range cfgs {
		if other, ok := byModule[c.Module]; ok {
			opts.Logger.Warn("HSM members share a PKCS#11 module path: one that fails cannot come back while the other serves; give each member its own module path",
				"members", other+","+c.Name, "module", c.Module)
		}
		byModule[c.Module] = c.Name
	}
	if opts.Modules == nil {
		opts.Modules = NewModules()
	}
	cfgs = forProfile(cfgs, opts.Profile)
	toks := make([]token, len(cfgs))
	openErrs := make([]error, len(cfgs))
	for i, c := range cfgs {
		toks[i], openErrs[i] = opts.Modules.openToken(c)
	}
	opts.reopen = true
	return newPool(cfgs, toks, openErrs, opts)
}

// newPool builds a pool on opened tokens (nil, with its error in openErrs,
// for a member that failed to open). Tests call it with their own tokens.
func newPool(cfgs []MemberConfig, toks []token, openErrs []error, opts Options) (*Pool, error) {
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
	if opts.RefusedProbeInterval == 0 {
		opts.RefusedProbeInterval = 10 * time.Minute
	}
	if opts.Modules == nil {
		opts.Modules = NewModules()
	}
	p := &Pool{
		log:     opts.Logger,
		metrics: newMetrics(opts.Registerer),
		opts:    opts,
		stop:    make(chan struct{}),
	}
	var ref map[vault.KeyID][]byte // the first admitted member's keys
	var refProfiles map[uint32]vault.Profile
	var errs []error
	var toProbe []*member
	p.metrics.shed.WithLabelValues("admission")
	p.metrics.shed.WithLabelValues("session")
	for i, c := range cfgs {
		m := &member{name: c.Name, sessions: make(chan struct{}, max(c.MaxSessions, 1)), work: make(chan *job),
			metrics: newMemberMetrics(p.metrics, c.Name)}
		m.limit.Store(int64(cap(m.sessions)))
		p.metrics.sessionsMax.WithLabelValues(c.Name).Set(float64(cap(m.sessions)))
		m.st.Store(brokenState(nil))
		if opts.reopen {
			m.reopen = func() (token, error) { return p.opts.Modules.openToken(c) }
		}
		p.members = append(p.members, m)
		p.metrics.up.WithLabelValues(c.Name).Set(0)
		p.metrics.keyMismatch.WithLabelValues(c.Name).Set(0)
		// Counters start at zero, so that the first event shows in rate().
		p.metrics.ejections.WithLabelValues(c.Name)
		p.metrics.readmissions.WithLabelValues(c.Name)

		err := openErrs[i]
		if err == nil && toks[i] == nil {
			err = errNoToken
		}
		if err == nil {
			var ks *keySet
			if ref != nil {
				ks = newKeySet(ref, refProfiles)
			}
			if err = p.checkCapabilities(m, toks[i], p.profileOf(ks)); err != nil {
				// Its probes open the token afresh: this one's sessions
				// would stay open for nothing (and a token may refuse to
				// be initialised while a session exists).
				closeToken(toks[i])
			}
		}
		if err == nil {
			var st *tokenState
			if st, err = admit(toks[i], ref); err == nil {
				m.st.Store(st)
				p.noteCopies(m, st.tok)
				if ref == nil {
					// The first admitted member is the reference.
					ref, refProfiles = st.kcvs, wrapProfiles(st.tok)
				}
				m.healthy.Store(true)
				p.metrics.up.WithLabelValues(c.Name).Set(1)
				continue
			}
			closeToken(toks[i])
		}
		errs = append(errs, fmt.Errorf("member %s: %w", c.Name, err))
		m.st.Store(brokenState(err))
		switch {
		case m.refusal.Load() != nil:
			toProbe = append(toProbe, m) // logged by checkCapabilities
		case isPINError(err):
			p.log.Error("HSM member left out until restart: its PIN is refused, and retrying could lock the token", "member", c.Name, "error", err.Error())
		case errors.Is(err, errKeyMismatch):
			p.metrics.keyMismatch.WithLabelValues(c.Name).Set(1)
			p.log.Error("HSM member refused: its keys differ from the pool's", "member", c.Name, "error", err.Error())
			toProbe = append(toProbe, m)
		default:
			p.log.Error("HSM member left out; probing it", "member", c.Name, "error", err.Error())
			toProbe = append(toProbe, m)
		}
	}
	if ref == nil {
		return nil, fmt.Errorf("hsmpool: no usable member: %w", errors.Join(errs...))
	}
	ks := newKeySet(ref, refProfiles)
	if err := checkProfile(opts.Profile, ks); err != nil {
		p.Close()
		return nil, fmt.Errorf("hsmpool: %w", err)
	}
	p.keys.Store(ks)
	for _, m := range toProbe {
		p.startProbe(m)
	}
	return p, nil
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
		errs = append(errs, closeToken(m.state().tok))
	}
	return errors.Join(errs...)
}

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

// Ready returns nil if at least one member is healthy and none is
// refused; a *DegradedError naming the refused members if some serve;
// else the reason none does.
func (p *Pool) Ready() error {
	refused := p.Refused()
	if p.Healthy() == 0 {
		if len(refused) > 0 {
			return fmt.Errorf("no healthy HSM member: %w", &DegradedError{refused})
		}
		return errors.New("no healthy HSM member")
	}
	if len(refused) > 0 {
		return &DegradedError{refused}
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

// Keys lists the key versions and check values of every member in
// service.
func (p *Pool) Keys() []MemberKeys {
	var out []MemberKeys
	for _, m := range p.members {
		st := m.state()
		if len(st.kcvs) == 0 {
			continue
		}
		mk := MemberKeys{Member: m.name}
		for _, role := range vault.Roles {
			for _, v := range st.tok.Versions(role) {
				id := vault.KeyID{Role: role, Version: v}
				mk.Keys = append(mk.Keys, KeyCheck{Label: id.Label(), KCV: hex.EncodeToString(st.kcvs[id])})
			}
		}
		out = append(out, mk)
	}
	return out
}

// HMAC implements vault.HSM, under PIN and root keys. A wrap key of the
// hmac profile derives record keys inside Seal and Open only: a caller
// never gets one for a message of its choosing.
func (p *Pool) HMAC(ctx context.Context, key vault.KeyID, msg []byte) ([]byte, error) {
	if key.Role == vault.RoleWrap {
		return nil, fmt.Errorf("%w: HMAC under the wrap key %s", errCaller, key.Label())
	}
	return p.do(ctx, "hmac", func(_ *member, st *tokenState) ([]byte, error) {
		return st.tok.HMAC(key, msg)
	})
}

// Seal implements vault.HSM: GCM in the HSM under a wrap key of the gcm
// or gcm-hsm-iv profile, or on the host under a key derived in the HSM
// for the hmac profile (sealDerived). Each attempt seals with its own copy
// of nonce, which a token that chooses the IV overwrites, and the copy of
// the attempt whose answer is returned goes back into nonce: an attempt
// abandoned on a stalled member never writes into the caller's nonce.
func (p *Pool) Seal(ctx context.Context, key vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error) {
	if len(nonce) != gcmNonceSize {
		return nil, fmt.Errorf("%w: GCM nonce of %d bytes, want %d", errCaller, len(nonce), gcmNonceSize)
	}
	out, err := p.do(ctx, "seal", func(_ *member, st *tokenState) ([]byte, error) {
		// The answer is the nonce followed by the ciphertext, in one
		// buffer that starts as the nonce's copy.
		out := make([]byte, gcmNonceSize, gcmNonceSize+len(plaintext)+p11raw.TagSize)
		n := out[:gcmNonceSize:gcmNonceSize]
		copy(n, nonce)
		if derives(st.tok, key) {
			return appendSealDerived(out, st.tok, key, n, plaintext, aad)
		}
		ct, err := st.tok.Seal(key, n, plaintext, aad)
		if err != nil {
			return nil, err
		}
		return append(out, ct...), nil
	})
	if err != nil {
		return nil, err
	}
	copy(nonce, out[:gcmNonceSize])
	return out[gcmNonceSize:], nil
}

// Open implements vault.HSM. A failed open is retried on the same member's
// known answer (gcm), or its check value of the wrap key (hmac): if that
// passes, the ciphertext is bad (ErrIntegrity) and the member stays; if
// not, the member is taken out and another one tries.
func (p *Pool) Open(ctx context.Context, key vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	return p.do(ctx, "open", func(m *member, st *tokenState) ([]byte, error) {
		if derives(st.tok, key) {
			return openDerived(m, st, key, nonce, ciphertext, aad)
		}
		pt, err := st.tok.Open(key, nonce, ciphertext, aad)
		if err == nil {
			return pt, nil
		}
		if errors.Is(err, errTokenKey) {
			// The member's key is not there to open with: its fault,
			// whatever the record.
			return nil, err
		}
		if stErr := st.runSelfTest(key.Version); stErr != nil {
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
func (p *Pool) do(ctx context.Context, op string, fn func(*member, *tokenState) ([]byte, error)) ([]byte, error) {
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
		if err := p.acquire(ctx, m, op); err != nil {
			return nil, err
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

// acquire takes one of the member's sessions, waiting no longer than the
// caller's context and QueueTimeout allow: past that the request is shed,
// so that a flood queues no deeper than the HSMs can drain in that time.
func (p *Pool) acquire(ctx context.Context, m *member, op string) error {
	// A caller that has already given up starts no operation: with a
	// session free, run's wait would otherwise race the operation against
	// ctx, and an answer nobody waits for could still come back.
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: hsm %s: %w", ErrUnavailable, op, err)
	}
	select {
	case m.sessions <- struct{}{}:
		return nil
	default:
	}
	var queue <-chan time.Time
	if p.opts.QueueTimeout > 0 {
		t := time.NewTimer(p.opts.QueueTimeout)
		defer t.Stop()
		queue = t.C
	}
	select {
	case m.sessions <- struct{}{}:
		return nil
	case <-queue:
		p.metrics.shed.WithLabelValues("session").Inc()
		return fmt.Errorf("%w: hsm %s: shed, no session free within %v", ErrUnavailable, op, p.opts.QueueTimeout)
	case <-ctx.Done():
		return fmt.Errorf("%w: hsm %s: waiting for a session: %w", ErrUnavailable, op, ctx.Err())
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
// up on is dropped with its job. The goroutine is one of the member's
// workers (hand), and the job, with its channel and timer, is reused once
// its answer is taken.
func (p *Pool) run(ctx context.Context, m *member, op string, fn func(*member, *tokenState) ([]byte, error)) ([]byte, error) {
	j, _ := p.jobs.Get().(*job)
	if j == nil {
		j = &job{done: make(chan struct{}, 1), timer: time.NewTimer(p.opts.OpTimeout)}
	} else {
		j.timer.Reset(p.opts.OpTimeout)
	}
	j.op, j.fn = op, fn
	p.hand(m, j)
	select {
	case <-j.done:
		// The timer, stopped, sends nothing more: the job can be reused.
		j.timer.Stop()
		out, err := j.out, j.err
		*j = job{done: j.done, timer: j.timer}
		p.jobs.Put(j)
		return out, err
	case <-j.timer.C:
		return nil, fmt.Errorf("hsm %s on member %s: %w (%v)", op, m.name, errStalled, p.opts.OpTimeout)
	case <-ctx.Done():
		j.timer.Stop()
		return nil, fmt.Errorf("%w: %w", errAbandoned, ctx.Err())
	}
}

// job is one operation handed to a member's worker. The worker sets out
// and err, then signals done (buffered: a caller that gave up is not
// waited for) and touches the job no more.
type job struct {
	op    string
	fn    func(*member, *tokenState) ([]byte, error)
	out   []byte
	err   error
	done  chan struct{}
	timer *time.Timer // the caller's OpTimeout
}

// hand gives j to an idle worker of the member, or to a new one while
// the member has fewer workers than session slots. The caller holds a
// slot, and a worker holds one only while it runs a job, so with every
// worker started one is idle or about to be, unless the pool has closed
// and its idle workers are gone: then a worker is started for the job.
func (p *Pool) hand(m *member, j *job) {
	select {
	case m.work <- j:
		return
	default:
	}
	if m.workers.Add(1) > int64(cap(m.sessions)) {
		m.workers.Add(-1)
		select {
		case m.work <- j:
			return
		case <-p.stop:
			m.workers.Add(1)
		}
	}
	go p.worker(m, j)
}

// worker runs j, then the member's next jobs, until the pool closes: a
// goroutine per operation would cost its start, and the growth of a
// fresh stack to what a PKCS#11 call needs, every time. Each job's
// session slot is released once its answer is sent, as its caller took
// it.
func (p *Pool) worker(m *member, j *job) {
	defer m.workers.Add(-1)
	for {
		p.runJob(m, j)
		select {
		case j = <-m.work:
		case <-p.stop:
			return
		}
	}
}

// runJob runs j and answers it, then releases its session slot; the
// slot is released even if the operation ends its goroutine
// (runtime.Goexit, as a failing test's fake token may), when its caller
// is left to its OpTimeout.
func (p *Pool) runJob(m *member, j *job) {
	defer func() { <-m.sessions }()
	j.out, j.err = p.call(m, j.op, j.fn)
	j.done <- struct{}{}
}

// call runs one operation, with its metrics, and recovers crypto11's
// panics (Seal and Sum panic on any PKCS#11 error).
func (p *Pool) call(m *member, op string, fn func(*member, *tokenState) ([]byte, error)) (out []byte, err error) {
	m.inFlight.Add(1)
	inFlight := m.metrics.inFlight()
	inFlight.Inc()
	start := time.Now()
	st, u := pinState(m)
	if u != nil {
		defer u.leave()
	}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pkcs11 %s: %v", op, r)
		}
		if sl, ok := st.tok.(sessionLimiter); ok {
			if n := sl.sessionLimit(); n > 0 {
				p.limitSessions(m, n)
			}
		}
		m.inFlight.Add(-1)
		inFlight.Dec()
		om := m.metrics.op(p.metrics, m.name, op)
		om.ops.Inc()
		om.duration.Observe(time.Since(start).Seconds())
		if err != nil && !errors.Is(err, ErrIntegrity) && !errors.Is(err, errCaller) {
			p.metrics.errors.WithLabelValues(m.name, op, reasonOf(err)).Inc()
		}
	}()
	return fn(m, st)
}

// viewUser is a view of a token whose operations are counted, so that
// what it serves with outlives none of them (p11Token).
type viewUser interface {
	enter() bool
	leave()
}

// pinState returns the member's state with its view entered, and the
// view to leave once the operation ends (nil: nothing to leave): fn's
// calls all run on one view, which stays usable until then. A view
// dropped before it is entered is passed over for the member's state of
// now, which replaced it; one still in place fails fn's calls.
func pinState(m *member) (*tokenState, viewUser) {
	for {
		st := m.state()
		u, ok := st.tok.(viewUser)
		if !ok {
			return st, nil
		}
		if u.enter() {
			return st, u
		}
		if m.state() == st {
			return st, nil
		}
	}
}

// pick returns the healthy member, not yet tried, with the fewest
// operations in flight relative to its session limit. The scan starts at a
// random member, so that ties (idle members, most of the time with fast
// HSMs) spread the load instead of all going to the first.
func (p *Pool) pick(tried map[*member]bool) *member {
	var best *member
	var bestLoad float64
	off := mrand.IntN(len(p.members))
	for i := range p.members {
		m := p.members[(off+i)%len(p.members)]
		if tried[m] || !m.healthy.Load() {
			continue
		}
		load := float64(m.inFlight.Load()) / float64(m.limit.Load())
		if best == nil || load < bestLoad {
			best, bestLoad = m, load
		}
	}
	return best
}
