package hsmpool

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keyvault/keyvault/internal/p11test"
	"github.com/keyvault/keyvault/vault"
)

func TestCapabilitiesAcceptSoftHSM(t *testing.T) {
	m := newMember(t, "a")
	c := Check([]MemberConfig{m}, vault.ProfileGCM)[0]
	if c.Err != nil {
		t.Fatalf("SoftHSM refused: %v", c.Err)
	}
	if !c.Caps.GCM.OK() || !c.Caps.HMAC.OK() || c.Caps.KnownAnswerHMAC != katOK || c.Caps.KnownAnswerGCM != katOK || c.Caps.Import != "yes" {
		t.Fatalf("SoftHSM capabilities: %+v", c.Caps)
	}
	if err := c.Caps.CanProvision(1, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
}

// opencryptokiMember is the opencryptoki soft token as a member, wiped.
func opencryptokiMember(t *testing.T, name string) MemberConfig {
	tok := p11test.Opencryptoki(t)
	return MemberConfig{Name: name, Module: tok.Module, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 4}
}

// opencryptoki 3.8's soft token has HMAC-SHA256 but no AES-GCM. Its
// HMAC known answer passing shows the single-part C_Sign works there
// (crypto11's multi-part HMAC crashes the process on it).
func TestCapabilitiesRefuseOpencryptokiForGCM(t *testing.T) {
	m := opencryptokiMember(t, "oc")
	c := Check([]MemberConfig{m}, vault.ProfileGCM)[0]
	var refusal *RefusedError
	if !errors.As(c.Err, &refusal) {
		t.Fatalf("opencryptoki: %v, want a refusal", c.Err)
	}
	msg := refusal.Error()
	for _, want := range []string{"member oc refused", `token "keyvault-oc" lacks CKM_AES_GCM (0x1087)`, "hmac profile"} {
		if !strings.Contains(msg, want) {
			t.Errorf("refusal %q does not say %q", msg, want)
		}
	}
	if refusal.Reason != "CKM_AES_GCM" {
		t.Errorf("reason %q", refusal.Reason)
	}
	if c.Caps.GCM.Present || !c.Caps.HMAC.OK() || c.Caps.KnownAnswerHMAC != katOK {
		t.Errorf("opencryptoki capabilities: %+v", c.Caps)
	}
	// Its data objects take CKA_VALUE and a label updated in place.
	if c.Anchors != nil {
		t.Errorf("opencryptoki anchors: %s, want yes", c.AnchorLine())
	}
}

// A pool with SoftHSM first and opencryptoki second serves on SoftHSM and
// shows opencryptoki refused, everywhere an operator looks, and does not
// probe it again in a loop.
func TestPoolServesBesideARefusedMember(t *testing.T) {
	soft := newMember(t, "soft")
	if _, err := Provision([]MemberConfig{soft}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	oc := opencryptokiMember(t, "oc")
	reg := prometheus.NewRegistry()
	p, err := Open([]MemberConfig{soft, oc}, Options{Registerer: reg, ProbeBackoff: 5 * time.Millisecond, ProbeBackoffMax: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	ctx := context.Background()
	for range 20 {
		if _, err := p.HMAC(ctx, pin1, []byte("pin check")); err != nil {
			t.Fatal(err)
		}
	}
	// Long enough for tens of probes at the ordinary backoff.
	time.Sleep(300 * time.Millisecond)
	if n := testutil.ToFloat64(p.metrics.capProbes.WithLabelValues("oc")); n != 1 {
		t.Errorf("opencryptoki probed %v times in 300ms, want once", n)
	}
	if v := testutil.ToFloat64(p.metrics.refused.WithLabelValues("oc", "CKM_AES_GCM")); v != 1 {
		t.Errorf("keyvault_hsm_member_refused{member=oc,reason=CKM_AES_GCM} = %v", v)
	}
	if p.Healthy() != 1 || len(p.Refused()) != 1 || p.Refused()[0].Member != "oc" {
		t.Errorf("healthy %d, refused %v", p.Healthy(), p.Refused())
	}
	var degraded *DegradedError
	if err := p.Ready(); !errors.As(err, &degraded) || !strings.Contains(err.Error(), "lacks CKM_AES_GCM") {
		t.Errorf("Ready: %v", err)
	}
}

// nssChild marks the test process that TestNSSThroughP11KitMatchesGo runs
// itself in.
const nssChild = "KEYVAULT_TEST_NSS_CHILD"

// NSS's softoken, through p11-kit-proxy, computes HMAC and GCM through the
// pool to the same bytes as Go's crypto: its GCM size query leaves out the
// tag, so this holds only with the one-call seal.
//
// It runs in a process of its own: p11-kit-proxy initialises every module
// the system configures, SoftHSM's among them, and keeps it initialised
// while the proxy is, so SoftHSM would no longer see the tokens the other
// tests create.
func TestNSSThroughP11KitMatchesGo(t *testing.T) {
	if os.Getenv(nssChild) == "" {
		cmd := exec.Command(os.Args[0], "-test.run", "^TestNSSThroughP11KitMatchesGo$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), nssChild+"=1")
		out, err := cmd.CombinedOutput()
		switch {
		case err != nil:
			t.Fatalf("%v\n%s", err, out)
		case bytes.Contains(out, []byte("--- SKIP")) && os.Getenv("CI") == "true":
			t.Fatalf("CI=true and the NSS test skipped:\n%s", out)
		case bytes.Contains(out, []byte("--- SKIP")):
			t.Skipf("skipping the NSS tier outside CI (CI=true makes this a failure):\n%s", out)
		case !bytes.Contains(out, []byte("--- PASS: TestNSSThroughP11KitMatchesGo")):
			t.Fatalf("the NSS test did not run:\n%s", out)
		}
		return
	}
	tok := p11test.NSS(t, hsmDir)
	m := MemberConfig{Name: "nss", Module: tok.Module, TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 4}
	c := Check([]MemberConfig{m}, vault.ProfileGCM)[0]
	if c.Err != nil {
		t.Fatalf("NSS refused: %v", c.Err)
	}
	// NSS's softoken refuses every token data object.
	var na *NoAnchorsError
	if !errors.As(c.Anchors, &na) || na.Step != "create" || !errors.Is(na, pkcs11.Error(pkcs11.CKR_ATTRIBUTE_VALUE_INVALID)) {
		t.Fatalf("NSS anchors: %v, want a refused create (CKR_ATTRIBUTE_VALUE_INVALID)", c.Anchors)
	}
	t.Logf("NSS anchors: %s", c.AnchorLine())
	material := map[vault.KeyID][]byte{}
	for _, id := range keyVersion1() {
		material[id] = make([]byte, 32)
		rand.Read(material[id])
	}
	err := withSession(m, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		for id, v := range material {
			if _, err := p.CreateObject(s, keyTemplate(id, v, vault.ProfileGCM)); err != nil {
				return err
			}
		}
		return nil
	}, absent(keyVersion1()))
	if err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), m)
	ctx := context.Background()
	// It serves from session copies of its keys: one key switch costs
	// NSS about 10 ms on token keys.
	checkServesCopies(t, viewOf(t, p, 0))
	if line := viewOf(t, p, 0).copiesLine(); line != "yes" {
		t.Fatalf("NSS session key copies: %s", line)
	}

	msg := []byte("keyvault PIN check input")
	got, err := p.HMAC(ctx, pin1, msg)
	if err != nil {
		t.Fatal(err)
	}
	mac := hmac.New(sha256.New, material[pin1])
	mac.Write(msg)
	if !bytes.Equal(got, mac.Sum(nil)) {
		t.Fatalf("NSS HMAC %x, Go's %x", got, mac.Sum(nil))
	}

	nonce, pt, aad := make([]byte, 12), []byte("a history key of 32 bytes......."), []byte("aad")
	rand.Read(nonce)
	ct, err := p.Seal(ctx, wrap1, nonce, pt, aad)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := aes.NewCipher(material[wrap1])
	g, _ := cipher.NewGCM(block)
	if want := g.Seal(nil, nonce, pt, aad); !bytes.Equal(ct, want) {
		t.Fatalf("NSS seal %x, Go's %x", ct, want)
	}
	if back, err := p.Open(ctx, wrap1, nonce, ct, aad); err != nil || !bytes.Equal(back, pt) {
		t.Fatalf("NSS open: %q %v", back, err)
	}
	ct[3] ^= 1
	if _, err := p.Open(ctx, wrap1, nonce, ct, aad); !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("NSS open of a tampered record: %v, want ErrIntegrity", err)
	}
	// Anchoring on NSS alone: the start is refused with the ways out.
	if _, err := p.AnchorMembers(ctx); !errors.Is(err, ErrNoAnchorMember) || !strings.Contains(err.Error(), "CKR_ATTRIBUTE_VALUE_INVALID") ||
		!strings.Contains(err.Error(), "store.rollback_anchor: false") {
		t.Fatalf("anchor members on NSS: %v", err)
	}
}
