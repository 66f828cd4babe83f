package hsmpool

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// viewOf returns the member's token view.
func viewOf(t testing.TB, p *Pool, i int) *p11Token {
	t.Helper()
	tok, ok := p.members[i].state().tok.(*p11Token)
	if !ok {
		t.Fatalf("member %s has no open token", p.members[i].name)
	}
	return tok
}

// sessionKeys lists the session secret keys the process holds on the
// token, by label: the copies (the token's own keys are token objects).
func sessionKeys(t *testing.T, tok *p11Token) map[string][]pkcs11.ObjectHandle {
	t.Helper()
	out := map[string][]pkcs11.ObjectHandle{}
	err := tok.raw.with(func(s pkcs11.SessionHandle) error {
		objs, err := findObjects(tok.raw.p, s, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		})
		if err != nil {
			return err
		}
		for _, o := range objs {
			a, err := tok.raw.p.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			if err != nil {
				return err
			}
			out[string(a[0].Value)] = append(out[string(a[0].Value)], o)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// checkServesCopies checks that every key of the view is served from a
// session copy of its own, which is a sensitive, non-extractable session
// object, and that these copies are all the session keys of the token.
func checkServesCopies(t *testing.T, tok *p11Token) {
	t.Helper()
	if err := tok.sessionCopies(); err != nil {
		t.Fatalf("member %s serves from its token keys: %v", tok.name, err)
	}
	found := sessionKeys(t, tok)
	if len(found) != len(tok.tokenKeys) {
		t.Fatalf("%d labels of session keys on the token (%v), want one per key (%d)", len(found), found, len(tok.tokenKeys))
	}
	for id, tk := range tok.tokenKeys {
		h := tok.handles[id]
		if h == tk || !slices.Equal(found[id.Label()], []pkcs11.ObjectHandle{h}) {
			t.Fatalf("%s: served with %d, token key %d, session keys with its label %v", id.Label(), h, tk, found[id.Label()])
		}
		err := tok.raw.with(func(s pkcs11.SessionHandle) error {
			a, err := tok.raw.p.GetAttributeValue(s, h, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, nil),
				pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, nil),
				pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, nil),
			})
			if err != nil {
				return err
			}
			return protectedCopy(a)
		})
		if err != nil {
			t.Fatalf("the copy of %s: %v", id.Label(), err)
		}
		// Its material cannot be read.
		err = tok.raw.with(func(s pkcs11.SessionHandle) error {
			_, err := tok.raw.p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
			return err
		})
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_SENSITIVE)) {
			t.Fatalf("reading CKA_VALUE of the copy of %s: %v, want CKR_ATTRIBUTE_SENSITIVE", id.Label(), err)
		}
	}
}

// roundTrip runs a PIN check and a seal and open through the pool.
func roundTrip(t *testing.T, p *Pool, wrap vault.KeyID, pin vault.KeyID) {
	t.Helper()
	ctx := context.Background()
	if _, err := p.HMAC(ctx, pin, []byte("pin check")); err != nil {
		t.Fatal(err)
	}
	nonce, pt, aad := make([]byte, 12), []byte("a history key of 32 bytes......."), []byte("aad")
	rand.Read(nonce)
	ct, err := p.Seal(ctx, wrap, nonce, pt, aad)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := p.Open(ctx, wrap, nonce, ct, aad); err != nil || !bytes.Equal(back, pt) {
		t.Fatalf("open under %s: %q %v", wrap.Label(), back, err)
	}
}

// Every key a SoftHSM member serves with is a session copy, sensitive
// and non-extractable, seen by the member's other sessions; the pool
// serves from them with the same check values as from the token keys,
// says so at info once, and hsm check says so too.
func TestSessionCopiesServe(t *testing.T) {
	for _, profile := range []vault.Profile{vault.ProfileGCM, vault.ProfileHMAC} {
		t.Run(string(profile), func(t *testing.T) {
			m := newMember(t, "a")
			if _, err := Provision([]MemberConfig{m}, profile); err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			var mu sync.Mutex
			p, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Logger: logTo(&logs, &mu)})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			checkServesCopies(t, viewOf(t, p, 0))
			roundTrip(t, p, wrap1, pin1)
			mu.Lock()
			if n := strings.Count(logs.String(), "HSM member serves from session copies of its keys"); n != 1 {
				t.Errorf("logged %d times that the member serves from copies, want once:\n%s", n, logs.String())
			}
			mu.Unlock()

			// The same check values as the token keys give.
			mods := NewModules()
			mods.noCopies = true
			defer mods.Close()
			plain, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Modules: mods})
			if err != nil {
				t.Fatal(err)
			}
			defer plain.Close()
			if pv := viewOf(t, plain, 0); !maps.Equal(pv.handles, pv.tokenKeys) {
				t.Fatalf("with copies turned off: served with %v, token keys %v", pv.handles, pv.tokenKeys)
			}
			if !maps.EqualFunc(p.ref(), plain.ref(), bytes.Equal) {
				t.Fatalf("check values from the copies %x, from the token keys %x", p.ref(), plain.ref())
			}

			c := Check([]MemberConfig{m}, "")[0]
			if c.Err != nil || c.Caps.SessionCopies != "yes" {
				t.Fatalf("hsm check: session key copies %q (%v), want yes", c.Caps.SessionCopies, c.Err)
			}
			var out bytes.Buffer
			c.Caps.Write(&out)
			if !strings.Contains(out.String(), "  session key copies: yes\n") {
				t.Fatalf("hsm check output lacks the copies line:\n%s", out.String())
			}
		})
	}
	// A token without keys has nothing to copy, and says so.
	c := Check([]MemberConfig{newMember(t, "empty")}, "")[0]
	if c.Caps == nil || !strings.HasPrefix(c.Caps.SessionCopies, "not tried") {
		t.Fatalf("hsm check on an empty token: session key copies %+v", c.Caps)
	}
}

// A token that refuses copies, or makes one that is extractable or not
// sensitive, serves with its token keys: the pool logs which once, hsm
// check names the reason, every operation passes, and no session key is
// left on the token.
func TestSessionCopiesRefusedFallBack(t *testing.T) {
	refusals := []struct {
		name, want string
		copy       func(real func() (pkcs11.ObjectHandle, error), p *pkcs11.Ctx, s pkcs11.SessionHandle, key pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error)
	}{
		{"not supported", "CKR_FUNCTION_NOT_SUPPORTED", func(_ func() (pkcs11.ObjectHandle, error), _ *pkcs11.Ctx, _ pkcs11.SessionHandle, _ pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
			return 0, pkcs11.Error(pkcs11.CKR_FUNCTION_NOT_SUPPORTED)
		}},
		{"action prohibited", "0x1B", func(_ func() (pkcs11.ObjectHandle, error), _ *pkcs11.Ctx, _ pkcs11.SessionHandle, _ pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
			return 0, pkcs11.Error(pkcs11.CKR_ACTION_PROHIBITED)
		}},
		// Every second copy is refused: the key copied before it goes
		// again.
		{"template inconsistent, second key", "CKR_TEMPLATE_INCONSISTENT", func() func(real func() (pkcs11.ObjectHandle, error), _ *pkcs11.Ctx, _ pkcs11.SessionHandle, _ pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
			var mu sync.Mutex
			n := 0
			return func(real func() (pkcs11.ObjectHandle, error), _ *pkcs11.Ctx, _ pkcs11.SessionHandle, _ pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
				mu.Lock()
				defer mu.Unlock()
				if n++; n%2 == 0 {
					return 0, pkcs11.Error(pkcs11.CKR_TEMPLATE_INCONSISTENT)
				}
				return real()
			}
		}()},
		// A token that hands back a key anyone can read.
		{"extractable", "the copy is extractable or not sensitive", func(_ func() (pkcs11.ObjectHandle, error), p *pkcs11.Ctx, s pkcs11.SessionHandle, _ pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
			return readableKey(p, s, true)
		}},
	}
	for _, r := range refusals {
		t.Run(r.name, func(t *testing.T) {
			m := newMember(t, "refuses")
			if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
				t.Fatal(err)
			}
			mods := NewModules()
			mods.copyObject = r.copy
			defer mods.Close()
			var logs bytes.Buffer
			var mu sync.Mutex
			p, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Logger: logTo(&logs, &mu), Modules: mods})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			tok := viewOf(t, p, 0)
			if err := tok.sessionCopies(); err == nil || !strings.Contains(err.Error(), r.want) {
				t.Fatalf("copies: %v, want refused for %s", err, r.want)
			}
			if !maps.Equal(tok.handles, tok.tokenKeys) {
				t.Fatalf("served with %v, token keys %v", tok.handles, tok.tokenKeys)
			}
			if found := sessionKeys(t, tok); len(found) != 0 {
				t.Fatalf("session keys left on the token: %v", found)
			}
			roundTrip(t, p, wrap1, pin1)
			// A reload keeps to the token keys, and says nothing new.
			if _, err := p.Reload(); err != nil {
				t.Fatal(err)
			}
			if tok := viewOf(t, p, 0); !maps.Equal(tok.handles, tok.tokenKeys) {
				t.Fatalf("after a reload: served with %v, token keys %v", tok.handles, tok.tokenKeys)
			}
			roundTrip(t, p, wrap1, pin1)
			mu.Lock()
			out := logs.String()
			mu.Unlock()
			if n := strings.Count(out, "HSM member serves from its token keys, not from session copies"); n != 1 || !strings.Contains(out, r.want) ||
				!strings.Contains(out, "level=INFO") {
				t.Fatalf("logged %d times at info that the member serves from token keys, naming %s, want once:\n%s", n, r.want, out)
			}

			c := mods.Check([]MemberConfig{m}, "")[0]
			if c.Err != nil || !strings.HasPrefix(c.Caps.SessionCopies, "no (") || !strings.Contains(c.Caps.SessionCopies, r.want) {
				t.Fatalf("hsm check: session key copies %q (%v), want no, naming %s", c.Caps.SessionCopies, c.Err, r.want)
			}
		})
	}
}

// Reload copies the new versions' keys and shares the copies of the
// others; Retire destroys the copies of the version it retires before
// the keys, and no view serves with them after; Forget does the same
// without destroying the keys.
func TestSessionCopiesRetire(t *testing.T) {
	m := newMember(t, "a")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), m)
	before := viewOf(t, p, 0)
	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	tok := viewOf(t, p, 0)
	checkServesCopies(t, tok)
	if len(tok.tokenKeys) != 5 {
		t.Fatalf("%d keys after the reload, want 5", len(tok.tokenKeys))
	}
	for id, h := range before.handles {
		if tok.handles[id] != h {
			t.Fatalf("the reload copied %s again (%d, was %d)", id.Label(), tok.handles[id], h)
		}
	}
	wrap2, pin2 := vault.KeyID{Role: vault.RoleWrap, Version: 2}, vault.KeyID{Role: vault.RolePIN, Version: 2}
	roundTrip(t, p, wrap2, pin2)
	retired := []pkcs11.ObjectHandle{tok.handles[wrap1], tok.handles[pin1]}

	if _, err := p.Retire(1); err != nil {
		t.Fatal(err)
	}
	after := viewOf(t, p, 0)
	checkServesCopies(t, after)
	if _, ok := after.handles[wrap1]; ok || len(after.handles) != 3 {
		t.Fatalf("after retire the view serves %v", after.handles)
	}
	for _, h := range retired {
		err := after.raw.with(func(s pkcs11.SessionHandle) error {
			_, err := after.raw.p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil)})
			return err
		})
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID)) {
			t.Fatalf("the copy %d of a retired key: %v, want CKR_OBJECT_HANDLE_INVALID", h, err)
		}
	}
	roundTrip(t, p, wrap2, pin2)
	if _, err := p.HMAC(context.Background(), pin1, []byte("x")); err == nil {
		t.Fatal("a PIN check under the retired version passed")
	}

	// Forget, on a pool beside it that still uses version 2 and 3.
	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	other := openPool(t, prometheus.NewRegistry(), m)
	ov := viewOf(t, other, 0)
	forgotten := []pkcs11.ObjectHandle{ov.handles[wrap2], ov.handles[pin2]}
	if err := other.Forget(2); err != nil {
		t.Fatal(err)
	}
	ov = viewOf(t, other, 0)
	if _, ok := ov.handles[wrap2]; ok || ov.copies.count() != 3 || ov.sessionCopies() != nil {
		t.Fatalf("after Forget(2): serving %v, %d copies (%v)", ov.handles, ov.copies.count(), ov.sessionCopies())
	}
	for _, h := range forgotten {
		err := ov.raw.with(func(s pkcs11.SessionHandle) error {
			_, err := ov.raw.p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil)})
			return err
		})
		if !errors.Is(err, pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID)) {
			t.Fatalf("the copy %d of a forgotten key: %v, want CKR_OBJECT_HANDLE_INVALID", h, err)
		}
	}
	wrap3, pin3 := vault.KeyID{Role: vault.RoleWrap, Version: 3}, vault.KeyID{Role: vault.RolePIN, Version: 3}
	if _, err := other.Reload(); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, other, wrap3, pin3)
}

// A member re-opened makes new copies (the old ones went with their
// session); a member whose token keys vanish under its copies (the token
// re-initialised, or gone) is taken out within tokenCheckInterval, as it
// would be serving with the token keys, and its probe does not pass on
// the copies.
func TestSessionCopiesReopenAndTokenGone(t *testing.T) {
	m := newMember(t, "a")
	p := provisionedPool(t, m, vault.ProfileGCM, Options{})
	defer p.Close()
	old := viewOf(t, p, 0)
	oldCopies := slices.Collect(maps.Values(old.handles))
	if err := p.reopen(p.members[0]); err != nil {
		t.Fatal(err)
	}
	tok := viewOf(t, p, 0)
	if tok == old || tok.copies == old.copies {
		t.Fatal("the member was not re-opened")
	}
	checkServesCopies(t, tok)
	if n := old.copies.count(); n != 0 {
		t.Fatalf("%d copies left of the closed token", n)
	}
	for _, h := range oldCopies {
		if slices.Contains(slices.Collect(maps.Values(tok.handles)), h) {
			continue // a handle number the token gave again
		}
		err := tok.raw.with(func(s pkcs11.SessionHandle) error {
			_, err := tok.raw.p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil)})
			return err
		})
		if err == nil {
			t.Fatalf("an old copy %d survived the re-open", h)
		}
	}
	roundTrip(t, p, wrap1, pin1)

	// The token keys go, as when a token is re-initialised: the copies
	// still work, but the member must not keep serving on them.
	destroyTokenKeys(t, m, wrap1, pin1, root1)
	ctx := context.Background()
	deadline := time.Now().Add(2 * time.Second)
	for p.members[0].healthy.Load() {
		if time.Now().After(deadline) {
			t.Fatal("the member still serves 2 s after its token keys went")
		}
		p.HMAC(ctx, pin1, []byte("x"))
		time.Sleep(5 * time.Millisecond)
	}
	if err := p.members[0].state().healthCheck(p.ref()); err == nil {
		t.Fatal("the probe's health check passes on the copies of keys the token lost")
	}
}

// opencryptoki's soft token copies keys too: its member serves from
// sensitive, non-extractable session copies, under the hmac profile (it
// has no AES-GCM).
func TestSessionCopiesOpencryptoki(t *testing.T) {
	m := opencryptokiMember(t, "oc")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileHMAC); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), m)
	tok := viewOf(t, p, 0)
	checkServesCopies(t, tok)
	if line := tok.copiesLine(); line != "yes" {
		t.Fatalf("opencryptoki session key copies: %s", line)
	}
	roundTrip(t, p, wrap1, pin1)
	if _, err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	roundTrip(t, p, wrap1, pin1)
}

// anchorsFail is a token whose anchor writes fail.
type anchorsFail struct{ *p11Token }

func (anchorsFail) WriteAnchor(context.Context, uint64, []byte) error {
	return pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)
}

// Key operations served from copies no longer touch the token, so a
// failed anchor write asks the token keys: a member whose keys answer
// stays in, one whose keys are gone is taken out at once, with no key
// operation.
func TestAnchorFailureChecksTokenKeys(t *testing.T) {
	m := newMember(t, "a")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	tok, err := NewModules().openToken(m)
	if err != nil {
		t.Fatal(err)
	}
	p, err := newPool([]MemberConfig{m}, []token{anchorsFail{tok}}, make([]error, 1),
		Options{Registerer: prometheus.NewRegistry(), ProbeBackoff: time.Hour, ProbeBackoffMax: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx := context.Background()
	if err := p.WriteAnchor(ctx, "a", 1, []byte("x")); err == nil {
		t.Fatal("the anchor write passed")
	}
	if !p.members[0].healthy.Load() {
		t.Fatal("a failed anchor write took out a member whose keys answer")
	}
	err = withSession(m, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		objs, err := findObjects(c, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)})
		for _, o := range objs {
			if err == nil {
				err = c.DestroyObject(s, o)
			}
		}
		return err
	}, func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if err := p.WriteAnchor(ctx, "a", 2, []byte("x")); !errors.Is(err, pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)) {
		t.Fatalf("the anchor write: %v, want the token's answer", err)
	}
	if p.members[0].healthy.Load() {
		t.Fatal("the member still serves after an anchor write failed and its token keys are gone")
	}
}

// provisionedPool provisions m's keys under profile and opens a pool on
// m with opts and a registry of its own, whose probes wait an hour, so
// that the test decides when a member is probed. The caller closes it.
func provisionedPool(t testing.TB, m MemberConfig, profile vault.Profile, opts Options) *Pool {
	t.Helper()
	if _, err := Provision([]MemberConfig{m}, profile); err != nil {
		t.Fatal(err)
	}
	opts.Registerer = prometheus.NewRegistry()
	opts.ProbeBackoff, opts.ProbeBackoffMax = time.Hour, time.Hour
	p, err := Open([]MemberConfig{m}, opts)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// readableKey makes, in place of a session copy, a session key anyone can
// read (not sensitive, extractable) that the token destroys or not as
// destroyable says: what a copy refused for its attributes looks like.
func readableKey(p *pkcs11.Ctx, s pkcs11.SessionHandle, destroyable bool) (pkcs11.ObjectHandle, error) {
	v := make([]byte, 32)
	rand.Read(v)
	tmpl := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_GENERIC_SECRET),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, false),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE, v),
	}
	if !destroyable {
		tmpl = append(tmpl, pkcs11.NewAttribute(pkcs11.CKA_DESTROYABLE, false))
	}
	return p.CreateObject(s, tmpl)
}
