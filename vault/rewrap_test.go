package vault_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/keyvault/keyvault/vault"
)

var v2 = map[vault.KeyRole]uint32{vault.RoleWrap: 2, vault.RolePIN: 2, vault.RoleRoot: 1}

// rotate gives the env an HSM that also holds version 2 of the wrap and
// PIN keys, as keys rotate and a reload do.
func (e *env) rotate() {
	e.t.Helper()
	e.closeStore()
	e.hsm = e.hsm.withVersions(v2)
	e.open()
}

// A right recovery re-seals a record under the newest PIN and wrap key in
// the write that resets its counter; a wrong guess moves nothing and
// counts.
func TestRecoveryMovesPINKeyVersion(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("mover", secret, rightPIN, 5)
	e.rotate()

	e.wrong("mover", 4)
	if st := e.status("mover"); st.KeyVersion != 1 || st.PINKeyVersion != 1 || st.AttemptsRemaining != 4 {
		t.Fatalf("after a wrong guess: %+v, want versions 1/1 and 4 attempts left", st)
	}
	s, rem, err := e.v.Recover(bg, ns, "mover", rightPIN)
	if err != nil || !bytes.Equal(s, secret) || rem != 5 {
		t.Fatalf("recover: %v, remaining %d", err, rem)
	}
	st := e.status("mover")
	if st.KeyVersion != 2 || st.PINKeyVersion != 2 || st.AttemptsRemaining != 5 || st.Generation != 1 {
		t.Fatalf("after recovery: %+v, want versions 2/2, 5 attempts, generation 1", st)
	}
	e.wrong("mover", 4)
	if st := e.status("mover"); st.PINKeyVersion != 2 || st.AttemptsRemaining != 4 {
		t.Fatalf("wrong guess on the re-sealed record: %+v", st)
	}
	if s, _, err := e.v.Recover(bg, ns, "mover", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("recover the re-sealed record: %v", err)
	}
}

func waitRewrap(t *testing.T, v *vault.Vault) vault.RewrapStatus {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if st := v.RewrapStatus(); !st.Running {
			return st
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatal("re-wrap did not finish in 30s")
	return vault.RewrapStatus{}
}

// The re-wrap job moves every record's outer layer to the newest wrap key
// without the PIN, leaves the PIN key and the counters alone, moves a
// finally locked record's versions, skips deletions, and a second run finds
// nothing. Retire refuses while a record uses the version, then destroys.
func TestRewrapAndRetire(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	const n = 40
	secrets := map[string][]byte{}
	for i := range n {
		u := fmt.Sprintf("user-%d", i)
		secrets[u] = randBytes(32)
		e.enroll(u, secrets[u], rightPIN, 5)
	}
	e.wrong("user-0", 4)
	e.enroll("locked", randBytes(32), rightPIN, 1)
	if _, _, err := e.v.Recover(bg, ns, "locked", []byte("0000-wrong")); !errors.Is(err, vault.ErrLocked) {
		t.Fatal(err)
	}
	e.enroll("gone", randBytes(32), rightPIN, 5)
	if err := e.v.Delete(bg, ns, "gone", vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	e.rotate()
	if u, err := e.v.KeyUsage(bg); err != nil || u.Wrap[1] != n+1 || u.PIN[1] != n+1 {
		t.Fatalf("usage before: %+v %v", u, err)
	}

	destroyed := 0
	destroy := func(uint32) error { destroyed++; return nil }
	var inUse *vault.KeysInUseError
	if err := e.v.RetireKeys(bg, 1, destroy); !errors.As(err, &inUse) || inUse.WrapRecords != n+1 || inUse.PINRecords != n+1 || destroyed != 0 {
		t.Fatalf("retire v1 in use: %v (destroyed %d)", err, destroyed)
	}
	if err := e.v.RetireKeys(bg, 2, destroy); !errors.Is(err, vault.ErrInvalid) {
		t.Fatalf("retire the newest: %v", err)
	}

	if _, started := e.v.StartRewrap(context.Background(), 0); !started {
		t.Fatal("rewrap did not start")
	}
	st := waitRewrap(t, e.v)
	if st.Target != 2 || st.Total != n+1 || st.Done != n+1 || st.Errors != 0 {
		t.Fatalf("rewrap status %+v", st)
	}
	if e.metric("keyvault_rewrap_records_total") != n+1 || e.metric("keyvault_records_by_wrap_key_version", "key_version", "2") != n+1 {
		t.Error("rewrap metrics")
	}
	if st := e.status("user-0"); st.KeyVersion != 2 || st.PINKeyVersion != 1 || st.AttemptsRemaining != 4 {
		t.Fatalf("after rewrap: %+v, want wrap 2, PIN 1, the wrong guess still counted", st)
	}
	if st := e.status("locked"); !st.Locked || st.KeyVersion != 2 || st.PINKeyVersion != 2 {
		t.Fatalf("locked after rewrap: %+v", st)
	}
	if err := e.v.RetireKeys(bg, 1, destroy); !errors.As(err, &inUse) || inUse.WrapRecords != 0 || inUse.PINRecords != n {
		t.Fatalf("retire v1 with PIN keys in use: %v", err)
	}
	if _, started := e.v.StartRewrap(context.Background(), 1000); !started {
		t.Fatal("second rewrap did not start")
	}
	if st := waitRewrap(t, e.v); st.Total != 0 {
		t.Fatalf("second run found %d records", st.Total)
	}
	for u, s := range secrets {
		got, _, err := e.v.Recover(bg, ns, u, rightPIN)
		if err != nil || !bytes.Equal(got, s) {
			t.Fatalf("recover %s after rewrap: %v", u, err)
		}
	}
	if err := e.v.RetireKeys(bg, 1, destroy); err != nil || destroyed != 1 {
		t.Fatalf("retire v1 when unused: %v (destroyed %d)", err, destroyed)
	}
	if u, _ := e.v.KeyUsage(bg); u.Wrap[2] != n+1 || u.PIN[2] != n+1 || len(u.Wrap) != 1 || len(u.PIN) != 1 {
		t.Fatalf("usage after: %+v", u)
	}
}

// A version that is still the newest of either key is never retired: a
// record may be sealed under it at any moment.
func TestRetireRefusesANewestVersion(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	e.closeStore()
	e.hsm = e.hsm.withVersions(map[vault.KeyRole]uint32{vault.RoleWrap: 2, vault.RolePIN: 1, vault.RoleRoot: 1})
	e.open()
	called := false
	if err := e.v.RetireKeys(bg, 1, func(uint32) error { called = true; return nil }); !errors.Is(err, vault.ErrInvalid) || called {
		t.Fatalf("retire a version still newest for the PIN key: %v (destroy called: %v)", err, called)
	}
	if _, _, err := e.v.Enroll(bg, ns, "after", randBytes(32), rightPIN, 0, vault.Precondition{}); err != nil {
		t.Fatalf("enroll after a refused retire: %v", err)
	}
}

// A re-wrap that lands while a right guess is being checked wins: the
// guess still recovers and is forgiven, but does not overwrite the new
// outer layer with its re-seal of what it read; the next recovery moves
// the PIN key. A wrong guess counted meanwhile stays counted.
func TestRewrapDuringARecovery(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	secret := randBytes(32)
	e.enroll("racer", secret, rightPIN, 5)
	e.rotate()
	entered, release := e.hsm.pause("right", 1)
	type result struct {
		secret []byte
		err    error
	}
	done := make(chan result, 1)
	go func() {
		s, _, err := e.v.Recover(withTag(bg, "right"), ns, "racer", rightPIN)
		done <- result{s, err}
	}()
	<-entered
	if _, started := e.v.StartRewrap(context.Background(), 0); !started {
		t.Fatal("rewrap did not start")
	}
	if st := waitRewrap(t, e.v); st.Done != 1 {
		t.Fatalf("rewrap during the check: %+v", st)
	}
	release()
	r := <-done
	if r.err != nil || !bytes.Equal(r.secret, secret) {
		t.Fatalf("recover across a rewrap: %v", r.err)
	}
	st := e.status("racer")
	if st.KeyVersion != 2 || st.PINKeyVersion != 1 || st.AttemptsRemaining != 5 {
		t.Fatalf("after the race: %+v, want wrap 2 (the rewrap), PIN 1, 5 attempts", st)
	}
	if s, _, err := e.v.Recover(bg, ns, "racer", rightPIN); err != nil || !bytes.Equal(s, secret) {
		t.Fatalf("second recovery: %v", err)
	}
	if st := e.status("racer"); st.KeyVersion != 2 || st.PINKeyVersion != 2 {
		t.Fatalf("after the second recovery: %+v, want 2/2", st)
	}
}

// A lock whose guess never settled (its request died) blocks the re-wrap
// only while it may still be pending: once older than the settle window it
// is final, and the re-wrap moves it and marks it so. The guess, if it
// ever returns wrong, answers 410.
func TestRewrapFinalisesAnAbandonedLock(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	e.enroll("abandoned", randBytes(32), rightPIN, 1)
	e.rotate()
	entered, release := e.hsm.pause("held", 1)
	done := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(withTag(bg, "held"), ns, "abandoned", []byte("0000-wrong"))
		done <- err
	}()
	<-entered
	if _, started := e.v.StartRewrap(context.Background(), 0); !started {
		t.Fatal("rewrap did not start")
	}
	if st := waitRewrap(t, e.v); st.Skipped != 1 || st.Done != 0 {
		t.Fatalf("rewrap over a young pending lock: %+v, want it skipped", st)
	}
	// The stepping clock moves a second per reading: enrollments of others
	// age the pending lock past the 20 s window.
	for i := range 15 {
		e.enroll(fmt.Sprintf("other-%d", i), randBytes(32), rightPIN, 0)
	}
	if _, started := e.v.StartRewrap(context.Background(), 0); !started {
		t.Fatal("rewrap did not start")
	}
	if st := waitRewrap(t, e.v); st.Done != 1 {
		t.Fatalf("rewrap over an abandoned lock: %+v, want it moved", st)
	}
	if st := e.status("abandoned"); !st.Locked || st.KeyVersion != 2 || st.PINKeyVersion != 2 {
		t.Fatalf("abandoned lock after rewrap: %+v", st)
	}
	release()
	if err := <-done; !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the abandoned wrong guess, returning: %v, want locked", err)
	}
	if _, _, err := e.v.Recover(bg, ns, "abandoned", rightPIN); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("recover after: %v, want locked", err)
	}
}
