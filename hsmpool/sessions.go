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

	mu     sync.Mutex
	closed bool
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
	return &rawSessions{mod: mod, p: p, slot: slot, idle: make(chan pkcs11.SessionHandle, max)}, nil
}

// findSlot returns the first slot whose token carries label, as crypto11
// chooses.
func findSlot(p *pkcs11.Ctx, label string) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("list slots: %w", err)
	}
	for _, s := range slots {
		if ti, err := p.GetTokenInfo(s); err == nil && ti.Label == label {
			return s, nil
		}
	}
	return 0, fmt.Errorf("no token labelled %q", label)
}

// with runs fn on an idle session, or a new one. A session whose call
// failed is closed rather than reused: an operation a token left active
// after an error would make the next caller's Init fail.
func (r *rawSessions) with(fn func(pkcs11.SessionHandle) error) error {
	var s pkcs11.SessionHandle
	select {
	case s = <-r.idle:
	default:
		r.mu.Lock()
		closed := r.closed
		r.mu.Unlock()
		if closed {
			return errNoToken
		}
		var err error
		if s, err = r.p.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION); err != nil {
			return fmt.Errorf("open session: %w", err)
		}
	}
	err := fn(s)
	r.mu.Lock()
	defer r.mu.Unlock()
	if err != nil || r.closed {
		r.p.CloseSession(s)
		return err
	}
	select {
	case r.idle <- s:
	default:
		r.p.CloseSession(s)
	}
	return nil
}

// findKey returns the handle of the one secret key labelled label.
func (r *rawSessions) findKey(label string) (h pkcs11.ObjectHandle, err error) {
	err = r.with(func(s pkcs11.SessionHandle) error {
		objs, err := findObjects(r.p, s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
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
	for {
		select {
		case s := <-r.idle:
			r.p.CloseSession(s)
		default:
			// The miekg handle is left as it is, not destroyed: a busy
			// session may still come back and be closed through it.
			return
		}
	}
}
