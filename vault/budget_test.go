package vault_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

var (
	bg       = context.Background()
	rightPIN = []byte("1234")
)

func isWrongPIN(err error) (int, bool) {
	var w *vault.WrongPINError
	if errors.As(err, &w) {
		return w.Remaining, true
	}
	return 0, false
}

// ---------------------------------------------------------------------------
// Happy paths, generations, max_attempts and input validation.

func TestLifecycle(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secret, pin2, secret2 := randBytes(32), []byte("5678"), randBytes(64)
	e.remember([]byte("alice"), secret, secret2, pin2)

	if _, _, err := e.v.Recover(bg, ns, "alice", rightPIN); !errors.Is(err, vault.ErrNotFound) {
		t.Fatalf("recover before enroll: %v, want ErrNotFound", err)
	}
	checks := e.hsm.pinChecks()
	b, created, err := e.v.Enroll(bg, ns, "alice", secret, rightPIN, 0, vault.Precondition{})
	if err != nil || !created {
		t.Fatalf("enroll: created=%v err=%v", created, err)
	}
	if got := e.hsm.pinChecks() - checks; got != 1 {
		t.Errorf("enroll made %d PIN-key HMACs, want 1", got)
	}
	if b.UserID != "alice" || b.Generation != 1 || b.MaxAttempts != 10 || b.AttemptsRemaining != 10 ||
		b.Locked || b.KeyVersion != 1 || b.PINKeyVersion != 1 || b.CreatedAt.IsZero() || !b.CreatedAt.Equal(b.UpdatedAt) {
		t.Errorf("enroll answered %+v", b)
	}
	if st := e.status("alice"); st != b {
		t.Errorf("status %+v, want what enroll answered %+v", st, b)
	}

	got, rem, err := e.v.Recover(bg, ns, "alice", rightPIN)
	if err != nil || !bytes.Equal(got, secret) || rem != 10 {
		t.Fatalf("recover: rem=%d err=%v, secret ok=%v", rem, err, bytes.Equal(got, secret))
	}
	if st := e.status("alice"); st.AttemptsRemaining != 10 || !st.UpdatedAt.After(st.CreatedAt) || !st.CreatedAt.Equal(b.CreatedAt) {
		t.Errorf("status after recover: %+v", st)
	}

	b2, created, err := e.v.Enroll(bg, ns, "alice", secret2, pin2, 4, vault.Precondition{})
	if err != nil || created || b2.Generation != 2 || b2.MaxAttempts != 4 || b2.AttemptsRemaining != 4 || !b2.CreatedAt.After(b.CreatedAt) {
		t.Fatalf("replace: %+v created=%v err=%v", b2, created, err)
	}
	if _, _, err := e.v.Recover(bg, ns, "alice", rightPIN); err == nil {
		t.Fatal("the replaced backup's old PIN still recovers")
	} else if r, ok := isWrongPIN(err); !ok || r != 3 {
		t.Fatalf("old PIN after replace: %v, want wrong PIN with 3 left", err)
	}
	if got, rem, err := e.v.Recover(bg, ns, "alice", pin2); err != nil || !bytes.Equal(got, secret2) || rem != 4 {
		t.Fatalf("recover the replaced backup: rem=%d err=%v", rem, err)
	}

	if err := e.v.Delete(bg, ns, "alice", vault.Precondition{}); err != nil {
		t.Fatalf("delete: %v", err)
	}
	checks = e.hsm.pinChecks()
	if _, err := e.v.Status(bg, ns, "alice"); !errors.Is(err, vault.ErrNotFound) {
		t.Errorf("status after delete: %v", err)
	}
	if _, _, err := e.v.Recover(bg, ns, "alice", pin2); !errors.Is(err, vault.ErrNotFound) {
		t.Errorf("recover after delete: %v", err)
	}
	if _, err := e.v.ChangePIN(bg, ns, "alice", pin2, []byte("9999"), vault.Precondition{}); !errors.Is(err, vault.ErrNotFound) {
		t.Errorf("change PIN after delete: %v", err)
	}
	if err := e.v.Delete(bg, ns, "alice", vault.Precondition{}); !errors.Is(err, vault.ErrNotFound) {
		t.Errorf("second delete: %v", err)
	}
	if n := e.hsm.pinChecks() - checks; n != 0 {
		t.Errorf("%d PIN checks on a deleted backup", n)
	}
	tomb, _ := e.raw(ns, "alice")
	if tomb == nil || !tomb.Tombstone || tomb.Generation != 2 || len(tomb.Sealed) != 0 || len(tomb.Salt) != 0 || len(tomb.Verifier) != 0 {
		t.Fatalf("tombstone: %+v", tomb)
	}

	b3, created, err := e.v.Enroll(bg, ns, "alice", secret, rightPIN, 0, vault.Precondition{})
	if err != nil || !created || b3.Generation != 3 {
		t.Fatalf("enroll over a tombstone: gen=%d created=%v err=%v", b3.Generation, created, err)
	}

	for _, m := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"keyvault_enrollments_total", []string{"result", "created"}, 2},
		{"keyvault_enrollments_total", []string{"result", "replaced"}, 1},
		{"keyvault_deletes_total", nil, 1},
		{"keyvault_recoveries_total", []string{"result", "success"}, 2},
		{"keyvault_recoveries_total", []string{"result", "wrong_pin"}, 1},
		{"keyvault_recoveries_total", []string{"result", "not_found"}, 2},
		{"keyvault_lockouts_total", nil, 0},
	} {
		if got := e.metric(m.name, m.labels...); got != m.want {
			t.Errorf("%s%v = %v, want %v", m.name, m.labels, got, m.want)
		}
	}
	if probs, err := testutil.GatherAndLint(e.reg); err != nil || len(probs) != 0 {
		t.Errorf("metric lint: %v %+v", err, probs)
	}
}

func TestGenerationsOnlyIncrease(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.remember([]byte("bob"), secret)
	gen := func() uint64 {
		r, _ := e.raw(ns, "bob")
		return r.Generation
	}
	steps := []struct {
		name string
		do   func() error
		want uint64
	}{
		{"enroll", func() error { e.enroll("bob", secret, rightPIN, 0); return nil }, 1},
		{"replace", func() error { e.enroll("bob", secret, rightPIN, 0); return nil }, 2},
		{"change PIN", func() error {
			_, err := e.v.ChangePIN(bg, ns, "bob", rightPIN, rightPIN, vault.Precondition{})
			return err
		}, 3},
		{"recover keeps the generation", func() error { _, _, err := e.v.Recover(bg, ns, "bob", rightPIN); return err }, 3},
		{"delete keeps it in the tombstone", func() error { return e.v.Delete(bg, ns, "bob", vault.Precondition{}) }, 3},
		{"enroll over the tombstone", func() error {
			_, _, err := e.v.Enroll(bg, ns, "bob", secret, rightPIN, 0, vault.Precondition{IfNoneMatch: true})
			return err
		}, 4},
		{"delete", func() error { return e.v.Delete(bg, ns, "bob", vault.Precondition{}) }, 4},
		{"restart", func() error { e.reopen(); return nil }, 4},
		{"enroll after restart", func() error { e.enroll("bob", secret, rightPIN, 0); return nil }, 5},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if g := gen(); g != s.want {
			t.Fatalf("after %s: generation %d, want %d", s.name, g, s.want)
		}
	}
}

func TestReplaceLockedBackup(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	e.enroll("carol", randBytes(16), rightPIN, 2)
	e.wrong("carol", 1)
	if _, _, err := e.v.Recover(bg, ns, "carol", []byte("4321")); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("last attempt: %v", err)
	}
	secret := randBytes(16)
	e.remember(secret)
	b, created, err := e.v.Enroll(bg, ns, "carol", secret, []byte("2468"), 5, vault.Precondition{})
	if err != nil || created || b.Generation != 2 || b.Locked || b.AttemptsRemaining != 5 {
		t.Fatalf("replace a locked backup: %+v created=%v err=%v", b, created, err)
	}
	if r, _ := e.raw(ns, "carol"); r.Guesses != 0 || r.Forgiven != 0 || r.Refunds != 0 || r.Locked || len(r.Sealed) == 0 {
		t.Errorf("the new generation does not start fresh: %+v", r)
	}
	if got, rem, err := e.v.Recover(bg, ns, "carol", []byte("2468")); err != nil || !bytes.Equal(got, secret) || rem != 5 {
		t.Fatalf("recover after replacing a locked backup: rem=%d err=%v", rem, err)
	}
}

func TestMaxAttempts(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		opts    vault.Options
		ask     int
		want    int
		wantErr bool
	}{
		{"default", vault.Options{}, 0, 10, false},
		{"one", vault.Options{}, 1, 1, false},
		{"the limit", vault.Options{}, 20, 20, false},
		{"past the limit", vault.Options{}, 21, 0, true},
		{"negative", vault.Options{}, -1, 0, true},
		{"most negative", vault.Options{}, math.MinInt, 0, true},
		{"huge", vault.Options{}, math.MaxInt, 0, true},
		{"configured default", vault.Options{Budget: vault.Budget{DefaultMaxAttempts: 3, MaxAttemptsLimit: 5}}, 0, 3, false},
		{"configured limit", vault.Options{Budget: vault.Budget{DefaultMaxAttempts: 3, MaxAttemptsLimit: 5}}, 5, 5, false},
		{"past the configured limit", vault.Options{Budget: vault.Budget{DefaultMaxAttempts: 3, MaxAttemptsLimit: 5}}, 6, 0, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, c.opts)
			b, _, err := e.v.Enroll(bg, ns, "dave", randBytes(16), rightPIN, c.ask, vault.Precondition{})
			if c.wantErr {
				if !errors.Is(err, vault.ErrInvalid) {
					t.Fatalf("max_attempts %d: %v, want ErrInvalid", c.ask, err)
				}
				if n := e.hsm.hmacCalls.Load(); n != 2 { // the two key derivations of vault.New
					t.Errorf("a refused enrollment made %d HSM HMACs", n-2)
				}
				if r, _ := e.raw(ns, "dave"); r != nil {
					t.Errorf("a refused enrollment wrote a record")
				}
				return
			}
			if err != nil || b.MaxAttempts != c.want || b.AttemptsRemaining != c.want {
				t.Fatalf("max_attempts %d: %+v %v, want %d", c.ask, b, err, c.want)
			}
		})
	}
}

func TestNewRejectsBadOptions(t *testing.T) {
	t.Parallel()
	for _, b := range []vault.Budget{
		{DefaultMaxAttempts: -1},
		{DefaultMaxAttempts: 21},
		{DefaultMaxAttempts: 5, MaxAttemptsLimit: 3},
		{MaxAttemptsLimit: -1},
	} {
		o := vault.Options{Budget: b}
		st, err := boltstore.Open(boltstore.Options{Path: t.TempDir() + "/s.db"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := vault.New(bg, st, newFakeHSM(t), o); err == nil {
			t.Errorf("New accepted %+v", o)
		}
		st.Close()
	}
}

// The escalating delay: after FreeGuesses attempts used in a row, a guess
// must wait Base * 2^(k-FreeGuesses) after the last one; a guess that comes
// too soon is refused with a truthful RetryAfter, and neither checked nor
// counted. It lives in the record, so a new vault process keeps it.
func TestEscalatingDelay(t *testing.T) {
	t.Parallel()
	var clock atomic.Int64
	clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	now := func() time.Time { return time.Unix(0, clock.Load()) }
	advance := func(d time.Duration) { clock.Add(int64(d)) }
	opts := vault.Options{Now: now, Budget: vault.Budget{EscalatingDelay: vault.EscalatingDelay{FreeGuesses: 2, Base: time.Minute}}}
	e := newEnv(t, opts)
	secret := randBytes(32)
	e.enroll("zoe", secret, rightPIN, 10)
	e.wrong("zoe", 9)
	advance(time.Second)
	e.wrong("zoe", 8)
	limited := func(want time.Duration, remaining int) {
		t.Helper()
		checks := e.hsm.pinChecks()
		_, _, err := e.v.Recover(bg, ns, "zoe", rightPIN)
		var rl *vault.DelayedError
		if !errors.As(err, &rl) || !errors.Is(err, vault.ErrDelayed) || rl.RetryAfter != want {
			t.Fatalf("a guess within the delay: %v, want DelayedError with RetryAfter %v", err, want)
		}
		if e.hsm.pinChecks() != checks || e.status("zoe").AttemptsRemaining != remaining {
			t.Fatal("a refused guess was checked or counted")
		}
	}
	limited(time.Minute, 8)
	advance(20 * time.Second)
	limited(40*time.Second, 8)
	advance(40 * time.Second)
	e.wrong("zoe", 7) // exactly when the delay ends; now 3 in a row: 2 minutes
	advance(time.Minute)
	limited(time.Minute, 7)
	// A new vault process on the same store keeps the delay.
	e.reopen()
	limited(time.Minute, 7)
	advance(time.Minute)
	// A guess the HSM never answers is refunded, and does not restart the
	// delay: the next guess need not wait again.
	e.hsm.failNextHMAC(1)
	if _, _, err := e.v.Recover(bg, ns, "zoe", rightPIN); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("a guess the HSM did not answer: %v", err)
	}
	advance(time.Second)
	if got, rem, err := e.v.Recover(bg, ns, "zoe", rightPIN); err != nil || !bytes.Equal(got, secret) || rem != 10 {
		t.Fatalf("the right PIN after the delay: rem=%d err=%v", rem, err)
	}
	e.wrong("zoe", 9) // a success resets the run: no delay
}

// Precheck refuses what a guess would refuse, and counts and checks
// nothing.
func TestPrecheck(t *testing.T) {
	t.Parallel()
	var clock atomic.Int64
	clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	e := newEnv(t, vault.Options{
		Now:    func() time.Time { return time.Unix(0, clock.Load()) },
		Budget: vault.Budget{EscalatingDelay: vault.EscalatingDelay{FreeGuesses: 1, Base: time.Minute}},
	})
	if err := e.v.Precheck(bg, ns, "nobody", vault.Precondition{}); !errors.Is(err, vault.ErrNotFound) {
		t.Fatalf("missing: %v", err)
	}
	b := e.enroll("pat", randBytes(32), rightPIN, 2)
	if err := e.v.Precheck(bg, ns, "pat", vault.Precondition{}); err != nil {
		t.Fatalf("fresh backup: %v", err)
	}
	if err := e.v.Precheck(bg, ns, "pat", vault.Precondition{IfMatch: b.Generation + 1}); !errors.Is(err, vault.ErrPrecondition) {
		t.Fatalf("stale If-Match: %v", err)
	}
	checks := e.hsm.pinChecks()
	e.wrong("pat", 1)
	var rl *vault.DelayedError
	if err := e.v.Precheck(bg, ns, "pat", vault.Precondition{}); !errors.As(err, &rl) || rl.RetryAfter != time.Minute {
		t.Fatalf("within the delay: %v", err)
	}
	clock.Add(int64(time.Minute))
	if _, _, err := e.v.Recover(bg, ns, "pat", []byte("0000-wrong")); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the last attempt: %v", err)
	}
	if err := e.v.Precheck(bg, ns, "pat", vault.Precondition{}); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("locked: %v", err)
	}
	if got := e.hsm.pinChecks() - checks; got != 2 {
		t.Fatalf("%d PIN checks, want the 2 guesses only", got)
	}
}

// Every malformed request is refused with ErrInvalid before anything is
// counted or written: no HSM call, and the stored record byte for byte the
// same.
func TestInvalidInputsCountNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("frank", secret, rightPIN, 5)
	e.wrong("frank", 4)
	_, rawBefore := e.raw(ns, "frank")
	hmacs := e.hsm.hmacCalls.Load()

	long := func(n int) string { return strings.Repeat("a", n) }
	pinOf := func(n int) []byte { return bytes.Repeat([]byte("7"), n) }
	recover := func(nsp, user string, pin []byte) func() error {
		return func() error { _, _, err := e.v.Recover(bg, nsp, user, pin); return err }
	}
	enroll := func(nsp, user string, secret, pin []byte, max int) func() error {
		return func() error {
			_, _, err := e.v.Enroll(bg, nsp, user, secret, pin, max, vault.Precondition{})
			return err
		}
	}
	change := func(nsp, user string, pin, newPIN []byte) func() error {
		return func() error { _, err := e.v.ChangePIN(bg, nsp, user, pin, newPIN, vault.Precondition{}); return err }
	}
	cases := []struct {
		name string
		do   func() error
	}{
		{"recover: empty user_id", recover(ns, "", rightPIN)},
		{"recover: user_id of 129", recover(ns, long(129), rightPIN)},
		{"recover: user_id with a slash", recover(ns, "frank/x", rightPIN)},
		{"recover: user_id with a space", recover(ns, "frank x", rightPIN)},
		{"recover: user_id with a NUL", recover(ns, "frank\x00", rightPIN)},
		{"recover: non-ASCII user_id", recover(ns, "fränk", rightPIN)},
		{"recover: empty namespace", recover("", "frank", rightPIN)},
		{"recover: upper-case namespace", recover("Messenger", "frank", rightPIN)},
		{"recover: namespace of 65", recover(long(65), "frank", rightPIN)},
		{"recover: PIN of 3", recover(ns, "frank", pinOf(3))},
		{"recover: PIN of 129", recover(ns, "frank", pinOf(129))},
		{"recover: empty PIN", recover(ns, "frank", nil)},
		{"enroll: secret of 15", enroll(ns, "frank", randBytes(15), rightPIN, 0)},
		{"enroll: secret of 513", enroll(ns, "frank", randBytes(513), rightPIN, 0)},
		{"enroll: empty secret", enroll(ns, "frank", nil, rightPIN, 0)},
		{"enroll: PIN of 3", enroll(ns, "frank", secret, pinOf(3), 0)},
		{"enroll: PIN of 129", enroll(ns, "frank", secret, pinOf(129), 0)},
		{"enroll: max_attempts -1", enroll(ns, "frank", secret, rightPIN, -1)},
		{"enroll: max_attempts 21", enroll(ns, "frank", secret, rightPIN, 21)},
		{"enroll: bad user_id", enroll(ns, "frank!", secret, rightPIN, 0)},
		{"enroll: bad namespace", enroll("ns_1", "frank", secret, rightPIN, 0)},
		{"change PIN: old PIN of 3", change(ns, "frank", pinOf(3), pinOf(6))},
		{"change PIN: old PIN of 129", change(ns, "frank", pinOf(129), pinOf(6))},
		{"change PIN: new PIN of 3", change(ns, "frank", rightPIN, pinOf(3))},
		{"change PIN: new PIN of 129", change(ns, "frank", rightPIN, pinOf(129))},
		{"change PIN: wrong old PIN and bad new PIN", change(ns, "frank", pinOf(6), pinOf(3))},
		{"change PIN: bad user_id", change(ns, "", rightPIN, pinOf(6))},
		{"delete: bad user_id", func() error { return e.v.Delete(bg, ns, long(200), vault.Precondition{}) }},
		{"delete: bad namespace", func() error { return e.v.Delete(bg, "", "frank", vault.Precondition{}) }},
		{"status: bad user_id", func() error { _, err := e.v.Status(bg, ns, "a b"); return err }},
	}
	for _, c := range cases {
		err := c.do()
		if !errors.Is(err, vault.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", c.name, err)
		}
		if n := e.hsm.hmacCalls.Load(); n != hmacs {
			t.Errorf("%s: %d HSM HMACs before refusing", c.name, n-hmacs)
			hmacs = n
		}
		if _, raw := e.raw(ns, "frank"); !bytes.Equal(raw, rawBefore) {
			t.Errorf("%s: the stored record changed", c.name)
			rawBefore = raw
		}
	}
	if st := e.status("frank"); st.AttemptsRemaining != 4 || st.Generation != 1 {
		t.Errorf("status after the refused requests: %+v", st)
	}
	if got := e.metric("keyvault_recoveries_total", "result", "invalid"); got != 12 {
		t.Errorf("recoveries{invalid} = %v, want 12", got)
	}
	// And the error text names the field, never its value.
	_, _, err := e.v.Recover(bg, ns, "frank", []byte("123"))
	if err == nil || !strings.Contains(err.Error(), "pin") || strings.Contains(err.Error(), "123") {
		t.Errorf("invalid PIN error %q should name the field and not hold the value", err)
	}
}

func TestBoundaryInputsAccepted(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	user := strings.Repeat("Az09._~:@-", 13)[:128]
	nsp := strings.Repeat("a-9", 22)[:64]
	for _, c := range []struct {
		nsp, user   string
		secret, pin []byte
	}{
		{nsp, user, randBytes(16), []byte("1234")},
		{"a", "b", randBytes(512), bytes.Repeat([]byte("x"), 128)},
		{ns, "x", randBytes(100), []byte("\xf0\x9f\x94\x91pin")},
	} {
		if _, _, err := e.v.Enroll(bg, c.nsp, c.user, c.secret, c.pin, 0, vault.Precondition{}); err != nil {
			t.Fatalf("enroll at the limits (%d-char ns, %d-char user, %d-byte secret, %d-byte PIN): %v",
				len(c.nsp), len(c.user), len(c.secret), len(c.pin), err)
		}
		got, _, err := e.v.Recover(bg, c.nsp, c.user, c.pin)
		if err != nil || !bytes.Equal(got, c.secret) {
			t.Fatalf("recover at the limits: %v", err)
		}
	}
}

// ---------------------------------------------------------------------------
// Wrong guesses and the lock.

func TestWrongGuessesLockAtTheLastAttempt(t *testing.T) {
	t.Parallel()
	for _, max := range []int{1, 2, 5} {
		t.Run(fmt.Sprint(max), func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, vault.Options{})
			secret := randBytes(32)
			e.enroll("gina", secret, rightPIN, max)
			for k := 1; k < max; k++ {
				e.wrong("gina", max-k)
				if st := e.status("gina"); st.AttemptsRemaining != max-k || st.Locked {
					t.Fatalf("after %d wrong: %+v", k, st)
				}
			}
			_, _, err := e.v.Recover(bg, ns, "gina", []byte("0000"))
			if !errors.Is(err, vault.ErrLocked) || errors.Is(err, vault.ErrWrongPIN) {
				t.Fatalf("the guess that uses the last attempt: %v, want ErrLocked and not a wrong PIN", err)
			}
			if _, ok := isWrongPIN(err); ok {
				t.Fatal("the locking guess is a *WrongPINError")
			}
			r, raw := e.raw(ns, "gina")
			if !r.Locked || len(r.Sealed) != 0 {
				t.Fatalf("locked record still holds a sealed secret: locked=%v sealed=%d bytes", r.Locked, len(r.Sealed))
			}
			if bytes.Contains(raw, secret) {
				t.Fatal("the record holds the secret in clear")
			}
			st := e.status("gina")
			if !st.Locked || st.AttemptsRemaining != 0 || st.Generation != 1 {
				t.Fatalf("status of a locked backup: %+v", st)
			}
			checks := e.hsm.pinChecks()
			if got, _, err := e.v.Recover(bg, ns, "gina", rightPIN); !errors.Is(err, vault.ErrLocked) || got != nil {
				t.Fatalf("right PIN on a locked backup: %v", err)
			}
			if _, err := e.v.ChangePIN(bg, ns, "gina", rightPIN, []byte("9876"), vault.Precondition{}); !errors.Is(err, vault.ErrLocked) {
				t.Fatalf("change PIN on a locked backup: %v", err)
			}
			if n := e.hsm.pinChecks() - checks; n != 0 {
				t.Fatalf("%d PIN checks against a locked backup", n)
			}
			if e.metric("keyvault_lockouts_total") != 1 ||
				e.metric("keyvault_recoveries_total", "result", "wrong_pin") != float64(max-1) ||
				e.metric("keyvault_recoveries_total", "result", "locked") != 2 {
				t.Error("lockout metrics disagree")
			}
			// Still there after a restart.
			e.reopen()
			if _, _, err := e.v.Recover(bg, ns, "gina", rightPIN); !errors.Is(err, vault.ErrLocked) {
				t.Fatalf("right PIN after restart: %v", err)
			}
			if err := e.v.Delete(bg, ns, "gina", vault.Precondition{}); err != nil {
				t.Fatalf("delete a locked backup: %v", err)
			}
		})
	}
}

func TestRightPINResetsTheCounter(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("hank", secret, rightPIN, 5)
	for round := 0; round < 3; round++ {
		for k := 1; k <= 4; k++ {
			e.wrong("hank", 5-k)
		}
		got, rem, err := e.v.Recover(bg, ns, "hank", rightPIN)
		if err != nil || rem != 5 || !bytes.Equal(got, secret) {
			t.Fatalf("round %d: right PIN after 4 wrong: rem=%d err=%v", round, rem, err)
		}
		if st := e.status("hank"); st.AttemptsRemaining != 5 {
			t.Fatalf("round %d: status after reset: %+v", round, st)
		}
	}
}

// 64 concurrent wrong guesses at a backup with 5 attempts, spread over two
// vaults sharing the store: exactly 4 are answered wrong_pin (4, 3, 2 and 1
// left), 60 locked, and no more than 5 PINs are checked.
func TestConcurrentWrongGuesses(t *testing.T) {
	t.Parallel()
	const max, workers, rounds = 5, 64, 20
	e := newEnv(t, vault.Options{})
	vaults := []*vault.Vault{e.v, e.newVault(e.store, e.hsm, prometheus.NewRegistry())}
	for round := 0; round < rounds; round++ {
		user := fmt.Sprintf("ivy-%d", round)
		e.enroll(user, randBytes(32), rightPIN, max)
		checks := e.hsm.pinChecks()
		var (
			wg    sync.WaitGroup
			start = make(chan struct{})
			errs  = make([]error, workers)
		)
		for i := range workers {
			wg.Go(func() {
				<-start
				_, _, errs[i] = vaults[i%2].Recover(bg, ns, user, fmt.Appendf(nil, "w%04d", i))
			})
		}
		close(start)
		wg.Wait()
		var remaining []int
		locked := 0
		for _, err := range errs {
			if r, ok := isWrongPIN(err); ok {
				remaining = append(remaining, r)
			} else if errors.Is(err, vault.ErrLocked) {
				locked++
			} else {
				t.Errorf("round %d: unexpected answer %v", round, err)
			}
		}
		slices.Sort(remaining)
		if !slices.Equal(remaining, []int{1, 2, 3, 4}) || locked != 60 {
			t.Fatalf("round %d: wrong_pin answers with remaining %v and %d locked, want [1 2 3 4] and 60", round, remaining, locked)
		}
		if n := e.hsm.pinChecks() - checks; n > max {
			t.Fatalf("round %d: %d PINs checked, budget is %d", round, n, max)
		}
		r, _ := e.raw(ns, user)
		if !r.Locked || len(r.Sealed) != 0 || r.Guesses != max {
			t.Fatalf("round %d: record after the storm: locked=%v sealed=%d guesses=%d", round, r.Locked, len(r.Sealed), r.Guesses)
		}
	}
}

// observedStore is the real bbolt store, plus a note of the index of each
// request's counted guess: the Guesses field of the first record it wrote,
// and of the last one (a wrong guess forgiven before it was checked is
// counted again under a new index: see vault.settleForgiven).
type observedStore struct {
	vault.Store
	key    []byte
	mu     sync.Mutex
	counts map[string]uint32
	last   map[string]uint32
}

func (s *observedStore) CompareAndSwap(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, error) {
	nr, err := s.Store.CompareAndSwap(ctx, key, rev, value)
	if err == nil {
		s.note(ctx, key, value)
	}
	return nr, err
}

// note records the guess count of value, written under key by the request
// tagged in ctx.
func (s *observedStore) note(ctx context.Context, key, value []byte) {
	tag := tagOf(ctx)
	if tag == "" || !bytes.Equal(key, s.key) {
		return
	}
	r, err := vault.ParseRecord(value)
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, seen := s.counts[tag]; !seen {
		s.counts[tag] = r.Guesses
	}
	s.last[tag] = r.Guesses
}

// Right and wrong PINs interleaved from many goroutines, on two vaults
// sharing the store, with and without HSM failures (refunds). Ordered by
// the index under which each guess was counted (the order the budget is
// kept in: a success forgives the guesses counted before it and keeps those
// counted after it began), no run of wrong PINs checked without a success
// between them is longer than max_attempts; every success returned the
// right secret; no two guesses share an index; the record never counts
// fewer wrong guesses than were checked since the last reset.
func TestConcurrentRightAndWrongGuesses(t *testing.T) {
	t.Parallel()
	for _, failing := range []bool{false, true} {
		t.Run(map[bool]string{false: "HSM healthy", true: "HSM failing one check in five"}[failing], func(t *testing.T) {
			t.Parallel()
			mixedGuesses(t, failing)
		})
	}
}

func mixedGuesses(t *testing.T, failing bool) {
	const budget, workers, perWorker, rounds = 4, 12, 10, 6
	e := newEnv(t, vault.Options{})
	for round := 0; round < rounds; round++ {
		user := fmt.Sprintf("jack-%d", round)
		secret := randBytes(32)
		e.enroll(user, secret, rightPIN, budget)
		obs := &observedStore{Store: e.store, key: vault.RecordKey(ns, user), counts: map[string]uint32{}, last: map[string]uint32{}}
		vaults := []*vault.Vault{e.newVault(obs, e.hsm, prometheus.NewRegistry()), e.newVault(obs, e.hsm, prometheus.NewRegistry())}

		var mu sync.Mutex
		reached := map[string]bool{} // the request's PIN check reached the HSM
		e.hsm.setHook(func(ctx context.Context, key vault.KeyID, _ []byte) {
			if tag := tagOf(ctx); key.Role == vault.RolePIN && tag != "" {
				mu.Lock()
				reached[tag] = true
				mu.Unlock()
				if rand.IntN(2) == 0 {
					runtime.Gosched()
				} else {
					time.Sleep(time.Duration(rand.IntN(200)) * time.Microsecond)
				}
				if failing && rand.IntN(5) == 0 {
					e.hsm.failTagged(tag)
				}
			}
		})

		type result struct {
			right  bool
			secret []byte
			err    error
		}
		// Each worker sends a sequence of guesses, half of them right, so
		// that right PINs are often in flight while wrong ones are counted.
		results := make([]result, workers*perWorker)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for w := range workers {
			wg.Go(func() {
				<-start
				for j := range perWorker {
					i := w*perWorker + j
					right := rand.IntN(2) == 0
					pin := rightPIN
					if !right {
						pin = fmt.Appendf(nil, "x%03d", i)
					}
					s, _, err := vaults[i%2].Recover(withTag(bg, fmt.Sprint(i)), ns, user, pin)
					results[i] = result{right, s, err}
				}
			})
		}
		close(start)
		wg.Wait()
		e.hsm.setHook(nil)

		const (
			right = iota
			wrong
			unanswered
			recounted // the first index of a wrong guess counted again
			untold    // forgiven by a later success, checked after the lock: not told
		)
		type event struct {
			index uint32
			kind  int
		}
		var events []event
		maxSuccess := uint32(0)
		refused := 0
		for i, res := range results {
			tag := fmt.Sprint(i)
			index, counted := obs.counts[tag]
			if reached[tag] != counted {
				t.Fatalf("round %d: request %d reached the HSM: %v, counted: %v", round, i, reached[tag], counted)
			}
			switch {
			case res.err == nil:
				if !res.right || !bytes.Equal(res.secret, secret) {
					t.Fatalf("round %d: request %d (right PIN: %v) recovered a wrong secret", round, i, res.right)
				}
				events = append(events, event{index, right})
				maxSuccess = max(maxSuccess, index)
			case errors.Is(res.err, vault.ErrUntold):
				if !counted {
					t.Fatalf("round %d: request %d left untold an outcome it never counted", round, i)
				}
				events = append(events, event{index, untold})
			case errors.Is(res.err, vault.ErrUnavailable):
				if !failing || !counted {
					t.Fatalf("round %d: request %d: %v", round, i, res.err)
				}
				events = append(events, event{index, unanswered})
			case errors.Is(res.err, vault.ErrWrongPIN) || errors.Is(res.err, vault.ErrLocked):
				if counted && res.right {
					t.Fatalf("round %d: the right PIN was checked and answered %v", round, res.err)
				}
				if counted && obs.last[tag] > index {
					events = append(events, event{index, recounted}, event{obs.last[tag], wrong})
				} else if counted {
					events = append(events, event{index, wrong})
				} else {
					refused++
				}
			default:
				t.Fatalf("round %d: request %d: unexpected error %v", round, i, res.err)
			}
		}
		sort.Slice(events, func(a, b int) bool { return events[a].index < events[b].index })
		run, longest := 0, 0
		for k, ev := range events {
			if int(ev.index) != k+1 {
				t.Fatalf("round %d: counted guess indexes are not 1..n: %v", round, events)
			}
			if ev.kind == untold && ev.index >= maxSuccess {
				t.Fatalf("round %d: guess %d left untold with no later success (last success: guess %d)", round, ev.index, maxSuccess)
			}
			switch ev.kind {
			case right:
				run = 0
			case wrong:
				run++
				longest = max(longest, run)
				if run > budget {
					t.Fatalf("round %d: %d wrong PINs checked in a row without a success (budget %d): %v", round, run, budget, events)
				}
			}
		}
		r, _ := e.raw(ns, user)
		t.Logf("round %d: %d guesses counted, %d refused unchecked, longest wrong run %d, forgiven up to %d, %d refunds, locked %v",
			round, len(events), refused, longest, r.Forgiven, r.Refunds, r.Locked)
		if int(r.Guesses) != len(events) || (!failing && r.Refunds != 0) {
			t.Fatalf("round %d: record counts %d guesses (%d refunds), %d were counted", round, r.Guesses, r.Refunds, len(events))
		}
		wrongSince, unansweredSince := 0, 0
		for _, ev := range events {
			if ev.index > r.Forgiven && ev.kind == wrong {
				wrongSince++
			} else if ev.index > r.Forgiven && ev.kind == unanswered {
				unansweredSince++
			}
		}
		if used := int(r.Guesses - r.Forgiven - r.Refunds); used < wrongSince || int(r.Refunds) > unansweredSince {
			t.Fatalf("round %d: the record counts %d attempts used (%d refunds), but %d wrong guesses were checked after guess %d (%d unanswered)",
				round, used, r.Refunds, wrongSince, r.Forgiven, unansweredSince)
		}
		if !r.Locked && r.Forgiven != maxSuccess {
			t.Fatalf("round %d: forgiven up to %d, last success was guess %d", round, r.Forgiven, maxSuccess)
		}
		if r.Locked && (len(r.Sealed) != 0 || events[len(events)-1].kind != wrong) {
			t.Fatalf("round %d: locked by a guess that was not a checked wrong PIN, or with a sealed secret", round)
		}
	}
}

// ---------------------------------------------------------------------------
// HSM failures refund the guess.

func TestHSMFailureDuringPINCheckRefundsTheGuess(t *testing.T) {
	t.Parallel()
	const max = 3
	type op int
	const (
		opRecover op = iota
		opChangePIN
	)
	cases := []struct {
		name        string
		wrongBefore int
		right       bool
	}{
		{"right PIN, first guess", 0, true},
		{"wrong PIN", 1, false},
		{"right PIN on the last attempt", max - 1, true},
		{"wrong PIN on the last attempt", max - 1, false},
	}
	for _, o := range []op{opRecover, opChangePIN} {
		for _, c := range cases {
			name := map[op]string{opRecover: "recover", opChangePIN: "change PIN"}[o] + ": " + c.name
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				e := newEnv(t, vault.Options{})
				secret := randBytes(32)
				e.enroll("kate", secret, rightPIN, max)
				for k := 1; k <= c.wrongBefore; k++ {
					e.wrong("kate", max-k)
				}
				before, _ := e.raw(ns, "kate")
				pin := rightPIN
				if !c.right {
					pin = []byte("5555")
				}
				checks := e.hsm.pinChecks()
				e.hsm.failNextHMAC(1)
				var err error
				var got []byte
				switch o {
				case opRecover:
					got, _, err = e.v.Recover(bg, ns, "kate", pin)
				case opChangePIN:
					_, err = e.v.ChangePIN(bg, ns, "kate", pin, []byte("8642"), vault.Precondition{})
				}
				if !errors.Is(err, vault.ErrUnavailable) || errors.Is(err, vault.ErrWrongPIN) || errors.Is(err, vault.ErrLocked) || got != nil {
					t.Fatalf("with the HSM failing: %v, want only ErrUnavailable", err)
				}
				if n := e.hsm.pinChecks() - checks; n != 0 {
					t.Fatalf("%d PIN checks produced a result", n)
				}
				st := e.status("kate")
				if st.AttemptsRemaining != max-c.wrongBefore || st.Locked || st.Generation != 1 {
					t.Fatalf("after the failed check: %+v, want %d remaining and unlocked", st, max-c.wrongBefore)
				}
				after, _ := e.raw(ns, "kate")
				if !bytes.Equal(after.Sealed, before.Sealed) || !bytes.Equal(after.Nonce, before.Nonce) {
					t.Fatal("the sealed secret did not come back")
				}
				metric := map[op]string{opRecover: "keyvault_recoveries_total", opChangePIN: "keyvault_pin_changes_total"}[o]
				if e.metric(metric, "result", "unavailable") != 1 {
					t.Errorf("%s{unavailable} not counted", metric)
				}
				s, rem, err := e.v.Recover(bg, ns, "kate", rightPIN)
				if err != nil || !bytes.Equal(s, secret) || rem != max {
					t.Fatalf("right PIN afterwards: rem=%d err=%v", rem, err)
				}
			})
		}
	}
}

// A PIN change whose old PIN was right but whose later HSM steps fail
// refunds its guess, even on the last attempt, and changes nothing.
func TestChangePINFailureAfterTheCheckRefunds(t *testing.T) {
	t.Parallel()
	const max = 3
	cases := []struct {
		name   string
		inject func(f *fakeHSM)
	}{
		{"open fails", func(f *fakeHSM) { f.failNextOpen(1) }},
		{"seal fails", func(f *fakeHSM) { f.failNextSeal(1) }},
		{"new PIN MAC fails", func(f *fakeHSM) {
			n := 0
			f.setHook(func(ctx context.Context, key vault.KeyID, _ []byte) {
				if key.Role == vault.RolePIN {
					if n++; n == 2 {
						f.failNextHMAC(1)
					}
				}
			})
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, vault.Options{})
			secret := randBytes(32)
			e.enroll("liam", secret, rightPIN, max)
			e.wrong("liam", 2)
			e.wrong("liam", 1)
			c.inject(e.hsm)
			if _, err := e.v.ChangePIN(bg, ns, "liam", rightPIN, []byte("7777"), vault.Precondition{}); !errors.Is(err, vault.ErrUnavailable) {
				t.Fatalf("change PIN: %v, want ErrUnavailable", err)
			}
			e.hsm.setHook(nil)
			st := e.status("liam")
			if st.Locked || st.AttemptsRemaining != 1 || st.Generation != 1 {
				t.Fatalf("after the failed change: %+v", st)
			}
			if s, _, err := e.v.Recover(bg, ns, "liam", rightPIN); err != nil || !bytes.Equal(s, secret) {
				t.Fatalf("the old PIN no longer recovers: %v", err)
			}
		})
	}
}

// The HSM answers the PIN check (right PIN, last attempt) but then fails to
// open the secret: the answer is ErrUnavailable, and the secret is still
// there for the next try; the budget is not spent.
func TestOpenFailureAfterRightPINKeepsTheSecret(t *testing.T) {
	t.Parallel()
	const max = 3
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("mia", secret, rightPIN, max)
	e.wrong("mia", 2)
	e.wrong("mia", 1)
	e.hsm.failNextOpen(1)
	if got, _, err := e.v.Recover(bg, ns, "mia", rightPIN); !errors.Is(err, vault.ErrUnavailable) || got != nil {
		t.Fatalf("recover with open failing: %v", err)
	}
	if st := e.status("mia"); st.Locked || st.AttemptsRemaining < 1 {
		t.Fatalf("after the failed open: %+v", st)
	}
	if s, _, err := e.v.Recover(bg, ns, "mia", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("right PIN afterwards: %v", err)
	}
}

// A request whose context ends while the HSM is checking its PIN gets no
// outcome (the HSM gave no result): its guess must be refunded like any
// other unanswered guess. The refund is a counting write, so it must not
// depend on the caller's context.
func TestClientHangUpDuringPINCheckRefundsTheGuess(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name        string
		max         int
		wrongBefore int
	}{
		{"first guess", 5, 0},
		{"right PIN on the last attempt", 3, 2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, vault.Options{})
			secret := randBytes(32)
			e.enroll("noah", secret, rightPIN, c.max)
			for k := 1; k <= c.wrongBefore; k++ {
				e.wrong("noah", c.max-k)
			}
			ctx, cancel := context.WithCancel(withTag(bg, "hangup"))
			defer cancel()
			e.hsm.setHook(func(ctx context.Context, key vault.KeyID, _ []byte) {
				if tagOf(ctx) == "hangup" && key.Role == vault.RolePIN {
					cancel() // the client hangs up while the HSM works
				}
			})
			got, _, err := e.v.Recover(ctx, ns, "noah", rightPIN)
			if got != nil || !errors.Is(err, vault.ErrUnavailable) {
				t.Fatalf("recover that lost its client: %v", err)
			}
			st := e.status("noah")
			if st.Locked || st.AttemptsRemaining != c.max-c.wrongBefore {
				t.Errorf("an unanswered guess stayed counted after the client hung up: %+v, want %d remaining and unlocked",
					st, c.max-c.wrongBefore)
			}
			if s, _, err := e.v.Recover(bg, ns, "noah", rightPIN); err != nil || !bytes.Equal(s, secret) {
				t.Errorf("the right PIN no longer recovers the secret: %v", err)
			}
		})
	}
}

// The HSM confirmed the right PIN on the last attempt, and then the client
// hung up. The right PIN must never destroy the backup.
func TestClientHangUpAfterRightPINDoesNotLockTheBackup(t *testing.T) {
	t.Parallel()
	const max = 3
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("olga", secret, rightPIN, max)
	e.wrong("olga", 2)
	e.wrong("olga", 1)
	ctx, cancel := context.WithCancel(withTag(bg, "hangup"))
	defer cancel()
	e.hsm.setAfterHook(func(ctx context.Context, key vault.KeyID) {
		if tagOf(ctx) == "hangup" && key.Role == vault.RolePIN {
			cancel()
		}
	})
	_, _, err := e.v.Recover(ctx, ns, "olga", rightPIN)
	if err == nil {
		t.Fatal("recover whose client hung up succeeded; the test did not cancel in time")
	}
	st := e.status("olga")
	if st.Locked {
		t.Errorf("the right PIN locked the backup and destroyed its secret because the client hung up (%v)", err)
	}
	if s, _, err := e.v.Recover(bg, ns, "olga", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Errorf("the right PIN no longer recovers the secret: %v", err)
	}
}

func TestCanceledBeforeAnythingCountsNothing(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	e.enroll("pia", randBytes(16), rightPIN, 3)
	ctx, cancel := context.WithCancel(bg)
	cancel()
	if _, _, err := e.v.Recover(ctx, ns, "pia", []byte("0000")); err == nil {
		t.Fatal("recover with a canceled context succeeded")
	}
	if st := e.status("pia"); st.AttemptsRemaining != 3 {
		t.Fatalf("a request canceled before it began was counted: %+v", st)
	}
}

// ---------------------------------------------------------------------------
// Interleavings held at a known point by the fake HSM.

// A right PIN is held inside the HSM while two wrong guesses are counted
// and answered: its reset keeps those two.
func TestRecoveryKeepsGuessesCountedAfterItBegan(t *testing.T) {
	t.Parallel()
	const max = 5
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("quinn", secret, rightPIN, max)
	entered, release := e.hsm.pause("right", 1)
	type res struct {
		s   []byte
		rem int
		err error
	}
	done := make(chan res, 1)
	go func() {
		s, rem, err := e.v.Recover(withTag(bg, "right"), ns, "quinn", rightPIN)
		done <- res{s, rem, err}
	}()
	<-entered
	e.wrong("quinn", max-2) // the held right guess is counted too
	e.wrong("quinn", max-3)
	release()
	r := <-done
	if r.err != nil || !bytes.Equal(r.s, secret) {
		t.Fatalf("held right PIN: %v", r.err)
	}
	if r.rem != max-2 {
		t.Errorf("recover answered %d remaining, want %d", r.rem, max-2)
	}
	if st := e.status("quinn"); st.AttemptsRemaining != max-2 {
		t.Errorf("remaining after the reset: %d, want %d", st.AttemptsRemaining, max-2)
	}
}

// The right PIN uses the last attempt: while it is in the HSM, the store
// holds no secret and other guesses are refused unchecked; when it
// succeeds, the secret is back and the counter fresh.
func TestRightLastGuessPutsTheSecretBack(t *testing.T) {
	t.Parallel()
	const max = 3
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("rosa", secret, rightPIN, max)
	e.wrong("rosa", 2)
	e.wrong("rosa", 1)
	entered, release := e.hsm.pause("right", 1)
	done := make(chan error, 1)
	var got []byte
	var rem int
	go func() {
		var err error
		got, rem, err = e.v.Recover(withTag(bg, "right"), ns, "rosa", rightPIN)
		done <- err
	}()
	<-entered
	if r, _ := e.raw(ns, "rosa"); !r.Locked || len(r.Sealed) != 0 {
		t.Fatal("while the last attempt is checked, the store still holds the sealed secret")
	}
	// Another guess meanwhile waits for the pending lock to settle: it is
	// neither checked nor answered 410 (the secret comes back below).
	checks := e.hsm.pinChecks()
	other := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(bg, ns, "rosa", []byte("0000"))
		other <- err
	}()
	select {
	case err := <-other:
		t.Fatalf("a guess while the last attempt is in flight answered %v before it settled", err)
	case <-time.After(50 * time.Millisecond):
	}
	if e.hsm.pinChecks() != checks {
		t.Fatal("a guess past the last attempt was checked")
	}
	release()
	if err := <-done; err != nil || !bytes.Equal(got, secret) || rem != max {
		t.Fatalf("the right last guess: rem=%d err=%v", rem, err)
	}
	// Once it settled right, the waiting guess was counted and checked.
	var wrong *vault.WrongPINError
	if err := <-other; !errors.As(err, &wrong) || wrong.Remaining != max-1 {
		t.Fatalf("the guess that waited: %v, want wrong PIN with %d left", err, max-1)
	}
	st := e.status("rosa")
	if st.Locked || st.AttemptsRemaining != max-1 {
		t.Fatalf("after the right last guess: %+v", st)
	}
	if r, _ := e.raw(ns, "rosa"); len(r.Sealed) == 0 {
		t.Fatal("the secret did not come back")
	}
}

// A right PIN held in the HSM while later wrong guesses use up the budget:
// the request that held the right PIN gets its secret, but the lock by the
// later guess stands (its 410 stays true).
func TestLockByALaterGuessStands(t *testing.T) {
	t.Parallel()
	const max = 3
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("sam", secret, rightPIN, max)
	entered, release := e.hsm.pause("right", 1)
	done := make(chan error, 1)
	var got []byte
	var rem int
	go func() {
		var err error
		got, rem, err = e.v.Recover(withTag(bg, "right"), ns, "sam", rightPIN)
		done <- err
	}()
	<-entered
	e.wrong("sam", 1)
	if _, _, err := e.v.Recover(bg, ns, "sam", []byte("0000")); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the wrong guess that uses the last attempt: %v", err)
	}
	release()
	if err := <-done; err != nil || !bytes.Equal(got, secret) || rem != 0 {
		t.Fatalf("held right PIN: rem=%d err=%v", rem, err)
	}
	if st := e.status("sam"); !st.Locked {
		t.Fatal("the lock by a later wrong guess was undone")
	}
	if r, _ := e.raw(ns, "sam"); len(r.Sealed) != 0 {
		t.Fatal("the secret came back after a later guess locked the backup")
	}
}

// A guess held in the HSM while a later right PIN forgives it and two wrong
// guesses follow; then the HSM fails it. Its refund must not uncount one of
// the later wrong guesses: it was already forgiven.
func TestRefundOfAForgivenGuessUncountsNothing(t *testing.T) {
	t.Parallel()
	const max = 5
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("ugo", secret, rightPIN, max)
	entered, release := e.hsm.pause("held", 1)
	done := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(withTag(bg, "held"), ns, "ugo", []byte("0000"))
		done <- err
	}()
	<-entered
	if s, rem, err := e.v.Recover(bg, ns, "ugo", rightPIN); err != nil || !bytes.Equal(s, secret) || rem != max {
		t.Fatalf("right PIN while another guess is held: rem=%d err=%v", rem, err)
	}
	e.wrong("ugo", max-1)
	e.wrong("ugo", max-2)
	e.hsm.failNextHMAC(1)
	release()
	if err := <-done; !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("held guess: %v, want ErrUnavailable", err)
	}
	if st := e.status("ugo"); st.AttemptsRemaining != max-2 {
		t.Fatalf("after the refund of a forgiven guess %d attempts remain, want %d", st.AttemptsRemaining, max-2)
	}
}

// A guess counted against generation 1 never touches generation 2. Its
// outcome is not told either, right or wrong: its generation is gone, so
// its check can be counted nowhere (a PIN change that forgave it may have
// started generation 2).
func TestOlderGenerationNeverTouchesANewerOne(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		do   func(e *env, ctx context.Context) error
		fail bool // make the held HSM call fail (a refund)
		want error
	}{
		{"reset by a right PIN", func(e *env, ctx context.Context) error {
			_, _, err := e.v.Recover(ctx, ns, "tom", rightPIN)
			return err
		}, false, vault.ErrUnavailable},
		{"refund of an unanswered guess", func(e *env, ctx context.Context) error {
			_, _, err := e.v.Recover(ctx, ns, "tom", rightPIN)
			return err
		}, true, vault.ErrUnavailable},
		{"wrong guess", func(e *env, ctx context.Context) error {
			_, _, err := e.v.Recover(ctx, ns, "tom", []byte("0000"))
			return err
		}, false, vault.ErrUnavailable},
		{"PIN change", func(e *env, ctx context.Context) error {
			_, err := e.v.ChangePIN(ctx, ns, "tom", rightPIN, []byte("1357"), vault.Precondition{})
			return err
		}, false, vault.ErrUnavailable},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			const max = 4
			e := newEnv(t, vault.Options{})
			e.enroll("tom", randBytes(32), rightPIN, max)
			e.wrong("tom", max-1)
			entered, release := e.hsm.pause("held", 1)
			done := make(chan error, 1)
			go func() { done <- c.do(e, withTag(bg, "held")) }()
			<-entered
			secret2 := randBytes(32)
			e.enroll("tom", secret2, []byte("2222"), max)
			_, before := e.raw(ns, "tom")
			if c.fail {
				e.hsm.failNextHMAC(1)
			}
			release()
			if err := <-done; (c.want == nil) != (err == nil) || (c.want != nil && !errors.Is(err, c.want)) {
				t.Fatalf("held request: %v, want %v", err, c.want)
			}
			if _, after := e.raw(ns, "tom"); !bytes.Equal(after, before) {
				r, _ := e.raw(ns, "tom")
				t.Fatalf("generation 2 was written by a request of generation 1: %+v", r)
			}
			if s, rem, err := e.v.Recover(bg, ns, "tom", []byte("2222")); err != nil || !bytes.Equal(s, secret2) || rem != max {
				t.Fatalf("generation 2 afterwards: rem=%d err=%v", rem, err)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// Preconditions.

func TestPreconditions(t *testing.T) {
	t.Parallel()
	type state int
	const (
		live state = iota // generation 2, 4 attempts of 5 left
		tombstone
		missing
		locked
	)
	enroll := func(pre vault.Precondition) func(e *env) error {
		return func(e *env) error {
			_, _, err := e.v.Enroll(bg, ns, "uma", randBytes(16), []byte("9090"), 0, pre)
			return err
		}
	}
	change := func(pin string, pre vault.Precondition) func(e *env) error {
		return func(e *env) error {
			_, err := e.v.ChangePIN(bg, ns, "uma", []byte(pin), []byte("9090"), pre)
			return err
		}
	}
	del := func(pre vault.Precondition) func(e *env) error {
		return func(e *env) error { return e.v.Delete(bg, ns, "uma", pre) }
	}
	cases := []struct {
		name    string
		state   state
		op      func(e *env) error
		want    error // nil: success
		wantGen uint64
		counted bool // a guess was checked
	}{
		{"enroll If-Match stale", live, enroll(vault.Precondition{IfMatch: 1}), vault.ErrPrecondition, 2, false},
		{"enroll If-Match newer", live, enroll(vault.Precondition{IfMatch: 3}), vault.ErrPrecondition, 2, false},
		{"enroll If-Match current", live, enroll(vault.Precondition{IfMatch: 2}), nil, 3, false},
		{"enroll If-Match on a tombstone", tombstone, enroll(vault.Precondition{IfMatch: 2}), vault.ErrPrecondition, 2, false},
		{"enroll If-Match on nothing", missing, enroll(vault.Precondition{IfMatch: 1}), vault.ErrPrecondition, 0, false},
		{"enroll If-None-Match on a live backup", live, enroll(vault.Precondition{IfNoneMatch: true}), vault.ErrPrecondition, 2, false},
		{"enroll If-None-Match on a locked backup", locked, enroll(vault.Precondition{IfNoneMatch: true}), vault.ErrPrecondition, 2, false},
		{"enroll If-None-Match on a tombstone", tombstone, enroll(vault.Precondition{IfNoneMatch: true}), nil, 3, false},
		{"enroll If-None-Match on nothing", missing, enroll(vault.Precondition{IfNoneMatch: true}), nil, 1, false},
		{"change PIN If-Match stale", live, change("1234", vault.Precondition{IfMatch: 1}), vault.ErrPrecondition, 2, false},
		{"change PIN If-Match stale, wrong PIN", live, change("0000", vault.Precondition{IfMatch: 1}), vault.ErrPrecondition, 2, false},
		{"change PIN If-Match stale on a locked backup", locked, change("1234", vault.Precondition{IfMatch: 1}), vault.ErrPrecondition, 2, false},
		{"change PIN If-Match current", live, change("1234", vault.Precondition{IfMatch: 2}), nil, 3, true},
		{"change PIN If-Match current, wrong PIN", live, change("0000", vault.Precondition{IfMatch: 2}), vault.ErrWrongPIN, 2, true},
		{"delete If-Match stale", live, del(vault.Precondition{IfMatch: 1}), vault.ErrPrecondition, 2, false},
		{"delete If-Match current", live, del(vault.Precondition{IfMatch: 2}), nil, 2, false},
		{"delete If-Match current on a locked backup", locked, del(vault.Precondition{IfMatch: 2}), nil, 2, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, vault.Options{})
			if c.state != missing {
				e.enroll("uma", randBytes(16), rightPIN, 5)
				e.enroll("uma", randBytes(16), rightPIN, 5)
				e.wrong("uma", 4)
			}
			switch c.state {
			case tombstone:
				if err := e.v.Delete(bg, ns, "uma", vault.Precondition{}); err != nil {
					t.Fatal(err)
				}
			case locked:
				for k := 3; k >= 1; k-- {
					e.wrong("uma", k)
				}
				if _, _, err := e.v.Recover(bg, ns, "uma", []byte("0000")); !errors.Is(err, vault.ErrLocked) {
					t.Fatal(err)
				}
			}
			_, rawBefore := e.raw(ns, "uma")
			hmacs, checks := e.hsm.hmacCalls.Load(), e.hsm.pinChecks()
			err := c.op(e)
			if (c.want == nil) != (err == nil) || (c.want != nil && !errors.Is(err, c.want)) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
			r, rawAfter := e.raw(ns, "uma")
			var gen uint64
			if r != nil {
				gen = r.Generation
			}
			if gen != c.wantGen {
				t.Errorf("generation %d, want %d", gen, c.wantGen)
			}
			if errors.Is(c.want, vault.ErrPrecondition) {
				if !bytes.Equal(rawBefore, rawAfter) {
					t.Error("a failed precondition wrote the record")
				}
				if e.hsm.hmacCalls.Load() != hmacs {
					t.Error("a failed precondition reached the HSM")
				}
			}
			if got := e.hsm.pinChecks() - checks; c.counted && got == 0 {
				t.Error("the guess was not checked")
			} else if !c.counted && c.want != nil && got != 0 {
				t.Errorf("%d PIN checks for a refused request", got)
			}
		})
	}
}

// ---------------------------------------------------------------------------
// ChangePIN.

func TestChangePIN(t *testing.T) {
	t.Parallel()
	const max = 4
	e := newEnv(t, vault.Options{})
	secret, newPIN := randBytes(48), []byte("new-pin-5678")
	e.remember(newPIN)
	b1 := e.enroll("vera", secret, rightPIN, max)
	e.wrong("vera", max-1)
	r1, _ := e.raw(ns, "vera")

	b, err := e.v.ChangePIN(bg, ns, "vera", rightPIN, newPIN, vault.Precondition{})
	if err != nil {
		t.Fatalf("change PIN: %v", err)
	}
	if b.Generation != b1.Generation+1 || b.MaxAttempts != max || b.AttemptsRemaining != max || b.Locked || b.KeyVersion != 1 || !b.CreatedAt.After(b1.CreatedAt) {
		t.Errorf("change PIN answered %+v", b)
	}
	if st := e.status("vera"); st != b {
		t.Errorf("status %+v, want %+v", st, b)
	}
	r2, _ := e.raw(ns, "vera")
	if bytes.Equal(r1.Salt, r2.Salt) || bytes.Equal(r1.Verifier, r2.Verifier) || bytes.Equal(r1.Nonce, r2.Nonce) || bytes.Equal(r1.Sealed, r2.Sealed) {
		t.Error("the new generation reuses the salt, verifier, nonce or sealed secret")
	}
	if r2.Guesses != 0 || r2.MaxAttempts != max {
		t.Errorf("new generation: guesses %d, max %d", r2.Guesses, r2.MaxAttempts)
	}

	// The old PIN is now a counted wrong guess; the new one recovers the same secret.
	e.wrong("vera", max-1)
	if _, _, err := e.v.Recover(bg, ns, "vera", rightPIN); err == nil {
		t.Fatal("the old PIN still recovers")
	}
	got, rem, err := e.v.Recover(bg, ns, "vera", newPIN)
	if err != nil || !bytes.Equal(got, secret) || rem != max {
		t.Fatalf("recover with the new PIN: rem=%d err=%v", rem, err)
	}

	// A wrong old PIN is counted and changes nothing else.
	if _, err := e.v.ChangePIN(bg, ns, "vera", rightPIN, []byte("3333"), vault.Precondition{}); err == nil {
		t.Fatal("change PIN with the superseded PIN succeeded")
	} else if r, ok := isWrongPIN(err); !ok || r != max-1 {
		t.Fatalf("change PIN with a wrong PIN: %v, want wrong PIN with %d left", err, max-1)
	}
	if st := e.status("vera"); st.AttemptsRemaining != max-1 || st.Generation != b.Generation {
		t.Fatalf("after a wrong change: %+v", st)
	}

	// An invalid new PIN is refused before anything is counted.
	_, rawBefore := e.raw(ns, "vera")
	hmacs := e.hsm.hmacCalls.Load()
	if _, err := e.v.ChangePIN(bg, ns, "vera", newPIN, []byte("123"), vault.Precondition{}); !errors.Is(err, vault.ErrInvalid) {
		t.Fatalf("invalid new PIN: %v", err)
	}
	if _, rawAfter := e.raw(ns, "vera"); !bytes.Equal(rawBefore, rawAfter) || e.hsm.hmacCalls.Load() != hmacs {
		t.Fatal("an invalid new PIN was counted")
	}

	// Changing to the same PIN still makes a new generation with a new salt.
	b3, err := e.v.ChangePIN(bg, ns, "vera", newPIN, newPIN, vault.Precondition{})
	if err != nil || b3.Generation != b.Generation+1 {
		t.Fatalf("change to the same PIN: %+v %v", b3, err)
	}
	r3, _ := e.raw(ns, "vera")
	if bytes.Equal(r3.Salt, r2.Salt) {
		t.Error("a PIN change kept the salt")
	}
	if got, _, err := e.v.Recover(bg, ns, "vera", newPIN); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("recover after the second change: %v", err)
	}
	if e.metric("keyvault_pin_changes_total", "result", "success") != 2 ||
		e.metric("keyvault_pin_changes_total", "result", "wrong_pin") != 1 ||
		e.metric("keyvault_pin_changes_total", "result", "invalid") != 1 {
		t.Error("PIN change metrics disagree")
	}
}

// The right PIN is used to change it; while the change is in the HSM
// (after its old-PIN check succeeded, sealing the new generation), two
// wrong guesses are counted and checked. A PIN change is a guess counted
// like a recovery, and a success must keep the wrong guesses counted after
// it began; a fresh counter on the new generation forgets them, so an
// attacker gets 2 + max_attempts wrong PINs checked after the last success.
func TestChangePINKeepsWrongGuessesCountedAfterItBegan(t *testing.T) {
	t.Parallel()
	const max = 5
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("walt", secret, rightPIN, max)
	entered, release := e.hsm.pause("change", 2) // 1: the old-PIN check; 2: the new PIN's MAC
	done := make(chan error, 1)
	go func() {
		_, err := e.v.ChangePIN(withTag(bg, "change"), ns, "walt", rightPIN, rightPIN, vault.Precondition{})
		done <- err
	}()
	<-entered
	wrongChecked := 0
	for k := 2; k <= 3; k++ {
		e.wrong("walt", max-k)
		wrongChecked++
	}
	release()
	if err := <-done; err != nil {
		t.Fatalf("change PIN: %v", err)
	}
	st := e.status("walt")
	if st.AttemptsRemaining != max-2 {
		t.Errorf("BUG: after the PIN change %d attempts remain; the 2 wrong guesses counted after it began were forgotten (want %d)",
			st.AttemptsRemaining, max-2)
	}
	for i := 0; i < 2*max; i++ {
		_, _, err := e.v.Recover(bg, ns, "walt", []byte("0000"))
		if _, ok := isWrongPIN(err); !ok && !errors.Is(err, vault.ErrLocked) {
			t.Fatalf("wrong guess: %v", err)
		}
		wrongChecked++
		if errors.Is(err, vault.ErrLocked) {
			break
		}
	}
	if wrongChecked > max {
		t.Errorf("BUG: %d wrong PINs were checked after the last success (the PIN change), budget %d", wrongChecked, max)
	}
}

// ---------------------------------------------------------------------------
// Namespaces and concurrent writers.

func TestNamespacesIsolate(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	sA, sB := randBytes(32), randBytes(32)
	e.remember(sA, sB)
	if _, created, err := e.v.Enroll(bg, "alpha", "xena", sA, []byte("1111"), 3, vault.Precondition{}); err != nil || !created {
		t.Fatal(err)
	}
	if _, created, err := e.v.Enroll(bg, "beta", "xena", sB, []byte("2222"), 3, vault.Precondition{}); err != nil || !created {
		t.Fatalf("the same user_id in another namespace is not a new backup: created=%v err=%v", created, err)
	}
	// Length-prefixed keys: ("ab", "c") and ("a", "bc") are two backups too.
	if _, created, err := e.v.Enroll(bg, "ab", "c", sA, []byte("1111"), 3, vault.Precondition{}); err != nil || !created {
		t.Fatal(err)
	}
	if _, created, err := e.v.Enroll(bg, "a", "bc", sB, []byte("2222"), 3, vault.Precondition{}); err != nil || !created {
		t.Fatalf("(a, bc) collides with (ab, c): created=%v err=%v", created, err)
	}
	if _, _, err := e.v.Recover(bg, "alpha", "xena", []byte("2222")); !errors.Is(err, vault.ErrWrongPIN) {
		t.Fatalf("beta's PIN against alpha's backup: %v", err)
	}
	if _, _, err := e.v.Recover(bg, "alpha", "xena", []byte("3333")); !errors.Is(err, vault.ErrWrongPIN) {
		t.Fatal(err)
	}
	if b, err := e.v.Status(bg, "beta", "xena"); err != nil || b.AttemptsRemaining != 3 {
		t.Fatalf("wrong guesses in alpha counted in beta: %+v %v", b, err)
	}
	if err := e.v.Delete(bg, "alpha", "xena", vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	if s, _, err := e.v.Recover(bg, "beta", "xena", []byte("2222")); err != nil || !bytes.Equal(s, sB) {
		t.Fatalf("beta after alpha's delete: %v", err)
	}
	if s, _, err := e.v.Recover(bg, "ab", "c", []byte("1111")); err != nil || !bytes.Equal(s, sA) {
		t.Fatalf("(ab, c): %v", err)
	}
	if s, _, err := e.v.Recover(bg, "a", "bc", []byte("2222")); err != nil || !bytes.Equal(s, sB) {
		t.Fatalf("(a, bc): %v", err)
	}
}

func TestConcurrentEnrollments(t *testing.T) {
	t.Parallel()
	const workers = 16
	e := newEnv(t, vault.Options{})
	type res struct {
		gen     uint64
		created bool
		secret  []byte
		pin     []byte
	}
	results := make([]res, workers)
	var wg sync.WaitGroup
	for i := range workers {
		secret, pin := randBytes(32), fmt.Appendf(nil, "pin-%d", i)
		wg.Go(func() {
			b, created, err := e.v.Enroll(bg, ns, "yara", secret, pin, 0, vault.Precondition{})
			if err != nil {
				t.Errorf("enroll %d: %v", i, err)
			}
			results[i] = res{b.Generation, created, secret, pin}
		})
	}
	wg.Wait()
	gens := map[uint64]bool{}
	created := 0
	var last res
	for _, r := range results {
		gens[r.gen] = true
		if r.created {
			created++
		}
		if r.gen > last.gen {
			last = r
		}
	}
	if len(gens) != workers || last.gen != workers || created != 1 {
		t.Fatalf("%d distinct generations (last %d), %d created; want %d, %d, 1", len(gens), last.gen, created, workers, workers)
	}
	if s, _, err := e.v.Recover(bg, ns, "yara", last.pin); err != nil || !bytes.Equal(s, last.secret) {
		t.Fatalf("the newest generation does not hold the last enrollment's secret: %v", err)
	}

	// With If-None-Match, exactly one of many concurrent creations wins.
	wins, refused := 0, 0
	var mu sync.Mutex
	for i := range workers {
		wg.Go(func() {
			_, _, err := e.v.Enroll(bg, ns, "zoe", randBytes(16), rightPIN, 0, vault.Precondition{IfNoneMatch: true})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				wins++
			case errors.Is(err, vault.ErrPrecondition):
				refused++
			default:
				t.Errorf("create %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if wins != 1 || refused != workers-1 {
		t.Fatalf("If-None-Match: %d won, %d refused", wins, refused)
	}
}
