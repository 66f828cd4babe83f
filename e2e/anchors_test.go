package e2e

import (
	"crypto/rand"
	"fmt"
	"net/http"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/internal/p11test"
)

// TestMixedPoolProvisioning runs the binary on SoftHSM and opencryptoki's
// soft token in one pool, under hmac, with rollback anchoring on: `hsm
// check` finds that both keep anchor objects, `keys init` loads each
// module once and imports equal key material into both (equal check
// values in `keys list`), and the vault serves with its anchors on both.
func TestMixedPoolProvisioning(t *testing.T) {
	oc := p11test.Opencryptoki(t) // not parallel: the token is the machine's only one
	dir := t.TempDir()
	write(t, filepath.Join(dir, "oc-pin"), oc.PIN+"\n")
	apiToken := rand.Text()
	write(t, filepath.Join(dir, "token"), apiToken+"\n")
	members := softHSMMember(t, dir) + fmt.Sprintf("    - name: oc\n      module: %s\n      token_label: %s\n      pin_file: %s\n      max_sessions: 4\n",
		oc.Module, oc.Label, filepath.Join(dir, "oc-pin"))
	cfg := filepath.Join(dir, "keyvault.yaml")
	write(t, cfg, fmt.Sprintf(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
store:
  path: %s
hsm:
  profile: hmac
%sclients:
  - name: messenger
    token_sha256: %s
`, filepath.Join(dir, "keyvault.db"), members, sha256Hex(apiToken)))

	code, out := runCLI(t, "hsm", "check", "--config", cfg)
	if code != 0 || strings.Count(out, "  anchors: yes\n") != 2 || !strings.Contains(out, "rollback anchors: on members soft, oc") {
		t.Fatalf("hsm check: exit %d, want both members keeping anchors:\n%s", code, out)
	}
	code, out = runCLI(t, "keys", "init", "--config", cfg)
	if code != 0 || !strings.Contains(out, "on 2 members") {
		t.Fatalf("keys init on SoftHSM and opencryptoki: exit %d:\n%s", code, out)
	}
	// Each label's check value, once per member: equal on both.
	kcvs := map[string][]string{}
	for _, m := range regexp.MustCompile(`(?m)^  (keyvault-\S+)\s+check value (\S+)$`).FindAllStringSubmatch(out, -1) {
		kcvs[m[1]] = append(kcvs[m[1]], m[2])
	}
	if len(kcvs) != 3 {
		t.Fatalf("keys listed: %v\n%s", kcvs, out)
	}
	for label, vs := range kcvs {
		if len(vs) != 2 || vs[0] != vs[1] {
			t.Errorf("%s: check values %v, want one equal value per member", label, vs)
		}
	}

	v := startServe(t, dir, cfg)
	c := newClient(t, v.API, v.Token)
	e := enrolled{randID("mixed"), randBytes(32), randPIN("mixed")}
	c.mustEnroll(t, http.StatusCreated, e.user, e.secret, e.pin, 0)
	c.mustRecover(t, e.user, e.pin, e.secret)
	v.Stop()
	code, out = runCLI(t, "anchor", "status", "--config", cfg)
	if code != 0 || !strings.Contains(out, "member soft: epoch") || !strings.Contains(out, "member oc: epoch") || !strings.Contains(out, "check: passes") {
		t.Fatalf("anchor status: exit %d, want anchors on both members:\n%s", code, out)
	}
}
