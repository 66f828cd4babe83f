// Package kvproc runs the keyvault binary for the tests that drive it from
// outside (e2e, stress): it builds it, starts it, waits for it to serve,
// and stops or kills it, keeping everything it wrote.
package kvproc

import (
	"bufio"
	"bytes"
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
)

// ModuleRoot finds the directory holding go.mod, from the working
// directory up.
func ModuleRoot() (string, error) {
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

// Build builds ./cmd/keyvault of the module into dir and returns the
// binary's path. It is built without -race, whatever the tests run with:
// the product as shipped.
func Build(dir string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "keyvault")
	build := exec.Command("go", "build", "-o", bin, "./cmd/keyvault")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/keyvault: %v\n%s", err, out)
	}
	return bin, nil
}

// LogBuffer collects a process's output; safe for concurrent use.
type LogBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LogBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// Bytes returns a copy of everything written so far.
func (l *LogBuffer) Bytes() []byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return bytes.Clone(l.b.Bytes())
}

// Vault is one keyvault process.
type Vault struct {
	Dir     string // the dev directory it belongs to (for its token)
	API     string // base URL of the REST API
	Admin   string // base URL of /metrics, /healthz, /readyz
	Token   string // the dev client's bearer token (DIR/token), if any
	Started time.Duration

	t    testing.TB
	cmd  *exec.Cmd
	out  *LogBuffer
	done chan struct{}
	err  error // cmd.Wait's result; read only after done is closed
}

// Launch starts `bin args...` and returns at once; the test's cleanup
// kills it.
func Launch(t testing.TB, bin, dir string, args ...string) *Vault {
	t.Helper()
	v := &Vault{t: t, Dir: dir, out: &LogBuffer{}, done: make(chan struct{})}
	v.cmd = exec.Command(bin, args...)
	v.cmd.Stdout, v.cmd.Stderr = v.out, v.out
	if err := v.cmd.Start(); err != nil {
		t.Fatalf("start keyvault %s: %v", args[0], err)
	}
	go func() {
		v.err = v.cmd.Wait()
		close(v.done)
	}()
	t.Cleanup(v.Kill)
	return v
}

// Start launches keyvault and waits, at most timeout, until it logs
// "keyvault serving"; then API, Admin and Token are set.
func Start(t testing.TB, bin, dir string, timeout time.Duration, args ...string) *Vault {
	t.Helper()
	began := time.Now()
	v := Launch(t, bin, dir, args...)
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if api, admin, ok := ServingLine(v.out.Bytes()); ok {
			v.API, v.Admin = "http://"+api, "http://"+admin
			v.Started = time.Since(began)
			break
		}
		select {
		case <-v.done:
			t.Fatalf("keyvault %s exited before serving: %v\n%s", args[0], v.err, v.out.Bytes())
		case <-deadline.C:
			v.Kill()
			t.Fatalf("keyvault %s did not log \"keyvault serving\" within %v:\n%s", args[0], timeout, v.out.Bytes())
		case <-tick.C:
		}
	}
	if tok, err := os.ReadFile(filepath.Join(dir, "token")); err == nil {
		v.Token = strings.TrimSpace(string(tok))
	}
	return v
}

// ServingLine finds the JSON log line "keyvault serving" and its bound
// addresses.
func ServingLine(out []byte) (api, admin string, ok bool) {
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

// RefusalLine finds the log line of a vault that refuses its store at
// start (the rollback check), with the reason and the admin address.
func RefusalLine(out []byte) (reason, admin string, ok bool) {
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var l struct{ Msg, Reason, Admin string }
		if json.Unmarshal(sc.Bytes(), &l) == nil && l.Msg == "refusing to serve the store: rollback check failed" {
			return l.Reason, l.Admin, true
		}
	}
	return "", "", false
}

// WaitRefusal waits, at most timeout, for the vault to refuse its store,
// and returns the reason. Serving instead, or exiting, is an error.
func (v *Vault) WaitRefusal(timeout time.Duration) (reason, admin string, err error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		out := v.out.Bytes()
		if _, _, ok := ServingLine(out); ok {
			return "", "", errors.New("the vault served a store it should refuse")
		}
		if reason, admin, ok := RefusalLine(out); ok {
			return reason, admin, nil
		}
		select {
		case <-v.done:
			return "", "", fmt.Errorf("keyvault exited instead of refusing: %v", v.err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	return "", "", fmt.Errorf("no refusal within %v", timeout)
}

// Logs returns everything the process wrote to stdout and stderr so far.
func (v *Vault) Logs() []byte { return v.out.Bytes() }

// Exited is closed once the process has exited; Err then says how.
func (v *Vault) Exited() <-chan struct{} { return v.done }

// Err is the process's exit error; call it only after Exited is closed.
func (v *Vault) Err() error { return v.err }

// Signal sends sig to the process.
func (v *Vault) Signal(sig os.Signal) error { return v.cmd.Process.Signal(sig) }

// Stop sends SIGTERM and waits for a graceful exit, which must be status 0.
func (v *Vault) Stop() {
	v.t.Helper()
	select {
	case <-v.done:
		v.t.Fatalf("keyvault exited before SIGTERM: %v\n%s", v.err, Tail(v.out.Bytes(), 40))
	default:
	}
	if err := v.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		v.t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-v.done:
	case <-time.After(30 * time.Second):
		v.Kill()
		v.t.Fatalf("keyvault did not stop within 30s of SIGTERM:\n%s", Tail(v.out.Bytes(), 40))
	}
	if v.err != nil {
		v.t.Errorf("keyvault exited with %v after SIGTERM, want status 0:\n%s", v.err, Tail(v.out.Bytes(), 40))
	}
}

// Kill sends SIGKILL (if the process still runs) and waits for it.
func (v *Vault) Kill() {
	select {
	case <-v.done:
		return
	default:
	}
	_ = v.cmd.Process.Kill()
	<-v.done
}

// Pid is the process's ID.
func (v *Vault) Pid() int { return v.cmd.Process.Pid }

// RSS is the process's resident set size in bytes, from /proc.
func (v *Vault) RSS() (int64, error) {
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

// Tail returns the last n lines of out.
func Tail(out []byte, n int) []byte {
	lines := bytes.Split(bytes.TrimRight(out, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return bytes.Join(lines, []byte("\n"))
}

// DevArgs are the arguments of `keyvault dev` on dir with ports the
// kernel picks.
func DevArgs(dir string) []string {
	return []string{"dev", "--dir", dir, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"}
}

// LimitsOff is a ratelimit section with the rate limits and HSM admission
// shedding off.
const LimitsOff = `ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 0s
`

// DelayOff is the budget section of the dev config with the escalating
// delay off.
const DelayOff = `budget:
  default_max_attempts: 10
  max_attempts_limit: 20
  escalating_delay: {base: 0s}
`

// SetLimitsOff turns the rate limits, HSM admission shedding (LimitsOff)
// and the escalating delay (DelayOff) off in a dev config file, for tests
// about the budget, durability and the HSMs rather than the limits.
func SetLimitsOff(t testing.TB, path string) {
	t.Helper()
	SetRateLimits(t, path, LimitsOff)
	SetSection(t, path, "budget", DelayOff)
}

// SetRateLimits replaces the ratelimit section of a config file with
// block, editing the text so that the rest keeps its layout.
func SetRateLimits(t testing.TB, path, block string) {
	t.Helper()
	SetSection(t, path, "ratelimit", block)
}

// SetRollbackAnchor sets store.rollback_anchor in a dev config (on by
// default): tests of the record MACs edit a stopped vault's store and
// expect each edited record refused on its own, which anchoring would
// turn into a refusal of the whole store.
func SetRollbackAnchor(t testing.TB, path string, on bool) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines, n := strings.SplitAfter(string(data), "\n"), 0
	for i, l := range lines {
		if strings.HasPrefix(l, "  rollback_anchor: ") {
			lines[i], n = fmt.Sprintf("  rollback_anchor: %v\n", on), n+1
		}
	}
	if n != 1 {
		t.Fatalf("%d store.rollback_anchor lines in %s, want 1", n, path)
	}
	if err := os.WriteFile(path, []byte(strings.Join(lines, "")), 0o600); err != nil {
		t.Fatal(err)
	}
}

// SetSection replaces the top-level section name (its line "name:" and
// the indented lines under it) of a config file with block.
func SetSection(t testing.TB, path, name, block string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	head := name + ":\n"
	lines := strings.SplitAfter(string(data), "\n")
	if !slices.Contains(lines, head) {
		t.Fatalf("no %s section in %s", name, path)
	}
	var out []string
	in := false
	for _, l := range lines {
		switch {
		case l == head:
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

// RecordKey is the store key of a backup (vault/record.go): "r", then the
// namespace and the user ID, each after its one-byte length.
func RecordKey(ns, user string) []byte {
	k := []byte{'r', byte(len(ns))}
	k = append(k, ns...)
	k = append(k, byte(len(user)))
	return append(k, user...)
}

// Client speaks JSON to the API with a bearer token.
type Client struct {
	base, token string
	hc          *http.Client
}

// NewClient is a client of the API at base with the bearer token (none if
// empty), with connections enough for a load of concurrent callers.
func NewClient(base, token string) *Client {
	return &Client{base: base, token: token, hc: &http.Client{
		Timeout:   60 * time.Second,
		Transport: &http.Transport{MaxIdleConns: 256, MaxIdleConnsPerHost: 256, IdleConnTimeout: 30 * time.Second},
	}}
}

// Response is one HTTP answer, body read in full.
type Response struct {
	Status int
	Header http.Header
	Body   []byte
}

func (r Response) String() string {
	return fmt.Sprintf("%d %s", r.Status, bytes.TrimSpace(r.Body))
}

// JSON decodes the body as an object; numbers become float64.
func (r Response) JSON(t testing.TB) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(r.Body, &m); err != nil {
		t.Fatalf("body is not a JSON object: %v: %s", err, r.Body)
	}
	return m
}

// RawBody is sent as is; an io.Reader is sent with no length (chunked).
type RawBody []byte

// Call sends a request. body: nil (none), RawBody, io.Reader, or a value
// sent as JSON. hdr holds name/value pairs; an empty Authorization value
// removes the header.
func (c *Client) Call(method, path string, body any, hdr ...string) (Response, error) {
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case RawBody:
		rd = bytes.NewReader(b)
	case io.Reader:
		rd = struct{ io.Reader }{b} // hide the length: chunked encoding
	default:
		j, err := json.Marshal(b)
		if err != nil {
			return Response{}, err
		}
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		return Response{}, err
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i+1] == "" {
			req.Header.Del(hdr[i])
		} else {
			req.Header.Set(hdr[i], hdr[i+1])
		}
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return Response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return Response{}, err
	}
	return Response{Status: resp.StatusCode, Header: resp.Header, Body: b}, nil
}
