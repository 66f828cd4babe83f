package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/softhsm"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// rotationKit is a vault on two fresh SoftHSM members provisioned by
// `keys init` (identical imported keys), with an admin token and every
// rate limit off: these tests are about keys, not abuse controls.
type rotationKit struct {
	dir, cfg   string
	tokenFile  string // the admin token
	adminToken string
}

func newRotationKit(t *testing.T) *rotationKit {
	t.Helper()
	module := softhsmtest.Module(t)
	dir := t.TempDir()
	conf, err := softhsm.WriteConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	pin := "rot-" + strings.ToLower(rand.Text()[:16])
	pinFile := filepath.Join(dir, "hsm-pin")
	write := func(name, body string) string {
		t.Helper()
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	write("hsm-pin", pin+"\n")
	for _, label := range []string{"keyvault-a", "keyvault-b"} {
		if err := softhsm.InitToken(conf, label, rand.Text(), pin); err != nil {
			t.Fatal(err)
		}
	}
	apiToken, adminToken := rand.Text(), rand.Text()
	write("token", apiToken+"\n")
	k := &rotationKit{dir: dir, adminToken: adminToken, tokenFile: write("admin-token", adminToken+"\n")}
	hash := func(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:]) }
	var members strings.Builder
	for _, m := range []string{"a", "b"} {
		fmt.Fprintf(&members, "    - name: hsm-%s\n      module: %s\n      token_label: keyvault-%s\n      pin_file: %s\n      max_sessions: 4\n", m, module, m, pinFile)
	}
	k.cfg = write("keyvault.yaml", fmt.Sprintf(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
admin_token_sha256: %s
store:
  path: %s
hsm:
  module_env:
    SOFTHSM2_CONF: %s
  members:
%sbudget:
  escalating_delay: {base: 0s}
clients:
  - name: messenger
    token_sha256: %s
ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 0s
`, hash(adminToken), filepath.Join(dir, "keyvault.db"), conf, members.String(), hash(apiToken)))
	if code, out := runCLI(t, "keys", "init", "--config", k.cfg); code != 0 {
		t.Fatalf("keys init: exit %d:\n%s", code, out)
	}
	return k
}

func (k *rotationKit) start(t *testing.T) *vault { t.Helper(); return startServe(t, k.dir, k.cfg) }

// keys runs a `keyvault keys` subcommand against the running vault v.
func (k *rotationKit) keys(t *testing.T, v *vault, args ...string) (int, string) {
	t.Helper()
	args = append(append([]string{"keys"}, args...), "--config", k.cfg)
	if v != nil {
		args = append(args, "--admin-url", v.Admin, "--admin-token-file", k.tokenFile)
	}
	return runCLI(t, args...)
}

// usage reads the records by key version from the admin endpoint.
func (k *rotationKit) usage(t *testing.T, v *vault) (wrap, pin map[string]int) {
	t.Helper()
	r := newAdminClient(v.Admin, k.adminToken).do(t, http.MethodGet, "/admin/keys/usage", nil)
	var u map[string]map[string]int
	if r.Status != 200 || json.Unmarshal(r.Body, &u) != nil {
		t.Fatalf("keys usage: %s", r)
	}
	return u["wrap"], u["pin"]
}

var anyKeyLine = regexp.MustCompile(`(keyvault-(?:wrap|pin|root)-v\d+)\s+check value\s+([0-9a-f]{16})`)

// listKeys runs `keys list` (a fresh process: a fresh look-up on every
// member) and returns member -> label -> check value.
func (k *rotationKit) listKeys(t *testing.T) map[string]map[string]string {
	t.Helper()
	code, out := k.keys(t, nil, "list")
	if code != 0 {
		t.Fatalf("keys list: exit %d:\n%s", code, out)
	}
	got := map[string]map[string]string{}
	var cur string
	for _, line := range strings.Split(out, "\n") {
		if m := keysListMember.FindStringSubmatch(strings.TrimSpace(line)); m != nil {
			cur = m[1]
			got[cur] = map[string]string{}
		} else if m := anyKeyLine.FindStringSubmatch(line); m != nil && cur != "" {
			got[cur][m[1]] = m[2]
		}
	}
	return got
}

func keyVersions(t *testing.T, r response) (wrap, pin float64) {
	t.Helper()
	m := r.JSON(t)
	return m["key_version"].(float64), m["pin_key_version"].(float64)
}

// TestRotateUnderLoad rotates the keys with `keys rotate` while clients
// enroll and recover without pause: no request fails, enrollments after
// the rotation carry version 2 of both keys, backups sealed under version
// 1 still recover, and `keys list` shows both versions on both members
// with the same check values.
func TestRotateUnderLoad(t *testing.T) {
	k := newRotationKit(t)
	t.Parallel()
	v := k.start(t)
	c := newClient(t, v.API, v.Token)
	old := make([]enrolled, 8)
	for i := range old {
		old[i] = enrolled{fmt.Sprintf("old-%d", i), randBytes(32), "1357"}
		if r := c.enroll(t, old[i].user, old[i].secret, old[i].pin, 0); r.Status != 201 {
			t.Fatalf("enroll: %s", r)
		}
	}

	var stop atomic.Bool
	var requests, failures atomic.Int64
	var firstFailure atomic.Value
	var rotatedAt atomic.Int64 // unix nanos when the reload returned
	var newOnV2, newAfter atomic.Int64
	var wg sync.WaitGroup
	fail := func(what string, r response, err error) {
		failures.Add(1)
		firstFailure.CompareAndSwap(nil, fmt.Sprintf("%s: %v %v", what, r, err))
	}
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				user := fmt.Sprintf("new-%d-%d", w, i)
				began := time.Now().UnixNano()
				r, err := c.call(http.MethodPut, backupPath(user), map[string]any{"secret": b64(randBytes(32)), "pin": "2468"})
				requests.Add(1)
				if err != nil || r.Status != 201 {
					fail("enroll", r, err)
					continue
				}
				if at := rotatedAt.Load(); at != 0 && began > at {
					newAfter.Add(1)
					if m := r.JSON(t); m["key_version"] == 2.0 && m["pin_key_version"] == 2.0 {
						newOnV2.Add(1)
					}
				}
				o := old[(w+i)%len(old)]
				r, err = c.call(http.MethodPost, backupPath(o.user)+"/recover", map[string]string{"pin": o.pin})
				requests.Add(1)
				if err != nil || r.Status != 200 {
					fail("recover", r, err)
				}
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)
	code, out := k.keys(t, v, "rotate")
	rotatedAt.Store(time.Now().UnixNano())
	time.Sleep(700 * time.Millisecond)
	stop.Store(true)
	wg.Wait()
	if code != 0 || !strings.Contains(out, "Created version 2") || !strings.Contains(out, "wrap key v2 and PIN key v2") {
		t.Fatalf("keys rotate: exit %d:\n%s", code, out)
	}
	t.Logf("%d requests during the rotation, %d failed; %d enrollments after it, %d on version 2", requests.Load(), failures.Load(), newAfter.Load(), newOnV2.Load())
	if failures.Load() != 0 {
		t.Errorf("%d requests failed during the rotation; first: %v", failures.Load(), firstFailure.Load())
	}
	if newAfter.Load() == 0 || newOnV2.Load() != newAfter.Load() {
		t.Errorf("%d of %d enrollments after the rotation carry version 2", newOnV2.Load(), newAfter.Load())
	}
	r := c.enroll(t, "after", randBytes(32), "2468", 0)
	if w, p := keyVersions(t, c.status(t, "after")); r.Status != 201 || w != 2 || p != 2 {
		t.Errorf("enrollment after the rotation: %s, versions %v/%v", r, w, p)
	}
	for _, o := range old {
		if r := c.recover(t, o.user, o.pin); r.Status != 200 || r.JSON(t)["secret"] != b64(o.secret) {
			t.Errorf("recover %s after the rotation: %s", o.user, r)
		}
	}
	keys := k.listKeys(t)
	for _, label := range []string{"keyvault-wrap-v1", "keyvault-pin-v1", "keyvault-wrap-v2", "keyvault-pin-v2", "keyvault-root-v1"} {
		if a, b := keys["hsm-a"][label], keys["hsm-b"][label]; a == "" || a != b {
			t.Errorf("%s: check value %q on hsm-a, %q on hsm-b", label, a, b)
		}
	}
	v.Stop()
}

// TestRecoveryMovesPINKeyAndRetire: after a rotation a wrong guess leaves
// a backup on PIN key version 1 and counts; a right one moves it to
// version 2. `keys retire --version 1` refuses, saying how many backups use
// the version, until the re-wrap and recoveries have moved every one; then
// it destroys version 1 on both members, which a fresh `keys list` and a
// restarted vault confirm.
func TestRecoveryMovesPINKeyAndRetire(t *testing.T) {
	k := newRotationKit(t)
	t.Parallel()
	v := k.start(t)
	c := newClient(t, v.API, v.Token)
	users := []enrolled{{"ann", randBytes(32), "1111"}, {"bob", randBytes(32), "2222"}, {"cyd", randBytes(32), "3333"}}
	for _, u := range users {
		if r := c.enroll(t, u.user, u.secret, u.pin, 5); r.Status != 201 {
			t.Fatalf("enroll: %s", r)
		}
	}
	if code, out := k.keys(t, v, "rotate"); code != 0 {
		t.Fatalf("keys rotate: exit %d:\n%s", code, out)
	}
	code, out := k.keys(t, v, "retire", "--version", "1")
	if code != 1 || !strings.Contains(out, "3 backups are sealed under wrap key v1 and 3 are checked with PIN key v1") {
		t.Fatalf("retire with 3 backups on v1: exit %d:\n%s", code, out)
	}
	if code, out := k.keys(t, v, "retire", "--version", "2"); code != 1 || !strings.Contains(out, "older than the newest") {
		t.Errorf("retire the newest version: exit %d:\n%s", code, out)
	}

	// A wrong guess: counted, and nothing moves.
	if r := c.recover(t, "ann", "0000"); r.Status != 403 || r.JSON(t)["attempts_remaining"] != 4.0 {
		t.Fatalf("wrong guess: %s", r)
	}
	st := c.status(t, "ann")
	if w, p := keyVersions(t, st); w != 1 || p != 1 || st.JSON(t)["attempts_remaining"] != 4.0 {
		t.Fatalf("after a wrong guess: %s, want versions 1/1 and 4 attempts left", st)
	}
	// A right one: the same write that resets the counter re-seals.
	if r := c.recover(t, "ann", "1111"); r.Status != 200 || r.JSON(t)["secret"] != b64(users[0].secret) {
		t.Fatalf("recover: %s", r)
	}
	st = c.status(t, "ann")
	if w, p := keyVersions(t, st); w != 2 || p != 2 || st.JSON(t)["attempts_remaining"] != 5.0 || st.JSON(t)["generation"] != 1.0 {
		t.Fatalf("after recovery: %s, want versions 2/2, 5 attempts, generation 1", st)
	}

	if code, out := k.keys(t, v, "rewrap", "--rate", "0", "--wait"); code != 0 || !strings.Contains(out, "re-wrap to wrap key v2 finished: 2 of 2 records moved") {
		t.Fatalf("keys rewrap: exit %d:\n%s", code, out)
	}
	code, out = k.keys(t, v, "retire", "--version", "1")
	if code != 1 || !strings.Contains(out, "0 backups are sealed under wrap key v1 and 2 are checked with PIN key v1") {
		t.Fatalf("retire with 2 backups on PIN key v1: exit %d:\n%s", code, out)
	}
	for _, u := range users[1:] {
		if r := c.recover(t, u.user, u.pin); r.Status != 200 {
			t.Fatalf("recover %s: %s", u.user, r)
		}
	}
	if wrap, pin := k.usage(t, v); wrap["2"] != 3 || pin["2"] != 3 || len(wrap) != 1 || len(pin) != 1 {
		t.Fatalf("usage before retiring: wrap %v pin %v", wrap, pin)
	}
	code, out = k.keys(t, v, "retire", "--version", "1")
	if code != 0 || strings.Count(out, "destroyed keyvault-wrap-v1, keyvault-pin-v1") != 2 {
		t.Fatalf("retire an unused version: exit %d:\n%s", code, out)
	}
	for _, u := range users {
		if r := c.recover(t, u.user, u.pin); r.Status != 200 {
			t.Fatalf("recover %s after the retire: %s", u.user, r)
		}
	}
	if r := c.enroll(t, "dee", randBytes(32), "4444", 0); r.Status != 201 {
		t.Fatalf("enroll after the retire: %s", r)
	}
	code, out = k.keys(t, v, "usage")
	if code != 0 || !regexp.MustCompile(`wrap key v2\s+4 backups`).MatchString(out) || !regexp.MustCompile(`pin\s+key v2\s+4 backups`).MatchString(out) || strings.Contains(out, "v1") {
		t.Errorf("keys usage after the retire: exit %d:\n%s", code, out)
	}
	v.Stop()

	keys := k.listKeys(t)
	for _, m := range []string{"hsm-a", "hsm-b"} {
		var labels []string
		for l := range keys[m] {
			labels = append(labels, l)
		}
		if len(labels) != 3 || keys[m]["keyvault-wrap-v2"] == "" || keys[m]["keyvault-pin-v2"] == "" || keys[m]["keyvault-root-v1"] == "" {
			t.Errorf("member %s holds %v after the retire, want wrap v2, pin v2, root v1", m, labels)
		}
	}
	v = k.start(t)
	c = newClient(t, v.API, v.Token)
	for _, u := range users {
		if r := c.recover(t, u.user, u.pin); r.Status != 200 || r.JSON(t)["secret"] != b64(u.secret) {
			t.Fatalf("recover %s after a restart: %s", u.user, r)
		}
	}
	v.Stop()
}

// rewrapRecords is how many backups TestRewrapResumesAfterKill seeds:
// 10,000 by default; KEYVAULT_E2E_REWRAP_RECORDS overrides it.
func rewrapRecords(t *testing.T) int {
	n := 10000
	if s := os.Getenv("KEYVAULT_E2E_REWRAP_RECORDS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n < 100 {
			t.Fatalf("KEYVAULT_E2E_REWRAP_RECORDS=%q: want a number of at least 100", s)
		}
	}
	return n
}

// TestRewrapResumesAfterKill seeds thousands of backups under key version
// 1, rotates, starts the re-wrap and kills the vault with SIGKILL in the
// middle of it. After a restart some backups are on each wrap key version;
// the re-wrap run again finishes the rest, and every backup then recovers
// with its PIN and is sealed under wrap key version 2.
func TestRewrapResumesAfterKill(t *testing.T) {
	k := newRotationKit(t)
	t.Parallel()
	n := rewrapRecords(t)
	v := k.start(t)
	c := newClient(t, v.API, v.Token)
	users := make([]enrolled, n)
	began0 := time.Now()
	parallel(t, n, func(i int) error {
		users[i] = enrolled{fmt.Sprintf("u%05d", i), randBytes(32), fmt.Sprintf("%04d", i%10000)}
		r, err := c.call(http.MethodPut, backupPath(users[i].user), map[string]any{"secret": b64(users[i].secret), "pin": users[i].pin})
		if err == nil && r.Status != 201 {
			err = fmt.Errorf("enroll %s: %s", users[i].user, r)
		}
		return err
	})
	seeded := time.Now()
	if code, out := k.keys(t, v, "rotate"); code != 0 {
		t.Fatalf("keys rotate: exit %d:\n%s", code, out)
	}
	// Slow enough to be killed half-way.
	rate := max(n/4, 50)
	if code, out := k.keys(t, v, "rewrap", "--rate", strconv.Itoa(rate)); code != 0 || !strings.Contains(out, "running") {
		t.Fatalf("keys rewrap: exit %d:\n%s", code, out)
	}
	admin := newAdminClient(v.Admin, k.adminToken)
	deadline := time.Now().Add(2 * time.Minute)
	for {
		var st struct{ Done, Total int }
		r := admin.do(t, http.MethodGet, "/admin/rewrap", nil)
		_ = json.Unmarshal(r.Body, &st)
		if st.Done >= n/3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("re-wrap made no progress: %s", r)
		}
		time.Sleep(20 * time.Millisecond)
	}
	v.Kill()

	v = k.start(t)
	c = newClient(t, v.API, v.Token)
	wrap, _ := k.usage(t, v)
	t.Logf("%d backups seeded in %v; killed with %d on wrap v1 and %d on wrap v2", n, seeded.Sub(began0), wrap["1"], wrap["2"])
	if wrap["1"] == 0 || wrap["2"] == 0 || wrap["1"]+wrap["2"] != n {
		t.Fatalf("after the kill: wrap versions %v, want some on each, %d in all", wrap, n)
	}
	began := time.Now()
	code, out := k.keys(t, v, "rewrap", "--rate", "0", "--wait")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("finished: %d of %d records moved, 0 skipped, 0 errors", wrap["1"], wrap["1"])) {
		t.Fatalf("keys rewrap after the restart: exit %d:\n%s", code, out)
	}
	t.Logf("the resumed re-wrap moved %d backups in %v", wrap["1"], time.Since(began).Round(time.Millisecond))
	if wrap, pin := k.usage(t, v); wrap["2"] != n || len(wrap) != 1 || pin["1"] != n {
		t.Fatalf("after the re-wrap: wrap %v, pin %v; want all %d on wrap v2, PIN v1", wrap, pin, n)
	}
	began = time.Now()
	parallel(t, n, func(i int) error {
		u := users[i]
		r, err := c.call(http.MethodGet, backupPath(u.user), nil)
		if err != nil {
			return err
		}
		var st struct {
			KeyVersion int `json:"key_version"`
		}
		if r.Status != 200 || json.Unmarshal(r.Body, &st) != nil || st.KeyVersion != 2 {
			return fmt.Errorf("status %s: %s", u.user, r)
		}
		r, err = c.call(http.MethodPost, backupPath(u.user)+"/recover", map[string]string{"pin": u.pin})
		if err != nil {
			return err
		}
		var rec struct {
			Secret string `json:"secret"`
		}
		if r.Status != 200 || json.Unmarshal(r.Body, &rec) != nil || rec.Secret != b64(u.secret) {
			return fmt.Errorf("recover %s: %s", u.user, r)
		}
		return nil
	})
	t.Logf("every backup checked and recovered in %v", time.Since(began).Round(time.Millisecond))
	if wrap, pin := k.usage(t, v); wrap["2"] != n || pin["2"] != n {
		t.Errorf("after recovering every backup: wrap %v, pin %v; want all %d on version 2", wrap, pin, n)
	}
	v.Stop()
}

// parallel runs fn(0..n-1) on 8 workers and fails the test on the first
// error.
func parallel(t *testing.T, n int, fn func(i int) error) {
	t.Helper()
	var next atomic.Int64
	var first atomic.Value
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for first.Load() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if err := fn(i); err != nil {
					first.CompareAndSwap(nil, err)
				}
			}
		}()
	}
	wg.Wait()
	if err := first.Load(); err != nil {
		t.Fatal(err)
	}
}

// TestReloadOnSIGHUP: `keys rotate` without an admin token creates the
// version and says how to take it into use; the vault keeps sealing under
// version 1 until it gets SIGHUP, then seals under version 2.
func TestReloadOnSIGHUP(t *testing.T) {
	k := newRotationKit(t)
	t.Parallel()
	v := k.start(t)
	c := newClient(t, v.API, v.Token)
	code, out := k.keys(t, nil, "rotate")
	if code != 0 || !strings.Contains(out, "No admin token given") || !strings.Contains(out, "keyvault-wrap-v2") {
		t.Fatalf("keys rotate without an admin token: exit %d:\n%s", code, out)
	}
	c.enroll(t, "before", randBytes(32), "2468", 0)
	if w, p := keyVersions(t, c.status(t, "before")); w != 1 || p != 1 {
		t.Fatalf("before the reload: versions %v/%v, want 1/1", w, p)
	}
	if err := v.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; ; i++ {
		user := fmt.Sprintf("after-%d", i)
		c.enroll(t, user, randBytes(32), "2468", 0)
		if w, p := keyVersions(t, c.status(t, user)); w == 2 && p == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no enrollment on version 2 within 10s of SIGHUP:\n%s", v.Logs())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(string(v.Logs()), "keys reloaded on SIGHUP") {
		t.Errorf("no log line for the reload")
	}
	v.Stop()
}
