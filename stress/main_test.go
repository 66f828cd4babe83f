package stress

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The helpers below are the minimum of e2e/main_test.go that the scenarios
// need, copied rather than shared: e2e stays as it is, and a change there
// cannot silently weaken the stress checks.

// keyvaultBin is the binary TestMain builds.
var keyvaultBin string

// startTimeout bounds how long a vault may take to log "keyvault serving";
// a large store may take longer to open than the e2e tests' vaults.
const startTimeout = 60 * time.Second

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

func runMain(m *testing.M) int {
	root, err := findModuleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "stress:", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "keyvault-stress-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "stress:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	keyvaultBin = filepath.Join(dir, "keyvault")
	// Without -race, whatever the tests run with: the product as shipped.
	build := exec.Command("go", "build", "-o", keyvaultBin, "./cmd/keyvault")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "stress: go build ./cmd/keyvault: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

func findModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the test directory")
		}
		dir = parent
	}
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

// logBuffer collects a process's output; safe for concurrent use.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.b.Bytes())
}

// vault is one running keyvault process.
type vault struct {
	t       testing.TB
	Dir     string
	API     string
	Admin   string
	Token   string
	Started time.Duration // from exec to "keyvault serving"

	cmd  *exec.Cmd
	out  *logBuffer
	done chan struct{}
	err  error
}

// startDev runs `keyvault dev` on dir with the rate limits, the escalating
// delay and HSM admission shedding off (as e2e's startDev does): the
// scenarios are about the budget, durability and the HSMs, not the limits.
func startDev(t testing.TB, dir string) *vault {
	t.Helper()
	cfg := filepath.Join(dir, "keyvault.yaml")
	if _, err := os.Stat(cfg); errors.Is(err, os.ErrNotExist) {
		startVault(t, dir, devArgs(dir)...).Stop()
		setRateLimits(t, cfg, `ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 0s
  escalating_delay: {base: 0s}
`)
	}
	return startVault(t, dir, devArgs(dir)...)
}

func devArgs(dir string) []string {
	return []string{"dev", "--dir", dir, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}
}

// setRateLimits replaces the ratelimit section of a config file.
func setRateLimits(t testing.TB, path, block string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitAfter(string(data), "\n")
	if !slices.Contains(lines, "ratelimit:\n") {
		t.Fatalf("no ratelimit section in %s", path)
	}
	var out []string
	in := false
	for _, l := range lines {
		switch {
		case l == "ratelimit:\n":
			in = true
			out = append(out, block)
		case in && strings.HasPrefix(l, "  "):
		default:
			in = false
			out = append(out, l)
		}
	}
	if err := os.WriteFile(path, []byte(strings.Join(out, "")), 0o600); err != nil {
		t.Fatal(err)
	}
}

func startVault(t testing.TB, dir string, args ...string) *vault {
	t.Helper()
	v := &vault{t: t, Dir: dir, out: &logBuffer{}, done: make(chan struct{})}
	v.cmd = exec.Command(keyvaultBin, args...)
	v.cmd.Stdout, v.cmd.Stderr = v.out, v.out
	began := time.Now()
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start keyvault %s: %v", args[0], err)
	}
	go func() {
		v.err = v.cmd.Wait()
		close(v.done)
	}()
	t.Cleanup(v.Kill)
	deadline := time.NewTimer(startTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if api, admin, ok := servingLine(v.out.Bytes()); ok {
			v.API, v.Admin = "http://"+api, "http://"+admin
			v.Started = time.Since(began)
			break
		}
		select {
		case <-v.done:
			t.Fatalf("keyvault %s exited before serving: %v\n%s", args[0], v.err, v.out.Bytes())
		case <-deadline.C:
			v.Kill()
			t.Fatalf("keyvault %s did not log \"keyvault serving\" within %v:\n%s", args[0], startTimeout, v.out.Bytes())
		case <-tick.C:
		}
	}
	if tok, err := os.ReadFile(filepath.Join(dir, "token")); err == nil {
		v.Token = strings.TrimSpace(string(tok))
	}
	return v
}

func servingLine(out []byte) (api, admin string, ok bool) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if !bytes.HasPrefix(line, []byte("{")) {
			continue
		}
		var l struct {
			Msg   string `json:"msg"`
			API   string `json:"api"`
			Admin string `json:"admin"`
		}
		if json.Unmarshal(line, &l) == nil && l.Msg == "keyvault serving" && l.API != "" && l.Admin != "" {
			return l.API, l.Admin, true
		}
	}
	return "", "", false
}

// Stop sends SIGTERM and requires a prompt exit with status 0.
func (v *vault) Stop() {
	v.t.Helper()
	select {
	case <-v.done:
		v.t.Fatalf("keyvault exited before SIGTERM: %v\n%s", v.err, tail(v.out.Bytes(), 20))
	default:
	}
	if err := v.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		v.t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-v.done:
	case <-time.After(30 * time.Second):
		v.Kill()
		v.t.Fatalf("keyvault did not stop within 30s of SIGTERM:\n%s", tail(v.out.Bytes(), 20))
	}
	if v.err != nil {
		v.t.Errorf("keyvault exited with %v after SIGTERM, want status 0:\n%s", v.err, tail(v.out.Bytes(), 20))
	}
}

// Kill sends SIGKILL (if the process still runs) and waits for it.
func (v *vault) Kill() {
	select {
	case <-v.done:
		return
	default:
	}
	_ = v.cmd.Process.Kill()
	<-v.done
}

// RSS is the process's resident set size in bytes, from /proc.
func (v *vault) RSS() (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", v.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS in /proc status")
}

// tail returns the last n lines of out.
func tail(out []byte, n int) []byte {
	lines := bytes.Split(bytes.TrimRight(out, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return bytes.Join(lines, []byte("\n"))
}

// client speaks JSON to the API with a bearer token.
type client struct {
	base  string
	token string
	hc    *http.Client
}

func newClient(base, token string) *client {
	return &client{base: base, token: token, hc: &http.Client{
		Timeout:   60 * time.Second,
		Transport: &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256, IdleConnTimeout: 30 * time.Second},
	}}
}

// response is one HTTP answer, body read in full.
type response struct {
	Status int
	Header http.Header
	Body   []byte
}

func (r response) String() string { return fmt.Sprintf("%d %s", r.Status, bytes.TrimSpace(r.Body)) }

// call sends a request with body (nil: none) sent as JSON.
func (c *client) call(method, path string, body any, hdr ...string) (response, error) {
	var rd io.Reader
	if body != nil {
		j, err := json.Marshal(body)
		if err != nil {
			return response{}, err
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		return response{}, err
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, err
	}
	return response{Status: resp.StatusCode, Header: resp.Header, Body: b}, nil
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

func (r response) answer() (answer, error) {
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

// recordKey is the store key of a backup (vault/record.go).
func recordKey(ns, user string) []byte {
	k := []byte{'r', byte(len(ns))}
	k = append(k, ns...)
	k = append(k, byte(len(user)))
	return append(k, user...)
}

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
