package e2e

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/p11test"
)

// TestMixedPoolHMAC serves, under the hmac profile, a pool of a SoftHSM
// token and opencryptoki's soft token: keys init imports the same key
// material into both (every check value equal across them), the binary
// spreads a recovery load over both, and then the SoftHSM member's token
// directory is moved away under the load, so that only opencryptoki can
// answer. No recovery may fail in any phase.
func TestMixedPoolHMAC(t *testing.T) {
	oc := p11test.Opencryptoki(t) // not parallel: the token is the machine's only one
	start := time.Now()
	dir := t.TempDir()
	write(t, filepath.Join(dir, "oc-pin"), oc.PIN+"\n")
	tokens := filepath.Join(dir, "tokens")
	soft := softHSMMember(t, dir)
	softDirs := subdirs(t, tokens)
	if len(softDirs) != 1 {
		t.Fatalf("%s holds %d token directories, want 1", tokens, len(softDirs))
	}
	var softDir string
	for name := range softDirs {
		softDir = filepath.Join(tokens, name)
	}
	k := newProfileKit(t, dir, soft+fmt.Sprintf("    - name: oc\n      module: %s\n      token_label: %s\n      pin_file: %s\n      max_sessions: 4\n",
		oc.Module, oc.Label, filepath.Join(dir, "oc-pin")), "hmac")

	if code, out := k.keys(t, nil, "init"); code != 0 || !strings.Contains(out, "on 2 members") || !strings.Contains(out, "for the hmac profile") {
		t.Fatalf("keys init on SoftHSM + opencryptoki under hmac: exit %d:\n%s", code, out)
	}
	code, out := k.keys(t, nil, "list")
	sameKeys(t, code, out, "soft", "oc")
	t.Logf("setup done in %v", time.Since(start).Round(time.Millisecond))

	v := k.start(t)
	c := newClient(t, v.API, v.Token)
	backups := make([]enrolled, 12)
	for i := range backups {
		backups[i] = enrolled{randID("mixed"), randBytes(32), randPIN("mixed")}
		c.mustEnroll(t, http.StatusCreated, backups[i].user, backups[i].secret, backups[i].pin, 0)
	}
	member := func(name, member string) float64 {
		t.Helper()
		samples, _ := metrics(t, v.Admin)
		n, _ := metricSum(samples, name, map[string]string{"member": member})
		return n
	}
	waitFor := func(within time.Duration, cond func() bool) bool {
		deadline := time.Now().Add(within)
		for !cond() {
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(50 * time.Millisecond)
		}
		return true
	}

	ld := &poolLoad{}
	ld.phase.Store("both members")
	stopLoad := recoverLoad(t, c, backups, ld, 8)

	if !waitFor(10*time.Second, func() bool {
		return member("keyvault_hsm_operations_total", "soft") >= 20 && member("keyvault_hsm_operations_total", "oc") >= 20
	}) {
		_, text := metrics(t, v.Admin)
		t.Fatalf("no traffic on both members within 10s of load:\n%s", grepLines(text, "keyvault_hsm_operations_total"))
	}
	time.Sleep(time.Second) // a second of load on both before one goes

	// The SoftHSM member is lost: its token directory moves away, and
	// SoftHSM fails every operation on its keys.
	ld.phase.Store("SoftHSM gone")
	away := filepath.Join(dir, "soft-token.away")
	if err := os.Rename(softDir, away); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Rename(away, softDir) })
	if !waitFor(5*time.Second, func() bool { return member("keyvault_hsm_member_up", "soft") == 0 }) {
		t.Fatalf("keyvault_hsm_member_up{member=soft} still 1 5s after its token went away; the log ends:\n%s", tail(v.Logs(), 12))
	}
	opsOC := member("keyvault_hsm_operations_total", "oc")
	time.Sleep(2 * time.Second)
	if n := member("keyvault_hsm_operations_total", "oc"); n <= opsOC+20 {
		t.Errorf("opencryptoki did not carry the load alone (operations %v, then %v)", opsOC, n)
	}
	if up := member("keyvault_hsm_member_up", "oc"); up != 1 {
		t.Errorf("keyvault_hsm_member_up{member=oc} = %v with SoftHSM gone, want 1", up)
	}
	if r := get(t, v.Admin+"/readyz"); r.Status != http.StatusOK {
		t.Errorf("/readyz with opencryptoki serving and SoftHSM gone: %v, want 200", r)
	}
	stopLoad()

	ld.mu.Lock()
	defer ld.mu.Unlock()
	for _, phase := range []string{"both members", "SoftHSM gone"} {
		t.Logf("load, %s: %d recoveries answered 200, %d did not", phase, ld.ok[phase], ld.bad[phase])
		if ld.ok[phase] == 0 {
			t.Errorf("load, %s: no recovery succeeded", phase)
		}
	}
	if len(ld.failures) > 0 {
		t.Errorf("recoveries failed with opencryptoki healthy throughout; the first ones:\n%s", strings.Join(ld.failures, "\n"))
	}
	t.Logf("whole test %v", time.Since(start).Round(time.Millisecond))
}
