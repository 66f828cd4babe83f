package hsmpool

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/hsmpool/internal/p11raw"
	"github.com/keyvault/keyvault/hsmpool/internal/p11raw/p11rawtest"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// An HSM that generates the GCM IV itself (AWS CloudHSM, Thales Luna in
// FIPS mode), emulated at the PKCS#11 ABI over a real SoftHSM token: its
// C_EncryptInit writes an IV of its own into CK_GCM_PARAMS.pIv and the
// real token encrypts under it. The gcm profile seals under the vault's
// nonce, so such a token is refused under gcm, with the way out (hmac)
// named, and serves under hmac. A seal that asks for the token's IV
// (p11raw.SealGCMTokenIV) gets it back, and what it sealed opens under it.
func TestTokenChosenGCMIV(t *testing.T) {
	_, tok := provisioned(t, "iv", 4)
	defer tok.Close()
	real := tok.raw.mod
	// The emulation's strictness is one per process: the lenient HSM
	// (any IV buffer) first, then the strict one (a zeroed buffer only).
	tok.raw.mod = p11rawtest.TokenChosenIV(real, false)

	// The probe's known answer meets the token's IV: refused under gcm.
	_, err := tok.probeCapabilities(vault.ProfileGCM)
	var refusal *RefusedError
	if !errors.As(err, &refusal) || refusal.Reason != "known_answer_gcm" ||
		!strings.Contains(refusal.Detail, "own choosing") || !strings.Contains(refusal.Detail, "hsm.profile: hmac") {
		t.Fatalf("probe of a token that chooses the GCM IV, under gcm: %v; want a known_answer_gcm refusal naming the token's IV and hmac", err)
	}
	if !bytes.Equal(katNonce, bytes.Repeat([]byte{0x6e}, gcmNonceSize)) {
		t.Fatal("the token's IV was written into the probe's shared known-answer nonce")
	}

	// A seal under the vault's nonce fails and leaves the nonce as it was.
	nonce := make([]byte, gcmNonceSize)
	rand.Read(nonce)
	kept := bytes.Clone(nonce)
	if _, err := tok.Seal(wrap1, nonce, []byte("secret"), []byte("aad")); !errors.Is(err, p11raw.ErrTokenChoseIV) {
		t.Fatalf("Seal on a token that chooses the GCM IV: %v, want ErrTokenChoseIV", err)
	}
	if !bytes.Equal(nonce, kept) {
		t.Fatal("the token's IV was written into the caller's nonce")
	}
	if _, err := kcv(tok, wrap1); !errors.Is(err, p11raw.ErrTokenChoseIV) || !bytes.Equal(kcvNonce, make([]byte, 12)) {
		t.Fatalf("check value on a token that chooses the GCM IV: %v, kcvNonce %x", err, kcvNonce)
	}

	// Asking for the token's IV: the IV comes back, differs per seal, and
	// opens what was sealed.
	sealTokenIV := func(mod *p11raw.Module) (iv, ct []byte, err error) {
		err = tok.raw.with(func(s pkcs11.SessionHandle) (err error) {
			iv, ct, err = mod.SealGCMTokenIV(s, tok.handles[wrap1], gcmNonceSize, []byte("secret"), []byte("aad"))
			return err
		})
		return iv, ct, err
	}
	openWith := func(iv, ct []byte) ([]byte, error) {
		var pt []byte
		err := tok.raw.with(func(s pkcs11.SessionHandle) (err error) {
			pt, err = real.OpenGCM(s, tok.handles[wrap1], iv, ct, []byte("aad"))
			return err
		})
		return pt, err
	}
	iv1, ct, err := sealTokenIV(tok.raw.mod)
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := openWith(iv1, ct); err != nil || string(pt) != "secret" {
		t.Fatalf("open under the IV the token chose: %q %v", pt, err)
	}
	iv2, _, err := sealTokenIV(tok.raw.mod)
	if err != nil || bytes.Equal(iv1, iv2) {
		t.Fatalf("two seals, IVs %x and %x (%v)", iv1, iv2, err)
	}
	// A token that does not choose the IV seals under the zeroed buffer:
	// refused, not returned.
	if _, _, err := sealTokenIV(real); !errors.Is(err, p11raw.ErrTokenKeptIV) {
		t.Fatalf("SealGCMTokenIV on a token that keeps the caller's IV: %v, want ErrTokenKeptIV", err)
	}

	// Strict, as CloudHSM's library: a nonce that is not zeroed is refused
	// by the token itself, and the probe refuses the member for it.
	tok.raw.mod = p11rawtest.TokenChosenIV(real, true)
	// The token key check of the copy, which such a token fails too
	// (its check value is a seal under a fixed nonce), is not due: this
	// looks at the seal's own answer.
	claimTokenKeyChecks(tok)
	if _, err := tok.Seal(wrap1, nonce, []byte("secret"), nil); !errors.Is(err, pkcs11.Error(pkcs11.CKR_MECHANISM_PARAM_INVALID)) {
		t.Fatalf("Seal on a strict token that chooses the GCM IV: %v, want CKR_MECHANISM_PARAM_INVALID", err)
	}
	if _, err := tok.probeCapabilities(vault.ProfileGCM); !errors.As(err, &refusal) || refusal.Reason != "known_answer_gcm" {
		t.Fatalf("probe of a strict token that chooses the GCM IV: %v, want a known_answer_gcm refusal", err)
	}
	if iv, ct, err := sealTokenIV(tok.raw.mod); err != nil {
		t.Fatalf("a zeroed IV buffer on a strict token: %v", err)
	} else if pt, err := openWith(iv, ct); err != nil || string(pt) != "secret" {
		t.Fatalf("open under the IV the strict token chose: %q %v", pt, err)
	}
}

// The way out for such a token: the hmac profile needs no token GCM, and
// a pool on it serves.
func TestTokenChosenGCMIVServesUnderHMAC(t *testing.T) {
	m := newMember(t, "iv-hmac")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileHMAC); err != nil {
		t.Fatal(err)
	}
	tok, err := NewModules().openToken(m)
	if err != nil {
		t.Fatal(err)
	}
	tok.raw.mod = p11rawtest.TokenChosenIV(tok.raw.mod, true)
	if _, err := tok.probeCapabilities(vault.ProfileHMAC); err != nil {
		t.Fatalf("probe under hmac: %v", err)
	}
	p, err := newPool([]MemberConfig{m}, []token{tok}, make([]error, 1), Options{Profile: vault.ProfileHMAC})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if errs := load(p, 4, 10, nil); len(errs) > 0 {
		t.Fatalf("%d requests failed under hmac on a token that chooses the GCM IV; the first: %v", len(errs), errs[0])
	}
}

// Under gcm-hsm-iv a pool of two members holding one AES wrap key (keys
// init imports it into both) serves from a token that chooses the GCM IV,
// emulated at the PKCS#11 ABI over real SoftHSM, beside a plain SoftHSM
// token that takes the IV it is given. Both pass the probe, and their
// check values (AES-ECB of a zero block) are equal. A seal on the
// emulated token hands back the token's IV in place of the vault's
// nonce, and what either member sealed opens on the other under the nonce
// handed back, and under no other. A tampered ciphertext is ErrIntegrity
// and takes no member out. The same emulated token, opened for gcm, is
// refused, naming gcm-hsm-iv.
func TestGCMHSMIVProfile(t *testing.T) {
	cfgs := []MemberConfig{newMember(t, "hsm-iv"), newMember(t, "caller-iv")}
	if _, err := Provision(cfgs, vault.ProfileGCMHSMIV); err != nil {
		t.Fatal(err)
	}
	cfgs = forProfile(cfgs, vault.ProfileGCMHSMIV)
	toks := make([]*p11Token, 2)
	for i, c := range cfgs {
		tok, err := NewModules().openToken(c)
		if err != nil {
			t.Fatal(err)
		}
		toks[i] = tok
	}
	// Strict, as CloudHSM's library: only a zeroed IV buffer is taken.
	toks[0].raw.mod = p11rawtest.TokenChosenIV(toks[0].raw.mod, true)
	for _, tok := range toks {
		if _, err := tok.probeCapabilities(vault.ProfileGCMHSMIV); err != nil {
			t.Fatalf("probe of %s under gcm-hsm-iv: %v", tok.name, err)
		}
	}
	kcv0, err0 := kcv(toks[0], wrap1)
	kcv1, err1 := kcv(toks[1], wrap1)
	if err0 != nil || err1 != nil || len(kcv0) != 8 || !bytes.Equal(kcv0, kcv1) {
		t.Fatalf("check values of the wrap key: %x (%v) and %x (%v), want 8 equal bytes", kcv0, err0, kcv1, err1)
	}

	p, err := newPool(cfgs, []token{toks[0], toks[1]}, make([]error, 2), Options{Profile: vault.ProfileGCMHSMIV})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if p.Healthy() != 2 || p.WrapProfile(1) != vault.ProfileGCMHSMIV {
		t.Fatalf("healthy %d, wrap v1 of profile %q: want 2 members under gcm-hsm-iv", p.Healthy(), p.WrapProfile(1))
	}
	ctx := context.Background()
	pt, aad := []byte("an inner layer"), []byte("outer aad")
	for i, from := range toks {
		to := toks[1-i]
		nonce := make([]byte, gcmNonceSize)
		rand.Read(nonce)
		vaults := bytes.Clone(nonce)
		ct, err := from.Seal(wrap1, nonce, pt, aad)
		if err != nil {
			t.Fatalf("seal on %s: %v", from.name, err)
		}
		if tokenIV := i == 0; bytes.Equal(nonce, vaults) == tokenIV {
			t.Fatalf("seal on %s: nonce %x after, %x before; the token's own IV must replace the vault's there, and only there", from.name, nonce, vaults)
		}
		if got, err := to.Open(wrap1, nonce, ct, aad); err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("sealed on %s, opened on %s under the nonce handed back: %q %v", from.name, to.name, got, err)
		}
		if i == 0 {
			if _, err := to.Open(wrap1, vaults, ct, aad); err == nil {
				t.Fatal("a seal under the token's IV opened under the vault's nonce")
			}
		}
	}
	for range 20 {
		nonce := make([]byte, gcmNonceSize)
		rand.Read(nonce)
		ct, err := p.Seal(ctx, wrap1, nonce, pt, aad)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := p.Open(ctx, wrap1, nonce, ct, aad); err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("pool open: %v", err)
		}
		ct[0] ^= 1
		if _, err := p.Open(ctx, wrap1, nonce, ct, aad); !errors.Is(err, vault.ErrIntegrity) {
			t.Fatalf("pool open of a tampered ciphertext: %v, want ErrIntegrity", err)
		}
	}
	if p.Healthy() != 2 {
		t.Fatalf("tampered ciphertexts took a member out: %d healthy", p.Healthy())
	}

	// The emulated token, opened for gcm: refused, with the way out.
	plain, err := NewModules().openToken(MemberConfig{Name: "hsm-iv", Module: cfgs[0].Module, TokenLabel: cfgs[0].TokenLabel, PIN: cfgs[0].PIN, MaxSessions: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	plain.raw.mod = p11rawtest.TokenChosenIV(plain.raw.mod, true)
	_, err = plain.probeCapabilities(vault.ProfileGCM)
	var refusal *RefusedError
	if !errors.As(err, &refusal) || refusal.Reason != "known_answer_gcm" || !strings.Contains(refusal.Detail, "hsm.profile: gcm-hsm-iv") {
		t.Fatalf("probe under gcm of a token that chooses the GCM IV: %v; want a known_answer_gcm refusal naming gcm-hsm-iv", err)
	}
}

// ivRecorder is a token that keeps the nonce of each seal as the caller
// passed it and as Seal handed it back.
type ivRecorder struct {
	*p11Token
	mu            sync.Mutex
	passed, given [][]byte
}

func (r *ivRecorder) Seal(k vault.KeyID, nonce, pt, aad []byte) ([]byte, error) {
	before := bytes.Clone(nonce)
	ct, err := r.p11Token.Seal(k, nonce, pt, aad)
	if err == nil {
		r.mu.Lock()
		r.passed, r.given = append(r.passed, before), append(r.given, bytes.Clone(nonce))
		r.mu.Unlock()
	}
	return ct, err
}

// A vault on a gcm-hsm-iv pool whose one member chooses the GCM IV
// (emulated over SoftHSM): an enrolled record is marked gcm-hsm-iv
// (sealing byte 3) and stores, as its outer nonce, the IV the token chose
// for its seal, not the nonce the vault passed; it recovers; with a byte
// of its sealed secret flipped it is refused as damaged.
func TestGCMHSMIVVaultRecords(t *testing.T) {
	cfgs := forProfile([]MemberConfig{newMember(t, "hsm-iv-vault")}, vault.ProfileGCMHSMIV)
	if _, err := Provision(cfgs, vault.ProfileGCMHSMIV); err != nil {
		t.Fatal(err)
	}
	tok, err := NewModules().openToken(cfgs[0])
	if err != nil {
		t.Fatal(err)
	}
	tok.raw.mod = p11rawtest.TokenChosenIV(tok.raw.mod, true)
	rec := &ivRecorder{p11Token: tok}
	p, err := newPool(cfgs, []token{rec}, make([]error, 1), Options{Profile: vault.ProfileGCMHSMIV})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	store, err := boltstore.Open(boltstore.Options{Path: filepath.Join(t.TempDir(), "keyvault.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	ctx := context.Background()
	v, err := vault.New(ctx, store, p, vault.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	secret, pin := []byte("a secret sealed under the HSM's IV"), []byte("a PIN of some length")
	if _, _, err := v.Enroll(ctx, "ns", "user", secret, pin, 5, vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	key := append([]byte{'r', 2}, "ns"...)
	key = append(append(key, 4), "user"...)
	raw, _, err := store.Get(ctx, key)
	if err != nil || len(raw) < 146 {
		t.Fatalf("the stored record: %d bytes, %v", len(raw), err)
	}
	// docs/format.md: the sealing byte at 62; salt, verifier and nonce
	// follow from 63, each after its one-byte length.
	const offNonce = 63 + 1 + 32 + 1 + 32 + 1
	nonce := raw[offNonce : offNonce+gcmNonceSize]
	rec.mu.Lock()
	n := len(rec.given)
	lastPassed, lastGiven := rec.passed[n-1], rec.given[n-1]
	rec.mu.Unlock()
	if raw[62] != 3 || raw[offNonce-1] != gcmNonceSize {
		t.Fatalf("sealing byte %d, nonce length %d; want 3, 12", raw[62], raw[offNonce-1])
	}
	if !bytes.Equal(nonce, lastGiven) || bytes.Equal(nonce, lastPassed) {
		t.Fatalf("the record's nonce %x; the vault passed %x and the token chose %x: want the token's", nonce, lastPassed, lastGiven)
	}
	if got, _, err := v.Recover(ctx, "ns", "user", pin); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("recover: %q %v", got, err)
	}

	tampered := bytes.Clone(raw)
	tampered[offNonce+gcmNonceSize+4+3] ^= 0x40 // a byte of the sealed secret
	_, rev, _ := store.Get(ctx, key)
	if _, err := store.CompareAndSwap(ctx, key, rev, tampered); err != nil {
		t.Fatal(err)
	}
	if _, _, err := v.Recover(ctx, "ns", "user", pin); !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("recover of a record with its sealed secret altered: %v, want ErrIntegrity", err)
	}
	if p.Healthy() != 1 {
		t.Fatalf("the tampered record took the member out: %d healthy", p.Healthy())
	}
}
