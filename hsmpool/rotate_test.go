package hsmpool

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keyvault/keyvault/vault"
)

// Rotate, Reload and Retire on two SoftHSM members: the pool takes a new
// version only once both hold it, keeps opening what the old one sealed,
// refuses a version one member lacks, and Retire destroys the old version
// on both, so that a fresh pool finds the gap and still works.
func TestRotateReloadRetire(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	if _, err := Provision([]MemberConfig{a, b}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), a, b)
	ctx := context.Background()
	nonce := make([]byte, 12)
	rand.Read(nonce)
	sealed1, err := p.Seal(ctx, wrap1, nonce, []byte("secret"), nil)
	if err != nil {
		t.Fatal(err)
	}

	v, inHSM, err := Rotate([]MemberConfig{a, b}, "")
	if err != nil || v != 2 || inHSM {
		t.Fatalf("Rotate: version %d inHSM %v err %v, want 2 false nil", v, inHSM, err)
	}
	if got := p.KeyVersion(vault.RoleWrap); got != 1 {
		t.Fatalf("before reload the pool uses wrap v%d, want v1", got)
	}
	// A member re-opened before the reload (a probe after a fault) finds
	// version 2 already there, and is admitted all the same.
	if err := p.reopen(p.members[1]); err != nil {
		t.Fatalf("re-open a member holding a version the pool does not use yet: %v", err)
	}
	vs, err := p.Reload()
	if err != nil || vs[vault.RoleWrap] != 2 || vs[vault.RolePIN] != 2 || vs[vault.RoleRoot] != 1 {
		t.Fatalf("Reload: %v %v", vs, err)
	}
	wrap2 := vault.KeyID{Role: vault.RoleWrap, Version: 2}
	pin2 := vault.KeyID{Role: vault.RolePIN, Version: 2}
	// Each member holds the new keys: every operation works on either.
	for range 8 {
		ct, err := p.Seal(ctx, wrap2, nonce, []byte("x"), nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := p.Open(ctx, wrap2, nonce, ct, nil); err != nil {
			t.Fatal(err)
		}
		if _, err := p.HMAC(ctx, pin2, []byte("m")); err != nil {
			t.Fatal(err)
		}
	}
	if pt, err := p.Open(ctx, wrap1, nonce, sealed1, nil); err != nil || !bytes.Equal(pt, []byte("secret")) {
		t.Fatalf("open under v1 after rotation: %v", err)
	}

	// Version 3 on one member only: Reload refuses and keeps version 2.
	mods := NewModules()
	defer mods.Close()
	if _, err := mods.provisionKeys([]MemberConfig{a}, []vault.KeyID{{Role: vault.RoleWrap, Version: 3}, {Role: vault.RolePIN, Version: 3}}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Reload(); !errors.Is(err, errKeyMismatch) {
		t.Fatalf("Reload with v3 on one member: %v, want a key mismatch", err)
	}
	if got := p.KeyVersion(vault.RoleWrap); got != 2 {
		t.Fatalf("after a refused reload the pool uses wrap v%d, want v2", got)
	}
	if _, _, err := Rotate([]MemberConfig{a, b}, ""); err == nil || !strings.Contains(err.Error(), "same keys") {
		t.Fatalf("Rotate over members that differ: %v", err)
	}
	if _, err := p.Retire(3); !errors.Is(err, ErrNewest) {
		t.Fatalf("Retire(3), past the pool's newest: %v, want ErrNewest", err)
	}
	// Take v3 away again (it is not in the pool's set) so the members agree.
	m0 := p.members[0].state().tok.(refresher)
	for _, r := range []vault.KeyRole{vault.RoleWrap, vault.RolePIN} {
		if _, err := m0.destroy(vault.KeyID{Role: r, Version: 3}); err != nil {
			t.Fatal(err)
		}
	}

	if _, err := p.Retire(2); !errors.Is(err, ErrNewest) {
		t.Fatalf("Retire(newest): %v, want ErrNewest", err)
	}
	destroyed, err := p.Retire(1)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []string{"a", "b"} {
		if got := strings.Join(destroyed[m], " "); got != "keyvault-wrap-v1 keyvault-pin-v1" {
			t.Errorf("member %s: destroyed %q", m, got)
		}
	}
	if _, err := p.Seal(ctx, wrap2, nonce, []byte("x"), nil); err != nil {
		t.Fatalf("seal under v2 after retiring v1: %v", err)
	}
	if _, err := p.Reload(); err != nil {
		t.Fatalf("reload after retire: %v", err)
	}

	// A fresh look-up on each member: v1 is gone, v2 and root v1 remain.
	for _, c := range []MemberConfig{a, b} {
		tok, err := NewModules().openToken(c)
		if err != nil {
			t.Fatal(err)
		}
		if got := tok.Versions(vault.RoleWrap); len(got) != 1 || got[0] != 2 {
			t.Errorf("member %s wrap versions %v, want [2]", c.Name, got)
		}
		if got := tok.Versions(vault.RolePIN); len(got) != 1 || got[0] != 2 {
			t.Errorf("member %s PIN versions %v, want [2]", c.Name, got)
		}
		if got := tok.Versions(vault.RoleRoot); len(got) != 1 || got[0] != 1 {
			t.Errorf("member %s root versions %v, want [1]", c.Name, got)
		}
		tok.Close()
	}
	p2 := openPool(t, prometheus.NewRegistry(), a, b)
	if p2.KeyVersion(vault.RoleWrap) != 2 || p2.Healthy() != 2 {
		t.Fatalf("a new pool after the retire: wrap v%d, %d healthy", p2.KeyVersion(vault.RoleWrap), p2.Healthy())
	}
}

func TestParseLabel(t *testing.T) {
	t.Parallel()
	for label, want := range map[string]vault.KeyID{
		"keyvault-wrap-v1":  {Role: vault.RoleWrap, Version: 1},
		"keyvault-pin-v12":  {Role: vault.RolePIN, Version: 12},
		"keyvault-root-v3":  {Role: vault.RoleRoot, Version: 3},
		"keyvault-wrap-v0":  {},
		"keyvault-wrap-v01": {},
		"keyvault-wrap-v":   {},
		"keyvault-mac-v1":   {},
		"other":             {},
		"keyvault-pin-v1x":  {},
	} {
		got, ok := parseLabel(label)
		if got != want || ok != (want != vault.KeyID{}) {
			t.Errorf("parseLabel(%q) = %v %v, want %v", label, got, ok, want)
		}
	}
}

// Two pools on one member, as two nodes sharing an HSM: one rotates and
// retires version 1. The other, still on version 1, lets it go on Forget
// or on a reload (gone from every member, which holds version 2), and a
// third whose member fails meanwhile comes back on version 2 instead of
// being refused as a key mismatch.
func TestPoolMovesOffAVersionRetiredElsewhere(t *testing.T) {
	a := newMember(t, "a")
	if _, err := Provision([]MemberConfig{a}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	retirer := openPool(t, prometheus.NewRegistry(), a)
	forgets, reloads := openPool(t, prometheus.NewRegistry(), a), openPool(t, prometheus.NewRegistry(), a)
	reg := prometheus.NewRegistry()
	probed, err := Open([]MemberConfig{a}, Options{Registerer: reg, ProbeBackoff: 5 * time.Millisecond, ProbeBackoffMax: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { probed.Close() })
	if _, _, err := Rotate([]MemberConfig{a}, ""); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*Pool{retirer, forgets} {
		if vs, err := p.Reload(); err != nil || vs[vault.RoleWrap] != 2 {
			t.Fatalf("reload: %v %v", vs, err)
		}
	}
	if err := forgets.Forget(2); !errors.Is(err, ErrNewest) {
		t.Fatalf("Forget(newest): %v", err)
	}
	if err := forgets.Forget(1); err != nil {
		t.Fatal(err)
	}
	if _, err := retirer.Retire(1); err != nil {
		t.Fatal(err)
	}
	if _, ok := forgets.ref()[wrap1]; ok || forgets.KeyVersion(vault.RoleWrap) != 2 {
		t.Fatalf("after Forget(1): ref holds wrap v1 %v, newest v%d", ok, forgets.KeyVersion(vault.RoleWrap))
	}
	if vs, err := reloads.Reload(); err != nil || vs[vault.RoleWrap] != 2 || vs[vault.RolePIN] != 2 {
		t.Fatalf("reload of a pool on v1 after v1 was retired elsewhere: %v %v", vs, err)
	}

	// The member of the pool still on v1 fails: its probe finds v1 gone
	// and v2 there, and the pool moves to v2 with it.
	probed.fail(probed.members[0], "seal", errors.New("CKR_OBJECT_HANDLE_INVALID"))
	deadline := time.Now().Add(10 * time.Second)
	for !probed.members[0].healthy.Load() {
		if time.Now().After(deadline) {
			t.Fatalf("member not back 10s after v1 was retired elsewhere; key mismatch %v",
				testutil.ToFloat64(probed.metrics.keyMismatch.WithLabelValues("a")))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if probed.KeyVersion(vault.RoleWrap) != 2 || testutil.ToFloat64(probed.metrics.keyMismatch.WithLabelValues("a")) != 0 {
		t.Fatalf("after the probe: wrap v%d, key mismatch %v", probed.KeyVersion(vault.RoleWrap), testutil.ToFloat64(probed.metrics.keyMismatch.WithLabelValues("a")))
	}
	ctx := context.Background()
	nonce := make([]byte, 12)
	rand.Read(nonce)
	wrap2 := vault.KeyID{Role: vault.RoleWrap, Version: 2}
	for _, p := range []*Pool{forgets, reloads, probed} {
		if _, err := p.Seal(ctx, wrap2, nonce, []byte("x"), nil); err != nil {
			t.Fatalf("seal under v2: %v", err)
		}
	}
}

// Under gcm-hsm-iv, the views of a token that Retire makes keep the
// member's AES profile: a reload after a retire reads the wrap keys as
// gcm-hsm-iv keys still, and the pool keeps sealing under them.
func TestRetireKeepsTheAESProfile(t *testing.T) {
	cfgs := []MemberConfig{newMember(t, "a"), newMember(t, "b")}
	if _, err := Provision(cfgs, vault.ProfileGCMHSMIV); err != nil {
		t.Fatal(err)
	}
	cfgs = forProfile(cfgs, vault.ProfileGCMHSMIV)
	p, err := Open(cfgs, Options{Profile: vault.ProfileGCMHSMIV, Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if v, _, err := Rotate(cfgs, vault.ProfileGCMHSMIV); err != nil || v != 2 {
		t.Fatalf("Rotate: version %d, %v", v, err)
	}
	if _, err := p.Reload(); err != nil {
		t.Fatalf("Reload: %v", err)
	}
	if _, err := p.Retire(1); err != nil {
		t.Fatalf("Retire(1): %v", err)
	}
	if vs, err := p.Reload(); err != nil || vs[vault.RoleWrap] != 2 {
		t.Fatalf("Reload after Retire(1): %v %v, want wrap v2", vs, err)
	}
	if got := p.WrapProfile(2); got != vault.ProfileGCMHSMIV {
		t.Fatalf("wrap v2 after a retire is of profile %q, want gcm-hsm-iv", got)
	}
	nonce := make([]byte, gcmNonceSize)
	rand.Read(nonce)
	wrap2 := vault.KeyID{Role: vault.RoleWrap, Version: 2}
	ct, err := p.Seal(context.Background(), wrap2, nonce, []byte("x"), nil)
	if err != nil {
		t.Fatalf("seal under v2 after the retire: %v", err)
	}
	if _, err := p.Open(context.Background(), wrap2, nonce, ct, nil); err != nil {
		t.Fatalf("open under v2 after the retire: %v", err)
	}
}
