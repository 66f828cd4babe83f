package hsmpool

import (
	"errors"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/hsmpool/internal/p11raw"
)

// rawSessions is a member's bounded pool of sessions for the operations
// that p11raw makes in one call (HMAC, GCM seal and open). It reaches the
// token through a second miekg/pkcs11 handle on the module crypto11
// loaded: one library instance, so its sessions share crypto11's login
// (PKCS#11 login state belongs to the application, not the session) and
// its object handles. It never logs in or out, never finalises the
// library, and never unloads it (the handle is never destroyed): some
// token libraries do not survive being loaded again.
type rawSessions struct {
	mod  *p11raw.Module
	p    *pkcs11.Ctx
	slot uint
	// idle holds at most max sessions; the pool's semaphore keeps the
	// member's callers, and so the open sessions, within max_sessions.
	idle chan pkcs11.SessionHandle
	// openSession opens one session on the slot: the module's
	// C_OpenSession, or, in tests, a token's emulated traits around it.
	openSession func(slot uint) (pkcs11.SessionHandle, error)
	// freed wakes a caller waiting at the token's session limit when a
	// session is closed rather than given back; done ends every wait.
	freed, done chan struct{}

	// openMu makes one session at a time, so that open is exact when the
	// token refuses one. Sessions are opened only while the pool grows
	// to its limit.
	openMu sync.Mutex
	mu     sync.Mutex
	closed bool
	open   int // sessions open, idle or busy
	// busy counts the calls running on a session; drained is signalled
	// when it falls to 0, for close's callers to wait on (waitIdle).
	busy    int
	drained *sync.Cond
	// limit is the most sessions the token has given (0: no limit met):
	// the count open when it answered CKR_SESSION_COUNT.
	limit int
}

func openRawSessions(module, label string, max int) (*rawSessions, error) {
	p := pkcs11.New(module)
	if p == nil {
		return nil, fmt.Errorf("cannot load PKCS#11 module %s", module)
	}
	if err := p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return nil, fmt.Errorf("initialise module: %w", err)
	}
	mod, err := p11raw.FromCtx(p)
	if err != nil {
		return nil, err
	}
	slot, err := findSlot(p, label)
	if err != nil {
		return nil, err
	}
	r := &rawSessions{mod: mod, p: p, slot: slot, idle: make(chan pkcs11.SessionHandle, max),
		freed: make(chan struct{}, 1), done: make(chan struct{})}
	r.drained = sync.NewCond(&r.mu)
	r.openSession = func(slot uint) (pkcs11.SessionHandle, error) {
		return p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	}
	return r, nil
}

// with runs fn on an idle session, or a new one. A session whose call
// failed is closed rather than reused: an operation a token left active
// after an error would make the next caller's Init fail.
func (r *rawSessions) with(fn func(pkcs11.SessionHandle) error) error {
	s, err := r.get()
	if err != nil {
		return err
	}
	err = fn(s)
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.busy--; r.busy == 0 {
		r.drained.Broadcast()
	}
	if err != nil || r.closed {
		r.closeLocked(s)
		return err
	}
	select {
	case r.idle <- s:
	default:
		r.closeLocked(s)
	}
	return nil
}

// get returns an idle session, or opens one. A token that refuses another
// session (CKR_SESSION_COUNT: its limit counts every session of the
// process, crypto11's and the anchors' included) while this pool has some
// open gets remembered as the limit, and the caller waits for one of
// those: the pool's semaphore shrinks to the limit (Pool.limitSessions),
// so only callers already past it wait here.
func (r *rawSessions) get() (pkcs11.SessionHandle, error) {
	s, err := r.take()
	if err != nil {
		return 0, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		r.closeLocked(s)
		return 0, errNoToken
	}
	r.busy++
	return s, nil
}

// take is get's search for a session: an idle one, a new one, or, at the
// token's limit, the next one given back.
func (r *rawSessions) take() (pkcs11.SessionHandle, error) {
	for {
		select {
		case s := <-r.idle:
			return s, nil
		default:
		}
		s, n, err := r.openOne()
		if err == nil {
			return s, nil
		}
		atLimit := errors.Is(err, pkcs11.Error(pkcs11.CKR_SESSION_COUNT)) && n > 0
		if !atLimit {
			return 0, fmt.Errorf("open session: %w", err)
		}
		select {
		case s := <-r.idle:
			return s, nil
		case <-r.freed:
		case <-r.done:
			return 0, errNoToken
		}
	}
}

// openOne opens a session, and returns the count of open sessions after
// it: when the token refuses one for its limit, that count is the limit,
// which it records.
func (r *rawSessions) openOne() (pkcs11.SessionHandle, int, error) {
	r.openMu.Lock()
	defer r.openMu.Unlock()
	r.mu.Lock()
	closed := r.closed
	r.mu.Unlock()
	if closed {
		return 0, 0, errNoToken
	}
	s, err := r.openSession(r.slot)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil {
		r.open++
		return s, r.open, nil
	}
	if errors.Is(err, pkcs11.Error(pkcs11.CKR_SESSION_COUNT)) && r.open > 0 && (r.limit == 0 || r.open < r.limit) {
		r.limit = r.open
	}
	return 0, r.open, err
}

// closeLocked closes a session that is not given back, and wakes a
// caller waiting at the token's limit to open one in its place.
func (r *rawSessions) closeLocked(s pkcs11.SessionHandle) {
	r.p.CloseSession(s)
	r.open--
	select {
	case r.freed <- struct{}{}:
	default:
	}
}

// waitIdle waits until no call runs on the sessions. After close, no new
// one starts, so the library can then be finalised without pulling it
// from under a call in flight (which crashes the process). A call that
// never returns keeps it waiting: closeToken gives up on it.
func (r *rawSessions) waitIdle() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.busy > 0 {
		r.drained.Wait()
	}
}

// sessionLimit is the most sessions the token has given, 0 if it has
// never refused one.
func (r *rawSessions) sessionLimit() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.limit
}

// findKey returns the handle of the one secret key token object labelled
// label (its session copies carry the label too).
func (r *rawSessions) findKey(label string) (h pkcs11.ObjectHandle, err error) {
	err = r.with(func(s pkcs11.SessionHandle) error {
		objs, err := findObjects(r.p, s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		})
		if err != nil {
			return err
		}
		if len(objs) != 1 {
			return fmt.Errorf("%d secret keys carry the label %s", len(objs), label)
		}
		h = objs[0]
		return nil
	})
	return h, err
}

// close closes the idle sessions; busy ones are closed as they come back.
// It must run before crypto11's context closes, which may finalise the
// library under them.
func (r *rawSessions) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return
	}
	r.closed = true
	close(r.done)
	for {
		select {
		case s := <-r.idle:
			r.closeLocked(s)
		default:
			// The miekg handle is left as it is, not destroyed: a busy
			// session may still come back and be closed through it.
			return
		}
	}
}
