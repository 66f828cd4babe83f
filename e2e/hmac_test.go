package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/p11test"
	"github.com/keyvault/keyvault/internal/softhsm"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// profileKit is a vault of the test's own on one token, with an admin
// token for the keys commands and rollback anchoring off (the tamper step
// edits the store by hand).
type profileKit struct {
	bin          string // the keyvault binary, or a link to it (p11test.NSSForProgram)
	dir, cfg, db string
	tokenFile    string // the admin token
	member       string // the hsm section after "hsm:", without the profile
	profile      string
	apiHash      string
	adminHash    string
}

// newProfileKit writes the config: member is the YAML of the hsm section
// after "hsm:" without the profile, which setProfile adds.
func newProfileKit(t *testing.T, dir, member, profile string) *profileKit {
	t.Helper()
	apiToken, adminToken := rand.Text(), rand.Text()
	write(t, filepath.Join(dir, "token"), apiToken+"\n")
	k := &profileKit{bin: keyvaultBin, dir: dir, cfg: filepath.Join(dir, "keyvault.yaml"), db: filepath.Join(dir, "keyvault.db"),
		tokenFile: filepath.Join(dir, "admin-token"), member: member}
	write(t, k.tokenFile, adminToken+"\n")
	k.apiHash, k.adminHash = sha256Hex(apiToken), sha256Hex(adminToken)
	k.setProfile(t, profile)
	return k
}

func sha256Hex(s string) string { h := sha256.Sum256([]byte(s)); return hex.EncodeToString(h[:]) }

func write(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// setProfile rewrites the config with hsm.profile set to profile ("":
// unset).
func (k *profileKit) setProfile(t *testing.T, profile string) {
	t.Helper()
	k.profile = profile
	line := ""
	if profile != "" {
		line = "  profile: " + profile + "\n"
	}
	write(t, k.cfg, fmt.Sprintf(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
admin_token_sha256: %s
store:
  path: %s
  rollback_anchor: false
hsm:
%s%sbudget:
  escalating_delay: {base: 0s}
clients:
  - name: messenger
    token_sha256: %s
ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 0s
`, k.adminHash, k.db, line, k.member, k.apiHash))
}

func (k *profileKit) start(t *testing.T) *vault {
	t.Helper()
	return kvproc.Start(t, k.bin, k.dir, startTimeout, "serve", "--config", k.cfg)
}

// run runs the kit's binary with args.
func (k *profileKit) run(t *testing.T, args ...string) (int, string) {
	t.Helper()
	return runBin(t, k.bin, args...)
}

// keys runs a `keyvault keys` subcommand, against the running vault v if
// not nil.
func (k *profileKit) keys(t *testing.T, v *vault, args ...string) (int, string) {
	t.Helper()
	args = append(append([]string{"keys"}, args...), "--config", k.cfg)
	if v != nil {
		args = append(args, "--admin-url", v.Admin, "--admin-token-file", k.tokenFile)
	}
	return k.run(t, args...)
}

// softHSMMember initialises a SoftHSM token in dir and returns its hsm
// section.
func softHSMMember(t *testing.T, dir string) string {
	t.Helper()
	module := softhsmtest.Module(t)
	conf, pinFile := softHSMToken(t, dir)
	return fmt.Sprintf("  module_env:\n    SOFTHSM2_CONF: %s\n  members:\n    - name: soft\n      module: %s\n      token_label: keyvault-soft\n      pin_file: %s\n      max_sessions: 4\n",
		conf, module, pinFile)
}

// softHSMToken initialises a SoftHSM token labelled keyvault-soft in dir
// and returns its SoftHSM config file and the file of its user PIN.
func softHSMToken(t *testing.T, dir string) (conf, pinFile string) {
	t.Helper()
	conf, err := softhsm.WriteConfig(dir)
	if err != nil {
		t.Fatal(err)
	}
	pin := strings.ToLower(rand.Text()[:16])
	pinFile = filepath.Join(dir, "hsm-pin")
	write(t, pinFile, pin+"\n")
	if err := softhsm.InitToken(conf, "keyvault-soft", rand.Text(), pin); err != nil {
		t.Fatal(err)
	}
	return conf, pinFile
}

// TestHMACProfileOnOpencryptoki runs the vault on opencryptoki's soft
// token, which has HMAC-SHA256 and no AES-GCM, under the hmac profile:
// keys init, hsm check, serve, the REST contract, a storm of wrong
// guesses, a key rotation with re-wrap and retire, and a tampered record.
func TestHMACProfileOnOpencryptoki(t *testing.T) {
	oc := p11test.Opencryptoki(t) // not parallel: the token is the machine's only one
	dir := t.TempDir()
	write(t, filepath.Join(dir, "oc-pin"), oc.PIN+"\n")
	k := newProfileKit(t, dir, fmt.Sprintf("  members:\n    - name: oc\n      module: %s\n      token_label: %s\n      pin_file: %s\n      max_sessions: 4\n",
		oc.Module, oc.Label, filepath.Join(dir, "oc-pin")), "hmac")
	if code, out := k.keys(t, nil, "init"); code != 0 || !strings.Contains(out, "for the hmac profile") {
		t.Fatalf("keys init under hmac on opencryptoki: exit %d:\n%s", code, out)
	}
	profileScenario(t, k)
}

// TestAESProfilesOnSoftHSM runs the scenario under each AES profile on
// SoftHSM: gcm, the HSM's AES-GCM under the vault's nonce, and
// gcm-hsm-iv, where SoftHSM takes the IV it is given: the binary's first
// seal finds that out and seals with the vault's nonce, and every record
// is marked gcm-hsm-iv. (A token that chooses its IV is emulated in
// hsmpool's tests: the emulation lives in the test process, out of the
// binary's reach.)
func TestAESProfilesOnSoftHSM(t *testing.T) {
	t.Parallel()
	for _, profile := range []string{"gcm", "gcm-hsm-iv"} {
		t.Run(profile, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			k := newProfileKit(t, dir, softHSMMember(t, dir), profile)
			if code, out := k.keys(t, nil, "init"); code != 0 || !strings.Contains(out, "for the "+profile+" profile") {
				t.Fatalf("keys init under %s: exit %d:\n%s", profile, code, out)
			}
			profileScenario(t, k)
		})
	}
}

// TestHMACProfileOnSoftHSM changes a SoftHSM store from gcm to hmac: the
// vault refuses to start under hmac while the newest wrap key is an AES
// one, and says what to run; after keys rotate it serves, a record sealed
// under gcm still opens, and the whole scenario runs under hmac.
func TestHMACProfileOnSoftHSM(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	k := newProfileKit(t, dir, softHSMMember(t, dir), "gcm")
	if code, out := k.keys(t, nil, "init"); code != 0 || !strings.Contains(out, "for the gcm profile") {
		t.Fatalf("keys init under gcm: exit %d:\n%s", code, out)
	}
	v := k.start(t)
	c := newClient(t, v.API, v.Token)
	old := enrolled{randID("gcm-era"), randBytes(32), randPIN("old")}
	c.mustEnroll(t, http.StatusCreated, old.user, old.secret, old.pin, 5)
	v.Stop()

	k.setProfile(t, "hmac")
	if code, out := runCLI(t, "serve", "--config", k.cfg); code == 0 || !strings.Contains(out, "keyvault-wrap-v1, is a key of the gcm profile") ||
		!strings.Contains(out, "keys rotate") {
		t.Fatalf("serve under hmac on gcm keys: exit %d, want a refusal naming the key and keys rotate:\n%s", code, out)
	}
	if code, out := k.keys(t, nil, "rotate"); code != 0 {
		t.Fatalf("keys rotate under hmac: exit %d:\n%s", code, out)
	}
	v = k.start(t)
	c = newClient(t, v.API, v.Token)
	c.mustRecover(t, old.user, old.pin, old.secret)
	v.Stop()
	profileScenario(t, k, old)
}

// profileScenario runs on a kit whose keys exist: hsm check, serve, the
// REST contract, 64 concurrent wrong guesses, a rotation (keys rotate,
// rewrap, retire of every older version) and a tampered record, checking
// that every record in the store says it was sealed under the kit's
// profile. earlier are backups the store holds already, recovered after
// the re-wrap with the others.
func profileScenario(t *testing.T, k *profileKit, earlier ...enrolled) {
	t.Helper()
	if code, out := k.run(t, "hsm", "check", "--config", k.cfg); code != 0 || !strings.Contains(out, "verdict: can serve (profile "+k.profile+")") {
		t.Fatalf("hsm check: exit %d:\n%s", code, out)
	}
	v := k.start(t)
	if !strings.Contains(string(v.Logs()), `"hsm_profile":"`+k.profile+`"`) {
		t.Errorf("the serving log line does not name the profile %s", k.profile)
	}
	c := newClient(t, v.API, v.Token)

	// The contract: enroll, status, recover, a wrong PIN, the lock.
	e := enrolled{randID("prof"), randBytes(32), randPIN("prof")}
	c.mustEnroll(t, http.StatusCreated, e.user, e.secret, e.pin, 5)
	if g := c.mustStatus(t, e.user); num(t, g, "attempts_remaining") != 5 || g["locked"] != false {
		t.Fatalf("GET: %v", g)
	}
	c.mustRecover(t, e.user, e.pin, e.secret)
	if p := wantProblem(t, "wrong PIN", c.recover(t, e.user, "wrong-pin"), http.StatusForbidden, "wrong_pin"); num(t, p, "attempts_remaining") != 4 {
		t.Errorf("wrong PIN: %v, want 4 attempts remaining", p)
	}
	c.mustRecover(t, e.user, e.pin, e.secret)
	lk := enrolled{randID("prof-lock"), randBytes(32), randPIN("lock")}
	c.mustEnroll(t, http.StatusCreated, lk.user, lk.secret, lk.pin, 2)
	wantProblem(t, "first wrong PIN", c.recover(t, lk.user, "wrong-1"), http.StatusForbidden, "wrong_pin")
	wantProblem(t, "last wrong PIN", c.recover(t, lk.user, "wrong-2"), http.StatusGone, "locked")
	wantProblem(t, "right PIN after the lock", c.recover(t, lk.user, lk.pin), http.StatusGone, "locked")

	// 64 wrong guesses at once at max_attempts 5: exactly 4 answer 403.
	storm := enrolled{randID("prof-storm"), randBytes(32), randPIN("storm")}
	c.mustEnroll(t, http.StatusCreated, storm.user, storm.secret, storm.pin, 5)
	var wg sync.WaitGroup
	results := make([]response, 64)
	errs := make([]error, 64)
	begin := make(chan struct{})
	for i := range results {
		wg.Go(func() {
			<-begin
			results[i], errs[i] = c.call(http.MethodPost, backupPath(storm.user)+"/recover", map[string]string{"pin": fmt.Sprintf("wrong-%d", i)})
		})
	}
	close(begin)
	wg.Wait()
	n403, n410 := 0, 0
	for i, r := range results {
		var p struct{ Code string }
		_ = json.Unmarshal(r.Body, &p)
		switch {
		case errs[i] != nil:
			t.Fatalf("storm request %d: %v", i, errs[i])
		case r.Status == http.StatusForbidden && p.Code == "wrong_pin":
			n403++
		case r.Status == http.StatusGone && p.Code == "locked":
			n410++
		default:
			t.Errorf("storm request %d: %v", i, r)
		}
	}
	if n403 != 4 || n410 != 60 {
		t.Errorf("64 concurrent wrong guesses at max_attempts 5: %d×403 and %d×410, want 4 and 60", n403, n410)
	}
	wantProblem(t, "right PIN after the storm", c.recover(t, storm.user, storm.pin), http.StatusGone, "locked")

	// A rotation: new keys of the profile, every record moved, the older
	// versions retired.
	before := num(t, c.mustStatus(t, e.user), "key_version")
	if code, out := k.keys(t, v, "rotate"); code != 0 {
		t.Fatalf("keys rotate: exit %d:\n%s", code, out)
	}
	newest := before + 1
	fresh := enrolled{randID("prof-fresh"), randBytes(32), randPIN("fresh")}
	if g := c.mustEnroll(t, http.StatusCreated, fresh.user, fresh.secret, fresh.pin, 5); num(t, g, "key_version") != newest {
		t.Fatalf("an enrollment after the rotation: %v, want key_version %d", g, newest)
	}
	if code, out := k.keys(t, v, "rewrap", "--rate", "0", "--wait"); code != 0 || !strings.Contains(out, fmt.Sprintf("re-wrap to wrap key v%d finished", newest)) {
		t.Fatalf("keys rewrap: exit %d:\n%s", code, out)
	}
	for _, en := range append([]enrolled{e, fresh}, earlier...) {
		c.mustRecover(t, en.user, en.pin, en.secret) // moves the PIN key too
		if g := c.mustStatus(t, en.user); num(t, g, "key_version") != newest || num(t, g, "pin_key_version") != newest {
			t.Fatalf("after rewrap and recovery: %v, want key versions %d", g, newest)
		}
	}
	for ver := 1; ver < newest; ver++ {
		if code, out := k.keys(t, v, "retire", "--version", fmt.Sprint(ver)); code != 0 {
			t.Fatalf("keys retire --version %d: exit %d:\n%s", ver, code, out)
		}
	}
	c.mustRecover(t, e.user, e.pin, e.secret)
	v.Stop()

	// Every live record says it was sealed under the profile (format 3,
	// the sealing byte after the MAC key version: 1 gcm, 2 hmac, 3
	// gcm-hsm-iv); then one has a byte of its sealed secret flipped.
	sealing := map[string]byte{"gcm": 1, "hmac": 2, "gcm-hsm-iv": 3}[k.profile]
	const offSealing = 8 + 62
	offSealed := offSealing + 1 + 1 + 32 + 1 + 32 + 1 + 12 + 4
	editStore(t, k.db, func(kv *bolt.Bucket) error {
		for _, en := range append([]enrolled{e, fresh, lk, storm}, earlier...) {
			val := kv.Get(recordKey("messenger", en.user))
			if len(val) < offSealed || val[8] != 3 || val[offSealing] != sealing {
				return fmt.Errorf("record of %s: %d bytes, format %d, sealing %d; want format 3, sealing %d", en.user, len(val), val[8], val[offSealing], sealing)
			}
		}
		key := recordKey("messenger", e.user)
		val := append([]byte(nil), kv.Get(key)...)
		if len(val) < offSealed+20 {
			return errors.New("the record holds no sealed secret")
		}
		val[offSealed+10] ^= 0x40
		return kv.Put(key, val)
	})
	v = k.start(t)
	c = newClient(t, v.API, v.Token)
	for _, r := range []response{c.status(t, e.user), c.recover(t, e.user, e.pin)} {
		wantProblem(t, "the tampered record", r, http.StatusInternalServerError, "integrity_error")
		if n := findEncoded(r.Body, e.secret); n != "" {
			t.Errorf("a tampered record's answer holds the secret (%s)", n)
		}
	}
	c.mustRecover(t, fresh.user, fresh.pin, fresh.secret)
}
