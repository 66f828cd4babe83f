package boltstore_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// A right guess's path on real parts (a bbolt file, SoftHSM members
// holding the rollback anchors), stopped at every instant a crash can
// fall on: the store left behind must open, must hold the guess counted
// or forgiven (never an attempt more than before the guess), and the
// store from before the guess must still be refused as a rollback.

func TestMain(m *testing.M) {
	code := m.Run()
	softhsmtest.RemoveShared()
	os.Exit(code)
}

// softPool opens a pool on a fresh SoftHSM token with keys made inside it.
func softPool(t *testing.T) *hsmpool.Pool {
	t.Helper()
	module, conf := softhsmtest.Shared(t)
	label := fmt.Sprintf("t-%d", time.Now().UnixNano())
	softhsmtest.Token(t, conf, label, "1234")
	m := hsmpool.MemberConfig{Name: "soft", Module: module, TokenLabel: label, PIN: "1234", MaxSessions: 4}
	if _, err := hsmpool.Provision([]hsmpool.MemberConfig{m}, vault.ProfileHMAC); err != nil {
		t.Fatal(err)
	}
	pool, err := hsmpool.Open([]hsmpool.MemberConfig{m}, hsmpool.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pool.Close() })
	return pool
}

// gatedHSM is the pool, with a hook around each PIN check.
type gatedHSM struct {
	vault.HSM
	before, after atomic.Pointer[func()]
}

func (g *gatedHSM) HMAC(ctx context.Context, key vault.KeyID, msg []byte) ([]byte, error) {
	if key.Role != vault.RolePIN {
		return g.HSM.HMAC(ctx, key, msg)
	}
	if f := g.before.Load(); f != nil {
		(*f)()
	}
	out, err := g.HSM.HMAC(ctx, key, msg)
	if f := g.after.Load(); f != nil {
		(*f)()
	}
	return out, err
}

// rightGuessRig is one vault process on a bbolt file with rollback
// anchoring on SoftHSM.
type rightGuessRig struct {
	t     *testing.T
	dir   string
	path  string
	pool  *hsmpool.Pool
	keys  anchor.Keys
	hsm   *gatedHSM
	store *boltstore.Store
	v     *vault.Vault
	logs  *kvproc.LogBuffer
}

var (
	rgPIN    = []byte("246810")
	rgSecret = []byte("0123456789abcdef0123456789abcdef")
)

const rgUser, rgMax = "jack", 5

func newRightGuessRig(t *testing.T) *rightGuessRig {
	t.Helper()
	r := &rightGuessRig{t: t, dir: t.TempDir(), pool: softPool(t)}
	r.path = filepath.Join(r.dir, "keyvault.db")
	r.hsm = &gatedHSM{HSM: r.pool}
	keys, err := vault.DeriveAnchorKeys(bg, r.pool)
	if err != nil {
		t.Fatal(err)
	}
	r.keys = keys
	if _, err := r.open(r.path); err != nil {
		t.Fatalf("first start: %v", err)
	}
	if _, _, err := r.v.Enroll(bg, "ns", rgUser, rgSecret, rgPIN, rgMax, vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	return r
}

// open starts the "process" on the store at path: the start-up check,
// then a vault.
func (r *rightGuessRig) open(path string) (anchor.Decision, error) {
	r.t.Helper()
	s, dec, err := r.startupCheck(path)
	if err != nil {
		s.Close()
		return dec, err
	}
	r.logs = &kvproc.LogBuffer{}
	v, err := vault.New(bg, s, r.hsm, vault.Options{
		Logger:        slog.New(slog.NewTextHandler(r.logs, nil)),
		ResolveWindow: 100 * time.Millisecond,
	})
	if err != nil {
		s.Close()
		r.t.Fatal(err)
	}
	r.store, r.v = s, v
	r.t.Cleanup(func() { s.Close() })
	return dec, nil
}

// copyTo copies the store file as it is on disk now.
func (r *rightGuessRig) copyTo(name string) string {
	r.t.Helper()
	return copyStore(r.t, r.path, filepath.Join(r.dir, name))
}

// startupCheck opens the store at path and runs the start-up check on it.
func (r *rightGuessRig) startupCheck(path string) (*boltstore.Store, anchor.Decision, error) {
	r.t.Helper()
	members, err := r.pool.AnchorMembers(bg)
	if err != nil {
		r.t.Fatal(err)
	}
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		r.t.Fatal(err)
	}
	dec, err := s.Anchor(bg, r.keys, members, nil, slog.New(slog.DiscardHandler))
	return s, dec, err
}

// refused checks that the store at path is refused as a rollback.
func (r *rightGuessRig) refused(path, what string) {
	r.t.Helper()
	s, _, err := r.startupCheck(path)
	s.Close()
	if reason, ok := anchor.IsRefused(err); !ok || reason != anchor.ReasonRollback {
		r.t.Fatalf("%s: start-up check said %v, want a refusal for rollback", what, err)
	}
}

// remaining is the attempts left of the backup as the store holds it.
func (r *rightGuessRig) remaining() int {
	r.t.Helper()
	b, err := r.v.Status(bg, "ns", rgUser)
	if err != nil {
		r.t.Fatal(err)
	}
	return b.AttemptsRemaining
}

// waitForLog waits a little for l to hold s, and returns what it holds.
func waitForLog(l *kvproc.LogBuffer, s string) (string, bool) {
	for range 100 {
		if out := string(l.Bytes()); strings.Contains(out, s) {
			return out, true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return string(l.Bytes()), false
}

type recovered struct {
	secret    []byte
	remaining int
	err       error
}

func (r *rightGuessRig) recover() <-chan recovered {
	out := make(chan recovered, 1)
	go func() {
		s, n, err := r.v.Recover(bg, "ns", rgUser, rgPIN)
		out <- recovered{s, n, err}
	}()
	return out
}

func within(t *testing.T, c <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-c:
	case <-time.After(20 * time.Second):
		t.Fatalf("timed out waiting for %s", what)
	}
}

func TestRightGuessCrashPoints(t *testing.T) {
	for _, tc := range []struct {
		name string
		// crash stops the process at its instant and returns the store
		// file it left (the file, once the process is gone) and the answer
		// the client got, if any.
		crash func(r *rightGuessRig) (image string, answer *recovered)
		// want is the attempts the left store must say, and past whether
		// it is one batch past its anchor.
		want int
		past bool
	}{
		{"after the count commits, before the PIN check", func(r *rightGuessRig) (string, *recovered) {
			return r.stopInPINCheck(true), nil
		}, rgMax - 1, false},
		{"after the PIN check, before the reset is sent", func(r *rightGuessRig) (string, *recovered) {
			return r.stopInPINCheck(false), nil
		}, rgMax - 1, false},
		{"after the answer, before the reset's commit", func(r *rightGuessRig) (string, *recovered) {
			entered, release := make(chan struct{}), make(chan struct{})
			boltstore.SetOnEarly(r.store, func() error {
				close(entered)
				<-release
				return errors.New("killed before the commit")
			})
			done := r.recover()
			within(t, entered, "the reset's transaction")
			var ans recovered
			select {
			case ans = <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("no answer while the reset's commit is held")
			}
			// The file as a kill here leaves it: the reset's transaction
			// has written nothing yet.
			image := r.copyTo("crash.db")
			close(release)
			r.store.Close()
			return image, &ans
		}, rgMax - 1, false},
		{"after the reset's fsync, before its anchor", func(r *rightGuessRig) (string, *recovered) {
			var checked atomic.Bool
			var image string
			after := func() { checked.Store(true) }
			r.hsm.after.Store(&after)
			boltstore.SetAfterCommit(r.store, func() error {
				if !checked.Load() {
					return nil
				}
				image = r.copyTo("crash.db") // committed, not anchored
				return errors.New("killed before the anchor")
			})
			ans := <-r.recover()
			r.store.Close()
			return image, &ans
		}, rgMax, true},
		{"after the reset's anchor", func(r *rightGuessRig) (string, *recovered) {
			ans := <-r.recover()
			r.store.Close()
			return r.copyTo("crash.db"), &ans
		}, rgMax, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRightGuessRig(t)
			pre := r.copyTo("pre-guess.db")
			image, ans := tc.crash(r)
			if ans != nil {
				// An answer that went out: the right secret, and the
				// attempts the reset left.
				if ans.err != nil || !bytes.Equal(ans.secret, rgSecret) || ans.remaining != rgMax {
					t.Fatalf("answer: %q %d %v, want the secret and %d left", ans.secret, ans.remaining, ans.err, rgMax)
				}
			}
			r.refused(pre, "the store from before the guess, before the restart")
			left := copyStore(t, image, filepath.Join(r.dir, "left.db")) // as the crash left it
			dec, err := r.open(image)
			if err != nil {
				t.Fatalf("the store the crash left was refused: %v", err)
			}
			if dec.Past != tc.past {
				t.Errorf("one batch past the anchor: %v, want %v", dec.Past, tc.past)
			}
			if got := r.remaining(); got != tc.want {
				t.Fatalf("after the crash: %d attempts left, want %d (of %d before the guess)", got, tc.want, rgMax)
			}
			r.refused(pre, "the store from before the guess, after the restart")
			// The backup serves on, and its budget with it.
			secret, n, err := r.v.Recover(bg, "ns", rgUser, rgPIN)
			if err != nil || !bytes.Equal(secret, rgSecret) || n != rgMax {
				t.Fatalf("a right guess after the restart: %q %d %v", secret, n, err)
			}
			if _, _, err := r.v.Recover(bg, "ns", rgUser, []byte("wrong-pin")); !errors.Is(err, vault.ErrWrongPIN) {
				t.Fatalf("a wrong guess after the restart: %v", err)
			}
			r.store.Close()
			r.refused(left, "the store as the crash left it, once a wrong guess followed")
		})
	}
}

// stopInPINCheck stops the process in the PIN check of a right guess,
// before the HSM is asked (before) or once it has answered, and returns
// the store file it leaves: nothing reaches the store or the members
// after that instant.
func (r *rightGuessRig) stopInPINCheck(before bool) string {
	r.t.Helper()
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	stop := func() {
		once.Do(func() {
			close(entered)
			<-release
		})
	}
	if before {
		r.hsm.before.Store(&stop)
	} else {
		r.hsm.after.Store(&stop)
	}
	done := r.recover()
	within(r.t, entered, "the PIN check")
	// The process dies here: its store is closed under the request, which
	// can then write nothing (its writes fail, and are never resolved).
	r.store.Close()
	close(release)
	<-done // a dead process's answer reaches nobody
	return r.copyTo("crash.db")
}

// While a reset answered before its commit is in flight, a read of its key
// waits for the commit, and a later guess is counted on the record the
// commit leaves: on the reset if it landed, on the count before it if it
// did not. Neither gives an attempt: the record never says more than the
// guesses checked since the last success that is durable allow.
func TestGuessDuringAnEarlyResetCountsOnWhatLanded(t *testing.T) {
	for _, lands := range []bool{true, false} {
		t.Run(fmt.Sprintf("reset lands: %v", lands), func(t *testing.T) {
			r := newRightGuessRig(t)
			entered, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			boltstore.SetOnEarly(r.store, func() error {
				var first bool
				once.Do(func() { first = true })
				if !first {
					return nil
				}
				close(entered)
				<-release
				if lands {
					return nil
				}
				return errors.New("the reset's commit failed")
			})
			done := r.recover()
			within(t, entered, "the reset's transaction")
			ans := <-done
			if ans.err != nil || ans.remaining != rgMax {
				t.Fatalf("right guess: %d %v", ans.remaining, ans.err)
			}
			// A wrong guess now reads the record: it must wait for the
			// reset's commit, and be counted on what it left.
			wrong := make(chan error, 1)
			go func() {
				_, _, err := r.v.Recover(bg, "ns", rgUser, []byte("wrong-pin"))
				wrong <- err
			}()
			select {
			case err := <-wrong:
				t.Fatalf("the wrong guess was answered (%v) while the reset's commit was held", err)
			case <-time.After(200 * time.Millisecond):
			}
			close(release)
			var wpe *vault.WrongPINError
			if err := <-wrong; !errors.As(err, &wpe) {
				t.Fatalf("wrong guess: %v", err)
			}
			want := rgMax - 1 // the reset landed: the wrong guess alone
			if !lands {
				want = rgMax - 2 // it did not: the right guess stays counted too
			}
			if wpe.Remaining != want || r.remaining() != want {
				t.Fatalf("after the wrong guess: answered %d, store says %d, want %d", wpe.Remaining, r.remaining(), want)
			}
			if out, ok := waitForLog(r.logs, "did not become durable"); ok != !lands {
				t.Fatalf("a reset answered early that never landed is logged: %v, want %v:\n%s", ok, !lands, out)
			}
		})
	}
}
