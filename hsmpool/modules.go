package hsmpool

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/vault"
)

// Modules keeps the PKCS#11 modules of a command loaded and initialised
// from their first use until Close, and owns what the tokens opened
// through it share for its lifetime: each token's anchor write guard
// (anchorGuard). A pool, and the check, provisioning and anchor passes of
// one command, share one Modules; two independent ones share nothing.
//
// A command that makes several passes over its members (the capability
// check, then provisioning, then the key listing) loads and initialises
// each module once through it: some token libraries do not survive
// C_Finalize and C_Initialize again in one process (opencryptoki 3.8
// crashed there), and SoftHSM sees tokens another process changed only at
// C_Initialize, so every pass of one command must see the same tokens.
//
// crypto11 initialises a module at its first context and finalises it
// when its last context closes, and fails if anything else initialised
// the module first. So Modules holds one crypto11 context per module, on
// the token of the first member that uses it, for as long as it is open:
// contexts opened and closed meanwhile (each pass's) never finalise it.
// Its own miekg/pkcs11 handle, for the calls crypto11 lacks (import,
// destroy by handle), shares that initialised library.
//
// Safe for concurrent use.
type Modules struct {
	mu   sync.Mutex
	libs map[string]*library
	// guards holds the anchor write guard of every token opened through
	// these modules, by module path and token label. Close keeps them:
	// an abandoned write may still be queued on one.
	guards map[string]*anchorGuard

	// failImport, when a test sets it, runs before each key import and
	// fails the import with its error: a fault on one member.
	failImport func(member string, id vault.KeyID) error
	// noCopies, when set, has the tokens opened through these modules
	// serve with their token keys, never with session copies: the
	// baseline of a benchmark.
	noCopies bool
	// copyObject, when a test sets it, makes the session copies of the
	// tokens opened through these modules in place of C_CopyObject: a
	// token's traits emulated around the real call, real.
	copyObject func(real func() (pkcs11.ObjectHandle, error), p *pkcs11.Ctx, s pkcs11.SessionHandle, key pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error)
	// dropWait, when a test sets it, is how long the views of the tokens
	// opened through these modules wait for their operations when
	// dropped, in place of dropWait.
	dropWait time.Duration
}

// keyCopies returns the session copies of a token opened on raw's
// handle, none made yet (see keyCopies).
func (m *Modules) keyCopies(raw *rawSessions) *keyCopies {
	var off error
	if m.noCopies {
		off = errCopiesOff
	}
	c := newKeyCopies(raw.p, raw.slot, off)
	if hook := m.copyObject; hook != nil {
		realCopy := c.copyObject
		c.copyObject = func(s pkcs11.SessionHandle, key pkcs11.ObjectHandle, template []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
			return hook(func() (pkcs11.ObjectHandle, error) { return realCopy(s, key, template) }, raw.p, s, key)
		}
	}
	return c
}

type library struct {
	pin *crypto11.Context
	p   *pkcs11.Ctx
}

// NewModules returns an empty set; modules load at their first use.
func NewModules() *Modules {
	return &Modules{libs: map[string]*library{}, guards: map[string]*anchorGuard{}}
}

// anchorObjects returns a new anchor store for the token, sharing the
// token's write guard with every other anchor store made for it here.
func (m *Modules) anchorObjects(module, label string) *anchorObjects {
	m.mu.Lock()
	defer m.mu.Unlock()
	key := module + "\x00" + label
	g, ok := m.guards[key]
	if !ok {
		g = &anchorGuard{turn: make(chan struct{}, 1)}
		m.guards[key] = g
	}
	return &anchorObjects{module: module, label: label, guard: g}
}

// use loads and initialises the member's module, once, and returns the
// handle for calls crypto11 lacks.
func (m *Modules) use(c MemberConfig) (*pkcs11.Ctx, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if l, ok := m.libs[c.Module]; ok {
		return l.p, nil
	}
	pin, err := crypto11.Configure(&crypto11.Config{Path: c.Module, TokenLabel: c.TokenLabel, Pin: c.PIN, MaxSessions: 2, GCMIVLength: 12})
	if err != nil {
		return nil, fmt.Errorf("member %s: open token %q on %s: %w", c.Name, c.TokenLabel, c.Module, scrubPIN(err, c.PIN))
	}
	p := pkcs11.New(c.Module)
	if p == nil {
		pin.Close()
		return nil, fmt.Errorf("member %s: cannot load PKCS#11 module %s", c.Name, c.Module)
	}
	if err := p.Initialize(); err != nil && !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		pin.Close()
		return nil, fmt.Errorf("member %s: initialise module: %w", c.Name, err)
	}
	m.libs[c.Module] = &library{pin: pin, p: p}
	return p, nil
}

// Close lets go of every module: crypto11 finalises one once no other
// context of this process uses it. Call it when the command's HSM work is
// over. The libraries stay loaded (the handle is never destroyed): a
// later use initialises them again without loading them again.
func (m *Modules) Close() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	var errs []error
	for path, l := range m.libs {
		errs = append(errs, l.pin.Close())
		delete(m.libs, path)
	}
	return errors.Join(errs...)
}

// withSession logs in to the member's token on a session of the module's
// shared handle, runs check then fn, and ends the session (see session).
func (m *Modules) withSession(c MemberConfig, fn func(*pkcs11.Ctx, pkcs11.SessionHandle) error, check func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error) error {
	p, s, end, err := m.session(c)
	if err != nil {
		return err
	}
	defer end()
	if err := check(p, s, c.Name); err != nil {
		return err
	}
	return fn(p, s)
}

// session opens a session on the member's token on its module's shared
// handle and logs in. end closes it, and logs out unless the token was
// logged in already (by a crypto11 context of this process: logging out
// would invalidate its key handles). The module stays initialised.
// Object handles of private objects last only while the login does.
func (m *Modules) session(c MemberConfig) (p *pkcs11.Ctx, s pkcs11.SessionHandle, end func(), err error) {
	if p, err = m.use(c); err != nil {
		return nil, 0, nil, err
	}
	slot, err := findSlot(p, c.TokenLabel)
	if err != nil {
		return nil, 0, nil, fmt.Errorf("member %s: %w", c.Name, err)
	}
	if s, err = p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
		return nil, 0, nil, fmt.Errorf("member %s: open session: %w", c.Name, err)
	}
	switch err := p.Login(s, pkcs11.CKU_USER, c.PIN); {
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)):
		return p, s, func() { p.CloseSession(s) }, nil
	case err != nil:
		p.CloseSession(s)
		return nil, 0, nil, fmt.Errorf("member %s: log in: %w", c.Name, scrubPIN(err, c.PIN))
	}
	return p, s, func() { p.Logout(s); p.CloseSession(s) }, nil
}

// findObjects returns every object on the session's token that matches
// template.
func findObjects(p *pkcs11.Ctx, s pkcs11.SessionHandle, template []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := p.FindObjectsInit(s, template); err != nil {
		return nil, fmt.Errorf("find objects: %w", err)
	}
	var all []pkcs11.ObjectHandle
	for {
		objs, _, err := p.FindObjects(s, 16)
		if err != nil {
			p.FindObjectsFinal(s)
			return nil, fmt.Errorf("find objects: %w", err)
		}
		if len(objs) == 0 {
			break
		}
		all = append(all, objs...)
	}
	if err := p.FindObjectsFinal(s); err != nil {
		return nil, fmt.Errorf("find objects: %w", err)
	}
	return all, nil
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
