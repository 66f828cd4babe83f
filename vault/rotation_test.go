package vault_test

import (
	"bytes"
	"testing"

	"github.com/keyvault/keyvault/vault"
)

// After wrap and PIN keys of version 2 are added, records sealed under
// version 1 still open and check under version 1 (they name their key
// versions), new enrollments and PIN changes use version 2, and Status
// tells which.
func TestWrapAndPINKeyRotation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secretOld, secretNew := randBytes(32), randBytes(32)
	if b := e.enroll("rot-old", secretOld, rightPIN, 5); b.KeyVersion != 1 || b.PINKeyVersion != 1 {
		t.Fatalf("enrolled under %d/%d", b.KeyVersion, b.PINKeyVersion)
	}
	e.closeStore()
	e.hsm = e.hsm.withVersions(map[vault.KeyRole]uint32{vault.RoleWrap: 2, vault.RolePIN: 2, vault.RoleRoot: 1})
	e.open()

	if st := e.status("rot-old"); st.KeyVersion != 1 || st.PINKeyVersion != 1 {
		t.Fatalf("old record reports %d/%d", st.KeyVersion, st.PINKeyVersion)
	}
	e.wrong("rot-old", 4)
	if s, rem, err := e.v.Recover(bg, ns, "rot-old", rightPIN); err != nil || !bytes.Equal(s, secretOld) || rem != 5 {
		t.Fatalf("recover a version-1 record after rotation: %v", err)
	}
	if b := e.enroll("rot-new", secretNew, rightPIN, 5); b.KeyVersion != 2 || b.PINKeyVersion != 2 {
		t.Fatalf("new enrollment under %d/%d, want 2/2", b.KeyVersion, b.PINKeyVersion)
	}
	if s, _, err := e.v.Recover(bg, ns, "rot-new", rightPIN); err != nil || !bytes.Equal(s, secretNew) {
		t.Fatalf("recover a version-2 record: %v", err)
	}
	b, err := e.v.ChangePIN(bg, ns, "rot-old", rightPIN, []byte("4321"), vault.Precondition{})
	if err != nil || b.KeyVersion != 2 || b.PINKeyVersion != 2 {
		t.Fatalf("change PIN re-seals under %d/%d (%v), want 2/2", b.KeyVersion, b.PINKeyVersion, err)
	}
	if s, _, err := e.v.Recover(bg, ns, "rot-old", []byte("4321")); err != nil || !bytes.Equal(s, secretOld) {
		t.Fatalf("recover after the re-seal: %v", err)
	}
	if e.metric("keyvault_wrap_key_seals", "key_version", "2") != 4096 {
		t.Error("no seals reserved under wrap key version 2")
	}
}
