package stress

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/softhsm"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestMemberLoss serves a vault on two SoftHSM members provisioned with the
// same keys by `keys init`, keeps a load of recoveries and enrollments on
// it, and takes member b away every few seconds and brings it back (its
// token directory is moved out and back, as in e2e's TestTwoMembers: SoftHSM
// then fails every operation on b's keys, as a dead device would). Member a
// stays healthy throughout, so every request must succeed: each one that
// does not is a violation, and so is a member b that is never taken out,
// or that stays out once its token is back.
func TestMemberLoss(t *testing.T) {
	module := softhsmtest.Module(t)
	duration := knobDuration(t, "STRESS_DURATION", 4*time.Second)
	period := knobDuration(t, "STRESS_FLAP", 2*time.Second)
	const workers = 8
	s := newTally(t, "member-loss")
	defer s.summary()

	dir := t.TempDir()
	cfg, bDir := twoMembers(t, dir, module)
	v := startVault(t, dir, "serve", "--config", cfg)
	c := newClient(v.API, v.Token)

	// Backups to recover, and one per worker to replace over and over.
	type backup struct {
		user   string
		secret []byte
		pin    string
	}
	fixed := make([]backup, 16)
	for i := range fixed {
		fixed[i] = backup{randID("m"), randBytes(32), randPIN("m")}
		if r, err := c.enroll(fixed[i].user, fixed[i].secret, fixed[i].pin, 10); err != nil || r.Status != http.StatusCreated {
			t.Fatalf("enroll: %v %v", r, err)
		}
	}

	var phase atomic.Value
	phase.Store("both up")
	var (
		mu     sync.Mutex
		failed = map[string]int{}
		served = map[string]int{}
	)
	record := func(what string, r response, err error, ok bool) {
		p := phase.Load().(string)
		s.op(1)
		mu.Lock()
		defer mu.Unlock()
		if ok {
			served[p]++
			return
		}
		failed[p]++
		s.violation("[%s] %s: %v %v", p, what, r, err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			own := backup{randID(fmt.Sprintf("mw%d", w)), nil, ""}
			for {
				select {
				case <-stop:
					return
				default:
				}
				if own.secret == nil || mrand.IntN(5) == 0 {
					next := backup{own.user, randBytes(32), randPIN("mw")}
					r, err := c.enroll(next.user, next.secret, next.pin, 10)
					ok := err == nil && (r.Status == http.StatusCreated || r.Status == http.StatusOK)
					record("enroll", r, err, ok)
					if ok {
						own = next
					}
					continue
				}
				b := fixed[mrand.IntN(len(fixed))]
				if mrand.IntN(2) == 0 {
					b = own
				}
				r, err := c.recover(b.user, b.pin)
				a, _ := answerOf(r)
				record("recover", r, err, err == nil && r.Status == http.StatusOK && a.Secret == b64(b.secret))
			}
		})
	}

	away := filepath.Join(dir, "b-token.away")
	end := time.Now().Add(duration)
	for time.Now().Before(end) {
		s.run()
		time.Sleep(period)
		phase.Store("b gone")
		if err := os.Rename(bDir, away); err != nil {
			t.Fatal(err)
		}
		time.Sleep(period)
		phase.Store("b back")
		if err := os.Rename(away, bDir); err != nil {
			t.Fatal(err)
		}
	}
	// Under load, each outage takes b out, and each return puts it back
	// (the probe backs off, so give the last one a little longer).
	ejections, readmissions := 0.0, 0.0
	for deadline := time.Now().Add(period + 10*time.Second); ; time.Sleep(100 * time.Millisecond) {
		ejections = metricSum(t, v.Admin, "keyvault_hsm_member_ejections_total", `member="b"`)
		readmissions = metricSum(t, v.Admin, "keyvault_hsm_member_readmissions_total", `member="b"`)
		if (ejections > 0 && readmissions >= ejections) || time.Now().After(deadline) {
			break
		}
	}
	close(stop)
	wg.Wait()
	if readmissions < ejections {
		s.violation("member b was taken out %v times and put back %v times: it did not come back after its token returned", ejections, readmissions)
	}
	opsB := metricSum(t, v.Admin, "keyvault_hsm_operations_total", `member="b"`)
	if r, err := getURL(v.Admin + "/readyz"); err != nil || r.Status != http.StatusOK {
		s.violation("/readyz with member a healthy: %v %v", r, err)
	}
	if readmissions == 0 {
		t.Logf("member b never came back into service; the vault's log about it:\n%s", grepLog(v.Logs(), `"member":"b"`, 12))
	}
	v.Stop()
	mu.Lock()
	s.note("outages_of_b=%d b_ejections=%v b_readmissions=%v b_operations=%v served=%v failed=%v",
		s.runs, ejections, readmissions, opsB, served, failed)
	mu.Unlock()
	// An outage that starts while b is still being probed from the last one
	// takes nothing out, so fewer ejections than outages is fine; none is not.
	if ejections == 0 {
		s.violation("member b was never taken out in %d outages under load", s.runs)
	}
}

// twoMembers makes a SoftHSM directory with two tokens, a serve config
// for them (limits off, a bearer token in dir/token), provisions them with
// `keys init`, and returns the config path and member b's token directory.
func twoMembers(t *testing.T, dir, module string) (cfg, bDir string) {
	t.Helper()
	conf, err := softhsm.WriteConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	tokens := filepath.Join(dir, "tokens")
	pin := "stress-" + strings.ToLower(rand.Text()[:16])
	pinFile := filepath.Join(dir, "hsm-pin")
	if err := os.WriteFile(pinFile, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := softhsm.InitToken(conf, "keyvault-a", rand.Text(), pin); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadDir(tokens)
	if err != nil {
		t.Fatal(err)
	}
	if err := softhsm.InitToken(conf, "keyvault-b", rand.Text(), pin); err != nil {
		t.Fatal(err)
	}
	after, err := os.ReadDir(tokens)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range after {
		known := false
		for _, b := range before {
			known = known || b.Name() == e.Name()
		}
		if !known {
			bDir = filepath.Join(tokens, e.Name())
		}
	}
	if obj, err := os.ReadFile(filepath.Join(bDir, "token.object")); err != nil || !bytes.Contains(obj, []byte("keyvault-b")) {
		t.Fatalf("cannot tell keyvault-b's token directory in %s (err %v)", tokens, err)
	}

	token := "stress_" + rand.Text()
	if err := os.WriteFile(filepath.Join(dir, "token"), []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(token))
	cfg = filepath.Join(dir, "keyvault.yaml")
	// Member b gets a copy of the library: crypto11 shares one library
	// instance per module path and finalises it only when its last context
	// closes, and SoftHSM only rescans its tokens on initialisation, so a
	// member that shares a's module can never see its restored token while
	// a serves. A copy at another path is a separate instance that b's
	// reopen can finalise and initialise again on its own.
	moduleB := filepath.Join(dir, "libsofthsm2-b.so")
	lib, err := os.ReadFile(module)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(moduleB, lib, 0o755); err != nil {
		t.Fatal(err)
	}
	member := func(name, module, label string) string {
		return fmt.Sprintf("    - name: %s\n      module: %s\n      token_label: %s\n      pin_file: %s\n      max_sessions: 8\n", name, module, label, pinFile)
	}
	text := fmt.Sprintf(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
store:
  path: %s
hsm:
  module_env:
    SOFTHSM2_CONF: %s
  members:
%s%sbudget:
  escalating_delay: {base: 0s}
clients:
  - name: dev
    namespace: dev
    token_sha256: %s
ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 0s
`, filepath.Join(dir, "keyvault.db"), conf, member("a", module, "keyvault-a"), member("b", moduleB, "keyvault-b"), hex.EncodeToString(sum[:]))
	if err := os.WriteFile(cfg, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(keyvaultBin, "keys", "init", "--config", cfg).CombinedOutput()
	if err != nil {
		t.Fatalf("keys init on two members: %v\n%s", err, out)
	}
	return cfg, bDir
}

// grepLog returns the distinct lines of a log that contain substr, the
// last n of them, with the time field cut so that repeats collapse.
func grepLog(logs []byte, substr string, n int) string {
	var out []string
	seen := map[string]bool{}
	for _, line := range strings.Split(string(logs), "\n") {
		if !strings.Contains(line, substr) {
			continue
		}
		if i := strings.Index(line, `"level"`); i > 0 {
			line = "{" + line[i:]
		}
		if !seen[line] {
			seen[line] = true
			out = append(out, line)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return strings.Join(out, "\n")
}
