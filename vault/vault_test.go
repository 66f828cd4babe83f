package vault_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

func TestNewNeedsTheHSM(t *testing.T) {
	t.Parallel()
	st, err := boltstore.Open(boltstore.Options{Path: t.TempDir() + "/s.db"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	down := newFakeHSM(t)
	down.failNextHMAC(1)
	if _, err := vault.New(bg, st, down, vault.Options{}); !errors.Is(err, vault.ErrUnavailable) {
		t.Errorf("New with the HSM down: %v, want ErrUnavailable", err)
	}
	noRoot := newFakeHSMVersions(t, map[vault.KeyRole]uint32{vault.RoleWrap: 1, vault.RolePIN: 1})
	if _, err := vault.New(bg, st, noRoot, vault.Options{}); err == nil {
		t.Error("New without a root key succeeded")
	}
	noWrap := newFakeHSMVersions(t, map[vault.KeyRole]uint32{vault.RolePIN: 1, vault.RoleRoot: 1})
	v, err := vault.New(bg, st, noWrap, vault.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := v.Enroll(bg, ns, "erin", randBytes(16), rightPIN, 0, vault.Precondition{}); !errors.Is(err, vault.ErrUnavailable) {
		t.Errorf("enroll without a wrap key: %v, want ErrUnavailable", err)
	}
}

func TestLogIDIsKeyedAndStable(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	id := e.v.LogID(ns, "alice")
	if id == e.v.LogID(ns, "alice2") || id == e.v.LogID("other", "alice") || strings.Contains(id, "alice") {
		t.Fatalf("LogID %q does not tell users apart or holds the user_id", id)
	}
	e.reopen()
	if e.v.LogID(ns, "alice") != id {
		t.Fatal("LogID changed across a restart with the same HSM keys")
	}
	other := newEnv(t, vault.Options{})
	if other.v.LogID(ns, "alice") == id {
		t.Fatal("LogID is the same under another HSM's keys: it is not keyed")
	}
}
