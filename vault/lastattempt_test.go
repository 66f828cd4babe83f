package vault_test

// The guess that uses the last attempt, and what settles around it: an HSM
// that stalls while it is checked, a right guess that began before it, a
// wrong one answered after it, and a lock whose request died.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// stall makes the PIN-key HMACs of requests tagged tag, from the nth on,
// wait for their context to end, as a pool call does when no member
// answers; entered closes once the first one waits.
func stall(e *env, tag string, nth int) (entered <-chan struct{}) {
	in := make(chan struct{})
	seen := 0
	e.hsm.setHook(func(ctx context.Context, key vault.KeyID, _ []byte) {
		if key.Role != vault.RolePIN || tagOf(ctx) != tag {
			return
		}
		if seen++; seen == nth {
			close(in)
		}
		if seen >= nth {
			<-ctx.Done()
		}
	})
	return in
}

// A last-attempt guess whose HSM stalls ends its HSM work while it may still
// undo its lock: it is refunded and answers 503, and the backup keeps its
// secret, whether the stall is in the PIN check or, for a PIN change with
// the right PIN, in sealing under the new PIN. The request's own deadline
// (as the API's) is later than the lock may be undone.
func TestStalledHSMOnTheLastAttemptIsRefunded(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		nth  int // the PIN-key HMAC that stalls
		op   func(e *env, ctx context.Context) error
	}{
		{"recover", 1, func(e *env, ctx context.Context) error {
			_, _, err := e.v.Recover(ctx, ns, "stalled", rightPIN)
			return err
		}},
		{"PIN change, its check", 1, func(e *env, ctx context.Context) error {
			_, err := e.v.ChangePIN(ctx, ns, "stalled", rightPIN, []byte("5678"), vault.Precondition{})
			return err
		}},
		{"PIN change, the new PIN's seal", 2, func(e *env, ctx context.Context) error {
			_, err := e.v.ChangePIN(ctx, ns, "stalled", rightPIN, []byte("5678"), vault.Precondition{})
			return err
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, vault.Options{Now: time.Now})
			secret := randBytes(32)
			e.enroll("stalled", secret, rightPIN, 2)
			e.wrong("stalled", 1)
			entered := stall(e, "stall", c.nth)
			ctx, cancel := context.WithTimeout(withTag(bg, "stall"), 25*time.Second)
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- c.op(e, ctx) }()
			<-entered
			if err := <-done; !errors.Is(err, vault.ErrUnavailable) {
				t.Fatalf("a last attempt the HSM never answered: %v, want unavailable", err)
			}
			if ctx.Err() != nil {
				t.Fatalf("the HSM work ended with the request's deadline, not before the lock's undo")
			}
			e.hsm.setHook(nil)
			if st := e.status("stalled"); st.Locked || st.AttemptsRemaining != 1 || st.Generation != 1 {
				t.Fatalf("after a stalled last attempt: %+v, want generation 1, unlocked, 1 left", st)
			}
			if got, _, err := e.v.Recover(bg, ns, "stalled", rightPIN); err != nil || !bytes.Equal(got, secret) {
				t.Fatalf("recover after: %v", err)
			}
		})
	}
}

// slowCountStore answers one armed compare-and-swap of a record as an etcd
// leader election would: the write applies, its answer is lost after the
// request timeout, and reads fail until a new leader serves them.
type slowCountStore struct {
	vault.Store
	armed     atomic.Bool
	readsDown atomic.Int64 // unix nanos until which reads fail
}

func (s *slowCountStore) Get(ctx context.Context, key []byte) ([]byte, uint64, error) {
	if time.Now().UnixNano() < s.readsDown.Load() {
		return nil, 0, errInjected
	}
	return s.Store.Get(ctx, key)
}

func (s *slowCountStore) CompareAndSwap(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, error) {
	if len(key) == 0 || key[0] != 'r' || !s.armed.CompareAndSwap(true, false) {
		return s.Store.CompareAndSwap(ctx, key, rev, value)
	}
	start := time.Now()
	s.readsDown.Store(start.Add(10500 * time.Millisecond).UnixNano())
	if _, err := s.Store.CompareAndSwap(ctx, key, rev, value); err != nil {
		return 0, err
	}
	time.Sleep(5 * time.Second) // etcdstore's RequestTimeout
	return 0, fmt.Errorf("store compare-and-swap: %w", errInjected)
}

// The right PIN on the last attempt whose counting write is known applied
// only once the lock could no longer be undone (an etcd leader election:
// the request times out at 5 s, a read finds the write at 10.5 s): its HSM
// work is not cut short, since nothing it does could undo the lock; the
// PIN is checked and the secret returned, and the lock stands.
func TestSlowlyCountedLastAttemptStillChecksTheRightPIN(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{Now: time.Now})
	s := &slowCountStore{Store: e.store}
	v := e.newVault(s, e.hsm, prometheus.NewRegistry())
	secret := randBytes(32)
	e.enroll("slow", secret, rightPIN, 2)
	e.wrong("slow", 1)
	s.armed.Store(true)
	if got, _, err := v.Recover(bg, ns, "slow", rightPIN); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("the right PIN on the last attempt, counted slowly: %v, want the secret", err)
	}
}

// A PIN change that meets a later guess's lock as pending, and as final by
// the time it would forgive itself (the clock crosses the settle window
// between the two readings), answers 410 and writes nothing: never a
// success for a generation it did not write.
func TestPINChangeMeetingALockTurningFinalAnswersLocked(t *testing.T) {
	t.Parallel()
	base := time.Now().UnixNano()
	var armed atomic.Int32
	now := func() time.Time {
		switch n := armed.Load(); {
		case n == 0:
			return time.Unix(0, base)
		case armed.Add(1) == 2:
			return time.Unix(0, base+int64(19500*time.Millisecond)) // pending
		default:
			return time.Unix(0, base+int64(20500*time.Millisecond)) // final by age
		}
	}
	e := newEnv(t, vault.Options{Now: now})
	e.enroll("edge", randBytes(32), rightPIN, 2)
	entered, release := holdTags(e, "right", "last")
	right := make(chan error, 1)
	go func() {
		_, err := e.v.ChangePIN(withTag(bg, "right"), ns, "edge", rightPIN, []byte("5678"), vault.Precondition{})
		right <- err
	}()
	<-entered["right"] // guess 1
	go e.v.Recover(withTag(bg, "last"), ns, "edge", []byte("0000-wrong"))
	<-entered["last"] // guess 2 locks; its lock is pending
	armed.Store(1)    // the next clock reading says pending, every later one final
	release["right"]()
	if err := <-right; !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the PIN change: %v, want locked", err)
	}
	if r, _ := e.raw(ns, "edge"); r.Generation != 1 || !r.Locked {
		t.Fatalf("after: generation %d, locked %v; want generation 1 still locked", r.Generation, r.Locked)
	}
	release["last"]()
}

// A right guess counted before the guess that uses the last attempt, and
// checked first, is forgiven before that guess settles, by a recovery and
// by a PIN change alike: the wrong last guess then finds an attempt left
// and answers 403, and the backup lives.
func TestRightGuessBeforeTheLastAttemptIsForgivenFirst(t *testing.T) {
	t.Parallel()
	for _, op := range []string{"recover", "change PIN"} {
		t.Run(op, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, vault.Options{Now: time.Now})
			e.enroll("race", randBytes(32), rightPIN, 2)
			entered, release := holdTags(e, "right", "last")
			right := make(chan error, 1)
			go func() {
				var err error
				if op == "recover" {
					_, _, err = e.v.Recover(withTag(bg, "right"), ns, "race", rightPIN)
				} else {
					_, err = e.v.ChangePIN(withTag(bg, "right"), ns, "race", rightPIN, []byte("5678"), vault.Precondition{})
				}
				right <- err
			}()
			<-entered["right"] // guess 1
			last := make(chan error, 1)
			go func() {
				_, _, err := e.v.Recover(withTag(bg, "last"), ns, "race", []byte("0000-wrong"))
				last <- err
			}()
			<-entered["last"] // guess 2, the last attempt: the lock is pending
			release["right"]()
			// The right guess is checked and, while the lock is pending,
			// forgiven; only then is the last attempt checked.
			waitFor(t, "the right guess forgiven", func() bool {
				r, _ := e.raw(ns, "race")
				return r.Forgiven == 1
			})
			release["last"]()
			var wrong *vault.WrongPINError
			if err := <-last; !errors.As(err, &wrong) || wrong.Remaining != 1 {
				t.Errorf("the wrong guess counted after a right one: %v, want 403 with 1 left", err)
			}
			if err := <-right; err != nil {
				t.Errorf("%s with the right PIN, checked first: %v", op, err)
			}
			if st := e.status("race"); st.Locked || st.AttemptsRemaining != 1 {
				t.Errorf("after: %+v, want unlocked with 1 left", st)
			}
		})
	}
}

// Two concurrent wrong guesses on a backup with 2 attempts: the second
// counted locks it for good, and the first, answered after that, answers
// in count order, 403 with the attempt its count left (docs/api.md,
// "Choices"): concurrent wrong guesses get one 403 per attempt.
func TestWrongGuessAnswersInCountOrder(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{Now: time.Now})
	e.enroll("pair", randBytes(32), rightPIN, 2)
	entered, release := holdTags(e, "first")
	first := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(withTag(bg, "first"), ns, "pair", []byte("0000-wrong"))
		first <- err
	}()
	<-entered["first"]
	var le *vault.LockedError
	if _, _, err := e.v.Recover(bg, ns, "pair", []byte("1111-wrong")); !errors.As(err, &le) || !le.Checked {
		t.Fatalf("the second wrong guess: %v, want the lockout", err)
	}
	release["first"]()
	var wrong *vault.WrongPINError
	if err := <-first; !errors.As(err, &wrong) || wrong.Remaining != 1 {
		t.Fatalf("the first wrong guess, answered after the lock: %v, want 403 with 1 left", err)
	}
	if _, _, err := e.v.Recover(bg, ns, "pair", rightPIN); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the right PIN after: %v, want locked", err)
	}
}

// A right guess forgiven while a later guess's last-attempt lock is pending,
// whose request then dies, leaves a lock with an attempt left, final by its
// age. A re-wrap moves it like any final lock, so the old key version can
// be retired.
func TestRewrapMovesAnAbandonedLockWithAttemptsLeft(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	e.enroll("abandoned", randBytes(32), rightPIN, 2)
	e.rotate()
	entered, release := holdTags(e, "right", "dies")
	right := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(withTag(bg, "right"), ns, "abandoned", rightPIN)
		right <- err
	}()
	<-entered["right"]
	go e.v.Recover(withTag(bg, "dies"), ns, "abandoned", []byte("0000-wrong")) // held past its settle window
	<-entered["dies"]
	release["right"]()
	if err := <-right; err != nil {
		t.Fatalf("the right guess: %v", err)
	}
	// The stepping clock moves a second a reading: age the lock past its
	// settle window.
	for i := range 25 {
		e.enroll(fmt.Sprintf("other-%d", i), randBytes(32), rightPIN, 0)
	}
	if r, _ := e.raw(ns, "abandoned"); !r.Locked || r.LockFinal || r.Forgiven != 1 {
		t.Fatalf("the abandoned lock: locked=%v final=%v forgiven=%d, want a lock the flag does not call final, one guess forgiven", r.Locked, r.LockFinal, r.Forgiven)
	}
	if _, _, err := e.v.Recover(bg, ns, "abandoned", rightPIN); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("recover once the lock aged: %v, want locked", err)
	}
	if _, started := e.v.StartRewrap(bg, 0); !started {
		t.Fatal("the re-wrap did not start")
	}
	if st := waitRewrap(t, e.v); st.Errors != 0 {
		t.Fatalf("the re-wrap: %+v", st)
	}
	if err := e.v.RetireKeys(bg, 1, func(uint32) error { return nil }); err != nil {
		t.Fatalf("retire version 1 after the re-wrap: %v", err)
	}
	if _, _, err := e.v.Recover(bg, ns, "abandoned", rightPIN); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("recover after the re-wrap: %v, want locked", err)
	}
	release["dies"]()
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
