package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
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

// keyvaultBin is the binary TestMain builds; moduleRoot is the repository
// root it is built from.
var keyvaultBin, moduleRoot string

// startTimeout bounds how long a vault may take to log "keyvault serving".
const startTimeout = 20 * time.Second

func TestMain(m *testing.M) { os.Exit(runMain(m)) }

func runMain(m *testing.M) int {
	root, err := kvproc.ModuleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	moduleRoot = root
	dir, err := os.MkdirTemp("", "keyvault-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer os.RemoveAll(dir)
	if keyvaultBin, err = kvproc.Build(dir); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	return m.Run()
}

// logBuffer collects a process's output; vault is one keyvault process
// (internal/kvproc, shared with the stress scenarios).
type (
	logBuffer = kvproc.LogBuffer
	vault     = kvproc.Vault
)

// startDev runs `keyvault dev` on dir with ports picked by the kernel,
// with the rate limits, the escalating delay and HSM admission shedding
// off: the tests that storm one backup are about the guess budget alone.
// On a new dir it sets the dir up with a first run, turns the limits off in
// its keyvault.yaml, and starts again. TestRateLimits runs with the
// defaults (startDevLimited).
func startDev(t testing.TB, dir string) *vault { t.Helper(); return startDevWith(t, dir, true) }

// startDevUnanchored is startDev with rollback anchoring off, for tests of
// the record MACs that edit records of a stopped vault (see
// kvproc.SetRollbackAnchor).
func startDevUnanchored(t testing.TB, dir string) *vault {
	t.Helper()
	return startDevWith(t, dir, false)
}

func startDevWith(t testing.TB, dir string, anchored bool) *vault {
	t.Helper()
	cfg := filepath.Join(dir, "keyvault.yaml")
	if _, err := os.Stat(cfg); errors.Is(err, os.ErrNotExist) {
		startDevLimited(t, dir).Stop()
		kvproc.SetLimitsOff(t, cfg)
		if !anchored {
			kvproc.SetRollbackAnchor(t, cfg, false)
		}
	}
	return startDevLimited(t, dir)
}

// startDevLimited runs `keyvault dev` on dir as it is: on a new dir, with
// the default rate limits.
func startDevLimited(t testing.TB, dir string) *vault {
	t.Helper()
	return startVault(t, dir, kvproc.DevArgs(dir)...)
}

// setRateLimits replaces the ratelimit section of a config file with
// block, editing the text so that the rest keeps its layout.
var setRateLimits = kvproc.SetRateLimits

// startServe runs `keyvault serve --config cfg`; dir is the dev directory
// the config belongs to (for its token file).
func startServe(t testing.TB, dir, cfg string) *vault {
	t.Helper()
	return startVault(t, dir, "serve", "--config", cfg)
}

func startVault(t testing.TB, dir string, args ...string) *vault {
	t.Helper()
	return kvproc.Start(t, keyvaultBin, dir, startTimeout, args...)
}

// servingLine finds the JSON log line "keyvault serving".
var servingLine = kvproc.ServingLine

// client speaks JSON to the API with a bearer token; response is one
// answer; rawBody is a body sent as is (internal/kvproc, shared with the
// stress scenarios). A client of the API holds every answer to
// api/openapi.yaml (checkAgainstDoc) and fails its test on one that breaks
// it.
type client struct {
	*kvproc.Client
	doc *docReporter // nil: answers are not checked (the admin listener)
}

type (
	response = kvproc.Response
	rawBody  = kvproc.RawBody
)

// newClient is a client of the API at base whose answers are checked
// against the document; a breach fails t, from any goroutine, until t's
// cleanup.
func newClient(t testing.TB, base, token string) *client {
	rep := &docReporter{t: t}
	t.Cleanup(rep.stop)
	return &client{Client: kvproc.NewClient(base, token), doc: rep}
}

// newAdminClient is a client of the admin listener, which the document
// does not describe.
func newAdminClient(base, token string) *client {
	return &client{Client: kvproc.NewClient(base, token)}
}

// docReporter fails a test with a document breach; after the test's
// cleanup (a request still in flight from a goroutine it left) it drops
// the report, as t may no longer be used then.
type docReporter struct {
	mu      sync.Mutex
	t       testing.TB
	stopped bool
}

func (d *docReporter) stop() { d.mu.Lock(); d.stopped = true; d.mu.Unlock() }

func (d *docReporter) errorf(format string, args ...any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.stopped {
		d.t.Errorf(format, args...)
	}
}

func (c *client) call(method, path string, body any, hdr ...string) (response, error) {
	r, err := c.Call(method, path, body, hdr...)
	if err == nil && c.doc != nil {
		if bad := checkAgainstDoc(method, path, r); bad != nil {
			c.doc.errorf("%s %s answered %s, which breaks api/openapi.yaml: %v", method, path, r, bad)
		}
	}
	return r, err
}

// do is call that fails the test on a transport error.
func (c *client) do(t testing.TB, method, path string, body any, hdr ...string) response {
	t.Helper()
	r, err := c.call(method, path, body, hdr...)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return r
}

func backupPath(user string) string { return "/v1/backups/" + user }

// enroll PUTs a backup; maxAttempts 0 leaves the field out.
func (c *client) enroll(t testing.TB, user string, secret []byte, pin string, maxAttempts int, hdr ...string) response {
	t.Helper()
	body := map[string]any{"secret": b64(secret), "pin": pin}
	if maxAttempts != 0 {
		body["max_attempts"] = maxAttempts
	}
	return c.do(t, http.MethodPut, backupPath(user), body, hdr...)
}

func (c *client) recover(t testing.TB, user, pin string) response {
	t.Helper()
	return c.do(t, http.MethodPost, backupPath(user)+"/recover", map[string]string{"pin": pin})
}

func (c *client) status(t testing.TB, user string) response {
	t.Helper()
	return c.do(t, http.MethodGet, backupPath(user), nil)
}

func (c *client) changePIN(t testing.TB, user, pin, newPIN string, hdr ...string) response {
	t.Helper()
	return c.do(t, http.MethodPost, backupPath(user)+"/pin", map[string]string{"pin": pin, "new_pin": newPIN}, hdr...)
}

func (c *client) delete(t testing.TB, user string, hdr ...string) response {
	t.Helper()
	return c.do(t, http.MethodDelete, backupPath(user), nil, hdr...)
}

// mustEnroll enrolls and requires the given status.
func (c *client) mustEnroll(t testing.TB, want int, user string, secret []byte, pin string, maxAttempts int) map[string]any {
	t.Helper()
	r := c.enroll(t, user, secret, pin, maxAttempts)
	if r.Status != want {
		t.Fatalf("PUT %s: got %v, want %d", user, r, want)
	}
	return r.JSON(t)
}

// mustRecover requires a 200 carrying secret.
func (c *client) mustRecover(t testing.TB, user, pin string, secret []byte) map[string]any {
	t.Helper()
	r := c.recover(t, user, pin)
	if r.Status != http.StatusOK {
		t.Fatalf("recover %s: got %v, want 200", user, r)
	}
	m := r.JSON(t)
	if m["secret"] != b64(secret) {
		t.Fatalf("recover %s: got secret %v, want %s", user, m["secret"], b64(secret))
	}
	return m
}

// mustStatus requires a 200 to GET and returns its body.
func (c *client) mustStatus(t testing.TB, user string) map[string]any {
	t.Helper()
	r := c.status(t, user)
	if r.Status != http.StatusOK {
		t.Fatalf("GET %s: got %v, want 200", user, r)
	}
	return r.JSON(t)
}

// problemCodes are the machine-readable codes of docs/api.md.
var problemCodes = map[string]bool{
	"invalid_request": true, "unauthorized": true, "not_found": true, "wrong_pin": true, "locked": true,
	"precondition_failed": true, "payload_too_large": true, "rate_limited": true, "unavailable": true,
	"integrity_error": true, "internal": true,
}

// wantProblem checks an RFC 9457 problem document with status and code
// (code "": any of docs/api.md's codes).
func wantProblem(t testing.TB, what string, r response, status int, code string) map[string]any {
	t.Helper()
	if r.Status != status {
		t.Errorf("%s: got %v, want %d %s", what, r, status, code)
		return nil
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/problem+json" {
		t.Errorf("%s: Content-Type %q, want application/problem+json", what, r.Header.Get("Content-Type"))
	}
	if r.Header.Get("X-Request-Id") == "" {
		t.Errorf("%s: no X-Request-Id", what)
	}
	var m map[string]any
	if err := json.Unmarshal(r.Body, &m); err != nil {
		t.Errorf("%s: problem body is not JSON: %v: %s", what, err, r.Body)
		return nil
	}
	for _, k := range []string{"type", "title", "detail", "code"} {
		if s, ok := m[k].(string); !ok || s == "" {
			t.Errorf("%s: problem field %q is %v, want a non-empty string: %s", what, k, m[k], r.Body)
		}
	}
	if m["status"] != float64(status) {
		t.Errorf("%s: problem status %v, want %d", what, m["status"], status)
	}
	switch c, _ := m["code"].(string); {
	case code == "" && !problemCodes[c]:
		t.Errorf("%s: problem code %q is none of docs/api.md's: %s", what, c, r.Body)
	case code != "" && c != code:
		t.Errorf("%s: problem code %q, want %s: %s", what, c, code, r.Body)
	}
	if _, ok := m["secret"]; ok {
		t.Errorf("%s: problem carries a secret field: %s", what, r.Body)
	}
	return m
}

// num reads an integer field of a decoded JSON object.
func num(t testing.TB, m map[string]any, key string) int {
	t.Helper()
	f, ok := m[key].(float64)
	if !ok {
		t.Fatalf("field %q is %v (%T), want a number; object %v", key, m[key], m[key], m)
	}
	return int(f)
}

// wantKeys requires the object to have exactly these keys; a key written
// "?key" is allowed but not required.
func wantKeys(t testing.TB, what string, m map[string]any, keys ...string) {
	t.Helper()
	want := map[string]bool{}
	for _, k := range keys {
		k, optional := strings.CutPrefix(k, "?")
		want[k] = true
		if _, ok := m[k]; !ok && !optional {
			t.Errorf("%s: field %q missing from %v", what, k, m)
		}
	}
	for k := range m {
		if !want[k] {
			t.Errorf("%s: unexpected field %q in %v", what, k, m)
		}
	}
}

func get(t testing.TB, url string) response {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return response{Status: resp.StatusCode, Header: resp.Header, Body: b}
}

// sample is one Prometheus text-format sample.
type sample struct {
	name   string
	labels map[string]string
	value  float64
}

// metrics fetches and parses /metrics; it also returns the raw text.
func metrics(t testing.TB, admin string) ([]sample, string) {
	t.Helper()
	r := get(t, admin+"/metrics")
	if r.Status != http.StatusOK {
		t.Fatalf("/metrics: %v", r)
	}
	s, err := parseMetrics(string(r.Body))
	if err != nil {
		t.Fatalf("/metrics: %v", err)
	}
	return s, string(r.Body)
}

// parseMetrics reads the Prometheus text format (0.0.4): enough of it for
// counters, gauges and histograms.
func parseMetrics(text string) ([]sample, error) {
	var out []sample
	for n, line := range strings.Split(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		s := sample{labels: map[string]string{}}
		i := strings.IndexAny(line, "{ ")
		if i < 0 {
			return nil, fmt.Errorf("line %d: %q", n+1, line)
		}
		s.name, line = line[:i], line[i:]
		if line[0] == '{' {
			line = line[1:]
			for {
				line = strings.TrimLeft(line, ", ")
				if strings.HasPrefix(line, "}") {
					line = line[1:]
					break
				}
				eq := strings.Index(line, `="`)
				if eq < 0 {
					return nil, fmt.Errorf("line %d: bad labels", n+1)
				}
				name := line[:eq]
				line = line[eq+2:]
				var val strings.Builder
				closed := false
				for j := 0; j < len(line); j++ {
					switch c := line[j]; {
					case c == '\\' && j+1 < len(line):
						j++
						switch line[j] {
						case 'n':
							val.WriteByte('\n')
						default:
							val.WriteByte(line[j])
						}
					case c == '"':
						line, closed = line[j+1:], true
					default:
						val.WriteByte(c)
					}
					if closed {
						break
					}
				}
				if !closed {
					return nil, fmt.Errorf("line %d: unterminated label value", n+1)
				}
				s.labels[name] = val.String()
			}
		}
		fields := strings.Fields(line)
		if len(fields) == 0 {
			return nil, fmt.Errorf("line %d: no value", n+1)
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			return nil, fmt.Errorf("line %d: value: %v", n+1, err)
		}
		s.value = v
		out = append(out, s)
	}
	return out, nil
}

// metricSum adds up the samples of name whose labels include want.
func metricSum(samples []sample, name string, want map[string]string) (sum float64, found bool) {
	for _, s := range samples {
		if s.name != name {
			continue
		}
		match := true
		for k, v := range want {
			if s.labels[k] != v {
				match = false
			}
		}
		if match {
			sum += s.value
			found = true
		}
	}
	return sum, found
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// randID is prefix plus a random suffix, valid as a user_id.
func randID(prefix string) string {
	return prefix + "." + strings.ToLower(rand.Text()[:12])
}

// randPIN is a distinctive PIN that cannot occur by chance.
func randPIN(prefix string) string { return prefix + "-" + hex.EncodeToString(randBytes(6)) }

// recordKey is the store key of a backup.
var recordKey = kvproc.RecordKey

// Offsets in a bbolt value: the 8-byte store revision, then the record
// (vault/record.go): format, flags, generation, max_attempts, guesses,
// forgiven, refunds, ...
const (
	offFlags    = 8 + 1
	offMax      = 8 + 1 + 1 + 8
	offGuesses  = offMax + 4
	offForgiven = offGuesses + 4
	offRefunds  = offForgiven + 4
)

// counters reads max_attempts, guesses, forgiven and refunds from a value.
func counters(v []byte) (maxAttempts, guesses, forgiven, refunds uint32) {
	return binary.BigEndian.Uint32(v[offMax:]), binary.BigEndian.Uint32(v[offGuesses:]),
		binary.BigEndian.Uint32(v[offForgiven:]), binary.BigEndian.Uint32(v[offRefunds:])
}

// checkDB opens the bbolt file read-only and runs bbolt's consistency check.
func checkDB(t testing.TB, path string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatalf("open %s read-only: %v", path, err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		if tx.Bucket([]byte("kv")) == nil {
			return errors.New(`no bucket "kv"`)
		}
		var errs []error
		for err := range tx.Check() {
			errs = append(errs, err)
		}
		return errors.Join(errs...)
	})
	if err != nil {
		t.Fatalf("bbolt check of %s: %v", path, err)
	}
}

// encodings are the forms a leaked secret or PIN may take in text.
var encodings = []struct {
	name string
	enc  func([]byte) string
}{
	{"raw", func(b []byte) string { return string(b) }},
	{"standard base64", base64.StdEncoding.EncodeToString},
	{"standard base64 unpadded", base64.RawStdEncoding.EncodeToString},
	{"URL base64", base64.URLEncoding.EncodeToString},
	{"URL base64 unpadded", base64.RawURLEncoding.EncodeToString},
	{"hex", hex.EncodeToString},
	{"HEX", func(b []byte) string { return strings.ToUpper(hex.EncodeToString(b)) }},
}

// findEncoded returns the name of the first encoding of needle found in
// hay, or "".
func findEncoded(hay, needle []byte) string {
	for _, e := range encodings {
		if bytes.Contains(hay, []byte(e.enc(needle))) {
			return e.name
		}
	}
	return ""
}

// takeTokensAway renames the dev directory's SoftHSM token directory, as an
// HSM that disappears; restore (also run at cleanup) puts it back once.
func takeTokensAway(t *testing.T, dir string) (restore func()) {
	t.Helper()
	tokens, away := filepath.Join(dir, "tokens"), filepath.Join(dir, "tokens.away")
	if err := os.Rename(tokens, away); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			if err := os.Rename(away, tokens); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Cleanup(restore)
	return restore
}

// needTool skips a test whose tool is missing, except under CI=true, where
// it fails: CI never passes by skipping a tier.
func needTool(t testing.TB, what string, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and %s cannot run: %v", what, err)
	}
	t.Skipf("skipping %s outside CI (CI=true makes this a failure): %v", what, err)
}
