package e2e

import (
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	yaml "go.yaml.in/yaml/v3"

	"github.com/keyvault/keyvault/internal/p11test"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestRefusedMember runs the binary, under the gcm profile, on a pool of
// the dev SoftHSM token and opencryptoki's soft token, which has
// HMAC-SHA256 but no AES-GCM: `hsm check` exits 2 and names the missing
// mechanism, and hmac as the profile that works, for opencryptoki only;
// `keys init` creates nothing; `keys list`, /readyz and the metrics show
// the member refused while the vault serves on SoftHSM. The dev token's
// keys are of the hmac profile (the default), so a keys rotate under gcm
// first adds a version for gcm.
func TestRefusedMember(t *testing.T) {
	softhsmtest.Module(t)
	oc := p11test.Opencryptoki(t) // not parallel: the token is the machine's only one
	dir := t.TempDir()
	startDev(t, dir).Stop()
	pinFile := filepath.Join(dir, "oc-pin")
	if err := os.WriteFile(pinFile, []byte(oc.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "keyvault.yaml")
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(readTrimmed(t, cfgPath)), &cfg); err != nil {
		t.Fatal(err)
	}
	h := cfg["hsm"].(map[string]any)
	h["profile"] = "gcm"
	writeYAML := func(name string) string {
		t.Helper()
		out, err := yaml.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, out, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	gcmCfg := writeYAML("gcm.yaml")
	if code, text := runCLI(t, "keys", "rotate", "--config", gcmCfg); code != 0 {
		t.Fatalf("keys rotate under gcm: exit %d:\n%s", code, text)
	}
	h["members"] = append(h["members"].([]any), map[string]any{
		"name": "oc", "module": oc.Module, "token_label": oc.Label, "pin_file": pinFile, "max_sessions": 4,
	})
	mixed := writeYAML("mixed.yaml")

	code, text := runCLI(t, "hsm", "check", "--config", mixed)
	if code != 2 {
		t.Fatalf("hsm check: exit %d, want 2:\n%s", code, text)
	}
	t.Logf("hsm check:\n%s", text)
	dev, ocPart, ok := strings.Cut(text, "member oc\n")
	if !ok || strings.Contains(dev, "CKM_AES_GCM (0x1087): absent") || !strings.Contains(dev, "verdict: can serve") ||
		!strings.Contains(ocPart, "lacks CKM_AES_GCM (0x1087)") || !strings.Contains(ocPart, "verdict: cannot serve") ||
		!strings.Contains(ocPart, "CKM_SHA256_HMAC (0x251): sign") || !strings.Contains(ocPart, "set hsm.profile: hmac") {
		t.Errorf("hsm check should pass the dev member and refuse oc for CKM_AES_GCM, naming hmac:\n%s", text)
	}
	if code, text := runCLI(t, "hsm", "check", "--config", cfgPath); code != 0 {
		t.Errorf("hsm check on SoftHSM alone: exit %d:\n%s", code, text)
	}
	if code, text := runCLI(t, "keys", "init", "--config", mixed); code == 0 || !strings.Contains(text, "created nothing") || !strings.Contains(text, "CKM_AES_GCM") {
		t.Errorf("keys init with a member lacking GCM: exit %d, want a refusal naming CKM_AES_GCM:\n%s", code, text)
	}
	if code, text := runCLI(t, "keys", "list", "--config", mixed); code != 0 || !strings.Contains(text, "keyvault-wrap-v1") ||
		!strings.Contains(text, "member oc\n  refused (CKM_AES_GCM)") {
		t.Errorf("keys list: exit %d, want the dev keys and oc refused:\n%s", code, text)
	}

	v := startServe(t, dir, mixed)
	defer v.Stop()
	r := get(t, v.Admin+"/readyz")
	if r.Status != http.StatusOK || !strings.Contains(string(r.Body), "member oc refused") || !strings.Contains(string(r.Body), "CKM_AES_GCM") {
		t.Errorf("/readyz: %d %s, want 200 naming oc refused", r.Status, r.Body)
	}
	samples, _ := metrics(t, v.Admin)
	if n, ok := metricSum(samples, "keyvault_hsm_member_refused", map[string]string{"member": "oc", "reason": "CKM_AES_GCM"}); !ok || n != 1 {
		t.Errorf("keyvault_hsm_member_refused{member=oc,reason=CKM_AES_GCM} = %v (found %v), want 1", n, ok)
	}
	c := newClient(t, v.API, v.Token)
	e := enrolled{randID("mixed"), randBytes(32), randPIN("mixed")}
	c.mustEnroll(t, http.StatusCreated, e.user, e.secret, e.pin, 0)
	c.mustRecover(t, e.user, e.pin, e.secret)
}
