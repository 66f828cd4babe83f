package hsmpool

import (
	"bytes"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/vault"
)

// keyCopies holds session copies of a token's keys, which the token's
// views serve with instead of the token keys: C_CopyObject with
// CKA_TOKEN false. A token that re-reads a token key's state on every
// operation (SoftHSM, from its file under a lock) or that pays for a
// switch between token keys (NSS's softoken, about 10 ms) serves a copy
// at memory speed; the copy is as sensitive and non-extractable as the
// key, and never leaves the token.
//
// A copy is bound to its key's identity, not to a handle number (tokens
// give a destroyed object's number to the next object): it records the
// key's KeyID, the token key's handle, and the key's check value computed
// with the token key, which the copy must give too. A view shares a copy
// made for another only for the same KeyID and token key handle, and
// only once the token key, found by label again, gives that check value
// again. While serving, each copy's token key is checked again, label and
// check value, at most once per tokenCheckInterval (checkDue); a view
// that serves with its token keys checks them the same way, each against
// a keyCopy record of the token key itself (p11Token.checked).
//
// The copies live on a session of their own, open as long as the token
// is: session objects die with the session that made them, and every
// session of the process sees them. A copy is counted by reference, by
// the views that hold it, and destroyed when the last one is dropped, or
// when the token closes. A session holding an object the token would not
// destroy takes no more copies, and is closed, which destroys its
// objects, once no view holds a copy on it.
//
// A token that refuses a copy, gives one that is extractable or not
// sensitive, or one that does not give its key's check value, serves with
// its token keys from then on: every view made after it takes the token
// keys, and the copies made before it go as the views that hold them are
// dropped. Why is in off. A refused copy the token would not destroy,
// on a session other views hold copies on, stays until those views are
// dropped: acquire says so, and the pool renews the member's view at
// once.
//
// Safe for concurrent use; the serving path takes no lock of the copies
// (a view's copies are fixed when it is made).
type keyCopies struct {
	p    *pkcs11.Ctx
	slot uint
	// copyObject makes one copy: the module's C_CopyObject, or, in tests,
	// a token's emulated traits around it.
	copyObject func(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error)

	mu       sync.Mutex
	cur      *copySession // where new copies go; nil until one is needed
	sessions map[*copySession]bool
	live     map[*keyCopy]bool // every copy a view holds
	closed   bool
	off      error // nil while copies serve
}

// copySession is a session the copies are made on.
type copySession struct {
	s pkcs11.SessionHandle
	// held counts the copies on it that views hold.
	held int
	// stale: an object on it could not be destroyed. It takes no new
	// copies, shares none, and is closed once held falls to 0.
	stale bool
}

// keyCopy is one session copy of one token key: what the view serves
// the key with, and what its token key's identity is checked against.
// A view that serves with its token keys has one for each key that is
// no copy: h is the token key, and sess is nil (tokenKeyRecords).
type keyCopy struct {
	id    vault.KeyID
	tk, h pkcs11.ObjectHandle // the token key, and the copy
	kcv   []byte              // the check value both give
	sess  *copySession
	refs  int
	// lastCheck is when an operation last claimed the check of the token
	// key (unix nanoseconds): see checkDue.
	lastCheck atomic.Int64
}

// keySpec is a token key a view serves, and how to compute its check
// value with a key object on a session (the token key's or a copy's).
type keySpec struct {
	id  vault.KeyID
	tk  pkcs11.ObjectHandle
	kcv func(s pkcs11.SessionHandle, h pkcs11.ObjectHandle) ([]byte, error)
}

// errCopiesOff: copies are not made on this token (see Modules).
var errCopiesOff = errors.New("turned off")

// errTokenKey: a token key a view serves, with a copy of it or as it
// is, does not answer, or is no longer the key the view was made with.
// The member is at fault, never the request's data.
var errTokenKey = errors.New("a token key fails its identity check")

// errCopyLeft: a copy the token would not destroy is still on it, on a
// session that closes once no view holds a copy there.
var errCopyLeft = errors.New("it stays on its session until no view holds a copy there")

// tokenCheckInterval is how often, at most, an operation under a key
// first checks the key's token key: a copy lives in the library's memory
// and can outlive the token or the key (SoftHSM keeps serving a copy
// after its token directory is gone), and a key destroyed and made again
// under its label, or another key, may take a token key's old handle
// number (opencryptoki gives it to the next object), which a view serving
// with its token keys would then use. Such a member must be taken out.
const tokenCheckInterval = 250 * time.Millisecond

func newKeyCopies(p *pkcs11.Ctx, slot uint, off error) *keyCopies {
	return &keyCopies{p: p, slot: slot, off: off, sessions: map[*copySession]bool{}, live: map[*keyCopy]bool{},
		copyObject: func(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
			return p.CopyObject(s, key, template)
		}}
}

// acquire returns the copies to serve keys with, by KeyID: made now, or
// shared with another view once the token key gives the copy's check
// value again. It returns none if the token refuses copies (the view
// serves with its token keys); left then says that an object the token
// would not destroy stays on a session other views hold copies on,
// until they are dropped. It returns an error if a token key to share a
// copy of fails its check: the caller holds nothing then.
func (c *keyCopies) acquire(keys []keySpec) (_ map[vault.KeyID]*keyCopy, left bool, _ error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.off != nil || c.closed {
		return nil, false, nil
	}
	held := map[vault.KeyID]*keyCopy{}
	for _, k := range keys {
		cp, err := c.shareLocked(k)
		if err != nil {
			return nil, false, errors.Join(err, c.releaseLocked(held))
		}
		if cp == nil {
			var leftOn *copySession
			if cp, leftOn, err = c.copyLocked(k); err != nil {
				// The whole view serves with token keys, and so does
				// every view after it.
				rerr := c.releaseLocked(held)
				if leftOn != nil {
					// Released, the copies made before it no longer
					// keep its session open.
					err = c.leftLocked(leftOn, err)
				}
				if rerr != nil {
					err = fmt.Errorf("%w (and letting go of the copies made before it: %w)", err, rerr)
				}
				c.off = err
				return nil, errors.Is(err, errCopyLeft), nil
			}
		}
		held[k.id] = cp
	}
	return held, false, nil
}

// shareLocked returns a live copy of k's key, with one more reference,
// if there is one the token key still vouches for; nil if there is none.
// The caller found k.tk by k.id's label just now.
func (c *keyCopies) shareLocked(k keySpec) (*keyCopy, error) {
	for cp := range c.live {
		if cp.id != k.id || cp.tk != k.tk || cp.sess.stale {
			continue
		}
		got, err := k.kcv(cp.sess.s, k.tk)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", errTokenKey, k.id.Label(), err)
		}
		if !bytes.Equal(got, cp.kcv) {
			// Another key under the same label and handle: the copy is
			// not its, and goes with the views that hold it.
			return nil, nil
		}
		cp.refs++
		cp.sess.held++
		return cp, nil
	}
	return nil, nil
}

// copyLocked copies the token key into a session object and checks the
// copy: a session object, sensitive, not extractable, giving the token
// key's check value. A copy that is not is destroyed again and refused;
// left is its session if the token would not destroy it.
func (c *keyCopies) copyLocked(k keySpec) (_ *keyCopy, left *copySession, _ error) {
	if c.cur == nil || c.cur.stale {
		s, err := c.p.OpenSession(c.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		if err != nil {
			return nil, nil, fmt.Errorf("open a session for the copies: %w", err)
		}
		c.cur = &copySession{s: s}
		c.sessions[c.cur] = true
	}
	sess := c.cur
	want, err := k.kcv(sess.s, k.tk)
	if err != nil {
		return nil, nil, fmt.Errorf("check value of %s with the token key: %w", k.id.Label(), err)
	}
	h, err := c.copyObject(sess.s, k.tk, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)})
	if err != nil {
		return nil, nil, fmt.Errorf("C_CopyObject: %w", err)
	}
	attrs, err := c.p.GetAttributeValue(sess.s, h, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
	})
	if err == nil {
		err = protectedCopy(attrs)
	} else {
		err = fmt.Errorf("read the copy's attributes: %w", err)
	}
	if err == nil {
		var got []byte
		if got, err = k.kcv(sess.s, h); err != nil {
			err = fmt.Errorf("check value of the copy of %s: %w", k.id.Label(), err)
		} else if !bytes.Equal(got, want) {
			err = fmt.Errorf("the copy of %s gives check value %x, the token key %x", k.id.Label(), got, want)
		}
	}
	if err != nil {
		if derr := c.destroyLocked(sess, h); derr != nil {
			return nil, sess, fmt.Errorf("%w (and destroying it: %w)", err, derr)
		}
		return nil, nil, err
	}
	cp := &keyCopy{id: k.id, tk: k.tk, h: h, kcv: want, sess: sess, refs: 1}
	sess.held++
	c.live[cp] = true
	return cp, nil, nil
}

// destroyLocked destroys the copy h on sess. If the token refuses, sess
// turns stale: it is to be closed once no view holds a copy on it.
func (c *keyCopies) destroyLocked(sess *copySession, h pkcs11.ObjectHandle) error {
	err := c.p.DestroyObject(sess.s, h)
	if err != nil {
		sess.stale = true
	}
	return err
}

// leftLocked closes sess if it is stale and no view holds a copy on it,
// and says whether an object the token would not destroy (err) is still
// there after that.
func (c *keyCopies) leftLocked(sess *copySession, err error) error {
	if cerr := c.closeIfUnheldLocked(sess); cerr != nil {
		return fmt.Errorf("%w; closing its session failed too: %w", err, cerr)
	}
	if c.sessions[sess] {
		return fmt.Errorf("%w; %w", err, errCopyLeft)
	}
	return fmt.Errorf("%w; closing its session destroyed it", err)
}

// closeIfUnheldLocked closes a stale session that no view holds a copy
// on, which destroys every object on it.
func (c *keyCopies) closeIfUnheldLocked(sess *copySession) error {
	if !sess.stale || sess.held > 0 || !c.sessions[sess] {
		return nil
	}
	delete(c.sessions, sess)
	if c.cur == sess {
		c.cur = nil
	}
	return c.p.CloseSession(sess.s)
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

// retain takes another reference on copies, which the caller holds
// already.
func (c *keyCopies) retain(copies map[vault.KeyID]*keyCopy) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, cp := range copies {
		if c.live[cp] {
			cp.refs++
			cp.sess.held++
		}
	}
}

// release lets go of copies; a copy no view holds any more is destroyed.
// It reports every copy the token would not destroy.
func (c *keyCopies) release(copies map[vault.KeyID]*keyCopy) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.releaseLocked(copies)
}

// releaseLocked reports the copies it could not destroy that are still
// on the token after it: one whose stale session it closed is gone.
func (c *keyCopies) releaseLocked(copies map[vault.KeyID]*keyCopy) error {
	type failure struct {
		cp  *keyCopy
		err error
	}
	var failed []failure
	touched := map[*copySession]bool{}
	for _, cp := range copies {
		if !c.live[cp] {
			continue
		}
		touched[cp.sess] = true
		cp.sess.held--
		if cp.refs--; cp.refs > 0 {
			continue
		}
		delete(c.live, cp)
		if err := c.destroyLocked(cp.sess, cp.h); err != nil {
			failed = append(failed, failure{cp, err})
		}
	}
	var errs []error
	for sess := range touched {
		if err := c.closeIfUnheldLocked(sess); err != nil {
			errs = append(errs, fmt.Errorf("close a session of copies: %w", err))
		}
	}
	for _, f := range failed {
		if c.sessions[f.cp.sess] {
			errs = append(errs, fmt.Errorf("the session copy of %s: %w; %w", f.cp.id.Label(), f.err, errCopyLeft))
		}
	}
	return errors.Join(errs...)
}

// verdict is nil while the token's keys are served from copies, else why
// they are not.
func (c *keyCopies) verdict() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.off
}

// count is how many copies views hold.
func (c *keyCopies) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.live)
}

// checkDue reports whether an operation under the key should check its
// token key first, and claims the check if so: at most one per
// tokenCheckInterval for each copy or token key record.
func (cp *keyCopy) checkDue() bool {
	last := cp.lastCheck.Load()
	now := time.Now().UnixNano()
	return now-last >= int64(tokenCheckInterval) && cp.lastCheck.CompareAndSwap(last, now)
}

// close destroys every copy and closes their sessions. The caller makes
// sure no operation runs on them any more.
func (c *keyCopies) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	for cp := range c.live {
		// A copy the token would not destroy goes with its session.
		_ = c.p.DestroyObject(cp.sess.s, cp.h)
		delete(c.live, cp)
	}
	for sess := range c.sessions {
		c.p.CloseSession(sess.s)
		delete(c.sessions, sess)
	}
	c.cur = nil
}
