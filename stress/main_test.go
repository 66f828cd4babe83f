package stress

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/internal/kvproc"
)

// Running the binary is shared with e2e (internal/kvproc); the client
// helpers below return errors instead of failing, because a scenario
// counts a failed request as a violation and goes on.

// keyvaultBin is the binary TestMain builds.
var keyvaultBin string

// startTimeout bounds how long a vault may take to log "keyvault serving";
// a large store may take longer to open than the e2e tests' vaults.
const startTimeout = 60 * time.Second

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "keyvault-stress-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "stress:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if keyvaultBin, err = kvproc.Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, "stress:", err)
		return 1
	}
	return m.Run()
}

// knob reads a positive integer size from the environment, or def.
func knob(t testing.TB, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return n
}

// knobDuration reads a duration from the environment, or def.
func knobDuration(t testing.TB, name string, def time.Duration) time.Duration {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	d, err := time.ParseDuration(s)
	if err != nil || d <= 0 {
		t.Fatalf("%s=%q: want a positive duration such as 60s", name, s)
	}
	return d
}

// tally counts a scenario's runs, operations and violations; a violation
// also fails the test, with the first few described in full.
type tally struct {
	t        testing.TB
	scenario string
	start    time.Time

	mu         sync.Mutex
	runs       int
	ops        int64
	violations int
	extra      []string
}

func newTally(t testing.TB, scenario string) *tally {
	return &tally{t: t, scenario: scenario, start: time.Now()}
}

func (s *tally) run() {
	s.mu.Lock()
	s.runs++
	s.mu.Unlock()
}

func (s *tally) op(n int) {
	s.mu.Lock()
	s.ops += int64(n)
	s.mu.Unlock()
}

// violation records a broken invariant.
func (s *tally) violation(format string, args ...any) {
	s.t.Helper()
	s.mu.Lock()
	s.violations++
	n := s.violations
	s.mu.Unlock()
	if n <= 20 {
		s.t.Errorf("VIOLATION: "+format, args...)
	} else if n == 21 {
		s.t.Errorf("more violations; only the first 20 are shown")
	}
}

// note adds a figure to the summary line.
func (s *tally) note(format string, args ...any) {
	s.mu.Lock()
	s.extra = append(s.extra, fmt.Sprintf(format, args...))
	s.mu.Unlock()
}

// summary logs the scenario's one line and appends it to $STRESS_SUMMARY.
func (s *tally) summary() {
	s.t.Helper()
	s.mu.Lock()
	line := fmt.Sprintf("stress %s: runs=%d operations=%d violations=%d time=%s",
		s.scenario, s.runs, s.ops, s.violations, time.Since(s.start).Round(time.Second))
	if len(s.extra) > 0 {
		line += " " + strings.Join(s.extra, " ")
	}
	s.mu.Unlock()
	s.t.Log(line)
	if path := os.Getenv("STRESS_SUMMARY"); path != "" {
		f, err := os.OpenFile(path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			s.t.Errorf("summary file: %v", err)
			return
		}
		defer f.Close()
		fmt.Fprintln(f, line)
	}
}

// vault is one running keyvault process.
type vault = kvproc.Vault

// startDev runs `keyvault dev` on dir with the rate limits, the escalating
// delay and HSM admission shedding off (as e2e's startDev does): the
// scenarios are about the budget, durability and the HSMs, not the limits.
func startDev(t testing.TB, dir string) *vault { t.Helper(); return startDevWith(t, dir, true) }

// startDevUnanchored is startDev with rollback anchoring off, for the
// scenario that edits records of a stopped vault and expects each edited
// record refused on its own (see kvproc.SetRollbackAnchor).
func startDevUnanchored(t testing.TB, dir string) *vault {
	t.Helper()
	return startDevWith(t, dir, false)
}

func startDevWith(t testing.TB, dir string, anchored bool) *vault {
	t.Helper()
	cfg := filepath.Join(dir, "keyvault.yaml")
	if _, err := os.Stat(cfg); errors.Is(err, os.ErrNotExist) {
		startVault(t, dir, kvproc.DevArgs(dir)...).Stop()
		kvproc.SetLimitsOff(t, cfg)
		if !anchored {
			kvproc.SetRollbackAnchor(t, cfg, false)
		}
	}
	return startVault(t, dir, kvproc.DevArgs(dir)...)
}

func startVault(t testing.TB, dir string, args ...string) *vault {
	t.Helper()
	return kvproc.Start(t, keyvaultBin, dir, startTimeout, args...)
}

// client speaks JSON to the API with a bearer token; response is one
// answer (internal/kvproc, shared with e2e).
type client struct{ *kvproc.Client }

type response = kvproc.Response

func newClient(base, token string) *client { return &client{kvproc.NewClient(base, token)} }

func (c *client) call(method, path string, body any, hdr ...string) (response, error) {
	return c.Call(method, path, body, hdr...)
}

func backupPath(user string) string { return "/v1/backups/" + user }

func (c *client) enroll(user string, secret []byte, pin string, maxAttempts int) (response, error) {
	return c.call(http.MethodPut, backupPath(user), map[string]any{"secret": b64(secret), "pin": pin, "max_attempts": maxAttempts})
}

func (c *client) recover(user, pin string) (response, error) {
	return c.call(http.MethodPost, backupPath(user)+"/recover", map[string]string{"pin": pin})
}

func (c *client) status(user string) (response, error) {
	return c.call(http.MethodGet, backupPath(user), nil)
}

// answer is the fields of a JSON answer the scenarios read.
type answer struct {
	Secret            string `json:"secret"`
	Generation        uint64 `json:"generation"`
	MaxAttempts       int    `json:"max_attempts"`
	AttemptsRemaining int    `json:"attempts_remaining"`
	Locked            bool   `json:"locked"`
	Code              string `json:"code"`
}

func answerOf(r response) (answer, error) {
	var a answer
	err := json.Unmarshal(r.Body, &a)
	return a, err
}

// getURL fetches an admin URL.
func getURL(url string) (response, error) {
	resp, err := http.Get(url)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return response{Status: resp.StatusCode, Header: resp.Header, Body: b}, err
}

// metricSum adds up, in the Prometheus text of /metrics, the samples of
// name whose labels include every pair of want ("k=\"v\"").
func metricSum(t testing.TB, admin, name string, want ...string) float64 {
	t.Helper()
	r, err := getURL(admin + "/metrics")
	if err != nil || r.Status != http.StatusOK {
		t.Fatalf("/metrics: %v %v", r, err)
	}
	var sum float64
	for _, line := range strings.Split(string(r.Body), "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if !ok {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// randID is prefix plus a random suffix, valid as a user_id.
func randID(prefix string) string { return prefix + "." + strings.ToLower(rand.Text()[:12]) }

// randPIN is a distinctive PIN that cannot occur by chance.
func randPIN(prefix string) string { return prefix + "-" + hex.EncodeToString(randBytes(6)) }

// recordKey is the store key of a backup.
var recordKey = kvproc.RecordKey

// revLen is the store's revision prefix in a bbolt value
// (vault/boltstore); the record follows it.
const revLen = 8

// checkDB opens the bbolt file read-only and runs bbolt's consistency check.
func checkDB(path string) error {
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		return fmt.Errorf("open %s read-only: %w", path, err)
	}
	defer db.Close()
	return db.View(func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("kv")) == nil {
			return errors.New(`no bucket "kv"`)
		}
		var errs []error
		for err := range tx.Check() {
			errs = append(errs, err)
		}
		return errors.Join(errs...)
	})
}

// editStore edits the bbolt file's "kv" bucket in one transaction, while no
// vault runs.
func editStore(t testing.TB, path string, edit func(kv *bolt.Bucket) error) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		kv := tx.Bucket([]byte("kv"))
		if kv == nil {
			return errors.New(`no bucket "kv"`)
		}
		return edit(kv)
	})
	if cerr := db.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("editing the store: %v", err)
	}
}
