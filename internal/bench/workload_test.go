package bench

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/internal/loadgen"
	"github.com/keyvault/keyvault/vault"
)

// fakePool records the lengths of what it is handed and answers with
// fixed bytes, or fails with err.
type fakePool struct {
	mu     sync.Mutex
	calls  []string
	sizes  vault.Sizes // of the last calls
	err    error
	closed bool
}

func (p *fakePool) record(call string, f func()) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls = append(p.calls, call)
	f()
	return p.err
}

func (p *fakePool) HMAC(_ context.Context, key vault.KeyID, msg []byte) ([]byte, error) {
	err := p.record("hmac", func() { p.sizes.PINMACInput = len(msg) })
	return make([]byte, 32), err
}

func (p *fakePool) Seal(_ context.Context, key vault.KeyID, nonce, pt, aad []byte) ([]byte, error) {
	err := p.record("seal", func() { p.sizes.OuterNonce, p.sizes.OuterAAD, p.sizes.Inner = len(nonce), len(aad), len(pt) })
	return make([]byte, len(pt)+16), err
}

func (p *fakePool) Open(_ context.Context, key vault.KeyID, nonce, ct, aad []byte) ([]byte, error) {
	err := p.record("open", func() { p.sizes.OuterNonce, p.sizes.OuterAAD, p.sizes.Inner = len(nonce), len(aad), len(ct)-16 })
	return make([]byte, len(ct)-16), err
}

func (p *fakePool) KeyVersion(vault.KeyRole) uint32 { return 1 }

func (p *fakePool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	return nil
}

// The HSM workload makes the calls of one recover (HMAC, Open) or one
// enroll (HMAC, Seal), with inputs of the sizes the vault uses.
func TestHSMWorkloadCalls(t *testing.T) {
	want := vault.SizesFor(hsmNamespace, hsmUserID, hsmSecretLen, hsmPINLen)
	for op, calls := range map[string][]string{"recover": {"seal", "hmac", "open"}, "enroll": {"seal", "hmac", "seal"}} {
		t.Run(op, func(t *testing.T) {
			p := &fakePool{}
			w, err := NewHSM(context.Background(), p, op)
			if err != nil {
				t.Fatal(err)
			}
			if err := w.Op(context.Background(), 0); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(p.calls, calls) {
				t.Errorf("calls %v, want %v", p.calls, calls)
			}
			if p.sizes != want {
				t.Errorf("inputs of %+v, want %+v", p.sizes, want)
			}
			if w.Name() != "hsm-"+op {
				t.Errorf("name %q", w.Name())
			}
			w.Close()
			if !p.closed {
				t.Error("Close left the pool open")
			}
		})
	}
}

// A workload that cannot be made closes the pool it was given.
func TestNewHSMClosesThePoolOnFailure(t *testing.T) {
	for name, p := range map[string]*fakePool{
		"unknown op":  {},
		"seal failed": {err: errors.New("CKR_DEVICE_ERROR")},
	} {
		op := "recover"
		if name == "unknown op" {
			op = "wrong"
		}
		if _, err := NewHSM(context.Background(), p, op); err == nil {
			t.Errorf("%s: no error", name)
		}
		if !p.closed {
			t.Errorf("%s: the pool is left open", name)
		}
	}
}

func TestNewHTTPChecksItsOptions(t *testing.T) {
	ok := HTTPOptions{URL: "http://127.0.0.1:1", Token: "t", Op: "mixed", Workers: 2, Users: 5, UserPrefix: "b-"}
	w, err := NewHTTP(ok)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(w.workers[0].users) + len(w.workers[1].users); n != 5 || len(w.workers[0].users) != 3 {
		t.Errorf("users per worker %d and %d, want 3 and 2", len(w.workers[0].users), len(w.workers[1].users))
	}
	if u := w.workers[1].users[0]; u.id != "b-0000001" || u.recover != "/v1/backups/b-0000001/recover" ||
		string(u.pinBody) != `{"pin":"`+u.pin+`"}` || string(u.wrongPIN) == string(u.pinBody) {
		t.Errorf("user %+v, want ID b-0000001 and its requests", u)
	}
	for name, mod := range map[string]func(*HTTPOptions){
		"unknown op":      func(o *HTTPOptions) { o.Op = "bogus" },
		"too few users":   func(o *HTTPOptions) { o.Users = 1 },
		"no worker":       func(o *HTTPOptions) { o.Workers = 0 },
		"not a URL":       func(o *HTTPOptions) { o.URL = "::" },
		"no bearer token": func(o *HTTPOptions) { o.Token = "" },
	} {
		o := ok
		mod(&o)
		if _, err := NewHTTP(o); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// stubWorkload fails every operation with a rate_limited answer of
// guesses_per_user, or its Before with err.
type stubWorkload struct{ beforeErr error }

func (stubWorkload) Name() string { return "stub" }
func (stubWorkload) Close()       {}
func (s stubWorkload) Before(context.Context, int) error {
	return s.beforeErr
}
func (stubWorkload) Op(context.Context, int) error {
	time.Sleep(time.Millisecond)
	return classify(&client.Error{Status: 429, Code: client.CodeRateLimited, Detail: "Too many requests or guesses (guesses_per_user); nothing was checked or counted."}, "")
}

// Run counts the window's refusals by limiter, not the warm-up's, and
// reports both phases to Progress. A refusal Before gives as its turn's
// answer is counted like the operation's own; any other error of Before
// ends the run.
func TestRunTalliesTheWindow(t *testing.T) {
	var phases []string
	o := Options{Concurrency: 2, Warmup: 100 * time.Millisecond, Duration: 200 * time.Millisecond,
		Progress: func(phase string, total time.Duration) func(loadgen.Progress) {
			phases = append(phases, phase)
			return func(loadgen.Progress) {}
		}}
	res, limiters, err := Run(context.Background(), stubWorkload{}, o)
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests == 0 || limiters["guesses_per_user"] != res.Errors[client.CodeRateLimited] || len(limiters) != 1 {
		t.Errorf("%d requests, errors %v, limiters %v: want every request counted once by guesses_per_user", res.Requests, res.Errors, limiters)
	}
	if !slices.Equal(phases, []string{"warm-up", "stub"}) {
		t.Errorf("progress phases %v", phases)
	}

	refused := classify(&client.Error{Status: 429, Code: client.CodeRateLimited, Detail: "Too many wrong guesses in a row: wait before the next one."}, "")
	res, limiters, err = Run(context.Background(), stubWorkload{beforeErr: &loadgen.Outcome{Err: refused}}, Options{Concurrency: 1, Duration: 100 * time.Millisecond})
	if err != nil {
		t.Fatalf("a Before answered early: %v", err)
	}
	if res.Requests == 0 || res.Succeeded != 0 || limiters["escalating_delay"] != res.Requests || len(limiters) != 1 {
		t.Errorf("Before answered every turn early: %d requests, %d succeeded, limiters %v; want each counted by escalating_delay", res.Requests, res.Succeeded, limiters)
	}
	broken := errors.New("set-up broke")
	if _, _, err := Run(context.Background(), stubWorkload{beforeErr: broken}, Options{Concurrency: 1, Duration: time.Second}); !errors.Is(err, broken) {
		t.Fatalf("a failed Before: %v, want the run ended with its error", err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, _, err := Run(ctx, stubWorkload{}, Options{Concurrency: 1, Duration: time.Second}); err == nil {
		t.Error("an interrupted run is no error")
	}
}
