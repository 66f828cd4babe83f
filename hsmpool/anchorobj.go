package hsmpool

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/anchor"
)

// AnchorLabel is the CKA_LABEL of the data objects that hold rollback
// anchors on each member (see package anchor).
const AnchorLabel = "keyvault-anchor"

// anchorKeeper is a token that can keep anchor objects. Tokens that tests
// inject need not be one.
type anchorKeeper interface {
	// ReadAnchors returns the value of every anchor object on the token.
	ReadAnchors() ([][]byte, error)
	// WriteAnchor creates an anchor object holding value, then destroys
	// every other one. A failure after the create leaves both; readers
	// take the newest valid one, so that is safe.
	WriteAnchor(value []byte) error
}

// anchorObjects reaches a token's data objects through miekg/pkcs11:
// crypto11 has no data-object calls. It shares the module crypto11 loaded
// (Initialize answers CKR_CRYPTOKI_ALREADY_INITIALIZED, which is fine),
// never finalises it and never logs in or out: PKCS#11 login state belongs
// to the application, so its session is logged in through crypto11's, and
// a logout here would invalidate every key handle. Its one session is
// opened on first use and serialised by mu.
type anchorObjects struct {
	module, label string

	mu      sync.Mutex
	ctx     *pkcs11.Ctx
	session pkcs11.SessionHandle
	// known are the anchor objects on the token as of the last find or
	// write, so that a write need not search (a search costs SoftHSM a
	// pass over the token's objects); nil: search.
	known []pkcs11.ObjectHandle
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
		a.ctx = nil
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
		a.ctx, a.known = nil, nil
		return err
	}
	return nil
}

func anchorTemplate() []*pkcs11.Attribute {
	return []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, AnchorLabel),
	}
}

func findAnchors(p *pkcs11.Ctx, s pkcs11.SessionHandle) ([]pkcs11.ObjectHandle, error) {
	if err := p.FindObjectsInit(s, anchorTemplate()); err != nil {
		return nil, fmt.Errorf("find anchors: %w", err)
	}
	var all []pkcs11.ObjectHandle
	for {
		objs, _, err := p.FindObjects(s, 16)
		if err != nil {
			p.FindObjectsFinal(s)
			return nil, fmt.Errorf("find anchors: %w", err)
		}
		if len(objs) == 0 {
			break
		}
		all = append(all, objs...)
	}
	if err := p.FindObjectsFinal(s); err != nil {
		return nil, fmt.Errorf("find anchors: %w", err)
	}
	return all, nil
}

func (a *anchorObjects) ReadAnchors() ([][]byte, error) {
	var values [][]byte
	err := a.with(func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		objs, err := findAnchors(p, s)
		if err != nil {
			return err
		}
		a.known = objs
		for _, o := range objs {
			attrs, err := p.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
			if err != nil {
				return fmt.Errorf("read anchor: %w", err)
			}
			values = append(values, attrs[0].Value)
		}
		return nil
	})
	return values, err
}

func (a *anchorObjects) WriteAnchor(value []byte) error {
	return a.with(func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		old := a.known
		if old == nil {
			var err error
			if old, err = findAnchors(p, s); err != nil {
				return err
			}
		}
		// Private: only a logged-in application reads it. Not modifiable:
		// an anchor is replaced by a newer object, never edited.
		t := append(anchorTemplate(),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, false),
			pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, "keyvault"),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, value))
		h, err := p.CreateObject(s, t)
		if err != nil {
			return fmt.Errorf("create anchor: %w", err)
		}
		a.known = []pkcs11.ObjectHandle{h}
		for _, o := range old {
			if err := p.DestroyObject(s, o); err != nil {
				a.known = nil // search next time
				return fmt.Errorf("destroy an older anchor: %w", err)
			}
		}
		return nil
	})
}

func (t *p11Token) ReadAnchors() ([][]byte, error) { return t.anchorObjs.ReadAnchors() }
func (t *p11Token) WriteAnchor(v []byte) error     { return t.anchorObjs.WriteAnchor(v) }

// errNoAnchors: the member's token cannot keep anchor objects.
var errNoAnchors = errors.New("this member's token keeps no anchor objects")

// Members names the configured members, in config order.
func (p *Pool) Members() []string {
	names := make([]string, len(p.members))
	for i, m := range p.members {
		names[i] = m.name
	}
	return names
}

// ReadAnchors reads the anchor objects of every configured member, healthy
// or not: a member that does not answer is reported with its error, never
// left out, so that the start-up check knows who was silent.
func (p *Pool) ReadAnchors(ctx context.Context) []anchor.Found {
	found := make([]anchor.Found, len(p.members))
	var wg sync.WaitGroup
	for i, m := range p.members {
		wg.Go(func() {
			found[i] = anchor.Found{Member: m.name}
			err := p.onMember(ctx, m, "anchor_read", func(k anchorKeeper) error {
				var err error
				found[i].Values, err = k.ReadAnchors()
				return err
			})
			if err != nil {
				found[i] = anchor.Found{Member: m.name, Err: err}
			}
		})
	}
	wg.Wait()
	return found
}

// WriteAnchor writes value as the anchor of the named member.
func (p *Pool) WriteAnchor(ctx context.Context, member string, value []byte) error {
	for _, m := range p.members {
		if m.name == member {
			return p.onMember(ctx, m, "anchor_write", func(k anchorKeeper) error { return k.WriteAnchor(value) })
		}
	}
	return fmt.Errorf("write anchor: no member named %q", member)
}

// onMember runs an anchor call on one member with a session slot, the
// operation timeout and the pool's metrics. It does not fail the member:
// whether a silent member is dropped from the live set is the anchor
// writer's decision, and its key operations judge its health.
//
// It waits for a session as long as ctx allows, not QueueTimeout: shedding
// is for requests, and an anchor write that lost its place to them would
// hold back every answer of its batch, or drop a healthy member from the
// live set.
func (p *Pool) onMember(ctx context.Context, m *member, op string, fn func(anchorKeeper) error) error {
	select {
	case m.sessions <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("member %s: %s: waiting for a session: %w", m.name, op, ctx.Err())
	}
	_, err := p.run(ctx, m, op, func(_ *member, st *tokenState) ([]byte, error) {
		if st == nil || st.tok == nil {
			return nil, errors.New("member not open")
		}
		k, ok := st.tok.(anchorKeeper)
		if !ok {
			return nil, errNoAnchors
		}
		return nil, fn(k)
	})
	if err != nil {
		return fmt.Errorf("member %s: %s: %w", m.name, op, err)
	}
	return nil
}
