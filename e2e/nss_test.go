package e2e

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/p11test"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// The tests on NSS's softoken run the binary through a link of their own
// (p11test.NSSForProgram): p11-kit-proxy loads the test's NSS module in
// the processes that link starts, and in no other, so they run in
// parallel with each other and with the tests whose vaults load SoftHSM
// or opencryptoki directly.

// nssKit is a profile kit on NSS's softoken through p11-kit-proxy, run
// by the link that loads the module. The hsm section is NSS alone, or,
// with more, what more writes from NSS's member item and the proxy's
// path (a pool with other members).
func nssKit(t *testing.T, dir, profile string, more func(nssItem, proxy string) string) *profileKit {
	t.Helper()
	nss, bin := p11test.NSSForProgram(t, dir, keyvaultBin)
	pinFile := filepath.Join(dir, "nss-pin")
	write(t, pinFile, nss.PIN+"\n")
	item := fmt.Sprintf("    - name: nss\n      module: %s\n      token_label: %s\n      pin_file: %s\n      max_sessions: 4\n", nss.Module, nss.Label, pinFile)
	member := "  members:\n" + item
	if more != nil {
		member = more(item, nss.Module)
	}
	k := newProfileKit(t, dir, member, profile)
	k.bin = bin
	return k
}

// nssNoAnchors is what hsm check says of NSS's anchors: its softoken
// refuses every private token data object.
const nssNoAnchors = "anchors: no (create a private token data object: pkcs11: 0x13: CKR_ATTRIBUTE_VALUE_INVALID)"

// TestNSSProfileGCM runs the profile scenario on NSS's softoken through
// p11-kit-proxy under gcm, anchoring off (NSS keeps no anchors): keys
// init, hsm check, serve, the REST contract, 64 concurrent wrong guesses
// at max_attempts 5 (exactly 4×403 and 60×410), a rotation with re-wrap
// and retire, and a tampered record refused.
func TestNSSProfileGCM(t *testing.T) { nssProfile(t, "gcm") }

// TestNSSProfileHMAC is TestNSSProfileGCM under the hmac profile, the one
// for tokens whose GCM the vault cannot use.
func TestNSSProfileHMAC(t *testing.T) { nssProfile(t, "hmac") }

func nssProfile(t *testing.T, profile string) {
	t.Parallel()
	k := nssKit(t, t.TempDir(), profile, nil)
	if code, out := k.keys(t, nil, "init"); code != 0 || !strings.Contains(out, "for the "+profile+" profile") {
		t.Fatalf("keys init under %s on NSS: exit %d:\n%s", profile, code, out)
	}
	profileScenario(t, k)
}

// TestNSSAloneRefusesAnchoring: with rollback anchoring on and NSS the
// only member, no member can keep the anchors, so hsm check exits 2, keys
// init creates nothing, and serve refuses to start, each naming the
// member, NSS's answer and the two ways out.
func TestNSSAloneRefusesAnchoring(t *testing.T) {
	t.Parallel()
	k := nssKit(t, t.TempDir(), "gcm", nil)
	kvproc.SetRollbackAnchor(t, k.cfg, true)
	wayOut := func(what string, code int, out string) {
		t.Helper()
		for _, want := range []string{"rollback anchoring needs at least one member whose token keeps anchor objects, and none does",
			"member nss", "CKR_ATTRIBUTE_VALUE_INVALID", "add a member whose token keeps them", "or set store.rollback_anchor: false"} {
			if code == 0 || !strings.Contains(out, want) {
				t.Errorf("%s with anchoring on NSS alone: exit %d, want a refusal saying %q:\n%s", what, code, want, out)
				return
			}
		}
	}
	code, out := k.run(t, "hsm", "check", "--config", k.cfg)
	if code != 2 || !strings.Contains(out, nssNoAnchors) || !strings.Contains(out, "rollback anchors: cannot be kept") {
		t.Errorf("hsm check: exit %d, want 2 with NSS's anchors refused:\n%s", code, out)
	}
	wayOut("hsm check", code, out)
	code, out = k.keys(t, nil, "init")
	if !strings.Contains(out, "created nothing") {
		t.Errorf("keys init: want \"created nothing\":\n%s", out)
	}
	wayOut("keys init", code, out)

	// With keys made under anchoring off, serve still refuses once it is on.
	kvproc.SetRollbackAnchor(t, k.cfg, false)
	if code, out := k.keys(t, nil, "init"); code != 0 {
		t.Fatalf("keys init with anchoring off: exit %d:\n%s", code, out)
	}
	kvproc.SetRollbackAnchor(t, k.cfg, true)
	code, out = k.run(t, "serve", "--config", k.cfg)
	if strings.Contains(out, "keyvault serving") {
		t.Errorf("serve with anchoring on NSS alone served")
	}
	wayOut("serve", code, out)
}

// TestNSSAnchorsOnSoftHSM serves, with rollback anchoring on, a pool of
// NSS's softoken and a SoftHSM token, both through p11-kit-proxy (a
// SoftHSM loaded directly beside the proxy, which initialises it too,
// cannot open): the anchors live on SoftHSM alone, the vault serves, and
// an older copy of the store is refused as a rollback.
func TestNSSAnchorsOnSoftHSM(t *testing.T) {
	softhsmtest.Module(t)
	needTool(t, "SoftHSM through p11-kit-proxy", softHSMRegistered())
	t.Parallel()
	dir := t.TempDir()
	conf, softPIN := softHSMToken(t, dir)
	k := nssKit(t, dir, "gcm", func(nssItem, proxy string) string {
		return fmt.Sprintf("  module_env:\n    SOFTHSM2_CONF: %s\n  members:\n%s    - name: soft\n      module: %s\n      token_label: keyvault-soft\n      pin_file: %s\n      max_sessions: 4\n",
			conf, nssItem, proxy, softPIN)
	})
	kvproc.SetRollbackAnchor(t, k.cfg, true)

	code, out := k.run(t, "hsm", "check", "--config", k.cfg)
	nssPart, softPart, ok := strings.Cut(out, "member soft\n")
	if code != 0 || !ok || !strings.Contains(nssPart, nssNoAnchors) || !strings.Contains(softPart, "  anchors: yes\n") ||
		!strings.Contains(out, "rollback anchors: on members soft\n") {
		t.Fatalf("hsm check: exit %d, want both members serving and the anchors on soft alone:\n%s", code, out)
	}
	if code, out := k.keys(t, nil, "init"); code != 0 || !strings.Contains(out, "on 2 members") || !strings.Contains(out, "for the gcm profile") {
		t.Fatalf("keys init on NSS and SoftHSM: exit %d:\n%s", code, out)
	}
	code, out = k.keys(t, nil, "list")
	sameKeys(t, code, out, "nss", "soft")

	v := k.start(t)
	if logs := string(v.Logs()); !strings.Contains(logs, `"msg":"HSM member keeps no rollback anchors; the anchors live on the other members","member":"nss"`) ||
		!strings.Contains(logs, `"anchor_members":"soft"`) || !strings.Contains(logs, `"hsm_members_healthy":2`) {
		t.Errorf("the start should name nss as keeping no anchors, soft as keeping them, and serve on both:\n%s", logs)
	}
	c := newClient(t, v.API, v.Token)
	first := enrolled{randID("nss-anchor"), randBytes(32), randPIN("first")}
	c.mustEnroll(t, http.StatusCreated, first.user, first.secret, first.pin, 5)
	c.mustRecover(t, first.user, first.pin, first.secret)
	v.Stop()
	older := filepath.Join(dir, "keyvault.db.older")
	copyFile(t, k.db, older)

	v = k.start(t)
	c = newClient(t, v.API, v.Token)
	c.mustRecover(t, first.user, first.pin, first.secret)
	second := enrolled{randID("nss-anchor"), randBytes(32), randPIN("second")}
	c.mustEnroll(t, http.StatusCreated, second.user, second.secret, second.pin, 5)
	v.Stop()
	if code, out := k.run(t, "anchor", "status", "--config", k.cfg); code != 0 || !strings.Contains(out, "member soft: epoch") ||
		!strings.Contains(out, "live soft\n") || strings.Contains(out, "member nss: epoch") || !strings.Contains(out, "check: passes") {
		t.Fatalf("anchor status: exit %d, want the anchors on soft alone and the check passing:\n%s", code, out)
	}

	copyFile(t, older, k.db)
	if got := startRefusedBin(t, k.bin, dir, "serve", "--config", k.cfg); got != "rollback" {
		t.Errorf("the older copy of the store was refused for %s, want rollback", got)
	}
}

// softHSMRegistered finds the module file by which p11-kit-proxy loads
// SoftHSM: Debian's softhsm2 ships it.
func softHSMRegistered() error {
	for _, dir := range []string{"/usr/share/p11-kit/modules", "/etc/pkcs11/modules"} {
		files, _ := filepath.Glob(filepath.Join(dir, "*.module"))
		for _, f := range files {
			if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), "libsofthsm2.so") {
				return nil
			}
		}
	}
	return errors.New("no p11-kit module file names libsofthsm2.so (Debian's softhsm2 installs /usr/share/p11-kit/modules/softhsm2.module)")
}
