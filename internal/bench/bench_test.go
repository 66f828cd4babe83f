package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/keyvault/keyvault/internal/loadgen"
	"github.com/keyvault/keyvault/vault"
)

// A raw HSM call the pool shed counts as the API's 503, "unavailable",
// which make bench accepts as shedding; any other error fails it.
func TestHSMErrorCodes(t *testing.T) {
	shed := hsmError{fmt.Errorf("%w: hsm hmac: shed, no session free within 50ms", vault.ErrUnavailable)}
	if got := loadgen.Code(shed); got != "unavailable" {
		t.Errorf("a shed operation is coded %q, want unavailable", got)
	}
	if got := loadgen.Code(hsmError{errors.New("pkcs11: 0x5: CKR_GENERAL_ERROR")}); got != "error" {
		t.Errorf("an HSM failure is coded %q, want error", got)
	}
	if !errors.Is(shed, vault.ErrUnavailable) {
		t.Error("the coded error no longer wraps the pool's")
	}
}

func TestLimiterOf(t *testing.T) {
	for detail, want := range map[string]string{
		"Too many requests or guesses (guesses_per_user); nothing was checked or counted.":         "guesses_per_user",
		"Too many requests or guesses (requests_per_client); nothing was checked or counted.":      "requests_per_client",
		"Too many requests or guesses (wrong_guesses_per_client); nothing was checked or counted.": "wrong_guesses_per_client",
		"Too many wrong guesses in a row: wait before the next one.":                               "escalating_delay",
		"Slow down.": "",
	} {
		if got := limiterOf(detail); got != want {
			t.Errorf("limiterOf(%q) = %q, want %q", detail, got, want)
		}
	}
}

// The verdict passes shedding and errors up to the threshold, and fails
// a run in which nothing succeeded or other errors passed it, naming the
// limit that refused and what to change.
func TestBenchVerdict(t *testing.T) {
	run := func(requests int64, errs map[string]int64) loadgen.Result {
		r := loadgen.Result{Requests: requests, Succeeded: requests, Errors: errs, FirstErrors: map[string]string{}}
		for c, n := range errs {
			r.Succeeded -= n
			r.FirstErrors[c] = "keyvault: recover: " + c
		}
		return r
	}
	for _, tc := range []struct {
		name     string
		res      loadgen.Result
		limiters map[string]int64
		want     []string // in the error; none: the run passes
	}{
		{"clean", run(1000, nil), nil, nil},
		{"shedding", run(1000, map[string]int64{"unavailable": 900}), nil, nil},
		{"below the threshold", run(1000, map[string]int64{"rate_limited": 10}), map[string]int64{"guesses_per_user": 10}, nil},
		{"above it", run(1000, map[string]int64{"rate_limited": 11, "unavailable": 500}), map[string]int64{"requests_per_client": 11},
			[]string{"11 of 1000 requests (1.1%) failed other than by shedding, above --max-errors 1%", "requests_per_client 11", "--rate R"}},
		{"every request refused", run(500, map[string]int64{"rate_limited": 500}), map[string]int64{"guesses_per_user": 400, "": 100},
			[]string{"nothing succeeded: every request was refused rate_limited (500)", "guesses_per_user 400", "a limit the answer did not name 100",
				"raise it in the vault's config, or spread the load over more users with --users N", "raise ratelimit.*"}},
		{"every request shed", run(500, map[string]int64{"unavailable": 500}), nil, []string{"nothing succeeded: every request was shed"}},
		{"wrong secrets", run(1000, map[string]int64{"wrong_secret": 20}), nil, []string{"the first wrong_secret: keyvault: recover: wrong_secret"}},
		{"nothing answered", run(0, nil), nil, []string{"no request was answered"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Verdict(tc.res, 1, tc.limiters)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("want a pass, got %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("want a failure, got a pass")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("the verdict lacks %q:\n%v", w, err)
				}
			}
		})
	}
}

// An enroll that the vault refuses leaves the secret the bench expects
// as it was; one with no outcome (a 503) may have been written, and the
// next recover settles which secret the vault holds. The vault here is an
// HTTP server that holds one secret and refuses or half-fails enrolls on
// cue. The users are enrolled first through the client, as EnrollAll does.
func TestEnrollAdoptsOnlyWhatTheVaultTook(t *testing.T) {
	var (
		mu     sync.Mutex
		held   string // base64, as sent
		answer int    // the status of the next enroll
		ids    = map[string]bool{}
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		ids[r.Header.Get("X-Request-Id")] = true
		if r.Header.Get("Authorization") != "Bearer t" || r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %s: headers %v", r.Method, r.URL.Path, r.Header)
		}
		var body struct{ Secret, PIN string }
		_ = json.NewDecoder(r.Body).Decode(&body)
		switch {
		case r.Method == http.MethodPut && r.URL.Path != "/v1/backups/b-0000000":
			t.Errorf("PUT %s", r.URL.Path)
		case r.Method == http.MethodPut && answer == http.StatusTooManyRequests:
			w.Header().Set("Content-Type", "application/problem+json")
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(answer)
			fmt.Fprint(w, `{"type":"urn:keyvault:problem:rate_limited","title":"Too many requests","status":429,"code":"rate_limited","detail":"Too many requests or guesses (requests_per_client); nothing was checked or counted."}`)
		case r.Method == http.MethodPut:
			held = body.Secret // written, whatever the answer says
			if answer == http.StatusServiceUnavailable {
				w.Header().Set("Content-Type", "application/problem+json")
				w.Header().Set("Retry-After", "1")
				w.WriteHeader(answer)
				fmt.Fprint(w, `{"type":"urn:keyvault:problem:unavailable","title":"Service unavailable","status":503,"code":"unavailable"}`)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusOK)
			fmt.Fprint(w, `{"user_id":"u","generation":1,"max_attempts":10,"attempts_remaining":10,"key_version":1,"created_at":"2026-01-01T00:00:00Z"}`)
		case r.URL.Path != "/v1/backups/b-0000000/recover":
			t.Errorf("POST %s", r.URL.Path)
		default: // recover
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"secret":%q,"attempts_remaining":10}`, held)
		}
	}))
	defer srv.Close()
	w, err := NewHTTP(HTTPOptions{URL: srv.URL, Token: "t", Op: "enroll", Workers: 1, Users: 1, UserPrefix: "b-"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	ctx := context.Background()
	if err := w.EnrollAll(ctx); err != nil {
		t.Fatal(err)
	}
	wk := w.workers[0]
	u := wk.users[0]
	step := func(status int, wantEnroll string) {
		t.Helper()
		mu.Lock()
		answer = status
		mu.Unlock()
		err := wk.enroll(ctx, u)
		if (wantEnroll == "" && err != nil) || (wantEnroll != "" && loadgen.Code(err) != wantEnroll) {
			t.Fatalf("enroll answered %d: %v, want code %q", status, err, wantEnroll)
		}
		if err := wk.recover(ctx, u); err != nil {
			t.Fatalf("recover after an enroll answered %d: %v", status, err)
		}
	}
	step(http.StatusOK, "")
	step(http.StatusTooManyRequests, "rate_limited")
	step(http.StatusServiceUnavailable, "unavailable")
	step(http.StatusOK, "")
	// A recover that returns a secret the vault never took is an error.
	mu.Lock()
	held = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	mu.Unlock()
	if err := wk.recover(ctx, u); loadgen.Code(err) != "wrong_secret" {
		t.Fatalf("a secret never enrolled: %v, want wrong_secret", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(ids) != 10 { // one enroll of EnrollAll, four enrolls and five recovers
		t.Errorf("%d request IDs for 10 requests: %v", len(ids), ids)
	}
}

// The answers the workload reads: a secret in the vault's compact JSON or
// in any other spelling, problem documents by their code (and a refusal
// by its limit), anything else by its status.
func TestAnswers(t *testing.T) {
	for body, want := range map[string]string{
		`{"secret":"c2VjcmV0","attempts_remaining":10}`:     "c2VjcmV0",
		`{"attempts_remaining":10, "secret" : "c2VjcmV0"}`:  "c2VjcmV0",
		`{"secret":"c2Vj\u0063mV0","attempts_remaining":1}`: "c2VjcmV0",
	} {
		if got, ok := secretOf([]byte(body)); !ok || string(got) != want {
			t.Errorf("secretOf(%s) = %q, %v", body, got, ok)
		}
	}
	if _, ok := secretOf([]byte(`{"attempts_remaining":10}`)); ok {
		t.Error("an answer without a secret has one")
	}
	err := answerError("recover", 429, []byte(`{"type":"urn:keyvault:problem:rate_limited","title":"Too many requests","status":429,"code":"rate_limited","detail":"Too many requests or guesses (guesses_per_user); nothing was checked or counted."}`))
	var ce *codedError
	if !errors.As(err, &ce) || ce.code != "rate_limited" || ce.limiter != "guesses_per_user" || !strings.Contains(err.Error(), "recover: 429 Too many requests") {
		t.Errorf("a refusal: %v (%+v)", err, ce)
	}
	if err := answerError("enroll", 502, []byte("<html>bad gateway</html>")); loadgen.Code(err) != "http_502" {
		t.Errorf("a proxy's answer: %v", err)
	}
	if err := transportError("recover", fmt.Errorf("read: %w", os.ErrDeadlineExceeded)); loadgen.Code(err) != "timeout" {
		t.Errorf("a timeout: %v", err)
	}
	if err := transportError("recover", errors.New("connection reset by peer")); loadgen.Code(err) != "transport" {
		t.Errorf("a reset: %v", err)
	}
}

// A reset before a wrong guess that a limit refuses is that turn's answer,
// rate_limited, and its wrong guess is not sent; a reset that fails any
// other way ends the run.
func TestRefusedResetIsTheTurnsAnswer(t *testing.T) {
	var (
		mu     sync.Mutex
		status int // the answer to a recover
		sent   []string
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var body struct{ PIN string }
		_ = json.NewDecoder(r.Body).Decode(&body)
		mu.Lock()
		defer mu.Unlock()
		sent = append(sent, r.Method+" "+r.URL.Path)
		w.Header().Set("Content-Type", "application/problem+json")
		w.WriteHeader(status)
		switch status {
		case http.StatusTooManyRequests:
			fmt.Fprint(w, `{"type":"urn:keyvault:problem:rate_limited","title":"Too many requests","status":429,"code":"rate_limited","detail":"Too many requests or guesses (requests_per_client); nothing was checked or counted."}`)
		default:
			fmt.Fprint(w, `{"type":"urn:keyvault:problem:unavailable","title":"Service unavailable","status":503,"code":"unavailable"}`)
		}
	}))
	defer srv.Close()
	w, err := NewHTTP(HTTPOptions{URL: srv.URL, Token: "t", Op: "wrong", Workers: 1, Users: 1, UserPrefix: "r-"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	u := w.workers[0].users[0]
	for _, tc := range []struct {
		status int
		early  bool // answered by Before, or the run's end
	}{{http.StatusTooManyRequests, true}, {http.StatusServiceUnavailable, false}} {
		mu.Lock()
		status, sent = tc.status, nil
		mu.Unlock()
		u.wrongs = escalatingFree
		err := w.Before(context.Background(), 0)
		out, early := errors.AsType[*loadgen.Outcome](err)
		if err == nil || early != tc.early {
			t.Errorf("a reset answered %d: %v (answered early: %v), want early %v", tc.status, err, early, tc.early)
		}
		if early && loadgen.Code(out.Err) != "rate_limited" {
			t.Errorf("a refused reset's answer is %q, want rate_limited", loadgen.Code(out.Err))
		}
		mu.Lock()
		if len(sent) != 1 || sent[0] != "POST /v1/backups/r-0000000/recover" {
			t.Errorf("a reset answered %d sent %q, want the one recover", tc.status, sent)
		}
		mu.Unlock()
		if u.wrongs != escalatingFree {
			t.Errorf("a failed reset left %d wrong guesses in a row, want %d", u.wrongs, escalatingFree)
		}
	}
}
