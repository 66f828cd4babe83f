package hsmpool

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// opencryptoki's soft token has all the hmac profile needs: the probe
// accepts it under hmac, and still refuses it under gcm, naming hmac as
// the profile that works.
func TestCapabilitiesOpencryptokiByProfile(t *testing.T) {
	m := opencryptokiMember(t, "oc")
	c := Check([]MemberConfig{m}, vault.ProfileHMAC)[0]
	if c.Err != nil {
		t.Fatalf("opencryptoki under hmac: %v", c.Err)
	}
	if c.Caps.Profile != vault.ProfileHMAC || c.Caps.GCM.Present || c.Caps.KnownAnswerHMAC != katOK {
		t.Fatalf("opencryptoki capabilities under hmac: %+v", c.Caps)
	}
	if err := c.Caps.CanProvision(1, vault.ProfileHMAC); err != nil {
		t.Errorf("keys init under hmac on opencryptoki alone: %v", err)
	}
	if err := c.Caps.CanProvision(2, vault.ProfileHMAC); err != nil {
		t.Errorf("keys init under hmac with opencryptoki among several: %v", err)
	}
	// No profile and no keys: new keys are made for DefaultProfile.
	if c := Check([]MemberConfig{m}, "")[0]; c.Err != nil || c.Caps.Profile != DefaultProfile {
		t.Fatalf("opencryptoki with no profile set: %v (profile %q), want accepted for %s", c.Err, c.Caps.Profile, DefaultProfile)
	}
	c = Check([]MemberConfig{m}, vault.ProfileGCM)[0]
	var refusal *RefusedError
	if !errors.As(c.Err, &refusal) || refusal.Reason != "CKM_AES_GCM" ||
		!strings.Contains(refusal.Detail, "set hsm.profile: hmac") || strings.Contains(refusal.Detail, "planned") {
		t.Fatalf("opencryptoki under gcm: %v, want a refusal for CKM_AES_GCM naming hsm.profile: hmac", c.Err)
	}
}

// keys init with SoftHSM and opencryptoki under hmac imports the same
// material on both: every key's check value is equal across them, the
// wrap key is of the hmac profile on each, a record sealed with the key
// one member derives opens with the key the other derives, and the pool
// serves on both. A damaged ciphertext is ErrIntegrity, tried on both,
// and takes neither out.
func TestHMACProfileSoftHSMAndOpencryptoki(t *testing.T) {
	soft := newMember(t, "soft")
	oc := opencryptokiMember(t, "oc")
	cfgs := []MemberConfig{soft, oc}
	for _, c := range Check(cfgs, vault.ProfileHMAC) {
		if c.Err != nil {
			t.Fatalf("probe under hmac: %v", c.Err)
		}
	}
	if inHSM, err := Provision(cfgs, vault.ProfileHMAC); err != nil || inHSM {
		t.Fatalf("Provision under hmac: inHSM %v, %v", inHSM, err)
	}
	reg := prometheus.NewRegistry()
	p, err := Open(cfgs, Options{Registerer: reg, Profile: vault.ProfileHMAC})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	if p.Healthy() != 2 || len(p.Refused()) != 0 {
		t.Fatalf("healthy %d, refused %v: want both members serving", p.Healthy(), p.Refused())
	}
	if p.WrapProfile(1) != vault.ProfileHMAC {
		t.Fatalf("WrapProfile(1) = %q", p.WrapProfile(1))
	}
	keys := p.Keys()
	if len(keys) != 2 || len(keys[0].Keys) != 3 {
		t.Fatalf("keys: %+v", keys)
	}
	for i, k := range keys[0].Keys {
		if o := keys[1].Keys[i]; o.Label != k.Label || o.KCV != k.KCV {
			t.Errorf("%s: check value %s on %s, %s on %s", k.Label, k.KCV, keys[0].Member, o.KCV, keys[1].Member)
		}
	}

	ctx := context.Background()
	pt, aad := []byte("an inner layer of forty-four bytes, or so.."), []byte("outer aad")
	toks := []token{p.members[0].state().tok, p.members[1].state().tok}
	for from := range toks {
		to := toks[1-from]
		nonce := make([]byte, 12)
		rand.Read(nonce)
		ct, err := sealDerived(toks[from], wrap1, nonce, pt, aad)
		if err != nil {
			t.Fatalf("seal on %s: %v", p.members[from].name, err)
		}
		g, err := derivedGCM(to, wrap1, nonce, aad)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := g.Open(nil, nonce, ct, aad); err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("sealed on %s, opened on %s: %v", p.members[from].name, p.members[1-from].name, err)
		}
	}
	// Through the pool, on whichever member.
	for range 20 {
		nonce := make([]byte, 12)
		rand.Read(nonce)
		ct, err := p.Seal(ctx, wrap1, nonce, pt, aad)
		if err != nil {
			t.Fatal(err)
		}
		if got, err := p.Open(ctx, wrap1, nonce, ct, aad); err != nil || !bytes.Equal(got, pt) {
			t.Fatalf("pool open: %v", err)
		}
		if _, err := p.HMAC(ctx, pin1, []byte("pin check")); err != nil {
			t.Fatal(err)
		}
		ct[len(ct)-1] ^= 1
		if _, err := p.Open(ctx, wrap1, nonce, ct, aad); !errors.Is(err, vault.ErrIntegrity) {
			t.Fatalf("pool open of a damaged ciphertext: %v, want ErrIntegrity", err)
		}
	}
	if p.Healthy() != 2 {
		t.Fatalf("damaged ciphertexts took a member out: %d healthy", p.Healthy())
	}
	if _, err := p.HMAC(ctx, wrap1, []byte("anything")); err == nil {
		t.Fatal("the pool computed an HMAC of the caller's choosing under the wrap key")
	}
	if _, err := p.Seal(ctx, wrap1, make([]byte, 8), pt, aad); err == nil {
		t.Fatal("a seal with an 8-byte nonce was taken")
	}
}

// On SoftHSM alone, keys init under hmac generates a generic secret wrap
// key inside the token. What Seal makes is exactly AES-256-GCM under
// HMAC-SHA256(wrap key, vault.SealKeyInput(nonce, aad)), the wrap key's
// check value is an HMAC like the other keys', and the token refuses GCM
// under it. A pool configured for gcm refuses these keys at start.
func TestHMACProfileOnSoftHSM(t *testing.T) {
	m := newMember(t, "a")
	if inHSM, err := Provision([]MemberConfig{m}, vault.ProfileHMAC); err != nil || !inHSM {
		t.Fatalf("Provision: inHSM %v, %v", inHSM, err)
	}
	if _, err := Open([]MemberConfig{m}, Options{Profile: vault.ProfileGCM}); err == nil ||
		!strings.Contains(err.Error(), "keyvault-wrap-v1, is a key of the hmac profile") || !strings.Contains(err.Error(), "keys rotate") {
		t.Fatalf("a gcm pool on hmac keys: %v, want a refusal naming the key and keys rotate", err)
	}
	p := openPool(t, prometheus.NewRegistry(), m) // no profile: follows the keys
	if p.WrapProfile(1) != vault.ProfileHMAC {
		t.Fatalf("WrapProfile(1) = %q", p.WrapProfile(1))
	}
	tok := p.members[0].state().tok
	if _, err := tok.Seal(wrap1, make([]byte, 12), []byte("x"), nil); !errors.Is(err, errCaller) {
		t.Fatalf("GCM in the HSM under an hmac wrap key: %v, want refused", err)
	}

	ctx := context.Background()
	nonce, pt, aad := make([]byte, 12), []byte("inner layer"), []byte("aad")
	rand.Read(nonce)
	ct, err := p.Seal(ctx, wrap1, nonce, pt, aad)
	if err != nil {
		t.Fatal(err)
	}
	// The derived key, by the token's HMAC under the wrap key, then Go's
	// GCM: the same bytes.
	k, err := tok.HMAC(wrap1, vault.SealKeyInput(nonce, aad))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := aes.NewCipher(k)
	g, _ := cipher.NewGCM(block)
	if want := g.Seal(nil, nonce, pt, aad); !bytes.Equal(ct, want) {
		t.Fatal("Seal under hmac differs from GCM under the derived key")
	}
	kcvWrap, err := tok.HMAC(wrap1, kcvInput(wrap1))
	if err != nil || p.Keys()[0].Keys[0].Label != "keyvault-wrap-v1" || p.Keys()[0].Keys[0].KCV != hex.EncodeToString(kcvWrap[:8]) {
		t.Fatalf("the wrap key's check value is not the HMAC of its KCV input: %v", err)
	}
	in := append([]byte("keyvault/v1/seal-key"), 0)
	in = append(append(in, 0, 0, 0, 12), nonce...)
	in = append(append(in, 0, 0, 0, byte(len(aad))), aad...)
	if !bytes.Equal(vault.SealKeyInput(nonce, aad), in) {
		t.Fatal("SealKeyInput differs from docs/format.md")
	}
	if _, err := p.Open(ctx, wrap1, nonce, ct, []byte("other aad")); !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("open with other associated data: %v, want ErrIntegrity", err)
	}
	if p.Healthy() != 1 {
		t.Fatal("a damaged record took the member out")
	}
}
