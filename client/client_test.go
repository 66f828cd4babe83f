package client_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/keyvault/keyvault/client"
)

const testToken = "kvtest_TOKEN123"

// newTestClient returns a client of url with its own transport, whose
// waits before retries are recorded instead of slept (no jitter).
func newTestClient(t *testing.T, url string, opts ...client.Option) (*client.Client, *waits) {
	t.Helper()
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	opts = append([]client.Option{client.WithHTTPClient(&http.Client{Transport: tr})}, opts...)
	c, err := client.New(url, testToken, opts...)
	if err != nil {
		t.Fatal(err)
	}
	w := &waits{}
	client.SetSleep(c, w.sleep)
	client.SetJitter(c, func(time.Duration) time.Duration { return 0 })
	return c, w
}

type waits struct {
	mu sync.Mutex
	d  []time.Duration
}

func (w *waits) sleep(ctx context.Context, d time.Duration) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.d = append(w.d, d)
	return ctx.Err()
}

func (w *waits) get() []time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]time.Duration(nil), w.d...)
}

// scripted answers the n-th request with steps[n] (the last step for
// every request after), and records what it got.
type scripted struct {
	steps []http.HandlerFunc

	mu       sync.Mutex
	requests []*http.Request
	bodies   []string
}

func script(t *testing.T, steps ...http.HandlerFunc) (*scripted, string) {
	t.Helper()
	s := &scripted{steps: steps}
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return s, srv.URL
}

func (s *scripted) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	s.mu.Lock()
	n := len(s.requests)
	s.requests = append(s.requests, r)
	s.bodies = append(s.bodies, string(body))
	step := s.steps[min(n, len(s.steps)-1)]
	s.mu.Unlock()
	w.Header().Set("X-Request-Id", r.Header.Get("X-Request-Id"))
	step(w, r)
}

func (s *scripted) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.requests)
}

func (s *scripted) request(i int) (*http.Request, string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests[i], s.bodies[i]
}

// problem answers a problem document; attempts < 0 leaves
// attempts_remaining out, retryAfter "" leaves the header out.
func problem(status int, code, retryAfter string, attempts int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if retryAfter != "" {
			w.Header().Set("Retry-After", retryAfter)
		}
		a := ""
		if attempts >= 0 {
			a = fmt.Sprintf(`,"attempts_remaining":%d`, attempts)
		}
		w.Header().Set("Content-Type", "application/problem+json")
		w.WriteHeader(status)
		fmt.Fprintf(w, `{"type":"urn:keyvault:problem:%s","title":"T","status":%d,"detail":"D %s","code":%q%s,"request_id":%q}`+"\n",
			code, status, code, code, a, r.Header.Get("X-Request-Id"))
	}
}

// plain answers a status with a non-problem body, as a proxy would.
func plain(status int, retryAfter string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if retryAfter != "" {
			w.Header().Set("Retry-After", retryAfter)
		}
		w.Header().Set("Content-Type", "text/html")
		w.WriteHeader(status)
		fmt.Fprintln(w, "<html>bad gateway</html>")
	}
}

func okJSON(status int, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		fmt.Fprintln(w, body)
	}
}

// hangUp reads the request, then closes the connection without an answer:
// the request reached the vault, its answer is lost.
func hangUp(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, r.Body)
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	conn.Close()
}

// applyThenHangUp lets h act on the request, then hangs up.
func applyThenHangUp(h http.Handler) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(httptest.NewRecorder(), r)
		hangUp(w, r)
	}
}

const (
	backupBody  = `{"user_id":"alice","generation":7,"max_attempts":5,"attempts_remaining":5,"key_version":2,"pin_key_version":3,"created_at":"2026-01-02T03:04:05.123456789Z"}`
	secretB64   = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	recoverBody = `{"secret":"` + secretB64 + `","attempts_remaining":5}`
)

var testSecret = func() []byte {
	b, _ := base64.StdEncoding.DecodeString(secretB64)
	return b
}()

// Each method sends the documented request and reads the documented
// answer.
func TestWireFormat(t *testing.T) {
	s, url := script(t,
		okJSON(http.StatusCreated, backupBody),
		okJSON(http.StatusOK, backupBody),
		okJSON(http.StatusOK, recoverBody),
		okJSON(http.StatusOK, `{"user_id":"alice","generation":8,"max_attempts":5,"attempts_remaining":5,"locked":true,"key_version":2,"pin_key_version":3,"created_at":"2026-01-02T03:04:05Z","updated_at":"2026-01-03T00:00:00Z","future_field":1}`),
		okJSON(http.StatusOK, backupBody),
		func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) },
	)
	c, _ := newTestClient(t, url+"/prefix/", client.WithUserAgent("test-agent/1"))
	ctx := context.Background()

	b, created, err := c.Enroll(ctx, "alice", testSecret, `24"6\8`, client.MaxAttempts(5), client.IfNoneMatch())
	if err != nil || !created {
		t.Fatalf("Enroll: %v, created %v", err, created)
	}
	want := client.Backup{UserID: "alice", Generation: 7, MaxAttempts: 5, AttemptsRemaining: 5, KeyVersion: 2, PINKeyVersion: 3,
		CreatedAt: time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC), UpdatedAt: time.Date(2026, 1, 2, 3, 4, 5, 123456789, time.UTC)}
	if !b.CreatedAt.Equal(want.CreatedAt) || !b.UpdatedAt.Equal(want.UpdatedAt) {
		t.Errorf("Enroll times: %v %v, want %v", b.CreatedAt, b.UpdatedAt, want.CreatedAt)
	}
	b.CreatedAt, b.UpdatedAt = want.CreatedAt, want.UpdatedAt
	if b != want {
		t.Errorf("Enroll: %+v, want %+v", b, want)
	}
	if _, created, err = c.Enroll(ctx, "alice", testSecret, "2468", client.IfMatch(7)); err != nil || created {
		t.Fatalf("Enroll over: %v, created %v", err, created)
	}
	secret, left, err := c.Recover(ctx, "alice", "2468")
	if err != nil || !bytes.Equal(secret, testSecret) || left != 5 {
		t.Fatalf("Recover: %x, %d, %v", secret, left, err)
	}
	b, err = c.Status(ctx, "alice")
	if err != nil || !b.Locked || b.Generation != 8 || !b.UpdatedAt.Equal(time.Date(2026, 1, 3, 0, 0, 0, 0, time.UTC)) {
		t.Fatalf("Status: %+v, %v", b, err)
	}
	if b, err = c.ChangePIN(ctx, "alice", "2468", "13579", client.IfMatch(7)); err != nil || b.Generation != 7 {
		t.Fatalf("ChangePIN: %+v, %v", b, err)
	}
	if err := c.Delete(ctx, "alice", client.IfMatch(7)); err != nil {
		t.Fatalf("Delete: %v", err)
	}

	wantReq := []struct {
		method, path, body string
		hdr                map[string]string
	}{
		{"PUT", "/prefix/v1/backups/alice", `{"secret":"` + secretB64 + `","pin":"24\"6\\8","max_attempts":5}`, map[string]string{"If-None-Match": "*", "If-Match": ""}},
		{"PUT", "/prefix/v1/backups/alice", `{"secret":"` + secretB64 + `","pin":"2468"}`, map[string]string{"If-Match": `"7"`, "If-None-Match": ""}},
		{"POST", "/prefix/v1/backups/alice/recover", `{"pin":"2468"}`, map[string]string{"If-Match": ""}},
		{"GET", "/prefix/v1/backups/alice", "", map[string]string{"Content-Type": ""}},
		{"POST", "/prefix/v1/backups/alice/pin", `{"pin":"2468","new_pin":"13579"}`, map[string]string{"If-Match": `"7"`}},
		{"DELETE", "/prefix/v1/backups/alice", "", map[string]string{"If-Match": `"7"`}},
	}
	if s.count() != len(wantReq) {
		t.Fatalf("%d requests, want %d", s.count(), len(wantReq))
	}
	ids := map[string]bool{}
	for i, w := range wantReq {
		r, body := s.request(i)
		if r.Method != w.method || r.URL.Path != w.path || body != w.body {
			t.Errorf("request %d: %s %s %s, want %s %s %s", i, r.Method, r.URL.Path, body, w.method, w.path, w.body)
		}
		if got := r.Header.Get("Authorization"); got != "Bearer "+testToken {
			t.Errorf("request %d: Authorization %q", i, got)
		}
		if got := r.Header.Get("User-Agent"); got != "test-agent/1" {
			t.Errorf("request %d: User-Agent %q", i, got)
		}
		if body != "" && r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("request %d: Content-Type %q", i, r.Header.Get("Content-Type"))
		}
		for k, v := range w.hdr {
			if got := r.Header.Get(k); got != v {
				t.Errorf("request %d: %s %q, want %q", i, k, got, v)
			}
		}
		id := r.Header.Get("X-Request-Id")
		if id == "" || ids[id] {
			t.Errorf("request %d: X-Request-Id %q: empty or reused across calls", i, id)
		}
		ids[id] = true
	}
}

// The fake vault, end to end: every method and every typed error.
func TestRoundTrip(t *testing.T) {
	srv := httptest.NewServer(newFakeVault(testToken))
	defer srv.Close()
	c, _ := newTestClient(t, srv.URL)
	ctx := context.Background()
	secret := bytes.Repeat([]byte{7}, 32)
	pin := "2468 ünïcødé \"\\\x01"

	b, created, err := c.Enroll(ctx, "bob", secret, pin, client.MaxAttempts(3), client.IfNoneMatch())
	if err != nil || !created || b.Generation != 1 || b.AttemptsRemaining != 3 {
		t.Fatalf("Enroll: %+v %v %v", b, created, err)
	}
	_, _, err = c.Enroll(ctx, "bob", secret, pin, client.IfNoneMatch())
	wantErr(t, "Enroll again", err, client.ErrPrecondition, 412)
	got, left, err := c.Recover(ctx, "bob", pin)
	if err != nil || !bytes.Equal(got, secret) || left != 3 {
		t.Fatalf("Recover: %v %d %v", got, left, err)
	}
	_, left, err = c.Recover(ctx, "bob", "0000")
	e := wantErr(t, "wrong PIN", err, client.ErrWrongPIN, 403)
	if left != 2 || e.AttemptsRemaining != 2 {
		t.Errorf("wrong PIN: attempts %d and %d, want 2", left, e.AttemptsRemaining)
	}
	_, err = c.ChangePIN(ctx, "bob", pin, "13579", client.IfMatch(9))
	wantErr(t, "ChangePIN with a stale If-Match", err, client.ErrPrecondition, 412)
	if b, err = c.ChangePIN(ctx, "bob", pin, "13579", client.IfMatch(1)); err != nil || b.Generation != 2 || b.AttemptsRemaining != 3 {
		t.Fatalf("ChangePIN: %+v %v", b, err)
	}
	for i, want := range []error{client.ErrWrongPIN, client.ErrWrongPIN, client.ErrLocked, client.ErrLocked} {
		_, _, err = c.Recover(ctx, "bob", pin) // the old PIN
		wantErr(t, fmt.Sprintf("old PIN %d", i), err, want, 0)
	}
	_, err = c.ChangePIN(ctx, "bob", "13579", "97531")
	wantErr(t, "ChangePIN on a locked backup", err, client.ErrLocked, 410)
	if b, err = c.Status(ctx, "bob"); err != nil || !b.Locked || b.AttemptsRemaining != 0 {
		t.Fatalf("Status: %+v %v", b, err)
	}
	wantErr(t, "Delete stale", c.Delete(ctx, "bob", client.IfMatch(1)), client.ErrPrecondition, 412)
	if err := c.Delete(ctx, "bob", client.IfMatch(2)); err != nil {
		t.Fatal(err)
	}
	_, err = c.Status(ctx, "bob")
	wantErr(t, "Status after Delete", err, client.ErrNotFound, 404)
	_, _, err = c.Recover(ctx, "bob", pin)
	wantErr(t, "Recover after Delete", err, client.ErrNotFound, 404)
	wantErr(t, "Delete again", c.Delete(ctx, "bob"), client.ErrNotFound, 404)
	if b, created, err = c.Enroll(ctx, "bob", secret, pin); err != nil || !created || b.Generation != 3 {
		t.Fatalf("Enroll after Delete: %+v %v %v", b, created, err)
	}

	bad, err := client.New(srv.URL, "wrong-token")
	if err != nil {
		t.Fatal(err)
	}
	_, err = bad.Status(ctx, "bob")
	wantErr(t, "bad token", err, client.ErrUnauthorized, 401)
	_, _, err = c.Enroll(ctx, "bob", []byte("short"), pin)
	wantErr(t, "short secret", err, client.ErrInvalid, 400)
}

// wantErr requires an *Error matching sentinel (and status, if not 0) and
// returns it.
func wantErr(t *testing.T, what string, err, sentinel error, status int) *client.Error {
	t.Helper()
	var e *client.Error
	if !errors.As(err, &e) {
		t.Fatalf("%s: %v (%T), want an *Error matching %v", what, err, err, sentinel)
	}
	if !errors.Is(err, sentinel) || status != 0 && e.Status != status {
		t.Fatalf("%s: %v (status %d), want %v with status %d", what, err, e.Status, sentinel, status)
	}
	return e
}

// Every problem code maps to its sentinel and to no other; an answer that
// is not a problem document maps to none.
func TestErrorMapping(t *testing.T) {
	all := []error{client.ErrInvalid, client.ErrUnauthorized, client.ErrNotFound, client.ErrWrongPIN, client.ErrLocked,
		client.ErrPrecondition, client.ErrTooLarge, client.ErrRateLimited, client.ErrUnavailable, client.ErrIntegrity, client.ErrInternal}
	cases := []struct {
		status int
		code   string
		want   error
	}{
		{400, "invalid_request", client.ErrInvalid},
		{401, "unauthorized", client.ErrUnauthorized},
		{404, "not_found", client.ErrNotFound},
		{403, "wrong_pin", client.ErrWrongPIN},
		{410, "locked", client.ErrLocked},
		{412, "precondition_failed", client.ErrPrecondition},
		{413, "payload_too_large", client.ErrTooLarge},
		{429, "rate_limited", client.ErrRateLimited},
		{503, "unavailable", client.ErrUnavailable},
		{500, "integrity_error", client.ErrIntegrity},
		{500, "internal", client.ErrInternal},
		{418, "teapot", nil},
	}
	for _, tc := range cases {
		t.Run(tc.code, func(t *testing.T) {
			retry := ""
			if tc.status == 429 || tc.status == 503 {
				retry = "120" // above the maximum wait: returned at once
			}
			_, url := script(t, problem(tc.status, tc.code, retry, 1))
			c, _ := newTestClient(t, url)
			_, err := c.Status(context.Background(), "alice")
			var e *client.Error
			if !errors.As(err, &e) {
				t.Fatalf("%v (%T), want *Error", err, err)
			}
			if e.Status != tc.status || e.Code != tc.code || e.Title != "T" || e.Detail != "D "+tc.code || e.RequestID == "" || e.Op != "status" ||
				e.Type != "urn:keyvault:problem:"+tc.code {
				t.Errorf("%+v", e)
			}
			if retry != "" && e.RetryAfter != 120*time.Second {
				t.Errorf("RetryAfter %v, want 2m", e.RetryAfter)
			}
			for _, s := range all {
				if errors.Is(err, s) != (s == tc.want) {
					t.Errorf("errors.Is(%v, %v) = %v", err, s, !(s == tc.want))
				}
			}
			if !strings.Contains(err.Error(), tc.code) || !strings.Contains(err.Error(), e.RequestID) {
				t.Errorf("Error() %q lacks the code or the request ID", err)
			}
		})
	}
	t.Run("not a problem document", func(t *testing.T) {
		_, url := script(t, plain(http.StatusBadGateway, ""))
		c, _ := newTestClient(t, url, client.WithRetry(0, 0))
		_, err := c.Status(context.Background(), "alice")
		var e *client.Error
		if !errors.As(err, &e) || e.Status != 502 || e.Code != "" || e.Title != "Bad Gateway" {
			t.Fatalf("%v: %+v", err, e)
		}
		for _, s := range all {
			if errors.Is(err, s) {
				t.Errorf("a proxy's 502 matches %v", s)
			}
		}
	})
}

// The vault's 503 and 429 are retried for every call, a guess included,
// honouring Retry-After, with one request ID across the attempts.
func TestRetryVault503And429(t *testing.T) {
	for _, tc := range []struct {
		name string
		call func(*client.Client) error
		ok   http.HandlerFunc
	}{
		{"recover", func(c *client.Client) error {
			_, _, err := c.Recover(context.Background(), "alice", "2468")
			return err
		}, okJSON(200, recoverBody)},
		{"change PIN", func(c *client.Client) error {
			_, err := c.ChangePIN(context.Background(), "alice", "2468", "1357")
			return err
		}, okJSON(200, backupBody)},
		{"blind enroll", func(c *client.Client) error {
			_, _, err := c.Enroll(context.Background(), "alice", testSecret, "2468")
			return err
		}, okJSON(201, backupBody)},
		{"blind delete", func(c *client.Client) error {
			return c.Delete(context.Background(), "alice")
		}, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(204) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, url := script(t,
				problem(503, "unavailable", "1", -1),
				problem(429, "rate_limited", "2", -1),
				tc.ok)
			c, w := newTestClient(t, url, client.WithRetry(2, 10*time.Millisecond))
			if err := tc.call(c); err != nil {
				t.Fatal(err)
			}
			if s.count() != 3 {
				t.Fatalf("%d requests, want 3", s.count())
			}
			if got := w.get(); len(got) != 2 || got[0] != time.Second || got[1] != 2*time.Second {
				t.Errorf("waits %v, want [1s 2s] (Retry-After over the backoff)", got)
			}
			r0, b0 := s.request(0)
			for i := 1; i < 3; i++ {
				r, b := s.request(i)
				if r.Header.Get("X-Request-Id") != r0.Header.Get("X-Request-Id") {
					t.Errorf("attempt %d: X-Request-Id %q, first %q", i, r.Header.Get("X-Request-Id"), r0.Header.Get("X-Request-Id"))
				}
				if b != b0 {
					t.Errorf("attempt %d sent %q, first %q", i, b, b0)
				}
			}
		})
	}
}

// Retries stop at the budget, and the last answer is returned.
func TestRetryBudget(t *testing.T) {
	s, url := script(t, problem(503, "unavailable", "", -1))
	c, w := newTestClient(t, url, client.WithRetry(3, 100*time.Millisecond), client.WithMaxWait(time.Second))
	_, _, err := c.Recover(context.Background(), "alice", "2468")
	wantErr(t, "always 503", err, client.ErrUnavailable, 503)
	if s.count() != 4 {
		t.Errorf("%d requests, want 4", s.count())
	}
	if got := w.get(); fmt.Sprint(got) != "[100ms 200ms 400ms]" {
		t.Errorf("waits %v, want [100ms 200ms 400ms]", got)
	}

	s, url = script(t, problem(503, "unavailable", "1", -1))
	c, _ = newTestClient(t, url, client.WithRetry(0, 0))
	_, err = c.Status(context.Background(), "alice")
	wantErr(t, "no retries", err, client.ErrUnavailable, 503)
	if s.count() != 1 {
		t.Errorf("WithRetry(0): %d requests, want 1", s.count())
	}
}

// A Retry-After above the maximum wait, or beyond the context's deadline,
// is returned at once rather than slept on.
func TestRetryAfterTooLong(t *testing.T) {
	s, url := script(t, problem(429, "rate_limited", "12", -1), okJSON(200, recoverBody))
	c, w := newTestClient(t, url)
	_, _, err := c.Recover(context.Background(), "alice", "2468")
	e := wantErr(t, "429 for 12 s", err, client.ErrRateLimited, 429)
	if e.RetryAfter != 12*time.Second || s.count() != 1 || len(w.get()) != 0 {
		t.Errorf("RetryAfter %v, %d requests, waits %v; want 12s, 1, none", e.RetryAfter, s.count(), w.get())
	}

	s, url = script(t, problem(503, "unavailable", "1", -1), okJSON(200, recoverBody))
	c, _ = newTestClient(t, url)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, _, err = c.Recover(ctx, "alice", "2468")
	wantErr(t, "503 for 1 s with 500 ms left", err, client.ErrUnavailable, 503)
	if s.count() != 1 {
		t.Errorf("%d requests, want 1", s.count())
	}
}

// A cancelled context ends the wait before a retry, with both errors.
func TestRetryWaitCancelled(t *testing.T) {
	_, url := script(t, problem(503, "unavailable", "1", -1))
	c, err := client.New(url, testToken)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	start := time.Now()
	_, err = c.Status(ctx, "alice")
	if !errors.Is(err, context.Canceled) || !errors.Is(err, client.ErrUnavailable) {
		t.Fatalf("%v, want context.Canceled and ErrUnavailable", err)
	}
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("took %v after cancel at 50ms", d)
	}
}

// The core rule: a recover or PIN change whose request reached the vault
// and whose answer was lost is never sent again, since the guess may have
// been counted; If-Match does not change that.
func TestNoRetryOfGuessAfterTransportError(t *testing.T) {
	const pin, newPIN = "pin-9f8e7d", "new-pin-6c5b4a"
	for _, tc := range []struct {
		name string
		call func(*client.Client) error
	}{
		{"recover", func(c *client.Client) error {
			_, _, err := c.Recover(context.Background(), "alice", pin)
			return err
		}},
		{"change PIN", func(c *client.Client) error {
			_, err := c.ChangePIN(context.Background(), "alice", pin, newPIN)
			return err
		}},
		{"change PIN with If-Match", func(c *client.Client) error {
			_, err := c.ChangePIN(context.Background(), "alice", pin, newPIN, client.IfMatch(7))
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A first 503 is retried; the hang-up on the retry is not.
			s, url := script(t, problem(503, "unavailable", "1", -1), hangUp, okJSON(200, recoverBody))
			c, _ := newTestClient(t, url, client.WithRetry(5, time.Millisecond))
			err := tc.call(c)
			if err == nil {
				t.Fatal("no error")
			}
			var e *client.Error
			if errors.As(err, &e) {
				t.Fatalf("%v: an *Error for a lost answer", err)
			}
			if s.count() != 2 {
				t.Fatalf("%d requests, want 2: a guess was sent again after its answer was lost", s.count())
			}
			if !strings.Contains(err.Error(), "may have been counted") {
				t.Errorf("%q does not say the guess may have been counted", err)
			}
			noSecrets(t, err, pin, newPIN, "alice", testToken)
		})
	}
}

// Blind writes are not repeated after a lost answer either: a repeat
// could overwrite or delete what another device wrote in between.
func TestNoRetryOfBlindWriteAfterTransportError(t *testing.T) {
	for _, tc := range []struct {
		name string
		call func(*client.Client) error
	}{
		{"enroll", func(c *client.Client) error {
			_, _, err := c.Enroll(context.Background(), "alice", testSecret, "2468")
			return err
		}},
		{"delete", func(c *client.Client) error { return c.Delete(context.Background(), "alice") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, url := script(t, hangUp, okJSON(200, backupBody))
			c, _ := newTestClient(t, url)
			err := tc.call(c)
			if err == nil || s.count() != 1 || !strings.Contains(err.Error(), "may have been") {
				t.Fatalf("%v after %d requests, want a lost-answer error after 1", err, s.count())
			}
		})
	}
}

// Repeatable calls are retried after a lost answer; a conditional write's
// later answer is marked Uncertain.
func TestRetryRepeatableAfterTransportError(t *testing.T) {
	ctx := context.Background()
	t.Run("status", func(t *testing.T) {
		s, url := script(t, hangUp, okJSON(200, backupBody))
		c, _ := newTestClient(t, url)
		if b, err := c.Status(ctx, "alice"); err != nil || b.Generation != 7 {
			t.Fatalf("%+v %v", b, err)
		}
		if s.count() != 2 {
			t.Errorf("%d requests, want 2", s.count())
		}
	})
	t.Run("enroll If-None-Match applied, answer lost", func(t *testing.T) {
		vault := newFakeVault(testToken)
		s, url := script(t, applyThenHangUp(vault), vault.ServeHTTP)
		c, _ := newTestClient(t, url)
		_, _, err := c.Enroll(ctx, "alice", testSecret, "2468", client.IfNoneMatch())
		e := wantErr(t, "retried enroll", err, client.ErrPrecondition, 412)
		if !e.Uncertain || !strings.Contains(err.Error(), "earlier attempt") {
			t.Errorf("%v: Uncertain not set", err)
		}
		if s.count() != 2 {
			t.Errorf("%d requests, want 2", s.count())
		}
		// The backup is there, once: generation 1.
		if b, err := c.Status(ctx, "alice"); err != nil || b.Generation != 1 {
			t.Errorf("Status: %+v %v", b, err)
		}
	})
	t.Run("enroll If-Match", func(t *testing.T) {
		s, url := script(t, hangUp, okJSON(200, backupBody))
		c, _ := newTestClient(t, url)
		if _, _, err := c.Enroll(ctx, "alice", testSecret, "2468", client.IfMatch(6)); err != nil {
			t.Fatal(err)
		}
		if s.count() != 2 {
			t.Errorf("%d requests, want 2", s.count())
		}
	})
	t.Run("delete If-Match", func(t *testing.T) {
		s, url := script(t, hangUp, problem(404, "not_found", "", -1))
		c, _ := newTestClient(t, url)
		e := wantErr(t, "retried delete", c.Delete(ctx, "alice", client.IfMatch(7)), client.ErrNotFound, 404)
		if !e.Uncertain || s.count() != 2 {
			t.Errorf("Uncertain %v after %d requests, want true after 2", e.Uncertain, s.count())
		}
	})
	// A store that cannot confirm a write answers 503 with the write maybe
	// applied: the repeat's 412 may be this call's own.
	t.Run("enroll If-None-Match after the vault's 503", func(t *testing.T) {
		s, url := script(t, problem(503, "unavailable", "1", -1), problem(412, "precondition_failed", "", -1))
		c, _ := newTestClient(t, url)
		_, _, err := c.Enroll(ctx, "alice", testSecret, "2468", client.IfNoneMatch())
		e := wantErr(t, "retried enroll", err, client.ErrPrecondition, 412)
		if !e.Uncertain || s.count() != 2 {
			t.Errorf("Uncertain %v after %d requests, want true after 2", e.Uncertain, s.count())
		}
	})
	t.Run("status after the vault's 503", func(t *testing.T) {
		s, url := script(t, problem(503, "unavailable", "1", -1), problem(404, "not_found", "", -1))
		c, _ := newTestClient(t, url)
		_, err := c.Status(ctx, "alice")
		if e := wantErr(t, "retried status", err, client.ErrNotFound, 404); e.Uncertain || s.count() != 2 {
			t.Errorf("Uncertain %v after %d requests, want false after 2: a read applies nothing", e.Uncertain, s.count())
		}
	})
	t.Run("proxy 502 and 504", func(t *testing.T) {
		s, url := script(t, plain(502, ""), plain(504, ""), okJSON(200, backupBody))
		c, _ := newTestClient(t, url)
		if _, err := c.Status(ctx, "alice"); err != nil || s.count() != 3 {
			t.Fatalf("%v after %d requests", err, s.count())
		}
	})
}

// A 5xx or 429 that is not the vault's own problem document may come from
// a proxy that forwarded the guess: it is not retried for a guess.
func TestNoRetryOfGuessAfterProxyError(t *testing.T) {
	for _, step := range []http.HandlerFunc{plain(502, ""), plain(503, "1"), plain(504, ""), plain(429, "1")} {
		s, url := script(t, step, okJSON(200, recoverBody))
		c, _ := newTestClient(t, url)
		_, _, err := c.Recover(context.Background(), "alice", "2468")
		var e *client.Error
		if !errors.As(err, &e) || e.Code != "" || s.count() != 1 {
			t.Errorf("%v after %d requests, want a code-less *Error after 1", err, s.count())
		}
	}
}

// A failure to connect is retried even for a guess: the request never
// left.
func TestRetryGuessAfterDialError(t *testing.T) {
	s, url := script(t, okJSON(200, recoverBody))
	var mu sync.Mutex
	dials := 0
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		mu.Lock()
		dials++
		n := dials
		mu.Unlock()
		if n == 1 {
			return nil, &net.OpError{Op: "dial", Net: network, Err: syscall.ECONNREFUSED}
		}
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	c, err := client.New(url, testToken, client.WithHTTPClient(&http.Client{Transport: tr}), client.WithRetry(2, time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	secret, _, err := c.Recover(context.Background(), "alice", "2468")
	if err != nil || !bytes.Equal(secret, testSecret) {
		t.Fatalf("%x %v", secret, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if dials != 2 || s.count() != 1 {
		t.Errorf("%d dials and %d requests, want 2 and 1", dials, s.count())
	}
}

// No error text holds the PIN, the secret, the user_id or the token.
func TestNoSecretsInErrors(t *testing.T) {
	const pin, newPIN, user = "pin-a1b2c3d4", "pin-e5f6a7b8", "user-c0ffee"
	secret := []byte("secret-0123456789abcdef")
	_, url := script(t, problem(403, "wrong_pin", "", 2))
	c, _ := newTestClient(t, url)
	ctx := context.Background()
	var errs []error
	_, _, err := c.Recover(ctx, user, pin)
	errs = append(errs, err)
	_, err = c.ChangePIN(ctx, user, pin, newPIN)
	errs = append(errs, err)
	_, _, err = c.Enroll(ctx, user, secret, pin+"\xff")
	errs = append(errs, err)
	_, _, err = c.Recover(ctx, user+"/x", pin)
	errs = append(errs, err)

	_, down := script(t, hangUp)
	c, _ = newTestClient(t, down)
	_, _, err = c.Enroll(ctx, user, secret, pin)
	errs = append(errs, err)
	_, _, err = c.Recover(ctx, user, pin)
	errs = append(errs, err)
	for _, err := range errs {
		if err == nil {
			t.Fatal("no error")
		}
		noSecrets(t, err, pin, newPIN, user, string(secret), base64.StdEncoding.EncodeToString(secret), testToken)
	}
}

func noSecrets(t *testing.T, err error, secrets ...string) {
	t.Helper()
	for _, s := range []string{err.Error(), fmt.Sprintf("%+v", err), fmt.Sprintf("%#v", err)} {
		for _, x := range secrets {
			if strings.Contains(s, x) {
				t.Errorf("error text %q holds %q", s, x)
			}
		}
	}
}

// Calls the client refuses are ErrInvalid with Status 0 and send nothing.
func TestLocalValidation(t *testing.T) {
	s, url := script(t, okJSON(200, backupBody))
	c, _ := newTestClient(t, url)
	ctx := context.Background()
	long := strings.Repeat("a", 129)
	checks := map[string]error{}
	for _, id := range []string{"", long, "a/b", "a b", "../x", "a?b", "a%2F", "é"} {
		_, err := c.Status(ctx, id)
		checks["user_id "+id] = err
	}
	_, _, checks["PIN not UTF-8"] = c.Recover(ctx, "alice", "12\xff4")
	_, checks["new PIN not UTF-8"] = c.ChangePIN(ctx, "alice", "1234", "12\xff4")
	_, _, checks["IfMatch and IfNoneMatch"] = c.Enroll(ctx, "alice", testSecret, "1234", client.IfMatch(1), client.IfNoneMatch())
	// Generations start at 1: IfMatch(0) is a mistake, not "no precondition".
	_, _, checks["Enroll IfMatch(0)"] = c.Enroll(ctx, "alice", testSecret, "1234", client.IfMatch(0))
	_, checks["ChangePIN IfMatch(-1)"] = c.ChangePIN(ctx, "alice", "1234", "5678", client.IfMatch(-1))
	checks["Delete IfMatch(0)"] = c.Delete(ctx, "alice", client.IfMatch(0))
	for what, err := range checks {
		e := wantErr(t, what, err, client.ErrInvalid, 0)
		if e.Status != 0 || e.RequestID != "" {
			t.Errorf("%s: %+v", what, e)
		}
	}
	if s.count() != 0 {
		t.Errorf("%d requests sent", s.count())
	}
	if _, err := c.Status(ctx, strings.Repeat("a", 128)); err != nil {
		t.Errorf("a 128-character user_id: %v", err)
	}
	if _, err := c.Status(ctx, "A-z.0_9~:@x"); err != nil {
		t.Errorf("every allowed character: %v", err)
	}
}

func TestNew(t *testing.T) {
	for _, tc := range []struct {
		url, token string
		opts       []client.Option
		ok         bool
	}{
		{"https://kv.example:8443", "t", nil, true},
		{"https://kv.example/prefix/", "t", nil, true},
		{"http://127.0.0.1:8080", "t", nil, true},
		{"http://[::1]:8080", "t", nil, true},
		{"http://localhost:8080", "t", nil, true},
		{"http://kv.example:8080", "t", nil, false},
		{"http://kv.example:8080", "t", []client.Option{client.WithInsecurePlaintext()}, true},
		{"ftp://kv.example", "t", nil, false},
		{"kv.example:8443", "t", nil, false},
		{"https://", "t", nil, false},
		{"https://user:hunter2@kv.example", "t", nil, false},
		{"https://kv.example?x=1", "t", nil, false},
		{"https://kv.example", "", nil, false},
		{"https://kv.example", "a b", nil, false},
		{"https://kv.example", "a\r\nX-Evil: 1", nil, false},
		{"https://kv.example", "t", []client.Option{client.WithRetry(-1, 0)}, false},
		{"https://kv.example", "t", []client.Option{client.WithMaxWait(-1)}, false},
		{"https://kv.example", "t", []client.Option{client.WithHTTPClient(nil)}, true},
	} {
		c, err := client.New(tc.url, tc.token, tc.opts...)
		if (err == nil) != tc.ok {
			t.Errorf("New(%q, %q): %v, want ok %v", tc.url, tc.token, err, tc.ok)
		}
		if err != nil && strings.Contains(err.Error(), "hunter2") {
			t.Errorf("New error %q quotes the URL's password", err)
		}
		if c != nil {
			for _, s := range []string{fmt.Sprint(c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", c)} {
				if strings.Contains(s, "Bearer") {
					t.Errorf("a printed client holds its token: %s", s)
				}
			}
		}
	}
}

// The client never follows a redirect: the PIN would go elsewhere.
func TestNoRedirects(t *testing.T) {
	other, otherURL := script(t, okJSON(200, recoverBody))
	_, url := script(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, otherURL+r.URL.Path, http.StatusTemporaryRedirect)
	})
	hc := &http.Client{}
	c, err := client.New(url, testToken, client.WithHTTPClient(hc))
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = c.Recover(context.Background(), "alice", "2468")
	var e *client.Error
	if !errors.As(err, &e) || e.Status != http.StatusTemporaryRedirect || other.count() != 0 {
		t.Fatalf("%v; %d requests to the redirect target", err, other.count())
	}
	if hc.CheckRedirect != nil {
		t.Error("New changed the caller's http.Client")
	}
}

func TestRequestIDFromContext(t *testing.T) {
	s, url := script(t, problem(404, "not_found", "", -1))
	c, _ := newTestClient(t, url)
	_, err := c.Status(client.ContextWithRequestID(context.Background(), "trace-42.a:b_c"), "alice")
	e := wantErr(t, "status", err, client.ErrNotFound, 404)
	r, _ := s.request(0)
	if r.Header.Get("X-Request-Id") != "trace-42.a:b_c" || e.RequestID != "trace-42.a:b_c" {
		t.Errorf("sent %q, error has %q", r.Header.Get("X-Request-Id"), e.RequestID)
	}
	_, _ = c.Status(client.ContextWithRequestID(context.Background(), "bad id"), "alice")
	if r, _ := s.request(1); r.Header.Get("X-Request-Id") == "bad id" || r.Header.Get("X-Request-Id") == "" {
		t.Errorf("an invalid request ID was sent as %q", r.Header.Get("X-Request-Id"))
	}
}

// A 200 to a recover whose secret does not decode is an error, not a
// wrong or empty key.
func TestRecoverBadResponse(t *testing.T) {
	for _, body := range []string{
		`{"secret":"not base64!","attempts_remaining":5}`,
		`{"secret":"AAEC\/AwQ=","attempts_remaining":5}`,
		`{"attempts_remaining":5}`,
		`{"secret":5}`,
		`not json`,
	} {
		_, url := script(t, okJSON(200, body))
		c, _ := newTestClient(t, url)
		secret, _, err := c.Recover(context.Background(), "alice", "2468")
		if err == nil || secret != nil {
			t.Errorf("%s: %x, %v; want an error", body, secret, err)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for in, want := range map[string]time.Duration{
		"":                              0,
		"7":                             7 * time.Second,
		" 60 ":                          time.Minute,
		"-1":                            0,
		"soon":                          0,
		"Fri, 02 Jan 2026 03:04:35 GMT": 30 * time.Second,
		"Fri, 02 Jan 2026 03:00:00 GMT": 0,
	} {
		if got := client.ParseRetryAfter(in, now); got != want {
			t.Errorf("%q: %v, want %v", in, got, want)
		}
	}
}

func TestAppendJSONString(t *testing.T) {
	for _, s := range []string{"2468", `a"b\c`, "tab\there\x00\x1f\x7f", "ünïcødé 🔑", "</script>\u2028"} {
		got := string(client.AppendJSONString(nil, s))
		var back string
		if err := json.Unmarshal([]byte(got), &back); err != nil || back != s {
			t.Errorf("%q encoded as %s decodes to %q, %v", s, got, back, err)
		}
		if len(got) > 2+6*len(s) {
			t.Errorf("%q: %d bytes, over the bound", s, len(got))
		}
	}
}
