package hsmpool

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"
)

// AnchorApplication is the CKA_APPLICATION of the data objects that hold
// rollback anchors on each member (see package anchor).
const AnchorApplication = "keyvault-anchor"

// anchorSlotValue is the CKA_VALUE of every slot object: fixed, as
// SoftHSM makes a data object's value read-only once created.
var anchorSlotValue = []byte("keyvault anchor slot")

// errStaleAnchor: an anchor write arrived after a newer one.
var errStaleAnchor = errors.New("a newer anchor has been written to this member")

// anchorObjects keeps a token's anchors in two private data objects,
// "slots", and writes them in turn: each write replaces the older slot in
// place, so the newer one stands if the write is cut off. (SoftHSM rewrites
// an object's file in place without fsync; a SIGKILL mid-write leaves a
// torn file, which C_FindObjects skips.) The anchor is kept, base64
// encoded, in the slot's CKA_LABEL: SoftHSM makes a data object's
// CKA_VALUE read-only once created, and replacing an object costs a create
// (about 2.7 ms on SoftHSM) where an in-place update costs about 0.3 ms,
// and every write of the store waits for one.
//
// It reaches the objects through miekg/pkcs11, as crypto11 has no
// data-object calls. It shares the module crypto11 loaded (Initialize
// answers CKR_CRYPTOKI_ALREADY_INITIALIZED, which is fine), never
// finalises it and never logs in or out: PKCS#11 login state belongs to
// the application, so its session is logged in through crypto11's, and a
// logout here would invalidate every key handle. Its one session is
// opened on first use and serialised by mu.
type anchorObjects struct {
	module, label string

	mu      sync.Mutex
	ctx     *pkcs11.Ctx
	session pkcs11.SessionHandle
	// slots are the two slot objects this session has written, the
	// newest last; nil: not known, so the next write starts over: it
	// creates both and removes every other anchor object on the token.
	slots []pkcs11.ObjectHandle
	// guard is the token's, shared by every anchorObjects that one
	// Modules makes for it (Modules.anchorObjects).
	guard *anchorGuard
}

// anchorGuard serialises the anchor writes to one token and keeps the
// highest write number written to it. It belongs to the token, kept by the
// Modules the token was opened through, not to one anchorObjects: a member that fails is reopened with a new one, and a
// write abandoned on the old one (queued behind a hung call) may run after
// the new one has taken newer writes; starting over, it would destroy them.
// A write waits for its turn only as long as its context allows, so a call
// that hangs holding the turn costs the writes after it their timeout, not
// their goroutines and sessions.
type anchorGuard struct {
	turn  chan struct{} // holds a value while a write runs
	lastW uint64        // read and written only while holding the turn
}

func (a *anchorObjects) open() error {
	if a.ctx != nil {
		return nil
	}
	p := pkcs11.New(a.module)
	if p == nil {
		return fmt.Errorf("anchor objects: cannot load PKCS#11 module %s", a.module)
	}
	if err := p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		p.Destroy()
		return fmt.Errorf("anchor objects: initialise module: %w", err)
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		p.Destroy()
		return fmt.Errorf("anchor objects: list slots: %w", err)
	}
	for _, s := range slots {
		if ti, err := p.GetTokenInfo(s); err == nil && ti.Label == a.label {
			session, err := p.OpenSession(s, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
			if err != nil {
				p.Destroy()
				return fmt.Errorf("anchor objects: open session: %w", err)
			}
			a.ctx, a.session = p, session
			return nil
		}
	}
	p.Destroy()
	return fmt.Errorf("anchor objects: no token labelled %q", a.label)
}

// close drops the session. The library stays loaded for crypto11.
func (a *anchorObjects) close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.ctx != nil {
		a.ctx.CloseSession(a.session)
		a.ctx.Destroy()
		a.ctx, a.slots = nil, nil
	}
}

// with runs fn on the session, opening it if needed. After an error the
// session is dropped, so the next call starts from a fresh one.
func (a *anchorObjects) with(fn func(*pkcs11.Ctx, pkcs11.SessionHandle) error) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.open(); err != nil {
		return err
	}
	if err := fn(a.ctx, a.session); err != nil {
		a.ctx.CloseSession(a.session)
		a.ctx.Destroy()
		a.ctx, a.slots = nil, nil
		return err
	}
	return nil
}

// anchorTemplate finds the anchor objects (slots) on a token; each holds
// its anchor in CKA_LABEL.
var anchorTemplate = []*pkcs11.Attribute{
	pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
	pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
	pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, AnchorApplication),
}

// findAnchors returns every anchor object on the token.
func findAnchors(p *pkcs11.Ctx, s pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
	return findObjects(p, s, anchorTemplate)
}

func (a *anchorObjects) ReadAnchors() ([][]byte, error) {
	var values [][]byte
	err := a.with(func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		objs, err := findAnchors(p, s)
		if err != nil {
			return err
		}
		for _, o := range objs {
			attrs, err := p.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil {
				return fmt.Errorf("read anchor: %w", err)
			}
			v := attrs[0].Value
			// A label that does not decode is passed on as it is: it
			// fails the anchor's MAC, and the check counts it.
			if d, err := base64.RawStdEncoding.DecodeString(string(v)); err == nil {
				v = d
			}
			values = append(values, v)
		}
		return nil
	})
	return values, err
}

func (a *anchorObjects) WriteAnchor(ctx context.Context, w uint64, value []byte) error {
	select {
	case a.guard.turn <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("anchor write %d: waiting for the token's previous write: %w", w, ctx.Err())
	}
	defer func() { <-a.guard.turn }()
	if w <= a.guard.lastW {
		return fmt.Errorf("anchor write %d: %w (%d)", w, errStaleAnchor, a.guard.lastW)
	}
	return a.with(func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		label := pkcs11.NewAttribute(pkcs11.CKA_LABEL, base64.RawStdEncoding.EncodeToString(value))
		if len(a.slots) == 2 {
			older := a.slots[0]
			if err := p.SetAttributeValue(s, older, []*pkcs11.Attribute{label}); err != nil {
				return fmt.Errorf("write anchor: %w", err)
			}
			a.slots[0], a.slots[1] = a.slots[1], older
			a.guard.lastW = w
			return nil
		}
		old, err := findAnchors(p, s)
		if err != nil {
			return err
		}
		// Starting over: both slots are created at once, holding the same
		// anchor, and every other anchor object goes. Creating objects
		// after start is avoided: a SoftHSM process that creates or
		// destroys an object stops noticing objects other processes
		// created meanwhile (keys rotate while the vault runs), and a key
		// reload would then miss the new keys.
		slots := make([]pkcs11.ObjectHandle, 2)
		for i := range slots {
			// Private: only a logged-in application reads or writes it.
			if slots[i], err = p.CreateObject(s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
				pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, true),
				pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, AnchorApplication),
				// Some tokens (tpm2-pkcs11) refuse a data object without
				// CKA_VALUE. The anchor itself is in the label, which
				// every token tested lets the owner update in place.
				pkcs11.NewAttribute(pkcs11.CKA_VALUE, anchorSlotValue),
				label,
			}); err != nil {
				return fmt.Errorf("create anchor: %w", err)
			}
		}
		a.slots, a.guard.lastW = slots, w
		// A failure here leaves the older objects beside the new ones;
		// readers take the newest valid anchor, so that is safe.
		for _, o := range old {
			if err := p.DestroyObject(s, o); err != nil {
				return fmt.Errorf("destroy an older anchor: %w", err)
			}
		}
		return nil
	})
}
