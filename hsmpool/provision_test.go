package hsmpool

import (
	"errors"
	"slices"
	"testing"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// keysOn lists the keyvault keys on a member's token, looked up afresh.
func keysOn(t *testing.T, mods *Modules, c MemberConfig) []vault.KeyID {
	t.Helper()
	var ids []vault.KeyID
	err := mods.withSession(c, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) (err error) {
		ids, err = keyIDsOn(p, s)
		return err
	}, func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// sameKCVs opens a pool on the members and fails unless every member
// holds the same keys with equal check values.
func sameKCVs(t *testing.T, cfgs ...MemberConfig) {
	t.Helper()
	p := openPool(t, prometheus.NewRegistry(), cfgs...)
	keys := p.Keys()
	if len(keys) != len(cfgs) {
		t.Fatalf("%d of %d members serve", len(keys), len(cfgs))
	}
	for _, k := range keys[1:] {
		if !slices.Equal(k.Keys, keys[0].Keys) {
			t.Fatalf("member %s holds %v, member %s holds %v", k.Member, k.Keys, keys[0].Member, keys[0].Keys)
		}
	}
	p.Close()
}

// keys init and keys rotate with several members are all or nothing: a
// fault on the second member's import leaves no member with a key of
// that version, a run after the fault is mended succeeds with equal check
// values, and the modules stay initialised across every pass.
func TestProvisionAllOrNothing(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	mods := NewModules()
	defer mods.Close()
	for _, c := range mods.Check([]MemberConfig{a, b}, vault.ProfileHMAC) {
		if c.Err != nil {
			t.Fatal(c.Err)
		}
	}
	// The check's contexts are closed; the module must still be
	// initialised, or the next pass initialises it again.
	probe := pkcs11.New(a.Module)
	if err := probe.Initialize(); !errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		if err == nil {
			probe.Finalize()
		}
		t.Fatalf("after the check, C_Initialize answered %v: the module was finalised between passes", err)
	}

	fault := errors.New("injected fault")
	failOn := func(version uint32) func(string, vault.KeyID) error {
		// b's second key: b holds one key of the version when it fails.
		n := 0
		return func(member string, id vault.KeyID) error {
			if member == "b" && id.Version == version {
				if n++; n == 2 {
					return fault
				}
			}
			return nil
		}
	}
	mods.failImport = failOn(1)
	_, err := mods.Provision([]MemberConfig{a, b}, vault.ProfileHMAC)
	var pe *ProvisionError
	if !errors.Is(err, fault) || !errors.As(err, &pe) || len(pe.Left) != 0 {
		t.Fatalf("provision with a fault on b: %v", err)
	}
	t.Logf("keys init with a fault on b: %v", err)
	for _, c := range []MemberConfig{a, b} {
		if ids := keysOn(t, mods, c); len(ids) != 0 {
			t.Fatalf("after the failed provision member %s holds %s", c.Name, labels(ids))
		}
	}
	mods.failImport = nil
	if inHSM, err := mods.Provision([]MemberConfig{a, b}, vault.ProfileHMAC); err != nil || inHSM {
		t.Fatalf("provision after the fault: inHSM=%v %v", inHSM, err)
	}
	sameKCVs(t, a, b)

	mods.failImport = failOn(2)
	if _, _, err := mods.Rotate([]MemberConfig{a, b}, ""); !errors.Is(err, fault) || !errors.As(err, &pe) || len(pe.Left) != 0 {
		t.Fatalf("rotate with a fault on b: %v", err)
	}
	for _, c := range []MemberConfig{a, b} {
		if ids := keysOn(t, mods, c); len(ids) != len(vault.Roles) || slices.ContainsFunc(ids, func(id vault.KeyID) bool { return id.Version != 1 }) {
			t.Fatalf("after the failed rotate member %s holds %s", c.Name, labels(ids))
		}
	}
	mods.failImport = nil
	if v, _, err := mods.Rotate([]MemberConfig{a, b}, ""); err != nil || v != 2 {
		t.Fatalf("rotate after the fault: v%d %v", v, err)
	}
	sameKCVs(t, a, b)
}
