package hsmpool

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// keyCopies holds session copies of a token's keys, which the token's
// views serve with instead of the token keys: C_CopyObject with
// CKA_TOKEN false. A token that re-reads a token key's state on every
// operation (SoftHSM, from its file under a lock) or that pays for a
// switch between token keys (NSS's softoken, about 10 ms) serves a copy
// at memory speed; the copy is as sensitive and non-extractable as the
// key, and never leaves the token.
//
// The copies live on one session of their own, open as long as the token
// is: session objects die with the session that made them, and every
// session of the process sees them. A copy is shared by the views that
// serve its key (a reload or retire makes a new view and drops the old
// one), counted by reference, and destroyed when the last view holding it
// is dropped, or when the token closes.
//
// A token that refuses a copy, or gives one that is extractable or not
// sensitive, serves with its token keys from then on: every view made
// after it takes the token keys, and the copies made before it go as the
// views that hold them are dropped. Why is in off.
//
// Safe for concurrent use; the serving path takes no lock (the views'
// handles are fixed when they are made).
type keyCopies struct {
	p    *pkcs11.Ctx
	slot uint
	// copyObject makes one copy: the module's C_CopyObject, or, in tests,
	// a token's emulated traits around it.
	copyObject func(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)

	mu      sync.Mutex
	s       pkcs11.SessionHandle
	hasSess bool
	closed  bool
	off     error // nil while copies serve
	byKey   map[pkcs11.ObjectHandle]*keyCopy

	// lastCheck is when a serving operation last checked that the token
	// keys still answer (unix nanoseconds): see due.
	lastCheck atomic.Int64
}

type keyCopy struct {
	h    pkcs11.ObjectHandle
	refs int
}

// errCopiesOff: copies are not made on this token (see Modules).
var errCopiesOff = errors.New("turned off")

// tokenCheckInterval is how often, at most, an operation served from a
// copy first checks that the token still answers for its token key: a
// copy lives in the library's memory and can outlive the token (SoftHSM
// keeps serving a copy after its token directory is gone), and a member
// whose token is gone, or was re-initialised, must be taken out as it is
// when it serves with token keys.
const tokenCheckInterval = 250 * time.Millisecond

func newKeyCopies(p *pkcs11.Ctx, slot uint, off error) *keyCopies {
	return &keyCopies{p: p, slot: slot, off: off, byKey: map[pkcs11.ObjectHandle]*keyCopy{},
		copyObject: func(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
			return p.CopyObject(s, key, template)
		}}
}

// acquire returns the handles to serve keys with, by the token key's
// handle: a copy of each, made now or shared with another view, or, if
// the token refuses copies, the token keys themselves. held lists the
// token keys whose copies the caller now holds, for release.
func (c *keyCopies) acquire(keys []pkcs11.ObjectHandle) (serve map[pkcs11.ObjectHandle]pkcs11.ObjectHandle, held []pkcs11.ObjectHandle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	serve = map[pkcs11.ObjectHandle]pkcs11.ObjectHandle{}
	for _, k := range keys {
		serve[k] = k
	}
	if c.off != nil || c.closed {
		return serve, nil
	}
	for _, k := range keys {
		if cp, ok := c.byKey[k]; ok {
			cp.refs++
			held = append(held, k)
			continue
		}
		h, err := c.copyLocked(k)
		if err != nil {
			// The whole view serves with token keys, and so does every
			// view after it.
			c.off = err
			c.releaseLocked(held)
			for _, k := range keys {
				serve[k] = k
			}
			return serve, nil
		}
		c.byKey[k] = &keyCopy{h: h, refs: 1}
		held = append(held, k)
	}
	for _, k := range held {
		serve[k] = c.byKey[k].h
	}
	return serve, held
}

// copyLocked copies the token key k into a session object and checks the
// copy: a session object, sensitive, not extractable. A copy that is not
// is destroyed again and refused.
func (c *keyCopies) copyLocked(k pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
	if !c.hasSess {
		s, err := c.p.OpenSession(c.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return 0, fmt.Errorf("open a session for the copies: %w", err)
		}
		c.s, c.hasSess = s, true
	}
	h, err := c.copyObject(c.s, k, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)})
	if err != nil {
		return 0, fmt.Errorf("C_CopyObject: %w", err)
	}
	attrs, err := c.p.GetAttributeValue(c.s, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
	})
	if err == nil {
		err = protectedCopy(attrs)
	} else {
		err = fmt.Errorf("read the copy's attributes: %w", err)
	}
	if err != nil {
		if derr := c.p.DestroyObject(c.s, h); derr != nil {
			err = fmt.Errorf("%w (and destroying it: %w)", err, derr)
		}
		return 0, err
	}
	return h, nil
}

// protectedCopy checks the attributes a copy answered: CKA_TOKEN false,
// CKA_SENSITIVE true, CKA_EXTRACTABLE false, in that order.
func protectedCopy(attrs []*pkcs11.Attribute) error {
	if len(attrs) != 3 {
		return fmt.Errorf("the copy answered %d of 3 attributes", len(attrs))
	}
	is := func(a *pkcs11.Attribute, want byte) bool { return len(a.Value) == 1 && a.Value[0] == want }
	switch {
	case !is(attrs[0], 0):
		return errors.New("the copy is a token object")
	case !is(attrs[1], 1) || !is(attrs[2], 0):
		return errors.New("the copy is extractable or not sensitive")
	}
	return nil
}

// retain takes another reference on the copies of keys, which the caller
// holds already.
func (c *keyCopies) retain(keys []pkcs11.ObjectHandle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range keys {
		if cp, ok := c.byKey[k]; ok {
			cp.refs++
		}
	}
}

// release lets go of the copies of keys; a copy no view holds any more is
// destroyed.
func (c *keyCopies) release(keys []pkcs11.ObjectHandle) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.releaseLocked(keys)
}

func (c *keyCopies) releaseLocked(keys []pkcs11.ObjectHandle) {
	for _, k := range keys {
		cp, ok := c.byKey[k]
		if !ok {
			continue
		}
		if cp.refs--; cp.refs > 0 {
			continue
		}
		delete(c.byKey, k)
		if !c.closed {
			// A copy the token cannot destroy still goes with the
			// session, when the token closes.
			_ = c.p.DestroyObject(c.s, cp.h)
		}
	}
}

// verdict is nil while the token's keys are served from copies, else why
// they are not.
func (c *keyCopies) verdict() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.off
}

// count is how many copies exist.
func (c *keyCopies) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.byKey)
}

// due reports whether an operation should check the token keys first,
// and claims the check if so: at most one per tokenCheckInterval.
func (c *keyCopies) due() bool {
	last := c.lastCheck.Load()
	now := time.Now().UnixNano()
	return now-last >= int64(tokenCheckInterval) && c.lastCheck.CompareAndSwap(last, now)
}

// close destroys every copy and closes their session. The caller makes
// sure no operation runs on them any more.
func (c *keyCopies) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	if !c.hasSess {
		return
	}
	for k, cp := range c.byKey {
		_ = c.p.DestroyObject(c.s, cp.h)
		delete(c.byKey, k)
	}
	c.p.CloseSession(c.s)
}
