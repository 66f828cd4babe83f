package hsmpool

import (
	"bytes"
	"crypto/rand"
	"errors"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/hsmpool/internal/p11raw"
	"github.com/keyvault/keyvault/hsmpool/internal/p11raw/p11rawtest"
	"github.com/keyvault/keyvault/vault"
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
	tok, err := openToken(m)
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
