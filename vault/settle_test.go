package vault_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/vault"
)

// holdTags holds the first PIN check of each tagged request until its
// release is called; entered[tag] closes once it is held.
func holdTags(e *env, tags ...string) (entered map[string]chan struct{}, release map[string]func()) {
	entered, release = map[string]chan struct{}{}, map[string]func(){}
	gates := map[string]chan struct{}{}
	for _, tag := range tags {
		entered[tag], gates[tag] = make(chan struct{}), make(chan struct{})
		var once sync.Once
		gate := gates[tag]
		release[tag] = func() { once.Do(func() { close(gate) }) }
		e.t.Cleanup(release[tag])
	}
	var mu sync.Mutex
	seen := map[string]bool{}
	e.hsm.setHook(func(ctx context.Context, key vault.KeyID, _ []byte) {
		tag := tagOf(ctx)
		if key.Role != vault.RolePIN || gates[tag] == nil {
			return
		}
		mu.Lock()
		first := !seen[tag]
		seen[tag] = true
		mu.Unlock()
		if first {
			close(entered[tag])
			<-gates[tag]
		}
	})
	return entered, release
}

// A right PIN that began before the guess that used the last attempt, and
// is forgiven while that guess is in the HSM: when the wrong last guess
// settles, attempts are left after all, so the secret goes back and the
// guess answers 403, not 410. Only max_attempts wrong PINs after the last
// success may destroy a backup.
func TestForgivenBeforeTheLockSettlesLeavesAttempts(t *testing.T) {
	t.Parallel()
	const max = 3
	e := newEnv(t, vault.Options{Now: time.Now}) // a real clock: the pending lock ages by it
	secret := randBytes(32)
	e.enroll("uma", secret, rightPIN, max)
	entered, release := holdTags(e, "right", "last")

	right := make(chan error, 1)
	go func() {
		got, _, err := e.v.Recover(withTag(bg, "right"), ns, "uma", rightPIN)
		if err == nil && !bytes.Equal(got, secret) {
			err = errors.New("wrong secret")
		}
		right <- err
	}()
	<-entered["right"]
	e.wrong("uma", 1) // guesses 1 (right, held) and 2 (wrong) are counted
	last := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(withTag(bg, "last"), ns, "uma", []byte("0000-wrong"))
		last <- err
	}()
	<-entered["last"] // guess 3 is counted: the lock is pending
	if r, _ := e.raw(ns, "uma"); !r.Locked || r.LockFinal || len(r.Sealed) != 0 {
		t.Fatalf("while the last attempt is checked: locked=%v final=%v sealed=%d", r.Locked, r.LockFinal, len(r.Sealed))
	}
	release["right"]()
	if err := <-right; err != nil {
		t.Fatal(err)
	}
	release["last"]()
	var wrong *vault.WrongPINError
	if err := <-last; !errors.As(err, &wrong) || wrong.Remaining != 1 {
		t.Fatalf("the wrong last guess after an earlier right one was forgiven: %v, want 403 with 1 left", err)
	}
	st := e.status("uma")
	if st.Locked || st.AttemptsRemaining != 1 {
		t.Fatalf("status: %+v, want unlocked with 1 left (two wrong guesses after the success)", st)
	}
	if got, _, err := e.v.Recover(bg, ns, "uma", rightPIN); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("recover after: %v", err)
	}
}

// The wrong guess that uses the last attempt: guesses that arrive while it
// is in the HSM wait, and answer 410 once it settles wrong; the lock is
// final and counted once in keyvault_lockouts_total.
func TestGuessesWaitForThePendingLock(t *testing.T) {
	t.Parallel()
	const max = 2
	e := newEnv(t, vault.Options{Now: time.Now}) // a real clock: the pending lock ages by it
	e.enroll("vic", randBytes(32), rightPIN, max)
	e.wrong("vic", 1)
	entered, release := holdTags(e, "last")
	last := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(withTag(bg, "last"), ns, "vic", []byte("0000-wrong"))
		last <- err
	}()
	<-entered["last"]
	waiting := make(chan error, 4)
	for range cap(waiting) {
		go func() {
			_, _, err := e.v.Recover(bg, ns, "vic", rightPIN)
			waiting <- err
		}()
	}
	select {
	case err := <-waiting:
		t.Fatalf("a guess answered %v while the last attempt was in flight", err)
	case <-time.After(50 * time.Millisecond):
	}
	release["last"]()
	if err := <-last; !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the wrong last guess: %v, want ErrLocked", err)
	}
	for range cap(waiting) {
		if err := <-waiting; !errors.Is(err, vault.ErrLocked) {
			t.Fatalf("a waiting guess: %v, want ErrLocked", err)
		}
	}
	if r, _ := e.raw(ns, "vic"); !r.Locked || !r.LockFinal || len(r.Sealed) != 0 {
		t.Fatalf("after: locked=%v final=%v sealed=%d", r.Locked, r.LockFinal, len(r.Sealed))
	}
	// A waiting guess gives up, counting nothing, when its client does.
	ctx, cancel := context.WithTimeout(bg, 20*time.Millisecond)
	defer cancel()
	e.enroll("wes", randBytes(32), rightPIN, 1)
	entered, release = holdTags(e, "wes-last")
	go func() { _, _, _ = e.v.Recover(withTag(bg, "wes-last"), ns, "wes", []byte("0000-wrong")) }()
	<-entered["wes-last"]
	if _, _, err := e.v.Recover(ctx, ns, "wes", rightPIN); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("a waiting guess whose client gave up: %v, want ErrUnavailable", err)
	}
	release["wes-last"]()
}

// Wrong guesses counted before a success but checked after it would fall
// between two successes uncounted: each is counted again before it is
// answered, so no more than max_attempts wrong PINs are checked between two
// successful recoveries, in the order the HSM checked them.
func TestWrongGuessesCheckedAfterASuccessCountAgain(t *testing.T) {
	t.Parallel()
	const max = 3
	e := newEnv(t, vault.Options{Now: time.Now})
	secret := randBytes(32)
	e.enroll("xia", secret, rightPIN, max)
	entered, release := holdTags(e, "a1", "a2")
	answers := make(chan error, 2)
	for _, tag := range []string{"a1", "a2"} {
		go func() {
			_, _, err := e.v.Recover(withTag(bg, tag), ns, "xia", []byte("0000-"+tag))
			answers <- err
		}()
		<-entered[tag] // counted, held in the HSM
	}
	if got, _, err := e.v.Recover(bg, ns, "xia", rightPIN); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("the user's recovery: %v", err)
	}
	release["a1"]()
	release["a2"]()
	remaining := map[int]bool{}
	for range 2 {
		var wrong *vault.WrongPINError
		if err := <-answers; !errors.As(err, &wrong) {
			t.Fatalf("a wrong guess checked after the success: %v", err)
		} else {
			remaining[wrong.Remaining] = true
		}
	}
	if !remaining[2] || !remaining[1] {
		t.Fatalf("attempts remaining told to the two wrong guesses: %v, want 2 and 1", remaining)
	}
	// One more wrong PIN uses the last attempt: 3 checked since the success.
	if _, _, err := e.v.Recover(bg, ns, "xia", []byte("0000-a3")); !errors.Is(err, vault.ErrLocked) {
		t.Fatalf("the third wrong PIN after the success: %v, want ErrLocked", err)
	}
}

// Refunds of guesses after a success survive its reset: a right PIN held
// while three guesses go unanswered (refunded) and two are wrong still
// resets a valid counter, and the two wrong ones stay counted.
func TestForgiveKeepsLaterRefunds(t *testing.T) {
	t.Parallel()
	const max = 4
	e := newEnv(t, vault.Options{Now: time.Now})
	secret := randBytes(32)
	e.enroll("yan", secret, rightPIN, max)
	entered, release := holdTags(e, "right")
	done := make(chan error, 1)
	go func() {
		got, _, err := e.v.Recover(withTag(bg, "right"), ns, "yan", rightPIN)
		if err == nil && !bytes.Equal(got, secret) {
			err = errors.New("wrong secret")
		}
		done <- err
	}()
	<-entered["right"]
	for range 3 {
		e.hsm.failNextHMAC(1)
		if _, _, err := e.v.Recover(bg, ns, "yan", []byte("0000-lost")); !errors.Is(err, vault.ErrUnavailable) {
			t.Fatalf("an unanswered guess: %v", err)
		}
	}
	e.wrong("yan", 2)
	e.wrong("yan", 1)
	release["right"]()
	if err := <-done; err != nil {
		t.Fatalf("the held right PIN: %v", err)
	}
	if st := e.status("yan"); st.Locked || st.AttemptsRemaining != 2 {
		t.Fatalf("after the reset: %+v, want 2 left (two wrong guesses after it)", st)
	}
}

// Guesses counted before a success but checked by the HSM only after the
// period since that success is used up (a recovery, then wrong guesses to
// the lock), or after a PIN change started the next generation: their
// checks can be counted nowhere, so no outcome is told, wrong or right.
// Each answers unavailable, as a guess the HSM never answered, so at most
// max_attempts wrong outcomes are told after any success, and a held right
// PIN cannot be told apart from a wrong one.
func TestHeldGuessesPastTheBudgetTellNothing(t *testing.T) {
	t.Parallel()
	for _, success := range []string{"recovery", "PIN change"} {
		for _, heldRight := range []bool{false, true} {
			name := success + "/held wrong PINs"
			if heldRight {
				name = success + "/held right and wrong PINs"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				const max = 3
				e := newEnv(t, vault.Options{Now: time.Now})
				secret := randBytes(32)
				e.enroll("zed", secret, rightPIN, max)
				held := map[string][]byte{"h1": []byte("0000-h1"), "h2": []byte("0000-h2")}
				if heldRight {
					held["h2"] = rightPIN
				}
				entered, release := holdTags(e, "h1", "h2")
				answers := make(chan error, len(held))
				for _, tag := range []string{"h1", "h2"} {
					go func() {
						got, _, err := e.v.Recover(withTag(bg, tag), ns, "zed", held[tag])
						if err == nil && !bytes.Equal(got, secret) {
							err = errors.New("wrong secret")
						}
						answers <- err
					}()
					<-entered[tag] // counted, held in the HSM
				}

				switch success {
				case "recovery":
					if _, _, err := e.v.Recover(bg, ns, "zed", rightPIN); err != nil {
						t.Fatalf("the user's recovery: %v", err)
					}
				default:
					if _, err := e.v.ChangePIN(bg, ns, "zed", rightPIN, []byte("5678"), vault.Precondition{}); err != nil {
						t.Fatalf("the user's PIN change: %v", err)
					}
				}
				told := 0 // wrong outcomes told since the success
				for i := 1; i <= max; i++ {
					_, _, err := e.v.Recover(bg, ns, "zed", []byte(fmt.Sprintf("0000-fresh%d", i)))
					var wrong *vault.WrongPINError
					var locked *vault.LockedError
					switch {
					case errors.As(err, &wrong) && i < max && wrong.Remaining == max-i,
						errors.As(err, &locked) && locked.Checked && i == max:
						told++
					default:
						t.Fatalf("fresh wrong guess %d after the success: %v", i, err)
					}
				}

				release["h1"]()
				release["h2"]()
				for range len(held) {
					err := <-answers
					var wrong *vault.WrongPINError
					var locked *vault.LockedError
					if errors.As(err, &wrong) || errors.As(err, &locked) && locked.Checked {
						told++
					}
					if !errors.Is(err, vault.ErrUnavailable) {
						t.Errorf("a guess held across the success and checked after the lock: %v, want unavailable", err)
					}
				}
				if told > max {
					t.Errorf("%d wrong outcomes told after one success, want at most %d", told, max)
				}
				if r, _ := e.raw(ns, "zed"); !r.Locked || !r.LockFinal || len(r.Sealed) != 0 {
					t.Errorf("after: locked=%v final=%v sealed=%d, want the lock final and no secret", r.Locked, r.LockFinal, len(r.Sealed))
				}
				if got := e.metric("keyvault_guess_outcomes_untold_total"); got != 2 {
					t.Errorf("keyvault_guess_outcomes_untold_total = %v, want 2", got)
				}
			})
		}
	}
}

// A guess a success forgave, checked wrong while a later guess's lock is
// pending, waits for that lock: undone by a right PIN, the period has
// attempts again, and the held guess is counted in it before its 403.
func TestHeldGuessWaitsForAPendingLockBeforeCountingAgain(t *testing.T) {
	t.Parallel()
	const max = 3
	e := newEnv(t, vault.Options{Now: time.Now})
	secret := randBytes(32)
	e.enroll("ada", secret, rightPIN, max)
	entered, release := holdTags(e, "held", "last")
	heldDone := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(withTag(bg, "held"), ns, "ada", []byte("0000-held"))
		heldDone <- err
	}()
	<-entered["held"]
	if _, _, err := e.v.Recover(bg, ns, "ada", rightPIN); err != nil {
		t.Fatalf("the user's recovery: %v", err)
	}
	e.wrong("ada", 2)
	e.wrong("ada", 1)
	lastDone := make(chan error, 1)
	go func() {
		_, _, err := e.v.Recover(withTag(bg, "last"), ns, "ada", rightPIN)
		lastDone <- err
	}()
	<-entered["last"] // the last attempt is counted: the lock is pending
	release["held"]()
	select {
	case err := <-heldDone:
		t.Fatalf("the held guess answered %v while a lock was pending", err)
	case <-time.After(50 * time.Millisecond):
	}
	release["last"]()
	if err := <-lastDone; err != nil {
		t.Fatalf("the right last attempt: %v", err)
	}
	var wrong *vault.WrongPINError
	if err := <-heldDone; !errors.As(err, &wrong) || wrong.Remaining != max-1 {
		t.Fatalf("the held wrong guess after the lock was undone: %v, want 403 with %d left", err, max-1)
	}
	if st := e.status("ada"); st.Locked || st.AttemptsRemaining != max-1 {
		t.Fatalf("status: %+v, want unlocked with %d left", st, max-1)
	}
}

// The guess that uses the last attempt, held in the HSM while its backup
// is replaced (PUT) or deleted: its generation is gone, so its count can
// never be kept, and a wrong PIN answers like a right one there, unavailable
// (a right one cannot be told: see forgiveResealed). Were the wrong one told
// 410, the answer would tell a held right PIN from a wrong one.
func TestLastAttemptOnAReplacedBackupTellsNothing(t *testing.T) {
	t.Parallel()
	for _, replace := range []string{"PUT", "DELETE"} {
		for _, heldRight := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/right=%v", replace, heldRight), func(t *testing.T) {
				t.Parallel()
				const max = 2
				e := newEnv(t, vault.Options{Now: time.Now})
				e.enroll("kim", randBytes(32), rightPIN, max)
				e.wrong("kim", 1)
				pin := []byte("0000-held")
				if heldRight {
					pin = rightPIN
				}
				entered, release := holdTags(e, "last")
				done := make(chan error, 1)
				go func() {
					_, _, err := e.v.Recover(withTag(bg, "last"), ns, "kim", pin)
					done <- err
				}()
				<-entered["last"] // counted: the lock is pending
				switch replace {
				case "PUT":
					e.enroll("kim", randBytes(32), []byte("2222"), max)
				default:
					if err := e.v.Delete(bg, ns, "kim", vault.Precondition{}); err != nil {
						t.Fatal(err)
					}
				}
				_, before := e.raw(ns, "kim")
				release["last"]()
				err := <-done
				if !errors.Is(err, vault.ErrUnavailable) || errors.Is(err, vault.ErrLocked) || vault.Classify(err).Checked {
					t.Fatalf("the last attempt on a replaced backup: %v, want unavailable, unchecked", err)
				}
				if got := e.metric("keyvault_guess_outcomes_untold_total"); got != 1 {
					t.Errorf("keyvault_guess_outcomes_untold_total = %v, want 1", got)
				}
				if _, after := e.raw(ns, "kim"); !bytes.Equal(after, before) {
					t.Errorf("the new generation was written by a guess of the old one")
				}
			})
		}
	}
}

// Wrong guesses counted while a PIN change was checked stay counted on the
// new generation, and so does the escalating delay they started: the next
// guess waits as it would have without the PIN change.
func TestPINChangeKeepsTheDelayOfGuessesCountedMeanwhile(t *testing.T) {
	t.Parallel()
	var clock atomic.Int64
	clock.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	e := newEnv(t, vault.Options{
		Now:    func() time.Time { return time.Unix(0, clock.Load()) },
		Budget: vault.Budget{EscalatingDelay: vault.EscalatingDelay{FreeGuesses: 2, Base: time.Minute}},
	})
	e.enroll("lee", randBytes(32), rightPIN, 10)
	entered, release := holdTags(e, "change")
	done := make(chan error, 1)
	go func() {
		_, err := e.v.ChangePIN(withTag(bg, "change"), ns, "lee", rightPIN, []byte("5678"), vault.Precondition{})
		done <- err
	}()
	<-entered["change"]
	e.wrong("lee", 8)
	clock.Add(int64(time.Minute))
	e.wrong("lee", 7) // the two stay counted after the change: the next guess waits a minute
	release["change"]()
	if err := <-done; err != nil {
		t.Fatalf("the PIN change: %v", err)
	}
	if st := e.status("lee"); st.AttemptsRemaining != 8 {
		t.Fatalf("after the PIN change: %+v, want the two wrong guesses still counted", st)
	}
	var rl *vault.DelayedError
	if _, _, err := e.v.Recover(bg, ns, "lee", []byte("5678")); !errors.As(err, &rl) {
		t.Fatalf("a guess right after the PIN change: %v, want the escalating delay", err)
	}
}
