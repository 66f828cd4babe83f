package e2e

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
	"go.yaml.in/yaml/v3"

	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// enableAnchor turns store.rollback_anchor on in a dev config (the
// default, said again so that these tests do not hang on it).
func enableAnchor(t testing.TB, cfg string) { t.Helper(); kvproc.SetRollbackAnchor(t, cfg, true) }

// anchoredDev sets up a dev directory with rollback anchoring on and
// returns it and its store file. The test runs in parallel.
func anchoredDev(t *testing.T) (dir, db string) {
	t.Helper()
	softhsmtest.Module(t)
	t.Parallel()
	dir = t.TempDir()
	startDev(t, dir).Stop()
	enableAnchor(t, filepath.Join(dir, "keyvault.yaml"))
	return dir, filepath.Join(dir, "keyvault.db")
}

// startRefused runs keyvault dev on dir and expects it to refuse its store:
// it returns the reason from the log, after checking that /readyz gives it
// too and that the API is not served.
func startRefused(t testing.TB, dir string) string {
	t.Helper()
	return startRefusedArgs(t, dir, "dev", "--dir", dir, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
}

// startRefusedArgs is startRefused for any keyvault command line.
func startRefusedArgs(t testing.TB, dir string, args ...string) string {
	t.Helper()
	return startRefusedBin(t, keyvaultBin, dir, args...)
}

// startRefusedBin is startRefusedArgs on bin, the keyvault binary or a
// link to it.
func startRefusedBin(t testing.TB, bin, dir string, args ...string) string {
	t.Helper()
	v := kvproc.Launch(t, bin, dir, args...)
	defer v.Kill()
	reason, admin, err := v.WaitRefusal(startTimeout)
	if err != nil {
		t.Fatalf("%v:\n%s", err, v.Logs())
	}
	r := get(t, "http://"+admin+"/readyz")
	if r.Status != 503 || !strings.Contains(string(r.Body), "("+reason+")") {
		t.Fatalf("/readyz of a refused store: %d %s", r.Status, r.Body)
	}
	samples, _ := metrics(t, "http://"+admin)
	if n, _ := metricSum(samples, "keyvault_anchor_refused", map[string]string{"reason": reason}); n != 1 {
		t.Fatalf("keyvault_anchor_refused{reason=%q} = %v, want 1", reason, n)
	}
	return reason
}

func copyFile(t testing.TB, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// boltGet reads one value of a stopped store's bucket.
func boltGet(t testing.TB, path, bucket string, key []byte) []byte {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var v []byte
	db.View(func(tx *bolt.Tx) error {
		v = bytes.Clone(tx.Bucket([]byte(bucket)).Get(key))
		return nil
	})
	if v == nil {
		t.Fatalf("%s has no %q in bucket %s", path, key, bucket)
	}
	return v
}

// boltPut writes one value into a stopped store's bucket.
func boltPut(t testing.TB, path, bucket string, key, value []byte) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte(bucket)).Put(key, value) }); err != nil {
		t.Fatal(err)
	}
}

// Rollback resistance against the real binary, SoftHSM and bbolt: every
// way of putting an older state back is refused at start; the current
// state is served; an accepted restore starts a new epoch in which the
// pre-restore store and older copies are refused too.
func TestRollback(t *testing.T) {
	dir, db := anchoredDev(t)

	v := startDev(t, dir)
	c := newClient(t, v.API, v.Token)
	secret := randBytes(32)
	users := map[string]string{}
	for _, u := range []string{"alice", "bob", "carol", "dave"} {
		users[u] = randPIN(u)
		c.mustEnroll(t, 201, u, secret, users[u], 3)
	}
	v.Stop()
	old := filepath.Join(dir, "old.db")
	copyFile(t, db, old)

	// Later: alice spends a guess, bob is deleted, carol is locked.
	v = startDev(t, dir)
	c = newClient(t, v.API, v.Token)
	wantProblem(t, "alice's wrong guess", c.recover(t, "alice", "wrong-pin"), 403, "wrong_pin")
	if r := c.delete(t, "bob"); r.Status != 204 {
		t.Fatalf("delete bob: %s", r)
	}
	for range 2 {
		wantProblem(t, "carol's wrong guess", c.recover(t, "carol", "wrong-pin"), 403, "wrong_pin")
	}
	wantProblem(t, "carol's last guess", c.recover(t, "carol", "wrong-pin"), 410, "locked")
	v.Stop()
	current := filepath.Join(dir, "current.db")
	copyFile(t, db, current)

	for _, tc := range []struct {
		name, want string
		make       func(path string)
	}{
		{"the whole store restored from an older copy", "rollback", func(p string) { copyFile(t, old, p) }},
		{"alice's record rolled back to before her wrong guess", "tamper", func(p string) {
			boltPut(t, p, "kv", recordKey("dev", "alice"), boltGet(t, old, "kv", recordKey("dev", "alice")))
		}},
		{"deleted bob revived", "tamper", func(p string) {
			boltPut(t, p, "kv", recordKey("dev", "bob"), boltGet(t, old, "kv", recordKey("dev", "bob")))
		}},
		{"locked carol revived", "tamper", func(p string) {
			boltPut(t, p, "kv", recordKey("dev", "carol"), boltGet(t, old, "kv", recordKey("dev", "carol")))
		}},
		{"the current meta spliced onto the older copy", "tamper", func(p string) {
			copyFile(t, old, p)
			boltPut(t, p, "meta", []byte("anchor"), boltGet(t, current, "meta", []byte("anchor")))
		}},
	} {
		copyFile(t, current, db)
		tc.make(db)
		if got := startRefused(t, dir); got != tc.want {
			t.Errorf("%s: refused for %s, want %s", tc.name, got, tc.want)
		}
	}

	// The current store is served, as it was.
	copyFile(t, current, db)
	v = startDev(t, dir)
	c = newClient(t, v.API, v.Token)
	if r := c.mustStatus(t, "alice"); num(t, r, "attempts_remaining") != 2 {
		t.Fatalf("alice after the refusals: %v", r)
	}
	wantProblem(t, "carol", c.recover(t, "carol", users["carol"]), 410, "locked")
	v.Stop()

	// A legitimate restore: accept it, with a reason, and the vault starts
	// on it in a new epoch.
	copyFile(t, old, db)
	code, out := runCLI(t, "anchor", "accept", "--config", filepath.Join(dir, "keyvault.yaml"), "--reason", "restore drill")
	if code != 0 || !strings.Contains(out, "accepted: epoch 2") || !strings.Contains(out, "anchored batches lost") || !strings.Contains(out, `"op":"rollback_accept","result":"success","reason":"restore drill"`) {
		t.Fatalf("anchor accept: exit %d:\n%s", code, out)
	}
	if code, out := runCLI(t, "anchor", "accept", "--config", filepath.Join(dir, "keyvault.yaml"), "--reason", "again"); code != 1 || !strings.Contains(out, "nothing to accept") {
		t.Fatalf("a second accept: exit %d:\n%s", code, out)
	}
	if code, out := runCLI(t, "anchor", "status", "--config", filepath.Join(dir, "keyvault.yaml")); code != 0 || !strings.Contains(out, "epoch 2") || !strings.Contains(out, "check: passes") {
		t.Fatalf("anchor status: exit %d:\n%s", code, out)
	}
	v = startDev(t, dir)
	c = newClient(t, v.API, v.Token)
	c.mustRecover(t, "bob", users["bob"], secret) // bob is back, as in the backup
	v.Stop()
	restored := filepath.Join(dir, "restored.db")
	copyFile(t, db, restored)
	// The store from before the restore, and the older copy the restore
	// came from, are both refused now.
	for name, p := range map[string]string{"the pre-restore store": current, "the older copy": old} {
		copyFile(t, p, db)
		if got := startRefused(t, dir); got != "epoch" {
			t.Errorf("%s after the accept: refused for %s, want epoch", name, got)
		}
	}
	copyFile(t, restored, db)
	startDev(t, dir).Stop()

	for _, args := range [][]string{
		{"anchor"}, {"anchor", "bogus"}, {"anchor", "status"}, {"anchor", "accept", "--config", filepath.Join(dir, "keyvault.yaml")},
	} {
		if code, out := runCLI(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2:\n%s", args, code, out)
		}
	}
}

// SIGKILL at random instants under load: the store is never refused after
// a kill (a clean state is never refused), and a copy taken before the
// load is always refused afterwards (a rollback is never accepted).
func TestRollbackCrash(t *testing.T) {
	dir, db := anchoredDev(t)
	cycles := 3
	if n := os.Getenv("KEYVAULT_E2E_ROLLBACK_KILLS"); n != "" {
		fmt.Sscan(n, &cycles)
	}
	secret := randBytes(32)
	var answered, past int64
	defer func() {
		t.Logf("%d SIGKILLs under load, %d writes answered before them; %d stores found one batch past their anchor", cycles, answered, past)
	}()
	for cycle := range cycles {
		before := filepath.Join(dir, "before.db")
		copyFile(t, db, before)
		v := startDev(t, dir)
		c := newClient(t, v.API, v.Token)
		var stop atomic.Bool
		var acked atomic.Int64
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Go(func() {
				for i := 0; !stop.Load(); i++ {
					u := fmt.Sprintf("c%d-w%d-%d", cycle, w, i%5)
					var r response
					var err error
					if i%3 == 2 {
						r, err = c.call("POST", backupPath(u)+"/recover", map[string]any{"pin": "wrong-pin"})
					} else {
						r, err = c.call("PUT", backupPath(u), map[string]any{"secret": b64(secret), "pin": "right-pin"})
					}
					if err == nil && r.Status < 500 {
						acked.Add(1)
					}
				}
			})
		}
		// Kill under load, never during start-up: SoftHSM rewrites
		// token.object in place (truncate, then write) at login, and a kill
		// there can empty it and lose the token.
		for acked.Load() < 20 {
			time.Sleep(5 * time.Millisecond)
		}
		time.Sleep(time.Duration(rand.IntN(300)) * time.Millisecond)
		v.Kill()
		stop.Store(true)
		wg.Wait()
		answered += acked.Load()
		// The killed store starts: a clean state is never refused.
		v = startDev(t, dir)
		newClient(t, v.API, v.Token).mustEnroll(t, 201, fmt.Sprintf("after-%d", cycle), secret, "right-pin", 3)
		v.Stop()
		if strings.Contains(string(v.Logs()), `"one_batch_past_anchor":true`) {
			past++
		}
		// The copy from before this cycle's answered writes is refused.
		current := filepath.Join(dir, "current.db")
		copyFile(t, db, current)
		copyFile(t, before, db)
		if got := startRefused(t, dir); got != "rollback" {
			t.Fatalf("cycle %d: the copy from before %d answered writes was refused for %s, want rollback", cycle, acked.Load(), got)
		}
		copyFile(t, current, db)
	}
}

// Two members: the anchor must come from every member that was live at
// the newest one. A hidden member is a refusal, a stale member cannot
// stand in for a hidden current one, and a member that fails while the
// vault runs drops out of the live set, so a start without it is accepted
// and its return catches it up.
func TestRollbackMembers(t *testing.T) {
	module := softhsmtest.Module(t)
	t.Parallel()
	dev := t.TempDir()
	startDev(t, dev).Stop()
	template := readTrimmed(t, filepath.Join(dev, "keyvault.yaml"))

	hsm := t.TempDir()
	conf, err := softhsm.WriteConfig(hsm)
	if err != nil {
		t.Fatal(err)
	}
	tokens := filepath.Join(hsm, "tokens")
	pinFile := filepath.Join(hsm, "hsm-pin")
	if err := os.WriteFile(pinFile, []byte("pool-pin-1234\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	dirs := map[string]string{}
	for _, label := range []string{"keyvault-a", "keyvault-b"} {
		before := subdirs(t, tokens)
		if err := softhsm.InitToken(conf, label, "so-pin-1234", "pool-pin-1234"); err != nil {
			t.Fatal(err)
		}
		for d := range subdirs(t, tokens) {
			if !before[d] {
				dirs[label] = filepath.Join(tokens, d)
			}
		}
	}
	cfg := filepath.Join(hsm, "keyvault.yaml")
	writePoolConfig(t, template, cfg, conf, filepath.Join(hsm, "keyvault.db"), module,
		poolMember{"a", "keyvault-a", pinFile}, poolMember{"b", "keyvault-b", pinFile})
	raw, _ := os.ReadFile(cfg)
	var m map[string]any
	if err := yaml.Unmarshal(raw, &m); err != nil {
		t.Fatal(err)
	}
	m["store"].(map[string]any)["rollback_anchor"] = true
	if raw, err = yaml.Marshal(m); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(cfg, raw, 0o600)
	if code, out := runCLI(t, "keys", "init", "--config", cfg); code != 0 {
		t.Fatalf("keys init: %d\n%s", code, out)
	}
	// SoftHSM finds a token in any directory under tokens/: hiding one
	// moves it out.
	hide := func(label string) (restore func()) {
		t.Helper()
		away := filepath.Join(hsm, label+".away")
		if err := os.Rename(dirs[label], away); err != nil {
			t.Fatal(err)
		}
		return func() {
			if err := os.Rename(away, dirs[label]); err != nil {
				t.Fatal(err)
			}
		}
	}
	refusedFor := func() string {
		t.Helper()
		return startRefusedArgs(t, hsm, "serve", "--config", cfg)
	}
	secret := randBytes(32)
	enroll := func(user string) {
		t.Helper()
		v := startServe(t, hsm, cfg)
		newClient(t, v.API, readTrimmed(t, filepath.Join(dev, "token"))).mustEnroll(t, 201, user, secret, "right-pin", 3)
		v.Stop()
	}
	enroll("u1")

	restore := hide("keyvault-b")
	if got := refusedFor(); got != "member_missing" {
		t.Fatalf("b hidden: refused for %s, want member_missing", got)
	}
	restore()

	// b as it is now, kept aside: it will be stale.
	stale := filepath.Join(hsm, "b-stale")
	if out, err := exec.Command("cp", "-a", dirs["keyvault-b"], stale).CombinedOutput(); err != nil {
		t.Fatalf("copy b: %v %s", err, out)
	}
	enroll("u2")
	restoreA := hide("keyvault-a")
	current := filepath.Join(hsm, "b-current")
	if err := os.Rename(dirs["keyvault-b"], current); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", stale, dirs["keyvault-b"]).CombinedOutput(); err != nil {
		t.Fatalf("put stale b in place: %v %s", err, out)
	}
	if got := refusedFor(); got != "member_missing" {
		t.Fatalf("a hidden, b stale: refused for %s, want member_missing", got)
	}
	os.RemoveAll(dirs["keyvault-b"])
	if err := os.Rename(current, dirs["keyvault-b"]); err != nil {
		t.Fatal(err)
	}
	restoreA()

	// b fails while the vault runs: the writes after it go on, anchored on
	// a alone, and a start without b is accepted.
	v := startServe(t, hsm, cfg)
	c := newClient(t, v.API, readTrimmed(t, filepath.Join(dev, "token")))
	restore = hide("keyvault-b")
	for i := range 5 {
		c.mustEnroll(t, 201, fmt.Sprintf("after-b-%d", i), secret, "right-pin", 3)
	}
	v.Stop()
	v = startServe(t, hsm, cfg)
	c = newClient(t, v.API, readTrimmed(t, filepath.Join(dev, "token")))
	c.mustRecover(t, "after-b-4", "right-pin", secret)
	v.Stop()
	// b comes back: accepted, and caught up by the start's anchor.
	restore()
	v = startServe(t, hsm, cfg)
	newClient(t, v.API, readTrimmed(t, filepath.Join(dev, "token"))).mustRecover(t, "u1", "right-pin", secret)
	v.Stop()
	code, out := runCLI(t, "anchor", "status", "--config", cfg)
	newest := func(m string) string {
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, "member "+m+": ") {
				return l
			}
		}
		return ""
	}
	if code != 0 || !strings.HasSuffix(newest("a"), "live a,b") || newest("a")[len("member a"):] != newest("b")[len("member b"):] {
		t.Fatalf("after b's return, both members should hold the newest anchor with both live: exit %d\n%s", code, out)
	}
}

// A kill can tear the anchor slot being written (SoftHSM rewrites the
// object file in place, without fsync): the other slot holds the anchor
// before, and the store, at most one batch past it, still starts. With
// both slots gone, no anchor is left and the store is refused. The slots
// are the two token object files written last: keys are written once, at
// setup, and every batch rewrites one slot.
func TestTornAnchorSlot(t *testing.T) {
	dir, _ := anchoredDev(t)
	v := startDev(t, dir)
	c := newClient(t, v.API, v.Token)
	secret := randBytes(32)
	for i := range 5 {
		c.mustEnroll(t, 201, fmt.Sprintf("torn-%d", i), secret, "right-pin", 3)
	}
	v.Stop()

	var objs []string
	filepath.Walk(filepath.Join(dir, "tokens"), func(path string, info os.FileInfo, err error) error {
		if err == nil && strings.HasSuffix(path, ".object") && filepath.Base(path) != "token.object" {
			objs = append(objs, path)
		}
		return nil
	})
	mtime := func(p string) time.Time {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return fi.ModTime()
	}
	slices.SortFunc(objs, func(a, b string) int { return mtime(b).Compare(mtime(a)) })
	if len(objs) < 3 {
		t.Fatalf("%d token objects, want keys and two anchor slots", len(objs))
	}
	tear := func(p string) {
		t.Helper()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, fi.Size()/2); err != nil {
			t.Fatal(err)
		}
	}

	tear(objs[0]) // the slot written last
	v = startDev(t, dir)
	newClient(t, v.API, v.Token).mustRecover(t, "torn-4", "right-pin", secret)
	v.Stop()
	if !strings.Contains(string(v.Logs()), `"msg":"rollback check passed"`) {
		t.Fatalf("no passed rollback check in the log:\n%s", v.Logs())
	}

	// The start wrote both slots again; tear them both.
	objs = objs[:0]
	filepath.Walk(filepath.Join(dir, "tokens"), func(path string, info os.FileInfo, err error) error {
		if err == nil && strings.HasSuffix(path, ".object") && filepath.Base(path) != "token.object" {
			objs = append(objs, path)
		}
		return nil
	})
	slices.SortFunc(objs, func(a, b string) int { return mtime(b).Compare(mtime(a)) })
	tear(objs[0])
	tear(objs[1])
	if got := startRefused(t, dir); got != "no_anchor" {
		t.Fatalf("both anchor slots torn: refused for %s, want no_anchor", got)
	}
}
