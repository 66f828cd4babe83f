package vault_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"os"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/vault"
)

// Tamper tests: the vault is stopped, the record is edited in the bbolt
// file through the store (as someone with the database but not the HSM
// could), and a new vault is started on the same file and HSM keys.

// The names have the same length, so that only the bytes of the store key
// tell the records apart, not the length the record MAC also covers.
const (
	userA   = "alice-tamper-victim"
	userB   = "bobby-tamper-victim"
	userC   = "carol-tamper-victim"
	otherNS = "messenge2"
)

// tamperEnv enrolls userA (max 5, after 3 wrong guesses: 2 left) and userB,
// then restarts the vault.
func tamperEnv(t *testing.T) (e *env, secretA []byte) {
	t.Helper()
	return tamperEnvOn(t, newEnv(t, vault.Options{}))
}

func tamperEnvOn(t *testing.T, e *env) (_ *env, secretA []byte) {
	t.Helper()
	secretA = randBytes(32)
	e.enroll(userA, secretA, rightPIN, 5)
	e.enroll(userB, randBytes(32), []byte("pin-of-bob"), 5)
	for k := 1; k <= 3; k++ {
		e.wrong(userA, 5-k)
	}
	e.reopen()
	return e, secretA
}

// everyOperationRefused runs every operation on user and checks that each
// answers ErrIntegrity, that none returns a secret, checks a PIN or writes
// the record, and that each was counted in the integrity metric.
func everyOperationRefused(t *testing.T, e *env, user string, pins ...[]byte) {
	t.Helper()
	key := vault.RecordKey(ns, user)
	rawBefore, _, _ := e.store.Get(bg, key)
	failures := e.metric("keyvault_integrity_failures_total")
	checks := e.hsm.pinChecks()
	ops := 0
	refused := func(what string, err error) {
		t.Helper()
		ops++
		if !errors.Is(err, vault.ErrIntegrity) {
			t.Errorf("%s on a tampered record: %v, want ErrIntegrity", what, err)
		}
	}
	for _, pin := range pins {
		s, _, err := e.v.Recover(bg, ns, user, pin)
		if s != nil {
			t.Fatalf("recover returned a secret from a tampered record")
		}
		refused("recover", err)
		_, err = e.v.ChangePIN(bg, ns, user, pin, []byte("new-pin-0000"), vault.Precondition{})
		refused("change PIN", err)
	}
	_, err := e.v.Status(bg, ns, user)
	refused("status", err)
	_, _, err = e.v.Enroll(bg, ns, user, randBytes(16), rightPIN, 0, vault.Precondition{})
	refused("enroll over it", err)
	refused("delete", e.v.Delete(bg, ns, user, vault.Precondition{}))

	if n := e.hsm.pinChecks() - checks; n != 0 {
		t.Errorf("%d PIN checks against a tampered record", n)
	}
	if rawAfter, _, _ := e.store.Get(bg, key); !bytes.Equal(rawAfter, rawBefore) {
		t.Error("a tampered record was rewritten")
	}
	if got := e.metric("keyvault_integrity_failures_total") - failures; got != float64(ops) {
		t.Errorf("keyvault_integrity_failures_total rose by %v for %d refused operations", got, ops)
	}
}

// edit re-encodes the record under user with fn applied, keeping its MAC.
func edit(t *testing.T, e *env, user string, fn func(r *vault.Record)) {
	t.Helper()
	r, raw := e.raw(ns, user)
	fn(r)
	body := vault.MarshalRecordBody(r)
	e.put(vault.RecordKey(ns, user), append(body, raw[len(raw)-32:]...))
}

// (a) Edited counters and fields are refused.
func TestEditedRecordIsRefused(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		edit func(r *vault.Record)
	}{
		{"counter back to zero", func(r *vault.Record) { r.Guesses = 0 }},
		{"all guesses forgiven", func(r *vault.Record) { r.Forgiven = r.Guesses }},
		{"all guesses refunded", func(r *vault.Record) { r.Refunds = r.Guesses }},
		{"max_attempts raised", func(r *vault.Record) { r.MaxAttempts = 20 }},
		{"generation moved", func(r *vault.Record) { r.Generation++ }},
		{"locked flag set", func(r *vault.Record) { r.Locked = true }},
		{"tombstone flag set", func(r *vault.Record) { r.Tombstone = true }},
		{"timestamps changed", func(r *vault.Record) { r.UpdatedAt++ }},
		{"MAC key version changed", func(r *vault.Record) { r.MACVersion = 2 }},
		{"wrap key version changed", func(r *vault.Record) { r.WrapVersion = 2 }},
		{"salt changed", func(r *vault.Record) { r.Salt[0] ^= 1 }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e, _ := tamperEnv(t)
			edit(t, e, userA, c.edit)
			everyOperationRefused(t, e, userA, rightPIN, []byte("0000"))
			// The other user is unaffected.
			if _, err := e.v.Status(bg, ns, userB); err != nil {
				t.Fatalf("another user's backup: %v", err)
			}
		})
	}
}

// (b) and (d): a record copied onto another key is refused, whichever key.
func TestRecordMovedToAnotherKeyIsRefused(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		nsp    string
		target string
		setup  func(t *testing.T, e *env)
	}{
		{"onto another user's live backup", ns, userB, nil},
		{"onto a user without a backup", ns, userC, nil},
		{"onto the same user_id in another namespace", otherNS, userA, func(t *testing.T, e *env) {
			if _, _, err := e.v.Enroll(bg, otherNS, userA, randBytes(16), rightPIN, 0, vault.Precondition{}); err != nil {
				t.Fatal(err)
			}
		}},
		{"onto another user's tombstone", ns, userB, func(t *testing.T, e *env) {
			if err := e.v.Delete(bg, ns, userB, vault.Precondition{}); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e, _ := tamperEnv(t)
			if c.setup != nil {
				c.setup(t, e)
			}
			_, rawA := e.raw(ns, userA)
			e.put(vault.RecordKey(c.nsp, c.target), rawA)
			failures := e.metric("keyvault_integrity_failures_total")
			s, _, err := e.v.Recover(bg, c.nsp, c.target, rightPIN)
			if s != nil || !errors.Is(err, vault.ErrIntegrity) {
				t.Fatalf("recover with A's PIN from A's record under another key: %v", err)
			}
			if _, err := e.v.Status(bg, c.nsp, c.target); !errors.Is(err, vault.ErrIntegrity) {
				t.Fatalf("status: %v", err)
			}
			if got := e.metric("keyvault_integrity_failures_total") - failures; got != 2 {
				t.Errorf("integrity failures rose by %v, want 2", got)
			}
			// The original stays good.
			if _, _, err := e.v.Recover(bg, ns, userA, rightPIN); err != nil {
				t.Fatalf("A's own record after the copy: %v", err)
			}
		})
	}
}

// (d) A generation-1 record of user A placed under user B, whose own
// record is at generation 1 too, and then at generation 2.
func TestOldGenerationOfAnotherUserIsRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	e.enroll(userA, randBytes(32), rightPIN, 5)
	_, rawA1 := e.raw(ns, userA)
	e.enroll(userA, randBytes(32), rightPIN, 5) // A is at generation 2 now
	e.enroll(userB, randBytes(32), rightPIN, 5) // B at generation 1, same PIN
	e.reopen()
	for _, genB := range []uint64{1, 2} {
		if genB == 2 {
			e.enroll(userB, randBytes(32), rightPIN, 5)
		}
		_, rawB := e.raw(ns, userB)
		e.put(vault.RecordKey(ns, userB), rawA1)
		everyOperationRefused(t, e, userB, rightPIN)
		e.put(vault.RecordKey(ns, userB), rawB)
		if b := e.status(userB); b.Generation != genB {
			t.Fatalf("B restored at generation %d, want %d", b.Generation, genB)
		}
	}
}

// (c) Every single-byte change of a record, its truncations and an
// extension are refused, and none of them yields the secret or counts,
// whichever profile sealed it.
func TestEveryByteFlipIsRefused(t *testing.T) {
	t.Parallel()
	for _, p := range profiles {
		t.Run(string(p), func(t *testing.T) {
			t.Parallel()
			everyByteFlipIsRefused(t, newEnvProfile(t, vault.Options{}, p))
		})
	}
}

func everyByteFlipIsRefused(t *testing.T, e *env) {
	e, secret := tamperEnvOn(t, e)
	key := vault.RecordKey(ns, userA)
	orig, _, err := e.store.Get(bg, key)
	if err != nil || orig == nil {
		t.Fatal(err)
	}
	checks := e.hsm.pinChecks()
	tries := 0
	try := func(what string, val []byte) {
		t.Helper()
		e.put(key, val)
		s, _, err := e.v.Recover(bg, ns, userA, rightPIN)
		if s != nil {
			t.Fatalf("%s: a tampered record gave up its secret", what)
		}
		if !errors.Is(err, vault.ErrIntegrity) {
			t.Fatalf("%s: recover answered %v, want ErrIntegrity", what, err)
		}
		if _, err := e.v.Status(bg, ns, userA); !errors.Is(err, vault.ErrIntegrity) {
			t.Fatalf("%s: status answered %v, want ErrIntegrity", what, err)
		}
		tries++
	}
	for i := range orig {
		for _, mask := range []byte{0x01, 0x80, 0xff} {
			val := bytes.Clone(orig)
			val[i] ^= mask
			try("flip", val)
		}
	}
	for n := 0; n < len(orig); n++ {
		try("truncation", orig[:n:n])
	}
	try("extension", append(bytes.Clone(orig), 0))

	if n := e.hsm.pinChecks() - checks; n != 0 {
		t.Fatalf("%d PIN checks against tampered records", n)
	}
	if got := e.metric("keyvault_integrity_failures_total"); got != float64(2*tries) {
		t.Errorf("integrity failures %v, want %d", got, 2*tries)
	}
	e.put(key, orig)
	if st := e.status(userA); st.AttemptsRemaining != 2 {
		t.Fatalf("the tampering counted guesses: %+v", st)
	}
	if s, _, err := e.v.Recover(bg, ns, userA, rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("the restored record: %v", err)
	}
}

// Records are MAC'd under a key derived from the HSM's root key: another
// deployment's HSM, even with the same wrap and PIN keys, refuses them.
func TestRecordsNeedTheSameRootKey(t *testing.T) {
	t.Parallel()
	e, _ := tamperEnv(t)
	e.closeStore()
	e.hsm = e.hsm.withNewRoot()
	e.open()
	everyOperationRefused(t, e, userA, rightPIN)
}

// Behind the record MAC: someone who holds the in-memory record MAC key
// (but not the HSM) still cannot move a sealed secret to another user or
// generation, nor a whole record to another user, nor flip a bit of the
// sealed secret: the AEAD associated data (under the hmac profile, also
// the record key derived from it) and the PIN MAC input bind them.
func TestSealedSecretIsBoundToUserAndGeneration(t *testing.T) {
	t.Parallel()
	for _, p := range profiles {
		t.Run(string(p), func(t *testing.T) {
			t.Parallel()
			sealedSecretIsBound(t, newEnvProfile(t, vault.Options{}, p))
		})
	}
}

func sealedSecretIsBound(t *testing.T, e *env) {
	secretA1, secretA2 := randBytes(32), randBytes(32)
	e.enroll(userA, secretA1, rightPIN, 5)
	rA1, _ := e.raw(ns, userA)
	e.enroll(userA, secretA2, rightPIN, 5)
	e.enroll(userB, randBytes(32), []byte("pin-of-bob"), 5)

	{ // a sealed secret moved to another user
		rB, rawB := e.raw(ns, userB)
		rA, _ := e.raw(ns, userA)
		rB.Nonce, rB.Sealed = rA.Nonce, rA.Sealed
		e.put(vault.RecordKey(ns, userB), e.v.ForgeRecord(vault.RecordKey(ns, userB), rB))
		failures := e.metric("keyvault_integrity_failures_total")
		s, _, err := e.v.Recover(bg, ns, userB, []byte("pin-of-bob"))
		if s != nil || !errors.Is(err, vault.ErrIntegrity) {
			t.Fatalf("B's PIN on A's sealed secret: %v, want ErrIntegrity", err)
		}
		if e.metric("keyvault_integrity_failures_total") <= failures {
			t.Error("not counted as an integrity failure")
		}
		e.put(vault.RecordKey(ns, userB), rawB)
	}
	{ // a bit of the sealed secret flipped
		rA, rawA := e.raw(ns, userA)
		rA.Sealed = bytes.Clone(rA.Sealed) // it shares rawA's bytes
		rA.Sealed[len(rA.Sealed)/2] ^= 1
		e.put(vault.RecordKey(ns, userA), e.v.ForgeRecord(vault.RecordKey(ns, userA), rA))
		s, _, err := e.v.Recover(bg, ns, userA, rightPIN)
		if s != nil || !errors.Is(err, vault.ErrIntegrity) {
			t.Fatalf("a flipped sealed secret: %v, want ErrIntegrity", err)
		}
		e.put(vault.RecordKey(ns, userA), rawA)
	}
	{ // the sealed secret of an older generation
		rA, rawA := e.raw(ns, userA)
		rA.Nonce, rA.Sealed = rA1.Nonce, rA1.Sealed
		e.put(vault.RecordKey(ns, userA), e.v.ForgeRecord(vault.RecordKey(ns, userA), rA))
		s, _, err := e.v.Recover(bg, ns, userA, rightPIN)
		if s != nil || !errors.Is(err, vault.ErrIntegrity) {
			t.Fatalf("generation 2 holding generation 1's sealed secret: %v, want ErrIntegrity", err)
		}
		e.put(vault.RecordKey(ns, userA), rawA)
	}
	{ // a whole record moved to another user
		rA, _ := e.raw(ns, userA)
		_, rawB := e.raw(ns, userB)
		e.put(vault.RecordKey(ns, userB), e.v.ForgeRecord(vault.RecordKey(ns, userB), rA))
		s, _, err := e.v.Recover(bg, ns, userB, rightPIN)
		if s != nil || err == nil {
			t.Fatalf("A's PIN recovered A's record forged under B: %v", err)
		}
		e.put(vault.RecordKey(ns, userB), rawB)
	}
	{ // a whole record of an older generation, relabelled
		_, rawA := e.raw(ns, userA)
		old := *rA1
		old.Generation = 2
		e.put(vault.RecordKey(ns, userA), e.v.ForgeRecord(vault.RecordKey(ns, userA), &old))
		s, _, err := e.v.Recover(bg, ns, userA, rightPIN)
		if s != nil || err == nil {
			t.Fatalf("generation 1's record relabelled as 2 recovered: %v", err)
		}
		e.put(vault.RecordKey(ns, userA), rawA)
	}
	if s, _, err := e.v.Recover(bg, ns, userA, rightPIN); err != nil || !bytes.Equal(s, secretA2) {
		t.Fatalf("A afterwards: %v", err)
	}
}

// The stored format, recomputed from docs/format.md with the HSM's key
// material: field offsets, the PIN MAC input, the verifier, both sealing
// layers (under each profile) and the record MAC. The database file holds
// no secret, PIN, M or inner key.
func TestStoredFormatMatchesTheDocs(t *testing.T) {
	t.Parallel()
	for _, p := range profiles {
		t.Run(string(p), func(t *testing.T) {
			t.Parallel()
			storedFormatMatchesTheDocs(t, newEnvProfile(t, vault.Options{}, p), p)
		})
	}
}

func storedFormatMatchesTheDocs(t *testing.T, e *env, profile vault.Profile) {
	const user = "format-user@example.org"
	secret := randBytes(40)
	pin := []byte("a long and distinctive PIN 7391")
	var msgs [][]byte
	e.hsm.setHook(func(_ context.Context, key vault.KeyID, msg []byte) {
		if key.Role == vault.RolePIN {
			msgs = append(msgs, bytes.Clone(msg))
		}
	})
	e.enroll(user, secret, pin, 7)
	e.hsm.setHook(nil)
	key := vault.RecordKey(ns, user)
	raw, _, err := e.store.Get(bg, key)
	if err != nil {
		t.Fatal(err)
	}

	// Store key.
	wantKey := append([]byte{'r', byte(len(ns))}, ns...)
	wantKey = append(append(wantKey, byte(len(user))), user...)
	if !bytes.Equal(key, wantKey) {
		t.Fatalf("store key %q, want %q", key, wantKey)
	}
	// Fixed fields at their documented offsets.
	u32 := func(off int) uint32 { return binary.BigEndian.Uint32(raw[off:]) }
	u64 := func(off int) uint64 { return binary.BigEndian.Uint64(raw[off:]) }
	sealing := map[vault.Profile]byte{vault.ProfileGCM: 1, vault.ProfileHMAC: 2, vault.ProfileGCMHSMIV: 3}[profile]
	if raw[0] != 3 || raw[1] != 0 || u64(2) != 1 || u32(10) != 7 || u32(14) != 0 || u32(18) != 0 || u32(22) != 0 ||
		u64(26) == 0 || u64(34) != u64(26) || u64(42) != 0 || u32(50) != 1 || u32(54) != 1 || u32(58) != 1 || raw[62] != sealing {
		t.Fatalf("fixed fields differ from docs/format.md: % x", raw[:63])
	}
	off := 63
	field := func(lenBytes int) []byte {
		var n int
		if lenBytes == 1 {
			n = int(raw[off])
		} else {
			n = int(binary.BigEndian.Uint32(raw[off:]))
		}
		off += lenBytes
		f := raw[off : off+n]
		off += n
		return f
	}
	salt, verifier, nonce, sealed := field(1), field(1), field(1), field(4)
	// Format 2: the write count, then the operation IDs (8 bytes each).
	opSeq, nOps := u64(off), int(raw[off+8])
	off += 9 + 8*nOps
	if len(salt) != 32 || len(verifier) != 32 || len(nonce) != 12 || opSeq != 1 || nOps != 1 || off != len(raw)-32 {
		t.Fatalf("variable fields: salt %d, verifier %d, nonce %d, op seq %d, op IDs %d, MAC at %d of %d",
			len(salt), len(verifier), len(nonce), opSeq, nOps, off, len(raw))
	}
	body, mac := raw[:off], raw[off:]

	lp := func(b []byte, f []byte) []byte { return append(binary.BigEndian.AppendUint32(b, uint32(len(f))), f...) }
	// PIN MAC input.
	in := append([]byte("keyvault/v1/pin-mac"), 0)
	in = lp(lp(in, []byte(ns)), []byte(user))
	in = binary.BigEndian.AppendUint64(in, 1)
	in = lp(lp(in, salt), pin)
	if len(msgs) != 1 || !bytes.Equal(msgs[0], in) {
		t.Fatalf("the PIN MAC input differs from docs/format.md")
	}
	mm := hmac.New(sha256.New, e.hsm.rawKey(vault.KeyID{Role: vault.RolePIN, Version: 1}))
	mm.Write(in)
	m := mm.Sum(nil)
	wantVerifier, _ := hkdf.Key(sha256.New, m, nil, "keyvault/v1/verifier", 32)
	innerKey, _ := hkdf.Key(sha256.New, m, nil, "keyvault/v1/inner", 32)
	if !bytes.Equal(verifier, wantVerifier) {
		t.Fatal("the stored verifier is not HKDF-SHA256(M, \"keyvault/v1/verifier\")")
	}
	// Outer layer.
	aad := append([]byte("keyvault/v1/outer"), 0)
	aad = lp(lp(aad, []byte(ns)), []byte(user))
	aad = binary.BigEndian.AppendUint64(aad, 1)
	aad = binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(aad, 1), 1)
	outerKey := e.hsm.rawKey(vault.KeyID{Role: vault.RoleWrap, Version: 1})
	if profile == vault.ProfileHMAC {
		// The record key the HSM derives: HMAC under the wrap key.
		in := append([]byte("keyvault/v1/seal-key"), 0)
		in = lp(lp(in, nonce), aad)
		dk := hmac.New(sha256.New, outerKey)
		dk.Write(in)
		outerKey = dk.Sum(nil)
		if _, err := gcmOf(t, e.hsm.rawKey(vault.KeyID{Role: vault.RoleWrap, Version: 1})).Open(nil, nonce, sealed, aad); err == nil {
			t.Fatal("under hmac, the outer layer opens under the wrap key itself")
		}
	}
	innerLayer, err := gcmOf(t, outerKey).Open(nil, nonce, sealed, aad)
	if err != nil {
		t.Fatalf("outer layer does not open with the documented AAD: %v", err)
	}
	// Inner layer.
	iaad := append([]byte("keyvault/v1/inner-aad"), 0)
	iaad = lp(lp(iaad, []byte(ns)), []byte(user))
	iaad = binary.BigEndian.AppendUint64(iaad, 1)
	got, err := gcmOf(t, innerKey).Open(nil, innerLayer[:12], innerLayer[12:], iaad)
	if err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("inner layer does not open to the secret with the documented key and AAD: %v", err)
	}
	// Record MAC.
	rk := hmac.New(sha256.New, e.hsm.rawKey(vault.KeyID{Role: vault.RoleRoot, Version: 1}))
	rk.Write([]byte("keyvault/v1/derive/record-mac"))
	rm := hmac.New(sha256.New, rk.Sum(nil))
	rm.Write(append([]byte("keyvault/v1/record"), 0))
	rm.Write(lp(nil, key))
	rm.Write(body)
	if !hmac.Equal(mac, rm.Sum(nil)) {
		t.Fatal("the record MAC differs from docs/format.md")
	}
	// Seal reservation.
	sk := binary.BigEndian.AppendUint32([]byte("m\x00seals/wrap/"), 1)
	cnt, _, _ := e.store.Get(bg, sk)
	if len(cnt) != 12+32 || binary.BigEndian.Uint64(cnt) != 4096 || binary.BigEndian.Uint32(cnt[8:]) != 1 {
		t.Fatalf("seal reservation %x, want 4096 under root v1", cnt)
	}
	sm := hmac.New(sha256.New, rk.Sum(nil))
	sm.Write(append([]byte("keyvault/v1/record"), 0))
	sm.Write(lp(nil, sk))
	sm.Write(cnt[:12])
	if !hmac.Equal(cnt[12:], sm.Sum(nil)) {
		t.Fatal("the seal count MAC differs from docs/format.md")
	}
	if e.metric("keyvault_wrap_key_seals", "key_version", "1") != 4096 {
		t.Error("keyvault_wrap_key_seals{key_version=1} is not 4096")
	}
	// A seal count wound back by hand is refused, and sealing with it.
	if _, err := e.store.CompareAndSwap(bg, sk, revOf(t, e, sk), append(binary.BigEndian.AppendUint64(nil, 0), cnt[8:]...)); err != nil {
		t.Fatal(err)
	}
	e.reopen()
	if _, _, err := e.v.Enroll(bg, ns, "seal-wound-back", randBytes(32), rightPIN, 0, vault.Precondition{}); !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("enroll with a wound-back seal count: %v, want ErrIntegrity", err)
	}

	// Nothing that opens the secret is in the database file.
	if e.etcd != nil {
		return // no file of ours: etcd's own files are its business
	}
	e.closeStore()
	file, err := os.ReadFile(e.path)
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range map[string][]byte{"secret": secret, "PIN": pin, "M": m, "inner key": innerKey, "inner layer": innerLayer, "outer key": outerKey} {
		if bytes.Contains(file, v) {
			t.Errorf("the database file holds the %s", name)
		}
	}
}

func gcmOf(t *testing.T, key []byte) cipher.AEAD {
	t.Helper()
	b, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// A store value too short to hold even its revision (damage below the
// record format) is an integrity failure too, not an outage.
func TestTruncatedStoreValueIsRefused(t *testing.T) {
	t.Parallel()
	e, _ := tamperEnvOn(t, newBoltEnv(t, vault.Options{})) // edits the bbolt file
	e.closeStore()
	db, err := bolt.Open(e.path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("kv")).Put(vault.RecordKey(ns, userA), []byte{0, 0, 1})
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	e.open()
	failures := e.metric("keyvault_integrity_failures_total")
	if _, err := e.v.Status(bg, ns, userA); !errors.Is(err, vault.ErrIntegrity) || errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("status over a truncated value: %v, want ErrIntegrity", err)
	}
	if s, _, err := e.v.Recover(bg, ns, userA, rightPIN); s != nil || !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("recover over a truncated value: %v, want ErrIntegrity", err)
	}
	if got := e.metric("keyvault_integrity_failures_total") - failures; got != 2 {
		t.Errorf("integrity failures rose by %v, want 2", got)
	}
}

func revOf(t *testing.T, e *env, key []byte) uint64 {
	t.Helper()
	_, rev, err := e.store.Get(bg, key)
	if err != nil {
		t.Fatal(err)
	}
	return rev
}
