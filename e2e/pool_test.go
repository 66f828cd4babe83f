package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	yaml "go.yaml.in/yaml/v3"

	"github.com/keyvault/keyvault/internal/softhsm"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestTwoMembers serves a vault on two SoftHSM tokens provisioned with
// identical keys by `keys init`, spreads a recovery load over both, takes
// member b away from under the running vault (its token directory is moved
// away: SoftHSM then fails every operation on its keys, as a dead device
// would), and puts it back. While b is gone, member a answers everything:
// no client sees anything but 200, /readyz stays 200, and the metrics show
// b out and ejected. Once b's directory is back, the member either comes
// back into service and takes traffic again, or, if SoftHSM cannot show
// the restored token to a process that keeps the library initialised for
// member a, stays out cleanly; the test logs which. SIGTERM then stops the
// vault promptly.
func TestTwoMembers(t *testing.T) {
	module := softhsmtest.Module(t)
	t.Parallel()
	start := time.Now()

	// The dev directory: a config template, and a token whose keys were
	// generated inside the HSM.
	dev := t.TempDir()
	startDev(t, dev).Stop()
	devPIN := readTrimmed(t, filepath.Join(dev, "hsm-pin"))
	devConf := filepath.Join(dev, "softhsm2.conf")
	template := readTrimmed(t, filepath.Join(dev, "keyvault.yaml"))

	// A second token next to the dev one cannot get the dev token's keys:
	// they are non-extractable, and keys init refuses to touch a pool in
	// which any member holds keys already.
	if err := softhsm.InitToken(devConf, "keyvault-dev-b", rand.Text(), devPIN); err != nil {
		t.Fatal(err)
	}
	devPair := filepath.Join(dev, "dev-pair.yaml")
	writePoolConfig(t, template, devPair, devConf, filepath.Join(dev, "dev-pair.db"), module,
		poolMember{"dev", "keyvault-dev", filepath.Join(dev, "hsm-pin")},
		poolMember{"dev-b", "keyvault-dev-b", filepath.Join(dev, "hsm-pin")})
	if code, out := runCLI(t, "keys", "init", "--config", devPair); code == 0 || !strings.Contains(out, "already exist") {
		t.Errorf("keys init on the dev token plus an empty one: exit %d, want a refusal saying the keys already exist:\n%s", code, out)
	}

	// Two fresh tokens in a SoftHSM directory of their own.
	hsm := t.TempDir()
	conf, err := softhsm.WriteConfig(hsm)
	if err != nil {
		t.Fatal(err)
	}
	tokens := filepath.Join(hsm, "tokens")
	pin := "pool-" + strings.ToLower(rand.Text()[:16])
	pinFile := filepath.Join(hsm, "hsm-pin")
	if err := os.WriteFile(pinFile, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := softhsm.InitToken(conf, "keyvault-a", rand.Text(), pin); err != nil {
		t.Fatal(err)
	}
	before := subdirs(t, tokens)
	if err := softhsm.InitToken(conf, "keyvault-b", rand.Text(), pin); err != nil {
		t.Fatal(err)
	}
	var added []string
	for name := range subdirs(t, tokens) {
		if !before[name] {
			added = append(added, name)
		}
	}
	if len(added) != 1 {
		t.Fatalf("initialising keyvault-b added %d token directories to %s (%v), want 1", len(added), tokens, added)
	}
	bDir := filepath.Join(tokens, added[0])
	if obj, err := os.ReadFile(filepath.Join(bDir, "token.object")); err != nil || !bytes.Contains(obj, []byte("keyvault-b")) {
		t.Fatalf("%s/token.object does not name keyvault-b (err %v)", bDir, err)
	}

	cfg := filepath.Join(hsm, "keyvault.yaml")
	writePoolConfig(t, template, cfg, conf, filepath.Join(hsm, "keyvault.db"), module,
		poolMember{"a", "keyvault-a", pinFile}, poolMember{"b", "keyvault-b", pinFile})
	code, out := runCLI(t, "keys", "init", "--config", cfg)
	if code != 0 {
		t.Fatalf("keys init on two fresh members: exit %d:\n%s", code, out)
	}
	if !strings.Contains(out, "on 2 members") || !strings.Contains(out, "imported into each member") {
		t.Errorf("keys init on two members does not say the material was imported into both:\n%s", out)
	}
	code, out = runCLI(t, "keys", "list", "--config", cfg)
	listed := sameKeys(t, code, out, "a", "b")
	t.Logf("setup done in %v", time.Since(start).Round(time.Millisecond))

	v := startServe(t, dev, cfg)
	c := newClient(t, v.API, v.Token)
	backups := make([]enrolled, 12)
	for i := range backups {
		backups[i] = enrolled{randID("pool"), randBytes(32), randPIN("pool")}
		c.mustEnroll(t, http.StatusCreated, backups[i].user, backups[i].secret, backups[i].pin, 0)
	}
	member := func(name, member string) float64 {
		t.Helper()
		samples, _ := metrics(t, v.Admin)
		n, _ := metricSum(samples, name, map[string]string{"member": member})
		return n
	}
	waitFor := func(what string, within time.Duration, cond func() bool) bool {
		t.Helper()
		deadline := time.Now().Add(within)
		for !cond() {
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(50 * time.Millisecond)
		}
		return true
	}

	opsA0, opsB0 := member("keyvault_hsm_operations_total", "a"), member("keyvault_hsm_operations_total", "b")

	// The load: recoveries with the right PIN, every answer checked.
	ld := &poolLoad{}
	ld.phase.Store("both members")
	stopLoad := recoverLoad(t, c, backups, ld, 8)

	// 1. Both members take the load's traffic (counted from after the
	// enrolments), and recoveries succeed.
	loadAt := time.Now()
	if !waitFor("traffic on both members", 10*time.Second, func() bool {
		return member("keyvault_hsm_operations_total", "a") >= opsA0+20 && member("keyvault_hsm_operations_total", "b") >= opsB0+20 &&
			ld.succeeded("both members") > 0
	}) {
		_, text := metrics(t, v.Admin)
		t.Fatalf("no traffic on both members within 10s of load:\n%s", grepLines(text, "keyvault_hsm_operations_total"))
	}
	t.Logf("both members serve %v into the load: operations a=%v b=%v", time.Since(loadAt).Round(time.Millisecond), member("keyvault_hsm_operations_total", "a"), member("keyvault_hsm_operations_total", "b"))

	// 2. Member b's token goes away. It is moved out of the token
	// directory, so that nothing could take it for another token there.
	away := filepath.Join(hsm, "b-token.away")
	ld.phase.Store("b gone")
	if err := os.Rename(bDir, away); err != nil {
		t.Fatal(err)
	}
	restored := false
	restore := func() {
		if !restored {
			restored = true
			if err := os.Rename(away, bDir); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Cleanup(restore)
	goneAt := time.Now()
	if !waitFor("member b out", 5*time.Second, func() bool { return member("keyvault_hsm_member_up", "b") == 0 }) {
		t.Fatalf("keyvault_hsm_member_up{member=b} still 1 5s after its token went away; the log ends:\n%s", tail(v.Logs(), 12))
	}
	t.Logf("member b out %v after its token went away", time.Since(goneAt).Round(time.Millisecond))
	if n := member("keyvault_hsm_member_ejections_total", "b"); n < 1 {
		t.Errorf("keyvault_hsm_member_ejections_total{member=b} = %v, want >= 1", n)
	}
	opsA := member("keyvault_hsm_operations_total", "a")
	time.Sleep(time.Second)
	if r := get(t, v.Admin+"/readyz"); r.Status != http.StatusOK {
		t.Errorf("/readyz with member a healthy and b gone: %v, want 200", r)
	}
	if n := member("keyvault_hsm_operations_total", "a"); n <= opsA {
		t.Errorf("member a did no operations in the second after b went away (%v, then %v)", opsA, n)
	}
	if up := member("keyvault_hsm_member_up", "a"); up != 1 {
		t.Errorf("keyvault_hsm_member_up{member=a} = %v while b is gone, want 1", up)
	}

	// 3. Member b's token comes back.
	ld.phase.Store("b restored")
	restore()
	backAt := time.Now()
	back := waitFor("member b back", 15*time.Second, func() bool { return member("keyvault_hsm_member_up", "b") == 1 })
	if back {
		t.Logf("READMISSION: member b back in service %v after its token was restored", time.Since(backAt).Round(time.Millisecond))
		opsB := member("keyvault_hsm_operations_total", "b")
		if !waitFor("traffic on b again", 5*time.Second, func() bool { return member("keyvault_hsm_operations_total", "b") > opsB+20 }) {
			t.Errorf("member b is up again but took no traffic in 5s (operations stay near %v)", opsB)
		}
		if n := member("keyvault_hsm_member_readmissions_total", "b"); n < 1 {
			t.Errorf("keyvault_hsm_member_readmissions_total{member=b} = %v after b came back, want >= 1", n)
		}
	} else {
		// SoftHSM only rescans a token after C_Finalize/C_Initialize,
		// which cannot happen while member a keeps the library in use.
		_, text := metrics(t, v.Admin)
		t.Logf("READMISSION: member b did NOT come back within 15s of its token being restored; it stayed out.\nmetrics:\n%s\nlog lines about member b:\n%s",
			grepLines(text, `member="b"`), memberLogs(v.Logs(), "b", 6))
		if up := member("keyvault_hsm_member_up", "b"); up != 0 {
			t.Errorf("keyvault_hsm_member_up{member=b} = %v, want 0 or 1", up)
		}
		if r := get(t, v.Admin+"/readyz"); r.Status != http.StatusOK {
			t.Errorf("/readyz with member b left out: %v, want 200", r)
		}
		opsA := member("keyvault_hsm_operations_total", "a")
		time.Sleep(300 * time.Millisecond)
		if n := member("keyvault_hsm_operations_total", "a"); n <= opsA {
			t.Errorf("member a stopped serving while b stayed out (%v, then %v)", opsA, n)
		}
	}

	stopLoad()
	ld.report(t)
	if !bytes.Contains(v.Logs(), []byte("HSM member taken out")) {
		t.Errorf("no \"HSM member taken out\" in the log; it ends:\n%s", tail(v.Logs(), 12))
	}

	// 4. SIGTERM stops the vault promptly, closing both members.
	stopAt := time.Now()
	v.Stop()
	if d := time.Since(stopAt); d > 4*time.Second {
		t.Errorf("keyvault took %v to exit after SIGTERM, want under 4s; the log ends:\n%s", d.Round(time.Millisecond), tail(v.Logs(), 12))
	}
	t.Logf("stopped %v after SIGTERM", time.Since(stopAt).Round(time.Millisecond))

	// b's token survived its trip: a new process sees it, with the pool's
	// keys. (Not while the vault runs: a login rewrites token.object.)
	code, out = runCLI(t, "keys", "list", "--config", cfg)
	if after := parseKeysList(out); code != 0 || len(after["b"]) != 3 || fmt.Sprint(after["b"]) != fmt.Sprint(listed["a"]) {
		t.Errorf("keys list after the vault stopped: exit %d, want member b with the keys listed at first (%v):\n%s", code, listed["a"], out)
	} else if !back {
		t.Logf("READMISSION: a new process sees member b's restored token with the pool's keys; only the serving process could not")
	}
	t.Logf("whole test %v", time.Since(start).Round(time.Millisecond))
}

// recoverLoad runs workers that recover the backups with their right PINs
// until the returned stop is called (or the test ends), tallying every
// answer in ld.
func recoverLoad(t *testing.T, c *client, backups []enrolled, ld *poolLoad, workers int) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	for g := range workers {
		wg.Go(func() {
			for i := g; ; i++ {
				select {
				case <-done:
					return
				default:
				}
				b := backups[i%len(backups)]
				r, err := c.call(http.MethodPost, backupPath(b.user)+"/recover", map[string]string{"pin": b.pin})
				ld.record(b, r, err)
			}
		})
	}
	var once sync.Once
	stop = func() { once.Do(func() { close(done); wg.Wait() }) }
	t.Cleanup(stop)
	return stop
}

// poolLoad tallies the load's answers by phase of the test.
type poolLoad struct {
	phase atomic.Value // string

	mu       sync.Mutex
	ok       map[string]int
	bad      map[string]int
	failures []string // the first few, for the report
}

func (l *poolLoad) record(b enrolled, r response, err error) {
	phase := l.phase.Load().(string)
	var problem string
	switch {
	case err != nil:
		problem = "transport error: " + err.Error()
	case r.Status != http.StatusOK:
		problem = r.String()
	default:
		var m struct {
			Secret string `json:"secret"`
		}
		if json.Unmarshal(r.Body, &m) != nil || m.Secret != b64(b.secret) {
			problem = "200 without the backup's secret: " + string(r.Body)
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ok == nil {
		l.ok, l.bad = map[string]int{}, map[string]int{}
	}
	if problem == "" {
		l.ok[phase]++
		return
	}
	l.bad[phase]++
	if len(l.failures) < 8 {
		l.failures = append(l.failures, fmt.Sprintf("[%s] recover %s: %s", phase, b.user, problem))
	}
}

// succeeded is how many recoveries of the phase answered 200 so far.
func (l *poolLoad) succeeded(phase string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ok[phase]
}

func (l *poolLoad) report(t testing.TB) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, phase := range []string{"both members", "b gone", "b restored"} {
		t.Logf("load, %s: %d recoveries answered 200, %d did not", phase, l.ok[phase], l.bad[phase])
		if l.ok[phase] == 0 {
			t.Errorf("load, %s: no recovery succeeded", phase)
		}
	}
	if len(l.failures) > 0 {
		t.Errorf("recoveries failed with member a healthy throughout; the first ones:\n%s", strings.Join(l.failures, "\n"))
	}
}

// poolMember is one member of a generated config.
type poolMember struct{ name, label, pinFile string }

// writePoolConfig writes, at path, the dev config template with its own
// SoftHSM config, store, kernel-picked ports and members; the members copy
// the template's first member but for name, token label and PIN file. The
// rate limits are lifted: the load recovers the same few backups hundreds
// of times a second, and this test is about the HSMs.
func writePoolConfig(t testing.TB, template, path, softhsmConf, store, module string, members ...poolMember) {
	t.Helper()
	var cfg map[string]any
	if err := yaml.Unmarshal([]byte(template), &cfg); err != nil {
		t.Fatalf("dev config: %v", err)
	}
	mapAt := func(m map[string]any, key string) map[string]any {
		t.Helper()
		sub, ok := m[key].(map[string]any)
		if !ok {
			t.Fatalf("dev config: %q is %T, want a mapping:\n%s", key, m[key], template)
		}
		return sub
	}
	cfg["listen"], cfg["admin_listen"] = "127.0.0.1:0", "127.0.0.1:0"
	mapAt(cfg, "store")["path"] = store
	h := mapAt(cfg, "hsm")
	env, _ := h["module_env"].(map[string]any)
	if env == nil {
		env = map[string]any{}
	}
	env["SOFTHSM2_CONF"] = softhsmConf
	h["module_env"] = env
	tmpl, ok := h["members"].([]any)
	if !ok || len(tmpl) == 0 {
		t.Fatalf("dev config: no hsm.members:\n%s", template)
	}
	first, ok := tmpl[0].(map[string]any)
	if !ok {
		t.Fatalf("dev config: hsm.members[0] is %T", tmpl[0])
	}
	var ms []any
	for _, pm := range members {
		m := map[string]any{}
		for k, val := range first {
			m[k] = val
		}
		delete(m, "pin_env")
		m["name"], m["token_label"], m["pin_file"], m["module"] = pm.name, pm.label, pm.pinFile, module
		ms = append(ms, m)
	}
	h["members"] = ms
	rl, _ := cfg["ratelimit"].(map[string]any)
	if rl == nil {
		rl = map[string]any{}
	}
	lifted := map[string]any{"per_second": 1000000, "burst": 1000000}
	rl["guesses_per_user"], rl["requests_per_client"] = lifted, lifted
	cfg["ratelimit"] = rl
	out, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		t.Fatal(err)
	}
}

// keysListMember matches a member heading of `keys list`.
var keysListMember = regexp.MustCompile(`^member (\S+)$`)

// parseKeysList reads `keys list` output: member, then key label, then
// check value.
// sameKeys requires `keys list` (its exit code and output) to show the
// three keys on both members, with equal check values, and returns what
// it listed.
func sameKeys(t *testing.T, code int, out, a, b string) map[string]map[string]string {
	t.Helper()
	if code != 0 {
		t.Fatalf("keys list: exit %d:\n%s", code, out)
	}
	listed := parseKeysList(out)
	if len(listed[a]) != 3 || len(listed[b]) != 3 {
		t.Fatalf("keys list shows %v, want members %s and %s with 3 keys each:\n%s", listed, a, b, out)
	}
	for label, kcv := range listed[a] {
		if listed[b][label] != kcv {
			t.Errorf("keys list: %s has check value %s on %s and %q on %s", label, kcv, a, listed[b][label], b)
		}
	}
	return listed
}

func parseKeysList(out string) map[string]map[string]string {
	got := map[string]map[string]string{}
	var cur string
	for _, line := range strings.Split(out, "\n") {
		if m := keysListMember.FindStringSubmatch(strings.TrimSpace(line)); m != nil {
			cur = m[1]
			got[cur] = map[string]string{}
			continue
		}
		if m := keyLines.FindStringSubmatch(line); m != nil && cur != "" {
			got[cur][m[1]] = m[2]
		}
	}
	return got
}

// subdirs names the directories in dir.
func subdirs(t testing.TB, dir string) map[string]bool {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, e := range ents {
		if e.IsDir() {
			out[e.Name()] = true
		}
	}
	return out
}

func readTrimmed(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// grepLines returns the lines of text that contain substr, sorted, but
// for the histograms'.
func grepLines(text, substr string) string {
	var out []string
	for _, line := range strings.Split(text, "\n") {
		if strings.Contains(line, substr) && !strings.HasPrefix(line, "#") && !strings.Contains(line, "_duration_seconds") {
			out = append(out, line)
		}
	}
	sort.Strings(out)
	return strings.Join(out, "\n")
}

// memberLogs returns the distinct log messages about a member, with their
// error text, the last n of them.
func memberLogs(logs []byte, name string, n int) string {
	var out []string
	seen := map[string]bool{}
	for _, line := range bytes.Split(logs, []byte("\n")) {
		var l struct {
			Msg    string `json:"msg"`
			Member string `json:"member"`
			Error  string `json:"error"`
		}
		if json.Unmarshal(line, &l) != nil || l.Member != name {
			continue
		}
		s := l.Msg
		if l.Error != "" {
			s += ": " + l.Error
		}
		if !seen[s] {
			seen[s] = true
			out = append(out, s)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return strings.Join(out, "\n")
}
