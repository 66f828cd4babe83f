package vault_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"errors"
	"testing"

	"github.com/keyvault/keyvault/vault"
)

// Under the hmac profile a backup goes through its whole life, every
// record written says hmac, and the HSM never sealed under the wrap key
// itself (the fake derives a key per seal, as hsmpool does).
func TestHMACProfileRoundTrip(t *testing.T) {
	t.Parallel()
	e := newEnvProfile(t, vault.Options{}, vault.ProfileHMAC)
	secret := randBytes(32)
	e.enroll("hmac-user", secret, rightPIN, 5)
	if r, _ := e.raw(ns, "hmac-user"); r.Sealing != vault.ProfileHMAC || r.WrapVersion != 1 {
		t.Fatalf("enrolled record: sealing %q under wrap v%d, want hmac under v1", r.Sealing, r.WrapVersion)
	}
	e.wrong("hmac-user", 4)
	if s, rem, err := e.v.Recover(bg, ns, "hmac-user", rightPIN); err != nil || !bytes.Equal(s, secret) || rem != 5 {
		t.Fatalf("recover: %v (remaining %d)", err, rem)
	}
	newPIN := []byte("a new PIN for hmac")
	e.remember(newPIN)
	if _, err := e.v.ChangePIN(bg, ns, "hmac-user", rightPIN, newPIN, vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	if r, _ := e.raw(ns, "hmac-user"); r.Sealing != vault.ProfileHMAC || r.Generation != 2 {
		t.Fatalf("after the PIN change: sealing %q, generation %d", r.Sealing, r.Generation)
	}
	e.reopen()
	if s, _, err := e.v.Recover(bg, ns, "hmac-user", newPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("recover with the new PIN after a restart: %v", err)
	}
	if _, _, err := e.v.Recover(bg, ns, "hmac-user", rightPIN); !errors.Is(err, vault.ErrWrongPIN) {
		t.Fatalf("the old PIN: %v, want ErrWrongPIN", err)
	}
}

// A record written before format 3 (no sealing byte) opens as sealed by
// GCM in the HSM, and is written back as format 3 with that mark, also
// on an HSM whose newest wrap key is of the hmac profile.
func TestFormat2RecordStillOpens(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("old-format", secret, rightPIN, 5)
	key := vault.RecordKey(ns, "old-format")
	r, _ := e.raw(ns, "old-format")
	e.put(key, e.v.ForgeRecordFormat2(key, r))
	e.reopen()
	if _, raw := e.raw(ns, "old-format"); raw[0] != 2 {
		t.Fatalf("the forged record is format %d", raw[0])
	}
	if s, _, err := e.v.Recover(bg, ns, "old-format", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("recover a format 2 record: %v", err)
	}
	r, raw := e.raw(ns, "old-format")
	if raw[0] != 3 || r.Sealing != vault.ProfileGCM {
		t.Fatalf("written back as format %d, sealing %q; want 3, gcm", raw[0], r.Sealing)
	}

	// Again, after a rotation to the hmac profile: the format 2 record
	// under v1 opens by GCM, and a re-wrap moves it to v2 under hmac.
	e.put(key, e.v.ForgeRecordFormat2(key, r))
	e.closeStore()
	e.hsm = e.hsm.withVersions(v2).withProfiles(map[uint32]vault.Profile{1: vault.ProfileGCM, 2: vault.ProfileHMAC})
	e.open()
	if s, _, err := e.v.Recover(bg, ns, "old-format", []byte("0000-wrong")); s != nil || !errors.Is(err, vault.ErrWrongPIN) {
		t.Fatalf("a wrong guess on the format 2 record: %v", err)
	}
	if _, started := e.v.StartRewrap(context.Background(), 0); !started {
		t.Fatal("rewrap did not start")
	}
	if st := waitRewrap(t, e.v); st.Done != 1 || st.Errors != 0 {
		t.Fatalf("rewrap: %+v", st)
	}
	if r, _ := e.raw(ns, "old-format"); r.Sealing != vault.ProfileHMAC || r.WrapVersion != 2 {
		t.Fatalf("after rewrap: sealing %q under v%d, want hmac under v2", r.Sealing, r.WrapVersion)
	}
	if s, _, err := e.v.Recover(bg, ns, "old-format", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("recover after rewrap: %v", err)
	}
}

// A store changes profile by a rotation: records sealed under the older
// version keep opening by their own mark (GCM in the HSM), new ones are
// sealed under the newest (hmac), a right recovery re-seals under it, the
// re-wrap moves the rest, and the old version then retires.
func TestProfileChangeByRotation(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secrets := map[string][]byte{"before-1": randBytes(32), "before-2": randBytes(32)}
	for u, s := range secrets {
		e.enroll(u, s, rightPIN, 5)
	}
	e.closeStore()
	e.hsm = e.hsm.withVersions(v2).withProfiles(map[uint32]vault.Profile{1: vault.ProfileGCM, 2: vault.ProfileHMAC})
	e.open()

	secrets["after"] = randBytes(32)
	e.enroll("after", secrets["after"], rightPIN, 5)
	if r, _ := e.raw(ns, "after"); r.Sealing != vault.ProfileHMAC || r.WrapVersion != 2 {
		t.Fatalf("new record: sealing %q under v%d, want hmac under v2", r.Sealing, r.WrapVersion)
	}
	if r, _ := e.raw(ns, "before-1"); r.Sealing != vault.ProfileGCM || r.WrapVersion != 1 {
		t.Fatalf("old record: sealing %q under v%d, want gcm under v1", r.Sealing, r.WrapVersion)
	}
	// A right recovery moves its record to the newest versions.
	if s, _, err := e.v.Recover(bg, ns, "before-1", rightPIN); err != nil || !bytes.Equal(s, secrets["before-1"]) {
		t.Fatalf("recover an old record: %v", err)
	}
	if r, _ := e.raw(ns, "before-1"); r.Sealing != vault.ProfileHMAC || r.WrapVersion != 2 {
		t.Fatalf("re-sealed on recovery: sealing %q under v%d, want hmac under v2", r.Sealing, r.WrapVersion)
	}
	if _, started := e.v.StartRewrap(context.Background(), 0); !started {
		t.Fatal("rewrap did not start")
	}
	if st := waitRewrap(t, e.v); st.Done != 1 || st.Errors != 0 {
		t.Fatalf("rewrap: %+v, want the one record left on v1 moved", st)
	}
	if r, _ := e.raw(ns, "before-2"); r.Sealing != vault.ProfileHMAC || r.WrapVersion != 2 {
		t.Fatalf("after rewrap: sealing %q under v%d", r.Sealing, r.WrapVersion)
	}
	// The PIN key v1 of before-2 keeps v1 in use until a recovery moves it.
	if _, _, err := e.v.Recover(bg, ns, "before-2", rightPIN); err != nil {
		t.Fatal(err)
	}
	if err := e.v.RetireKeys(bg, 1, func(uint32) error { return nil }); err != nil {
		t.Fatalf("retire v1: %v", err)
	}
	for u, s := range secrets {
		if got, _, err := e.v.Recover(bg, ns, u, rightPIN); err != nil || !bytes.Equal(got, s) {
			t.Fatalf("recover %s at the end: %v", u, err)
		}
	}
}

// A record whose mark disagrees with the kind of its wrap key version
// cannot have been sealed by it: refused with ErrIntegrity and counted,
// with no secret and no write.
func TestSealingMarkMustMatchTheKey(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	e.enroll(userA, randBytes(32), rightPIN, 5)
	key := vault.RecordKey(ns, userA)
	r, _ := e.raw(ns, userA)
	r.Sealing = vault.ProfileHMAC
	e.put(key, e.v.ForgeRecord(key, r))
	failures := e.metric("keyvault_integrity_failures_total")
	if s, _, err := e.v.Recover(bg, ns, userA, rightPIN); s != nil || !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("recover of a record marked hmac under a gcm key: %v, want ErrIntegrity", err)
	}
	if e.metric("keyvault_integrity_failures_total") <= failures {
		t.Error("not counted as an integrity failure")
	}
}

// Under gcm-hsm-iv the HSM chooses the GCM IV: every record stores, as
// its outer nonce, the IV the HSM chose for that seal (not a nonce of the
// vault's), is marked gcm-hsm-iv (sealing byte 3), and opens. A record
// sealed under gcm opens under a wrap key of gcm-hsm-iv, both being AES
// keys, and the reverse.
func TestGCMHSMIVProfileStoresTheHSMsIV(t *testing.T) {
	t.Parallel()
	e := newEnvProfile(t, vault.Options{}, vault.ProfileGCMHSMIV)
	secret := randBytes(32)
	e.enroll("iv-user", secret, rightPIN, 5)
	r, raw := e.raw(ns, "iv-user")
	if r.Sealing != vault.ProfileGCMHSMIV || raw[0] != 3 {
		t.Fatalf("enrolled record: format %d, sealing %q; want 3, gcm-hsm-iv", raw[0], r.Sealing)
	}
	if sealingByte := raw[62]; sealingByte != 3 {
		t.Fatalf("sealing byte %d, want 3", sealingByte)
	}
	chosen := e.hsm.ring.chosenIVs[vault.KeyID{Role: vault.RoleWrap, Version: 1}.Label()]
	if len(chosen) == 0 || !bytes.Equal(r.Nonce, chosen[len(chosen)-1]) {
		t.Fatalf("the record's outer nonce %x is not the IV the HSM chose last (%x)", r.Nonce, chosen)
	}
	// The stored nonce is the one that opens: GCM under the raw wrap key.
	block, err := aes.NewCipher(e.hsm.rawKey(vault.KeyID{Role: vault.RoleWrap, Version: 1}))
	if err != nil {
		t.Fatal(err)
	}
	g, _ := cipher.NewGCM(block)
	if _, err := g.Open(nil, r.Nonce, r.Sealed, vault.OuterAAD(ns, "iv-user", r.Generation, r.WrapVersion, r.PINVersion)); err != nil {
		t.Fatalf("open the sealed secret under the stored nonce: %v", err)
	}
	if s, _, err := e.v.Recover(bg, ns, "iv-user", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("recover: %v", err)
	}

	e.reopenWith(map[uint32]vault.Profile{1: vault.ProfileGCM, 2: vault.ProfileGCM})
	if s, _, err := e.v.Recover(bg, ns, "iv-user", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("recover a gcm-hsm-iv record under a gcm key: %v", err)
	}
	e.enroll("gcm-user", secret, rightPIN, 5)
	e.reopenWith(map[uint32]vault.Profile{1: vault.ProfileGCMHSMIV, 2: vault.ProfileGCMHSMIV})
	if s, _, err := e.v.Recover(bg, ns, "gcm-user", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("recover a gcm record under a gcm-hsm-iv key: %v", err)
	}
	e.reopenWith(map[uint32]vault.Profile{1: vault.ProfileHMAC, 2: vault.ProfileHMAC})
	if _, _, err := e.v.Recover(bg, ns, "iv-user", rightPIN); !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("a gcm-hsm-iv record under an hmac key of its version: %v, want ErrIntegrity", err)
	}
}
