package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keyvault/keyvault/ratelimit"
	"github.com/keyvault/keyvault/vault"
)

// stubBackups answers every call with err, recording what it was given.
// The real vault behind the real router is tested end to end in ../e2e.
type stubBackups struct {
	err       error
	calls     int
	ns        string
	pin       []byte
	maxAttem  int
	pre       vault.Precondition
	secretOut []byte
	refused   []string
	precheck  error
}

func (s *stubBackups) Enroll(_ context.Context, ns, _ string, _, pin []byte, max int, pre vault.Precondition) (vault.Backup, bool, error) {
	s.calls, s.ns, s.pin, s.maxAttem, s.pre = s.calls+1, ns, append([]byte(nil), pin...), max, pre
	return vault.Backup{Generation: 3, CreatedAt: time.Unix(0, 0)}, true, s.err
}

func (s *stubBackups) Recover(_ context.Context, ns, _ string, pin []byte) ([]byte, int, error) {
	s.calls, s.ns, s.pin = s.calls+1, ns, append([]byte(nil), pin...)
	if s.err != nil {
		return nil, 0, s.err
	}
	return append([]byte(nil), s.secretOut...), 7, nil
}

func (s *stubBackups) CountRefused(op, _ string) { s.refused = append(s.refused, op) }

func (s *stubBackups) Precheck(context.Context, string, string, vault.Precondition) error {
	return s.precheck
}

func (s *stubBackups) Status(_ context.Context, ns, _ string) (vault.Backup, error) {
	s.calls, s.ns = s.calls+1, ns
	return vault.Backup{Generation: 2}, s.err
}

func (s *stubBackups) Delete(_ context.Context, ns, _ string, pre vault.Precondition) error {
	s.calls, s.ns, s.pre = s.calls+1, ns, pre
	return s.err
}

func (s *stubBackups) ChangePIN(_ context.Context, ns, _ string, pin, _ []byte, pre vault.Precondition) (vault.Backup, error) {
	s.calls, s.ns, s.pin, s.pre = s.calls+1, ns, append([]byte(nil), pin...), pre
	return vault.Backup{Generation: 4}, s.err
}

func newTestRouter(b Backups, reg prometheus.Registerer) http.Handler {
	return newTestRouterWith(b, Options{Registerer: reg})
}

// newTestRouterWith is newTestRouter with opts, whose Clients it sets:
// client a (tokens token-a and token-a-next) and client b (token-b).
func newTestRouterWith(b Backups, opts Options) http.Handler {
	tokA, tokB := sha256.Sum256([]byte("token-a")), sha256.Sum256([]byte("token-b"))
	tokA2 := sha256.Sum256([]byte("token-a-next"))
	opts.Clients = []Client{
		{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{tokA, tokA2}},
		{Name: "b", Namespace: "ns-b", TokenHashes: [][32]byte{tokB}},
	}
	return NewRouter(b, opts)
}

func do(h http.Handler, method, path, token, body string, hdr ...string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	if body != "" {
		r.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i+1] == "" {
			r.Header.Del(hdr[i])
		} else {
			r.Header.Set(hdr[i], hdr[i+1])
		}
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	return w
}

func decodeProblem(t *testing.T, w *httptest.ResponseRecorder) problem {
	t.Helper()
	if ct := w.Header().Get("Content-Type"); ct != "application/problem+json" {
		t.Fatalf("Content-Type %q, want application/problem+json; body %s", ct, w.Body)
	}
	var p problem
	if err := json.Unmarshal(w.Body.Bytes(), &p); err != nil {
		t.Fatal(err)
	}
	if p.Status != w.Code || p.Type == "" || p.Title == "" || p.Detail == "" || p.Code == "" {
		t.Fatalf("incomplete problem document %+v for status %d", p, w.Code)
	}
	return p
}

func TestErrorMapping(t *testing.T) {
	t.Parallel()
	cases := []struct {
		err        error
		status     int
		code       string
		retryAfter bool
	}{
		{fmt.Errorf("recover: %w", &vault.WrongPINError{Remaining: 2}), 403, "wrong_pin", false},
		{fmt.Errorf("recover: %w", vault.ErrLocked), 410, "locked", false},
		{vault.ErrNotFound, 404, "not_found", false},
		{fmt.Errorf("x: %w", vault.ErrPrecondition), 412, "precondition_failed", false},
		{fmt.Errorf("x: %w: y", vault.ErrUnavailable), 503, "unavailable", true},
		{fmt.Errorf("x: %w", vault.ErrIntegrity), 500, "integrity_error", false},
		{fmt.Errorf("%w: pin: must be 4 to 128 bytes", vault.ErrInvalid), 400, "invalid_request", false},
		{errors.New("store: disk on fire at /secret/path"), 500, "internal", false},
	}
	for _, c := range cases {
		h := newTestRouter(&stubBackups{err: c.err}, nil)
		w := do(h, "POST", "/v1/backups/alice/recover", "token-a", `{"pin":"1234"}`)
		if w.Code != c.status {
			t.Errorf("%v: status %d, want %d", c.err, w.Code, c.status)
			continue
		}
		p := decodeProblem(t, w)
		if p.Code != c.code {
			t.Errorf("%v: code %q, want %q", c.err, p.Code, c.code)
		}
		if (w.Header().Get("Retry-After") != "") != c.retryAfter {
			t.Errorf("%v: Retry-After %q", c.err, w.Header().Get("Retry-After"))
		}
		if c.code == "wrong_pin" && (p.AttemptsRemaining == nil || *p.AttemptsRemaining != 2) {
			t.Errorf("wrong_pin without attempts_remaining 2: %+v", p)
		}
		if c.code == "internal" && strings.Contains(w.Body.String(), "disk on fire") {
			t.Error("internal error text reached the body")
		}
	}
}

func TestAuthAndNamespaces(t *testing.T) {
	t.Parallel()
	s := &stubBackups{}
	h := newTestRouter(s, nil)
	for _, tok := range []string{"", "nope", "token-a ", "token-"} {
		w := do(h, "GET", "/v1/backups/alice", tok, "")
		if w.Code != 401 || decodeProblem(t, w).Code != "unauthorized" || w.Header().Get("WWW-Authenticate") == "" {
			t.Errorf("token %q: %d %s", tok, w.Code, w.Body)
		}
	}
	if s.calls != 0 {
		t.Fatal("an unauthenticated request reached the vault")
	}
	if w := do(h, "GET", "/v1/backups/alice", "", "", "Authorization", "bearer token-b"); w.Code != 200 || s.ns != "ns-b" {
		t.Errorf("the auth scheme is case-insensitive (RFC 9110): %d", w.Code)
	}
	for tok, ns := range map[string]string{"token-a": "ns-a", "token-a-next": "ns-a", "token-b": "ns-b"} {
		if w := do(h, "GET", "/v1/backups/alice", tok, ""); w.Code != 200 || s.ns != ns {
			t.Errorf("token %s: status %d namespace %q, want 200 %q", tok, w.Code, s.ns, ns)
		}
	}
}

func TestRequestValidation(t *testing.T) {
	t.Parallel()
	big := `{"pin":"` + strings.Repeat("a", MaxBodyBytes) + `"}`
	cases := []struct {
		name, method, path, body string
		hdr                      []string
		status                   int
	}{
		{"bad user_id", "GET", "/v1/backups/a%20b", "", nil, 400},
		{"long user_id", "GET", "/v1/backups/" + strings.Repeat("a", 129), "", nil, 400},
		{"unknown field", "POST", "/v1/backups/u/recover", `{"pin":"1234","x":1}`, nil, 400},
		{"field name in another case", "POST", "/v1/backups/u/recover", `{"PIN":"1234"}`, nil, 400},
		{"field given twice", "POST", "/v1/backups/u/recover", `{"pin":"1234","pin":"5678"}`, nil, 400},
		{"trailing data", "POST", "/v1/backups/u/recover", `{"pin":"1234"} {}`, nil, 400},
		{"not an object", "POST", "/v1/backups/u/recover", `["1234"]`, nil, 400},
		{"empty body", "POST", "/v1/backups/u/recover", ``, nil, 400},
		{"pin not a string", "POST", "/v1/backups/u/recover", `{"pin":1234}`, nil, 400},
		{"pin not UTF-8", "POST", "/v1/backups/u/recover", "{\"pin\":\"\xff\xfe12\"}", nil, 400},
		{"pin not UTF-8, escaped path", "POST", "/v1/backups/u/recover", "{\"pin\":\"\\u0041\xff12\"}", nil, 400},
		{"too large", "POST", "/v1/backups/u/recover", big, nil, 413},
		{"bad base64", "PUT", "/v1/backups/u", `{"secret":"!!!","pin":"1234"}`, nil, 400},
		{"unpadded base64", "PUT", "/v1/backups/u", `{"secret":"YWI","pin":"1234"}`, nil, 400},
		{"bad If-Match", "DELETE", "/v1/backups/u", "", []string{"If-Match", `"x"`}, 400},
		{"If-None-Match on DELETE", "DELETE", "/v1/backups/u", "", []string{"If-None-Match", "*"}, 400},
		{"unknown route", "GET", "/v1/nothing", "", nil, 404},
		{"wrong method", "PATCH", "/v1/backups/u", "", nil, 405},
	}
	for _, c := range cases {
		s := &stubBackups{}
		w := do(newTestRouter(s, nil), c.method, c.path, "token-a", c.body, c.hdr...)
		if w.Code != c.status {
			t.Errorf("%s: status %d, want %d: %s", c.name, w.Code, c.status, w.Body)
			continue
		}
		decodeProblem(t, w)
		if s.calls != 0 {
			t.Errorf("%s: reached the vault", c.name)
		}
	}
}

func TestRequestsReachVault(t *testing.T) {
	t.Parallel()
	s := &stubBackups{secretOut: []byte("0123456789abcdef")}
	h := newTestRouter(s, nil)

	w := do(h, "PUT", "/v1/backups/u", "token-a", `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"12\u00e934"}`, "If-None-Match", "*")
	if w.Code != 201 || !s.pre.IfNoneMatch || s.maxAttem != 0 || string(s.pin) != "12é34" {
		t.Fatalf("PUT: %d %+v %q", w.Code, s, s.pin)
	}
	if w.Header().Get("ETag") != `"3"` {
		t.Errorf("ETag %q", w.Header().Get("ETag"))
	}
	if w := do(h, "PUT", "/v1/backups/u", "token-a", `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234","max_attempts":0}`); s.maxAttem >= 1 {
		t.Fatalf("explicit max_attempts 0 passed as %d (status %d)", s.maxAttem, w.Code)
	}
	w = do(h, "POST", "/v1/backups/u/recover", "token-a", `{"pin":"1234"}`)
	var rec struct {
		Secret            string `json:"secret"`
		AttemptsRemaining int    `json:"attempts_remaining"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &rec); err != nil || rec.Secret != "MDEyMzQ1Njc4OWFiY2RlZg==" || rec.AttemptsRemaining != 7 {
		t.Fatalf("recover body %s: %v", w.Body, err)
	}
	if w := do(h, "POST", "/v1/backups/u/pin", "token-a", `{"pin":"1234","new_pin":"5678"}`, "If-Match", `"9"`); w.Code != 200 || s.pre.IfMatch != 9 {
		t.Fatalf("pin: %d %+v", w.Code, s.pre)
	}
	if w := do(h, "DELETE", "/v1/backups/u", "token-a", ""); w.Code != 204 {
		t.Fatalf("DELETE: %d", w.Code)
	}
}

func TestRequestIDAndMetrics(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	h := newTestRouter(&stubBackups{}, reg)
	w := do(h, "GET", "/v1/backups/carol", "token-a", "", "X-Request-Id", "abc-123")
	if w.Header().Get("X-Request-Id") != "abc-123" {
		t.Fatalf("request ID not echoed: %q", w.Header().Get("X-Request-Id"))
	}
	w = do(h, "GET", "/v1/backups/carol", "token-a", "", "X-Request-Id", "bad id\n")
	if id := w.Header().Get("X-Request-Id"); id == "" || strings.ContainsAny(id, " \n") {
		t.Fatalf("bad request ID not replaced: %q", id)
	}
	if w := do(h, "GET", "/v1/backups/carol", "", ""); w.Header().Get("X-Request-Id") == "" {
		t.Fatal("no request ID on a 401")
	}
	if n := requestCount(t, reg, "/v1/backups/{user_id}", "GET", "200"); n != 2 {
		t.Fatalf("requests by route pattern: %v, want 2", n)
	}
	if problems, err := testutil.CollectAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %+v", err, problems)
	}
}

// requestCount reads keyvault_http_requests_total for one label set, and
// fails the test if any label value holds the user_id used above.
func requestCount(t *testing.T, reg *prometheus.Registry, route, method, code string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, p := range m.GetLabel() {
				if strings.Contains(p.GetValue(), "carol") {
					t.Fatalf("a user_id reached label %s of %s", p.GetName(), mf.GetName())
				}
				l[p.GetName()] = p.GetValue()
			}
			if mf.GetName() == "keyvault_http_requests_total" && l["route"] == route && l["method"] == method && l["code"] == code {
				n += m.GetCounter().GetValue()
			}
		}
	}
	return n
}

func TestAdmin(t *testing.T) {
	t.Parallel()
	ready := errors.New("no healthy HSM member")
	h := NewAdminRouter(prometheus.NewRegistry(), func() error { return ready })
	if w := do(h, "GET", "/healthz", "", ""); w.Code != 200 {
		t.Fatalf("healthz %d", w.Code)
	}
	if w := do(h, "GET", "/readyz", "", ""); w.Code != 503 || !strings.Contains(w.Body.String(), "no healthy HSM member") {
		t.Fatalf("readyz %d %s", w.Code, w.Body)
	}
	ready = nil
	if w := do(h, "GET", "/readyz", "", ""); w.Code != 200 {
		t.Fatalf("readyz %d", w.Code)
	}
	if w := do(h, "GET", "/metrics", "", ""); w.Code != 200 {
		t.Fatalf("metrics %d", w.Code)
	}
}

// panicky panics in every call, as a bug would.
type panicky struct{ stubBackups }

func (panicky) Status(context.Context, string, string) (vault.Backup, error) {
	panic("the secret is 1234") // a value that must not reach the log or body
}

func TestPanicIsA500(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	h := newTestRouter(&panicky{}, reg)
	w := do(h, "GET", "/v1/backups/u", "token-a", "")
	if w.Code != 500 || decodeProblem(t, w).Code != "internal" || strings.Contains(w.Body.String(), "1234") {
		t.Fatalf("panic: %d %s", w.Code, w.Body)
	}
	if n := requestCount(t, reg, "/v1/backups/{user_id}", "GET", "500"); n != 1 {
		t.Fatalf("the panic was counted as %v 500s, want 1", n)
	}
}

// The limits over HTTP, with the real ratelimit package on a fake clock:
// each limiter answers 429 rate_limited with a truthful integer
// Retry-After, refused guesses never reach the vault, and a retry exactly
// Retry-After later is admitted.
func TestRateLimitsOverHTTP(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	reg := prometheus.NewRegistry()
	limits := ratelimit.New(ratelimit.Config{
		GuessesPerUser:        perMinute(2, 2),
		RequestsPerClient:     perSecond(1, 20),
		WrongGuessesPerClient: perMinute(1, 3),
	}, ratelimit.Options{Now: clock, Registerer: reg})
	s := &stubBackups{secretOut: []byte("0123456789abcdef")}
	tokA := sha256.Sum256([]byte("token-a"))
	h := NewRouter(s, Options{Registerer: reg, Limits: limits, Clients: []Client{{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{tokA}}}})
	limited := func(what string, w *httptest.ResponseRecorder, retryAfter string) {
		t.Helper()
		if w.Code != 429 || decodeProblem(t, w).Code != "rate_limited" || w.Header().Get("Retry-After") != retryAfter {
			t.Fatalf("%s: %d Retry-After %q, want 429 rate_limited with Retry-After %s: %s", what, w.Code, w.Header().Get("Retry-After"), retryAfter, w.Body)
		}
	}
	recoverAs := func(user string) *httptest.ResponseRecorder {
		return do(h, "POST", "/v1/backups/"+user+"/recover", "token-a", `{"pin":"1234"}`)
	}

	// Per user: a burst of 2, then one guess per 30s.
	for range 2 {
		if w := recoverAs("alice"); w.Code != 200 {
			t.Fatalf("guess within the burst: %d", w.Code)
		}
	}
	calls := s.calls
	limited("third guess on alice", recoverAs("alice"), "30")
	if s.calls != calls || len(s.refused) != 1 || s.refused[0] != vault.OpRecover {
		t.Fatalf("a refused guess reached the vault, or was not noted (%v)", s.refused)
	}
	if w := recoverAs("bob"); w.Code != 200 {
		t.Fatalf("another user is not limited by alice's bucket: %d", w.Code)
	}
	advance(29 * time.Second)
	limited("alice after 29s", recoverAs("alice"), "1")
	advance(time.Second)
	if w := recoverAs("alice"); w.Code != 200 {
		t.Fatalf("alice exactly when Retry-After said: %d", w.Code)
	}
	// A malformed guess takes no token: it is a 400 before the limits.
	if w := do(h, "POST", "/v1/backups/carol/recover", "token-a", `{"pin":"12"}`); w.Code != 400 {
		t.Fatalf("short PIN: %d", w.Code)
	}
	for range 2 {
		if w := recoverAs("carol"); w.Code != 200 {
			t.Fatalf("carol's burst after a 400: %d", w.Code)
		}
	}
	// Guesses that check nothing cost nothing: refused by the precheck
	// (no backup), or by the vault itself (deleted meanwhile).
	s.precheck = vault.ErrNotFound
	for range 4 {
		if w := recoverAs("dave"); w.Code != 404 {
			t.Fatalf("precheck refusal: %d", w.Code)
		}
	}
	s.precheck, s.err = nil, vault.ErrNotFound
	for range 4 {
		if w := recoverAs("dave"); w.Code != 404 {
			t.Fatalf("a guess that found no backup: %d (its token was not given back)", w.Code)
		}
	}
	s.err = nil
	for range 2 {
		if w := recoverAs("dave"); w.Code != 200 {
			t.Fatalf("dave's burst after guesses that checked nothing: %d", w.Code)
		}
	}

	// Per client, wrong guesses: three wrong ones use the bucket, then
	// every user of the client waits.
	s.err = &vault.WrongPINError{Remaining: 3}
	for _, u := range []string{"dan2", "eve", "fay"} {
		if w := recoverAs(u); w.Code != 403 {
			t.Fatalf("wrong guess by %s: %d", u, w.Code)
		}
	}
	s.err = nil
	calls = s.calls
	limited("a guess after the client's wrong guesses ran out", recoverAs("gus"), "60")
	if s.calls != calls {
		t.Fatal("a guess refused by the wrong-guess limit reached the vault")
	}
	advance(time.Minute)
	if w := recoverAs("gus"); w.Code != 200 {
		t.Fatalf("after the wrong-guess bucket refilled: %d", w.Code)
	}

	// The vault's escalating delay: 429 with Retry-After in whole seconds,
	// rounded up.
	s.err = fmt.Errorf("recover: %w", &vault.DelayedError{RetryAfter: 90*time.Second + time.Millisecond})
	limited("the escalating delay", recoverAs("hal"), "91")
	s.err = nil

	// Per client, all requests: a burst of 20 (some used above), then 1/s.
	var w *httptest.ResponseRecorder
	for range 30 {
		if w = do(h, "GET", "/v1/backups/ivy", "token-a", ""); w.Code == 429 {
			break
		}
	}
	limited("requests past the client's burst", w, "1")

	for limiter, least := range map[string]float64{"guesses_per_user": 2, "wrong_guesses_per_client": 1, "requests_per_client": 1, "escalating_delay": 1} {
		if got := rejections(t, reg, limiter); got < least {
			t.Errorf("keyvault_ratelimit_rejections_total{limiter=%q} = %v, want at least %v", limiter, got, least)
		}
	}
}

func rejections(t *testing.T, reg *prometheus.Registry, limiter string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "keyvault_ratelimit_rejections_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "limiter" && l.GetValue() == limiter {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// refuseAll is an Admitter with no capacity left.
type refuseAll struct{ asked int }

func (r *refuseAll) Admit(context.Context) (func(), error) {
	r.asked++
	return nil, fmt.Errorf("%w: the HSMs are busy", vault.ErrUnavailable)
}

// Admission control: a request that will use the HSMs and is not admitted
// is shed with 503 and Retry-After before it reaches the vault; requests
// that do not use the HSMs are not held back.
func TestAdmissionSheds(t *testing.T) {
	t.Parallel()
	s := &stubBackups{}
	adm := &refuseAll{}
	tokA := sha256.Sum256([]byte("token-a"))
	h := NewRouter(s, Options{Admission: adm, Clients: []Client{{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{tokA}}}})
	for _, c := range []struct{ method, path, body string }{
		{"PUT", "/v1/backups/u", `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234"}`},
		{"POST", "/v1/backups/u/recover", `{"pin":"1234"}`},
		{"POST", "/v1/backups/u/pin", `{"pin":"1234","new_pin":"5678"}`},
	} {
		w := do(h, c.method, c.path, "token-a", c.body)
		if w.Code != 503 || decodeProblem(t, w).Code != "unavailable" || w.Header().Get("Retry-After") == "" {
			t.Fatalf("%s %s not admitted: %d %s", c.method, c.path, w.Code, w.Body)
		}
	}
	if s.calls != 0 || adm.asked != 3 {
		t.Fatalf("vault calls %d, admissions asked %d", s.calls, adm.asked)
	}
	if w := do(h, "GET", "/v1/backups/u", "token-a", ""); w.Code != 200 {
		t.Fatalf("GET needs no HSM and is not shed: %d", w.Code)
	}
}

// logIDStub is a stub vault that names users by a stand-in keyed hash.
type logIDStub struct{ stubBackups }

func (*logIDStub) LogID(ns, userID string) string { return "h(" + ns + ")" }

// One audit event per vault operation, with request ID, client, namespace,
// a keyed hash of the user (never the raw ID), result and duration.
func TestAuditEvents(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	s := &logIDStub{}
	tokA := sha256.Sum256([]byte("token-a"))
	h := NewRouter(s, Options{
		Logger:  slog.New(slog.NewJSONHandler(&buf, nil)),
		Clients: []Client{{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{tokA}}},
	})
	do(h, "PUT", "/v1/backups/alice-raw-id", "token-a", `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234"}`, "X-Request-Id", "req-1")
	s.err = fmt.Errorf("recover: %w", &vault.LockedError{Checked: true})
	do(h, "POST", "/v1/backups/alice-raw-id/recover", "token-a", `{"pin":"wrong-pin-q"}`, "X-Request-Id", "req-2")
	s.err = &vault.WrongPINError{Remaining: 2}
	do(h, "POST", "/v1/backups/alice-raw-id/pin", "token-a", `{"pin":"wrong-pin-q","new_pin":"new-pin-x"}`, "X-Request-Id", "req-3")
	s.err = vault.ErrNotFound
	do(h, "DELETE", "/v1/backups/alice-raw-id", "token-a", "", "X-Request-Id", "req-4")
	do(h, "GET", "/v1/backups/alice-raw-id", "token-a", "", "X-Request-Id", "req-5") // not an operation

	want := map[string][2]string{"req-1": {"enroll", "created"}, "req-2": {"recover", "lockout"}, "req-3": {"change_pin", "wrong_pin"}, "req-4": {"delete", "not_found"}}
	got := 0
	for _, line := range bytes.Split(buf.Bytes(), []byte("\n")) {
		// The PINs are words, not digits, which a timestamp could hold.
		if bytes.Contains(line, []byte("alice-raw-id")) || bytes.Contains(line, []byte("wrong-pin-q")) || bytes.Contains(line, []byte("new-pin-x")) ||
			bytes.Contains(line, []byte("token-a")) {
			t.Fatalf("a raw user_id, PIN or token in the log: %s", line)
		}
		var ev map[string]any
		if json.Unmarshal(line, &ev) != nil || ev["msg"] != "audit" {
			continue
		}
		got++
		w, ok := want[fmt.Sprint(ev["request_id"])]
		if !ok || ev["op"] != w[0] || ev["result"] != w[1] || ev["client"] != "a" || ev["namespace"] != "ns-a" || ev["user"] != "h(ns-a)" || ev["duration_ms"] == nil {
			t.Errorf("audit event %v, want op %s result %s", ev, w[0], w[1])
		}
	}
	if got != len(want) {
		t.Fatalf("%d audit events, want %d:\n%s", got, len(want), buf.Bytes())
	}
}

func TestMethodNotAllowedListsAllow(t *testing.T) {
	t.Parallel()
	h := newTestRouter(&stubBackups{}, nil)
	for path, want := range map[string]string{"/v1/backups/u": "GET, PUT, DELETE", "/v1/backups/u/recover": "POST"} {
		if w := do(h, "PATCH", path, "token-a", ""); w.Code != 405 || w.Header().Get("Allow") != want {
			t.Errorf("PATCH %s: %d Allow %q, want 405 with %q", path, w.Code, w.Header().Get("Allow"), want)
		}
	}
}

// The audit events go to Options.Audit, not to the request log: a log at
// warn drops the request lines, never the audit trail.
func TestAuditEventsIgnoreLogLevel(t *testing.T) {
	t.Parallel()
	var logBuf, auditBuf bytes.Buffer
	tokA := sha256.Sum256([]byte("token-a"))
	h := NewRouter(&logIDStub{}, Options{
		Logger:  slog.New(slog.NewJSONHandler(&logBuf, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Audit:   slog.New(slog.NewJSONHandler(&auditBuf, nil)),
		Clients: []Client{{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{tokA}}},
	})
	do(h, "PUT", "/v1/backups/alice-raw-id", "token-a", `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234"}`, "X-Request-Id", "req-1")
	do(h, "POST", "/v1/backups/alice-raw-id/recover", "token-a", `{"pin":"1234"}`, "X-Request-Id", "req-2")
	if bytes.Contains(logBuf.Bytes(), []byte(`"audit"`)) {
		t.Errorf("an audit event in the request log:\n%s", logBuf.Bytes())
	}
	lines := bytes.Split(bytes.TrimSpace(auditBuf.Bytes()), []byte("\n"))
	if len(lines) != 2 {
		t.Fatalf("%d audit events, want 2:\n%s", len(lines), auditBuf.Bytes())
	}
	for i, line := range lines {
		var ev map[string]any
		if err := json.Unmarshal(line, &ev); err != nil {
			t.Fatalf("audit event %q: %v", line, err)
		}
		if ev["msg"] != "audit" || ev["request_id"] != fmt.Sprintf("req-%d", i+1) || ev["client"] != "a" || ev["result"] != "success" && ev["result"] != "created" {
			t.Errorf("audit event %v", ev)
		}
	}
	if bytes.Contains(auditBuf.Bytes(), []byte("alice-raw-id")) || bytes.Contains(auditBuf.Bytes(), []byte("1234")) || bytes.Contains(auditBuf.Bytes(), []byte("MDEyMzQ1")) {
		t.Errorf("a raw user_id, PIN or secret in the audit events:\n%s", auditBuf.Bytes())
	}
}

// panickingVault panics in every operation, as a bug in the vault would.
type panickingVault struct{ logIDStub }

func (*panickingVault) Enroll(context.Context, string, string, []byte, []byte, int, vault.Precondition) (vault.Backup, bool, error) {
	panic("bug")
}
func (*panickingVault) Recover(context.Context, string, string, []byte) ([]byte, int, error) {
	panic("bug")
}
func (*panickingVault) ChangePIN(context.Context, string, string, []byte, []byte, vault.Precondition) (vault.Backup, error) {
	panic("bug")
}
func (*panickingVault) Delete(context.Context, string, string, vault.Precondition) error {
	panic("bug")
}

// Every operation that passed authentication writes its event: one
// refused for its user_id as invalid_request (user "-"), one whose vault
// call panicked as internal, never as a success.
func TestAuditEventsOfRefusedAndPanicked(t *testing.T) {
	t.Parallel()
	tokA := sha256.Sum256([]byte("token-a"))
	ops := []struct{ op, method, path, body string }{
		{"enroll", "PUT", "/v1/backups/%s", `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234"}`},
		{"recover", "POST", "/v1/backups/%s/recover", `{"pin":"1234"}`},
		{"change_pin", "POST", "/v1/backups/%s/pin", `{"pin":"1234","new_pin":"5678"}`},
		{"delete", "DELETE", "/v1/backups/%s", ""},
	}
	for _, tc := range []struct {
		id, status, result, user string
	}{{"bad%20id", "400", "invalid_request", "-"}, {"alice", "500", "internal", "h(ns-a)"}} {
		var auditBuf bytes.Buffer
		h := NewRouter(&panickingVault{}, Options{
			Logger:  slog.New(slog.NewJSONHandler(io.Discard, nil)),
			Audit:   slog.New(slog.NewJSONHandler(&auditBuf, nil)),
			Clients: []Client{{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{tokA}}},
		})
		for _, o := range ops {
			auditBuf.Reset()
			w := do(h, o.method, fmt.Sprintf(o.path, tc.id), "token-a", o.body, "X-Request-Id", "req-1")
			var ev map[string]any
			if err := json.Unmarshal(auditBuf.Bytes(), &ev); err != nil || strconv.Itoa(w.Code) != tc.status {
				t.Errorf("%s on %s: %d, audit %q (%v); want %s and one event", o.op, tc.id, w.Code, auditBuf.Bytes(), err, tc.status)
				continue
			}
			if ev["op"] != o.op || ev["result"] != tc.result || ev["user"] != tc.user || ev["request_id"] != "req-1" || ev["namespace"] != "ns-a" {
				t.Errorf("%s on %s: audit event %v, want result %s, user %s", o.op, tc.id, ev, tc.result, tc.user)
			}
		}
	}
}

// perMinute is a Rate of n tokens a minute, with the given burst.
func perMinute(n float64, burst int) ratelimit.Rate {
	return ratelimit.Rate{PerSecond: n / 60, Burst: burst}
}

// perSecond is a Rate of n tokens a second, with the given burst.
func perSecond(n float64, burst int) ratelimit.Rate {
	return ratelimit.Rate{PerSecond: n, Burst: burst}
}
