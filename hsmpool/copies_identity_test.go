package hsmpool

// The session copies serve the key their view names and no other: each
// copy is bound to its key's identity (label and check value), checked
// per key while it serves, and destroyed only once nothing runs on it.

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// destroyTokenKeys destroys the token objects labelled as ids, on a
// session of modules of its own: another node retiring them.
func destroyTokenKeys(t *testing.T, m MemberConfig, ids ...vault.KeyID) {
	t.Helper()
	err := withSession(m, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		for _, id := range ids {
			objs, err := findObjects(c, s, []*pkcs11.Attribute{
				pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
				pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
				pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.Label()),
			})
			if err != nil {
				return err
			}
			for _, o := range objs {
				if err := c.DestroyObject(s, o); err != nil {
					return err
				}
			}
		}
		return nil
	}, func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
}

// claimTokenKeyChecks makes the token key check of every copy the view
// serves with not due for tokenCheckInterval, as if an operation had
// just made it.
func claimTokenKeyChecks(tok *p11Token) {
	for _, cp := range tok.held {
		cp.lastCheck.Store(time.Now().UnixNano())
	}
}

// handleReuse runs the other node's steps between the pool's open and
// its reload: retire version 1 and rotate to version 3, in either order.
func handleReuse(t *testing.T, retireFirst bool) {
	m := opencryptokiMember(t, "oc")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileHMAC); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), m)
	old := viewOf(t, p, 0)
	oldTokenKeys := map[vault.KeyID]pkcs11.ObjectHandle{wrap1: old.tokenKeys[wrap1], pin1: old.tokenKeys[pin1]}

	// Another node sharing the member retires version 1 and rotates to
	// version 3; this node has not reloaded in between.
	if retireFirst {
		destroyTokenKeys(t, m, wrap1, pin1)
	}
	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	if !retireFirst {
		destroyTokenKeys(t, m, wrap1, pin1)
	}
	if _, err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	now := viewOf(t, p, 0)
	checkServesCopies(t, now)
	wrap3 := vault.KeyID{Role: vault.RoleWrap, Version: 3}
	pin3 := vault.KeyID{Role: vault.RolePIN, Version: 3}
	for _, id := range []vault.KeyID{wrap3, pin3} {
		for oldID, h := range oldTokenKeys {
			if now.tokenKeys[id] == h {
				t.Logf("%s took the token handle %d of the destroyed %s", id.Label(), h, oldID.Label())
			}
		}
	}

	// The truth: the same token, served with its token keys.
	mods := NewModules()
	mods.noCopies = true
	defer mods.Close()
	plain, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Modules: mods})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if !maps.EqualFunc(p.ref(), plain.ref(), bytes.Equal) {
		t.Errorf("check values served %x, the token keys' %x", p.ref(), plain.ref())
	}
	// A record sealed by the serving pool opens under the token key.
	ctx := context.Background()
	nonce, pt, aad := make([]byte, 12), []byte("a history key of 32 bytes......."), []byte("aad")
	rand.Read(nonce)
	ct, err := p.Seal(ctx, wrap3, nonce, pt, aad)
	if err != nil {
		t.Fatal(err)
	}
	if back, err := plain.Open(ctx, wrap3, nonce, ct, aad); err != nil || !bytes.Equal(back, pt) {
		t.Errorf("a record sealed under %s by the serving pool does not open under the token key: %v", wrap3.Label(), err)
	}
}

// A copy is bound to its key, not to the token key's handle number: on
// opencryptoki, which gives a destroyed key's handle to the next key,
// keys made after another node destroyed version 1 take its handles, and
// a reload still serves each version from a copy of that version's key
// (same check values as the token keys; records open under them).
func TestCopiesBoundToKeyIdentity(t *testing.T) {
	t.Run("retire then rotate", func(t *testing.T) { handleReuse(t, true) })
	t.Run("rotate then retire", func(t *testing.T) { handleReuse(t, false) })
}

// A view's copies outlive every operation that entered it: Retire
// destroys the retired version's copies only once the operation running
// on the old view has ended, and an operation that reaches a view whose
// copies are gone fails instead of running on their handle numbers,
// which opencryptoki gives to the next copies.
func TestDroppedViewCopiesOutliveItsOperations(t *testing.T) {
	m := opencryptokiMember(t, "oc")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileHMAC); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), m)
	old := viewOf(t, p, 0)
	retired := map[pkcs11.ObjectHandle]vault.KeyID{old.handles[wrap1]: wrap1, old.handles[pin1]: pin1}
	alive := func(h pkcs11.ObjectHandle) error {
		return old.raw.with(func(s pkcs11.SessionHandle) error {
			_, err := old.raw.p.GetAttributeValue(s, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, nil)})
			return err
		})
	}

	// An operation is in flight on the old view while Retire runs.
	if !old.enter() {
		t.Fatal("the view refuses an operation")
	}
	done := make(chan error, 1)
	go func() {
		_, err := p.Retire(1)
		done <- err
	}()
	time.Sleep(200 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("Retire returned while an operation ran on the view it drops: %v", err)
	default:
	}
	for h, id := range retired {
		if err := alive(h); err != nil {
			t.Fatalf("the copy of %s was destroyed under an operation in flight: %v", id.Label(), err)
		}
	}
	old.leave()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for h, id := range retired {
		if err := alive(h); !errors.Is(err, pkcs11.Error(pkcs11.CKR_OBJECT_HANDLE_INVALID)) {
			t.Fatalf("the copy of %s after its last operation: %v, want CKR_OBJECT_HANDLE_INVALID", id.Label(), err)
		}
	}

	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	now := viewOf(t, p, 0)
	msg := []byte("a PIN check")
	for id, h := range now.handles {
		if was, ok := retired[h]; ok {
			t.Logf("the retired %s's copy handle %d now names the copy of %s", was.Label(), h, id.Label())
		}
	}
	for _, id := range []vault.KeyID{wrap1, pin1} {
		if _, err := old.HMAC(id, msg); !errors.Is(err, errViewDropped) {
			t.Errorf("an HMAC under the retired %s on the dropped view: %v, want %v", id.Label(), err, errViewDropped)
		}
	}
	roundTrip(t, p, vault.KeyID{Role: vault.RoleWrap, Version: 3}, vault.KeyID{Role: vault.RolePIN, Version: 3})
}

// The token key check is due per copy: operations under one key do not
// keep another key's loss from being noticed. A member whose wrap token
// key alone goes is taken out at its next seal after tokenCheckInterval,
// though PIN checks run in between.
func TestTokenKeyCheckPerCopy(t *testing.T) {
	m := newMember(t, "a")
	p := provisionedPool(t, m, vault.ProfileGCM, Options{})
	defer p.Close()
	destroyTokenKeys(t, m, wrap1)
	ctx := context.Background()
	nonce, pt, aad := make([]byte, 12), []byte("a history key of 32 bytes......."), []byte("aad")
	deadline := time.Now().Add(2 * time.Second)
	seals := 0
	for time.Now().Before(deadline) && p.members[0].healthy.Load() {
		// A request: a PIN check, then a seal, as a store does.
		if _, err := p.HMAC(ctx, pin1, []byte("pin")); err != nil {
			break
		}
		rand.Read(nonce)
		if _, err := p.Seal(ctx, wrap1, nonce, pt, aad); err != nil {
			break
		}
		seals++
		time.Sleep(tokenCheckInterval + 10*time.Millisecond)
	}
	if p.members[0].healthy.Load() {
		t.Fatalf("%d seals under %s in 2 s after its token key went, and the member still serves", seals, wrap1.Label())
	}
	if seals > 1 {
		t.Errorf("%d seals under %s after its token key went, want at most 1 (the check was not due yet)", seals, wrap1.Label())
	}
}

// The token key check verifies identity, not just that the handle names
// an object: on opencryptoki a token whose keys were destroyed and made
// again (same labels, new material, the old handle numbers) has its
// member taken out within tokenCheckInterval of a PIN check, fails the
// probe's health check, and a reload refuses it.
func TestReprovisionedTokenFailsTokenKeyCheck(t *testing.T) {
	m := opencryptokiMember(t, "oc")
	p := provisionedPool(t, m, vault.ProfileHMAC, Options{})
	defer p.Close()
	before := viewOf(t, p, 0)
	destroyTokenKeys(t, m, wrap1, pin1, root1)
	// Provisioned anew, by another process: new material, same labels.
	err := withSession(m, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		for _, id := range []vault.KeyID{wrap1, pin1, root1} {
			v := make([]byte, 32)
			rand.Read(v)
			if _, err := c.CreateObject(s, keyTemplate(id, v, vault.ProfileHMAC)); err != nil {
				return err
			}
		}
		return nil
	}, func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Reload(); err == nil {
		t.Error("a reload accepts the token provisioned anew")
	} else if !errors.Is(err, errKeyMismatch) && !errors.Is(err, errTokenKey) {
		t.Errorf("reload: %v, want a key mismatch or a failed token key check", err)
	}
	ctx := context.Background()
	deadline := time.Now().Add(1 * time.Second)
	for time.Now().Before(deadline) && p.members[0].healthy.Load() {
		p.HMAC(ctx, pin1, []byte("x"))
		time.Sleep(5 * time.Millisecond)
	}
	if p.members[0].healthy.Load() {
		t.Errorf("the member still serves 1 s after its token was provisioned anew (token keys were %v)", before.tokenKeys)
	}
	if err := p.members[0].state().healthCheck(p.ref()); !errors.Is(err, errTokenKey) {
		t.Errorf("the probe's health check on copies of keys the token no longer holds: %v, want %v", err, errTokenKey)
	}
}

// A token key check that fails on a gcm Open is the member's failure,
// not a damaged record: the member is taken out, and the caller gets
// ErrUnavailable, never ErrIntegrity.
func TestTokenKeyCheckFailureIsMemberFailure(t *testing.T) {
	m := newMember(t, "a")
	p := provisionedPool(t, m, vault.ProfileGCM, Options{})
	defer p.Close()
	ctx := context.Background()
	nonce, pt, aad := make([]byte, 12), []byte("a history key of 32 bytes......."), []byte("aad")
	rand.Read(nonce)
	ct, err := p.Seal(ctx, wrap1, nonce, pt, aad)
	if err != nil {
		t.Fatal(err)
	}
	destroyTokenKeys(t, m, wrap1, pin1, root1)
	for _, cp := range viewOf(t, p, 0).held {
		cp.lastCheck.Store(0) // the next operation checks
	}
	_, err = p.Open(ctx, wrap1, nonce, ct, aad)
	if errors.Is(err, ErrIntegrity) || !errors.Is(err, ErrUnavailable) || !errors.Is(err, errTokenKey) {
		t.Errorf("a sound record on a member whose token keys are gone: %v, want ErrUnavailable for a failed token key check", err)
	}
	if p.members[0].healthy.Load() {
		t.Error("the member still serves")
	}
}

// undestroyable has the member's copies made with CKA_DESTROYABLE
// false: C_DestroyObject on them answers CKR_ACTION_PROHIBITED.
func undestroyable(mods *Modules) {
	mods.copyObject = func(_ func() (pkcs11.ObjectHandle, error), p *pkcs11.Ctx, s pkcs11.SessionHandle, key pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
		return p.CopyObject(s, key, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_DESTROYABLE, false)})
	}
}

// undestroyablePool opens a pool on one SoftHSM member with key versions 1
// and 2, whose copies the token will not destroy (undestroyable); with
// dropWait set, a dropped view waits that long for its operations.
func undestroyablePool(t *testing.T, dropWait time.Duration) (*Pool, MemberConfig) {
	t.Helper()
	m := newMember(t, "a")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	mods := NewModules()
	t.Cleanup(func() { mods.Close() })
	undestroyable(mods)
	if dropWait > 0 {
		mods.dropWait = dropWait
	}
	p, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Modules: mods})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p, m
}

// A copy the token will not destroy is reported, and still goes: Retire
// and Forget say so in their error, the member's copies are made again
// on a new session, and closing the old one leaves no copy of the
// version on the token. The member keeps serving.
func TestUndestroyableCopyReportedAndClosedAway(t *testing.T) {
	for _, forget := range []bool{false, true} {
		name := "retire"
		if forget {
			name = "forget"
		}
		t.Run(name, func(t *testing.T) {
			p, _ := undestroyablePool(t, 0)
			err := viewOf(t, p, 0).sessionCopies()
			if err != nil {
				t.Fatalf("copies: %v", err)
			}
			if forget {
				err = p.Forget(1)
			} else {
				_, err = p.Retire(1)
			}
			if err == nil || !strings.Contains(err.Error(), "CKR_ACTION_PROHIBITED") && !strings.Contains(err.Error(), "0x1B") {
				t.Errorf("%s(1): %v, want the copies the token would not destroy reported", name, err)
			}
			t.Logf("%s(1): %v", name, err)
			tok := viewOf(t, p, 0)
			left := sessionKeys(t, tok)
			if n := len(left[wrap1.Label()]) + len(left[pin1.Label()]); n > 0 {
				t.Errorf("%d session copies of version 1 left on the token: %v", n, left)
			}
			checkServesCopies(t, tok)
			wrap2, pin2 := vault.KeyID{Role: vault.RoleWrap, Version: 2}, vault.KeyID{Role: vault.RolePIN, Version: 2}
			roundTrip(t, p, wrap2, pin2)
		})
	}
}

// A refused copy the token will not destroy (extractable, readable) is
// not left on the token: its session is closed once no copy on it is
// held (the copies made before it, for the same view, are let go), and
// the member serves with its token keys.
func TestRefusedCopyNotLeftReadable(t *testing.T) {
	for _, after := range []int{0, 1} {
		t.Run(fmt.Sprintf("after %d good copies", after), func(t *testing.T) {
			m := newMember(t, "a")
			if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
				t.Fatal(err)
			}
			mods := NewModules()
			defer mods.Close()
			n := 0
			mods.copyObject = func(real func() (pkcs11.ObjectHandle, error), p *pkcs11.Ctx, s pkcs11.SessionHandle, _ pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
				if n++; n <= after {
					return real()
				}
				return readableKey(p, s, false)
			}
			p, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Modules: mods})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			tok := viewOf(t, p, 0)
			if err := tok.sessionCopies(); err == nil || !strings.Contains(err.Error(), "extractable") || !strings.Contains(err.Error(), "closing its session destroyed it") {
				t.Fatalf("copies: %v, want refused as extractable, its session closed", err)
			}
			if found := sessionKeys(t, tok); len(found) != 0 {
				t.Errorf("session keys left on the token while the member serves: %v", found)
			}
			roundTrip(t, p, wrap1, pin1)
		})
	}
}

// Provisioning a single member in a process that serves from copies of
// keys its token no longer holds looks for token objects only: the
// copies, which carry the old labels, do not count as keys held.
func TestProvisionIgnoresSessionCopies(t *testing.T) {
	m := newMember(t, "a")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), m)
	checkServesCopies(t, viewOf(t, p, 0))
	destroyTokenKeys(t, m, wrap1, pin1, root1)
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
		t.Fatalf("provisioning a token whose keys are gone, beside copies of them: %v", err)
	}
}

// A version another node retired, which Reload lets go, leaves none of
// its copies on the token though the token will not destroy them: the
// member's copies are made again on a new session, and closing the old
// one destroys them. The member keeps serving from copies.
func TestReloadClosesAwayUndestroyableCopies(t *testing.T) {
	p, m := undestroyablePool(t, 0)
	destroyTokenKeys(t, m, wrap1, pin1)
	if _, err := p.Reload(); err != nil {
		t.Fatalf("reload: %v", err)
	}
	tok := viewOf(t, p, 0)
	if left := sessionKeys(t, tok); len(left[wrap1.Label()])+len(left[pin1.Label()]) > 0 {
		t.Errorf("session copies of version 1, retired elsewhere and let go by Reload, left on the token: %v", left)
	}
	checkServesCopies(t, tok)
	roundTrip(t, p, vault.KeyID{Role: vault.RoleWrap, Version: 2}, vault.KeyID{Role: vault.RolePIN, Version: 2})
}

// A refused copy the token will not destroy, made for a reload's view on
// the session the serving view holds copies on, does not stay there
// while that view serves: the member's view is made again at once, with
// its token keys, though the reload then fails, and dropping the old one
// closes that session. The member serves.
func TestRefusedCopyGoesThoughReloadFails(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	if _, err := Provision([]MemberConfig{a, b}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	mods := NewModules()
	defer mods.Close()
	// The copies made at open (3 keys on each of 2 members) are sound;
	// the next one is readable, and cannot be destroyed.
	var n atomic.Int32
	mods.copyObject = func(real func() (pkcs11.ObjectHandle, error), p *pkcs11.Ctx, s pkcs11.SessionHandle, _ pkcs11.ObjectHandle) (pkcs11.ObjectHandle, error) {
		if n.Add(1) <= 6 {
			return real()
		}
		return readableKey(p, s, false)
	}
	p, err := Open([]MemberConfig{a, b}, Options{Registerer: prometheus.NewRegistry(), Modules: mods})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	checkServesCopies(t, viewOf(t, p, 0))
	// Version 2 on member a only: the reload fails, after a's view of it
	// had its copy of a version 2 key refused.
	if _, _, err := Rotate([]MemberConfig{a}, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Reload(); !errors.Is(err, errKeyMismatch) {
		t.Fatalf("reload with version 2 on one member of two: %v, want a key mismatch", err)
	}
	tok := viewOf(t, p, 0)
	if err := tok.sessionCopies(); err == nil || !strings.Contains(err.Error(), "extractable") {
		t.Errorf("member a's copies: %v, want refused as extractable", err)
	}
	if left := sessionKeys(t, tok); len(left) > 0 {
		t.Errorf("session keys left on member a's token while it serves with its token keys: %v", left)
	}
	checkServesCopies(t, viewOf(t, p, 1))
	roundTrip(t, p, wrap1, pin1)
}

// The copies of a view whose operation outlasts the drop's wait, and
// which the token will not destroy, go when that operation ends: the
// member's copies are made again on a new session then, and closing the
// old one destroys them.
func TestUndestroyableCopyOfLateDropClosedAway(t *testing.T) {
	p, _ := undestroyablePool(t, 100*time.Millisecond)
	old := viewOf(t, p, 0)
	if !old.enter() {
		t.Fatal("the view refuses an operation")
	}
	if _, err := p.Retire(1); err == nil || !strings.Contains(err.Error(), "still runs") {
		t.Fatalf("retire(1) with an operation on the old view past the drop's wait: %v, want it reported", err)
	}
	left := func() int {
		found := sessionKeys(t, viewOf(t, p, 0))
		return len(found[wrap1.Label()]) + len(found[pin1.Label()])
	}
	if n := left(); n != 2 {
		t.Fatalf("%d session copies of version 1 while an operation runs on them, want 2", n)
	}
	afterRetire := p.members[0].state()
	old.leave()
	// The member's view is made again, under rotateMu.
	deadline := time.Now().Add(2 * time.Second)
	for p.members[0].state() == afterRetire && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	p.rotateMu.Lock()
	p.rotateMu.Unlock()
	if n := left(); n > 0 {
		t.Fatalf("%d session copies of the retired version 1 left on the token after the last operation on them", n)
	}
	checkServesCopies(t, viewOf(t, p, 0))
	roundTrip(t, p, vault.KeyID{Role: vault.RoleWrap, Version: 2}, vault.KeyID{Role: vault.RolePIN, Version: 2})
}

// A member that serves with its token keys checks their identity as it
// checks a copy's token key: on opencryptoki, after another node retires
// version 1 and rotates to version 3 (whose keys take version 1's handle
// numbers), an operation under version 1 once the check is due fails as
// the member's fault instead of running under another key, and the
// probe's health check fails.
func TestTokenKeyServingChecksKeyIdentity(t *testing.T) {
	m := opencryptokiMember(t, "oc")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileHMAC); err != nil {
		t.Fatal(err)
	}
	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	mods := NewModules()
	mods.noCopies = true
	defer mods.Close()
	p, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Modules: mods, ProbeBackoff: time.Hour, ProbeBackoffMax: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	tok := viewOf(t, p, 0)
	if err := tok.sessionCopies(); err == nil {
		t.Fatal("the member serves from copies")
	}
	if err := tok.checkTokenKeys(); err != nil {
		t.Fatalf("the probe's health check on the token keys as they are: %v", err)
	}
	ctx := context.Background()
	msg := []byte("a PIN check")
	before, err := p.HMAC(ctx, pin1, msg)
	if err != nil {
		t.Fatal(err)
	}
	reused := map[pkcs11.ObjectHandle]vault.KeyID{tok.tokenKeys[wrap1]: wrap1, tok.tokenKeys[pin1]: pin1}
	destroyTokenKeys(t, m, wrap1, pin1)
	if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
		t.Fatal(err)
	}
	again, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Modules: mods})
	if err != nil {
		t.Fatal(err)
	}
	for id, h := range viewOf(t, again, 0).tokenKeys {
		if was, ok := reused[h]; ok {
			t.Logf("%s took the token handle %d of the destroyed %s", id.Label(), h, was.Label())
		}
	}
	again.Close()
	time.Sleep(tokenCheckInterval)
	after, err := p.HMAC(ctx, pin1, msg)
	if err == nil {
		if !bytes.Equal(after, before) {
			t.Fatalf("an HMAC under %s, its token key destroyed, answered under another key", pin1.Label())
		}
		t.Fatalf("an HMAC under %s, its token key destroyed, answered", pin1.Label())
	}
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, errTokenKey) {
		t.Errorf("an HMAC under %s, its token key destroyed: %v, want ErrUnavailable for a failed token key check", pin1.Label(), err)
	}
	if p.members[0].healthy.Load() {
		t.Error("the member still serves")
	}
	if err := p.members[0].state().healthCheck(p.ref()); !errors.Is(err, errTokenKey) {
		t.Errorf("the probe's health check on token keys whose handles name other keys now: %v, want %v", err, errTokenKey)
	}
}

// Operations under every version in use while this node rotates, reloads
// and retires, on opencryptoki (which gives a destroyed key's handle
// number to the next key), served from copies and from token keys: an
// HMAC under a version gives one answer each time, a seal under the
// current version opens, and no check takes the member out.
func TestOperationsThroughRotateAndRetireKeepTheirKeys(t *testing.T) {
	for _, keys := range []string{"session-copies", "token-keys"} {
		t.Run(keys, func(t *testing.T) {
			m := opencryptokiMember(t, "oc")
			if _, err := Provision([]MemberConfig{m}, vault.ProfileHMAC); err != nil {
				t.Fatal(err)
			}
			mods := NewModules()
			mods.noCopies = keys == "token-keys"
			defer mods.Close()
			p, err := Open([]MemberConfig{m}, Options{Registerer: prometheus.NewRegistry(), Modules: mods, ProbeBackoff: time.Hour, ProbeBackoffMax: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			if err := viewOf(t, p, 0).sessionCopies(); (err == nil) != (keys == "session-copies") {
				t.Fatalf("session copies: %v", err)
			}
			ctx := context.Background()
			var mu sync.Mutex
			seen := map[vault.KeyID][]byte{}
			var stop atomic.Bool
			var ops atomic.Int64
			var wg sync.WaitGroup
			for range 4 {
				wg.Go(func() {
					for !stop.Load() {
						pv, wv := p.KeyVersion(vault.RolePIN), p.KeyVersion(vault.RoleWrap)
						for _, v := range []uint32{pv, pv - 1} {
							id := vault.KeyID{Role: vault.RolePIN, Version: v}
							out, err := p.HMAC(ctx, id, []byte("a PIN check"))
							ops.Add(1)
							if err != nil {
								// A version retired since it was read is
								// no key of the member's any more.
								if !errors.Is(err, errCaller) {
									t.Errorf("HMAC under %s: %v", id.Label(), err)
								}
								continue
							}
							mu.Lock()
							if prev, ok := seen[id]; !ok {
								seen[id] = out
							} else if !bytes.Equal(prev, out) {
								t.Errorf("HMAC under %s changed: %x then %x", id.Label(), prev, out)
							}
							mu.Unlock()
						}
						id := vault.KeyID{Role: vault.RoleWrap, Version: wv}
						nonce, pt := make([]byte, 12), []byte("a history key of 32 bytes.......")
						rand.Read(nonce)
						ct, err := p.Seal(ctx, id, nonce, pt, nil)
						ops.Add(2)
						if err != nil {
							continue
						}
						if back, err := p.Open(ctx, id, nonce, ct, nil); err == nil && !bytes.Equal(back, pt) {
							t.Errorf("open under %s: another plaintext", id.Label())
						} else if err != nil && p.KeyVersion(vault.RoleWrap) == wv {
							t.Errorf("open under %s, still the newest: %v", id.Label(), err)
						}
					}
				})
			}
			rounds := 0
			for deadline := time.Now().Add(1500 * time.Millisecond); time.Now().Before(deadline) && !t.Failed(); rounds++ {
				if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
					t.Error(err)
					break
				}
				if _, err := p.Reload(); err != nil {
					t.Errorf("reload: %v", err)
					break
				}
				if v := p.KeyVersion(vault.RoleWrap); v >= 3 {
					if _, err := p.Retire(v - 2); err != nil {
						t.Errorf("retire %d: %v", v-2, err)
						break
					}
				}
			}
			stop.Store(true)
			wg.Wait()
			t.Logf("%d rounds, to version %d; %d operations", rounds, p.KeyVersion(vault.RoleWrap), ops.Load())
			if !p.members[0].healthy.Load() {
				t.Error("the member was taken out")
			}
		})
	}
}
