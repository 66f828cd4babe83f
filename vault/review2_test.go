package vault_test

// Adversarial review of the last-attempt changes (hsmContext, ChangePIN's
// forgive-first, settleForgiven's 410, rewrapOne's flag).

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

// ChangePIN's final write reads the clock twice on a later guess's pending
// lock: once in its own switch (pending: forgive first) and once inside
// forgiveNext (final by age: no write). When the lock turns final between
// the two readings, forgiveNext returns (nil, nil), the update writes
// nothing, forgave stays false, and waitSettled returns nil: ChangePIN
// answers success with a generation it never wrote.
func TestReviewPINChangeAtTheLockAgeBoundaryIsNotAFalseSuccess(t *testing.T) {
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
	secret := randBytes(32)
	e.enroll("edge", secret, rightPIN, 2)
	entered, release := holdTags(e, "right", "last")
	right := make(chan error, 1)
	var got vault.Backup
	go func() {
		var err error
		got, err = e.v.ChangePIN(withTag(bg, "right"), ns, "edge", rightPIN, []byte("5678"), vault.Precondition{})
		right <- err
	}()
	<-entered["right"] // guess 1
	go e.v.Recover(withTag(bg, "last"), ns, "edge", []byte("0000-wrong"))
	<-entered["last"] // guess 2 locks; its lock is pending
	armed.Store(1)    // the next clock reading says pending, every later one final
	release["right"]()
	err := <-right
	if err != nil {
		t.Logf("PIN change answered %v (no false success)", err)
		return
	}
	r, _ := e.raw(ns, "edge")
	if r.Generation != got.Generation {
		t.Fatalf("PIN change answered success with generation %d, but the store holds generation %d (locked=%v, forgiven=%d)",
			got.Generation, r.Generation, r.Locked, r.Forgiven)
	}
	if s, _, err := e.v.Recover(bg, ns, "edge", []byte("5678")); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("recover with the new PIN the change reported: %v", err)
	}
}

// A wrong PIN checked in the HSM and answered 410 because a later guess
// locked the backup for good (settleForgiven's new case) classifies as
// neither Checked nor Wrong: the API gives the user's rate-limit token back
// and never charges the client's wrong-guess limit, though the 410 told the
// caller the PIN was wrong (a right one in its place gets the secret).
// Before the change it was a 403, charged.
func TestReviewWrongGuessAnsweredLockedIsChargedAsWrong(t *testing.T) {
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
	if _, _, err := e.v.Recover(bg, ns, "pair", []byte("1111-wrong")); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the second wrong guess: %v, want the lockout", err)
	}
	checks := e.hsm.pinChecks()
	release["first"]()
	err := <-first
	if e.hsm.pinChecks() == checks {
		t.Fatalf("the first guess was not checked in the HSM")
	}
	t.Logf("first: %v %+v", err, vault.Classify(err))
	if o := vault.Classify(err); !o.Checked || !o.Wrong {
		t.Fatalf("a wrong PIN checked and told (%v) classifies as %+v: the client's wrong-guess limit is not charged and the user's token is given back", err, o)
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

// The right PIN on the last attempt, whose counting write resolves as
// applied only after the lock's undo time (an etcd leader election: the
// request times out at 5 s, resolve reads it back at 10.5 s, within
// ResolveWindow). hsmContext's deadline (countedAt + 8 s) has passed before
// the PIN check starts, so the right PIN is never checked; the refund can
// no longer undo the lock (mayUnlock), and the backup stays locked, final
// by age, with 503. Before the change the PIN was checked and the user got
// the secret (the lock stood).
func TestReviewSlowCountOnTheLastAttemptKeepsTheRightPIN(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{Now: time.Now})
	s := &slowCountStore{Store: e.store}
	v := e.newVault(s, e.hsm, prometheus.NewRegistry())
	secret := randBytes(32)
	e.enroll("slow", secret, rightPIN, 2)
	e.wrong("slow", 1)
	s.armed.Store(true)
	got, _, err := v.Recover(bg, ns, "slow", rightPIN)
	st := e.status("slow")
	if err != nil || !bytes.Equal(got, secret) {
		if st.Locked {
			t.Fatalf("the right PIN on the last attempt, counted slowly: %v; the backup stays locked (%+v) and nobody can undo it: the key is lost", err, st)
		}
		t.Logf("503, but the backup is unlocked: %+v", st)
	}
}
