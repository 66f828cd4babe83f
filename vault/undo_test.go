package vault_test

// A write that undoes a pending lock lands while the lock may be undone,
// or not at all: never after another process could take the lock for final.

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

// lostThenResentStore loses one armed compare-and-swap of a record as an
// etcd leader election does: the write is not applied, its answer (an
// error) comes after the request timeout, and reads through this process
// fail until readsUntil. The vault's resolution then finds the record at
// the same revision and sends the identical write again, which lands.
type lostThenResentStore struct {
	vault.Store
	armed      atomic.Bool
	readsUntil atomic.Int64 // unix nanos
	downUntil  atomic.Int64 // readsUntil once the armed write is sent
}

func (s *lostThenResentStore) Get(ctx context.Context, key []byte) ([]byte, uint64, error) {
	if time.Now().UnixNano() < s.readsUntil.Load() {
		return nil, 0, errInjected
	}
	return s.Store.Get(ctx, key)
}

func (s *lostThenResentStore) CompareAndSwap(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, error) {
	if len(key) == 0 || key[0] != 'r' || !s.armed.CompareAndSwap(true, false) {
		return s.Store.CompareAndSwap(ctx, key, rev, value)
	}
	s.readsUntil.Store(s.downUntil.Load())
	time.Sleep(5 * time.Second) // etcdstore's RequestTimeout; nothing applied
	return 0, fmt.Errorf("store compare-and-swap: %w", errInjected)
}

// twoProcessesOneAttemptLeft is backup "late" with one attempt left, and
// two vaults on its store: a, whose writes go through s, and b.
func twoProcessesOneAttemptLeft(t *testing.T) (e *env, s *lostThenResentStore, a, b *vault.Vault, secret []byte) {
	e = newEnv(t, vault.Options{Now: time.Now})
	s = &lostThenResentStore{Store: e.store}
	a = e.newVault(s, e.hsm, prometheus.NewRegistry())
	b = e.newVault(e.store, e.hsm, prometheus.NewRegistry())
	secret = randBytes(32)
	e.enroll("late", secret, rightPIN, 2)
	e.wrong("late", 1)
	return e, s, a, b, secret
}

// A last attempt whose HSM stalls is refunded at its 8 s deadline, and the
// refund decides to undo the lock while it may (mayUnlock). Its write is
// lost, and reads come back only once the lock has turned final by age and
// another process has told the right PIN 410. Sent again then, the refund
// would undo the lock and make that 410 untrue: after the undo time it is
// not sent again, and the lock stands.
func TestLostRefundIsNotSentAgainAfterTheUndoTime(t *testing.T) {
	t.Parallel()
	e, s, a, b, secret := twoProcessesOneAttemptLeft(t)

	entered := stall(e, "stall", 1)
	start := time.Now()
	ctx, cancel := context.WithTimeout(withTag(bg, "stall"), 60*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, _, err := a.Recover(ctx, ns, "late", []byte("0000-wrong"))
		done <- err
	}()
	<-entered // counted: the lock is pending; the HSM stalls until 8 s
	s.armed.Store(true)
	s.downUntil.Store(start.Add(21 * time.Second).UnixNano())

	time.Sleep(time.Until(start.Add(20500 * time.Millisecond)))
	e.hsm.setHook(nil)
	if _, _, err := b.Recover(bg, ns, "late", rightPIN); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("process B, once the lock is 20 s old: %v, want 410 locked", err)
	}
	err := <-done
	r, _ := e.raw(ns, "late")
	t.Logf("A: %v after %v; record locked=%v refunds=%d", err, time.Since(start), r.Locked, r.Refunds)
	if !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("process A's stalled last attempt: %v, want 503", err)
	}
	if got, _, err := b.Recover(bg, ns, "late", rightPIN); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the right PIN, after process B answered it 410: err=%v, secret returned=%v; want 410 (the lock was final)",
			err, bytes.Equal(got, secret))
	}
}

// The same with a right PIN on the last attempt: its forgive decides, at
// 7 s, to put the secret back; the write is lost, and reads come back at
// 21 s, once process B has answered the same right PIN 410 on the final
// lock: the forgive is not sent again, and process A still gets its secret
// while the lock stands, as a right guess after a final lock does.
func TestLostForgiveIsNotSentAgainAfterTheUndoTime(t *testing.T) {
	t.Parallel()
	e, s, a, b, secret := twoProcessesOneAttemptLeft(t)

	entered, release := holdTags(e, "right")
	start := time.Now()
	done := make(chan error, 1)
	go func() {
		got, _, err := a.Recover(withTag(bg, "right"), ns, "late", rightPIN)
		if err == nil && !bytes.Equal(got, secret) {
			err = errors.New("wrong secret")
		}
		done <- err
	}()
	<-entered["right"] // counted: the lock is pending
	s.armed.Store(true)
	s.downUntil.Store(start.Add(21 * time.Second).UnixNano())
	time.Sleep(time.Until(start.Add(7 * time.Second)))
	release["right"]() // checked at 7 s: right; the forgive is the armed write

	time.Sleep(time.Until(start.Add(20500 * time.Millisecond)))
	if _, _, err := b.Recover(bg, ns, "late", rightPIN); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("process B, once the lock is 20 s old: %v, want 410 locked", err)
	}
	err := <-done
	r, _ := e.raw(ns, "late")
	t.Logf("A: %v after %v; record locked=%v forgiven=%d", err, time.Since(start), r.Locked, r.Forgiven)
	if err != nil {
		t.Fatalf("process A's right PIN: %v, want the secret (the lock stands)", err)
	}
	if got, _, err := b.Recover(bg, ns, "late", rightPIN); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the right PIN, after process B answered it 410: err=%v, secret returned=%v; want 410 (the lock was final)",
			err, bytes.Equal(got, secret))
	}
}
