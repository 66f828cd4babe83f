package vault_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/keyvault/keyvault/internal/etcdtest"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/etcdstore"
)

// How an injected write with an unknown outcome behaves.
type fault int32

const (
	faultNone    fault = iota
	faultApplied       // applied, then answered with an error (a deadline hit after the commit)
	faultLost          // not applied, answered with an error (never reached a leader)
	faultLate          // answered with an error at once, applied a little later (a proposal still in flight)
	faultDown          // not applied, and from then on reads fail too
	// applied, then answered as a conflict: the etcd client re-sent a Txn
	// whose first copy landed, and the copy's compare failed
	faultAppliedConflict
)

var errInjected = errors.New("injected: etcdserver: request timed out")

// ambiguousStore wraps the env's real store and gives compare-and-swaps of
// records (keys starting 'r') an unknown outcome: every one while fault is
// set, or, with rate > 0, that share of them at random with a random fault.
// Only the first send of a value is faulted, so that a resent write (the
// vault's resolution) reaches the store as the network would let it.
type ambiguousStore struct {
	vault.Store
	fault     atomic.Int32
	rate      float64
	injected  atomic.Int64
	readsDown atomic.Bool
	late      sync.WaitGroup
	mu        sync.Mutex
	sent      map[string]bool
	// beforeAnswer runs, once, after a lost write and before its error is
	// returned: another writer may move the record meanwhile.
	beforeAnswer atomic.Pointer[func()]
}

func (s *ambiguousStore) pick() fault {
	if f := fault(s.fault.Load()); f != faultNone {
		return f
	}
	if s.rate > 0 && rand.Float64() < s.rate {
		return fault(1 + rand.IntN(3)) // applied, lost or late
	}
	return faultNone
}

func (s *ambiguousStore) Get(ctx context.Context, key []byte) ([]byte, uint64, error) {
	if s.readsDown.Load() {
		return nil, 0, errInjected
	}
	return s.Store.Get(ctx, key)
}

func (s *ambiguousStore) CompareAndSwap(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, error) {
	if len(key) == 0 || key[0] != 'r' {
		return s.Store.CompareAndSwap(ctx, key, rev, value)
	}
	s.mu.Lock()
	resent := s.sent[string(value)]
	if s.sent == nil {
		s.sent = map[string]bool{}
	}
	s.sent[string(value)] = true
	s.mu.Unlock()
	f := s.pick()
	if f == faultNone || resent && f != faultDown {
		return s.Store.CompareAndSwap(ctx, key, rev, value)
	}
	s.injected.Add(1)
	switch f {
	case faultApplied:
		if _, err := s.Store.CompareAndSwap(ctx, key, rev, value); err != nil {
			return 0, err // a real answer (a conflict): pass it on
		}
	case faultAppliedConflict:
		if _, err := s.Store.CompareAndSwap(ctx, key, rev, value); err != nil {
			return 0, err
		}
		return 0, vault.ErrConflict
	case faultLate:
		s.late.Go(func() {
			time.Sleep(time.Duration(1+rand.IntN(20)) * time.Millisecond)
			s.Store.CompareAndSwap(context.Background(), key, rev, value)
		})
	case faultDown:
		s.readsDown.Store(true)
	case faultLost:
		if fn := s.beforeAnswer.Swap(nil); fn != nil {
			(*fn)()
		}
	}
	return 0, fmt.Errorf("store compare-and-swap: %w", errInjected)
}

func ambiguousEnv(t *testing.T, opts vault.Options) (*env, *ambiguousStore, *vault.Vault, *prometheus.Registry) {
	e := newEnv(t, opts)
	s := &ambiguousStore{Store: e.store}
	t.Cleanup(s.late.Wait)
	reg := prometheus.NewRegistry()
	return e, s, e.newVault(s, e.hsm, reg), reg
}

func gathered(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetValue() == label {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric %s{%s} missing", name, label)
	return 0
}

// Every write of a guess's life (count, forgive, refund) answered with an
// error whatever really happened: the guesses are counted exactly as
// without faults. A refund that landed but was reported failed is never
// applied twice (that would hand back a guess), and a count is never taken
// as "not applied" when it was.
func TestAmbiguousWritesResolveAsCounted(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name  string
		fault fault
		want  []string // resolutions that must have happened
	}{
		{"applied", faultApplied, []string{"applied"}},
		{"lost", faultLost, []string{"resent"}},
		{"late", faultLate, nil}, // resent or applied, by the race
		{"applied-answered-conflict", faultAppliedConflict, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e, s, v, reg := ambiguousEnv(t, vault.Options{})
			user := "amb-" + c.name
			e.enroll(user, randBytes(32), rightPIN, 5)
			s.fault.Store(int32(c.fault))
			for want := 4; want >= 2; want-- {
				_, _, err := v.Recover(bg, ns, user, []byte("0000-wrong"))
				if r, ok := isWrongPIN(err); !ok || r != want {
					t.Fatalf("wrong guess: %v, want wrong_pin with %d left", err, want)
				}
			}
			if _, left, err := v.Recover(bg, ns, user, rightPIN); err != nil || left != 5 {
				t.Fatalf("right PIN: %d left, %v", left, err)
			}
			// One wrong guess, then one the HSM never answers: refunded
			// exactly once, so 4 left, not 5.
			if _, _, err := v.Recover(bg, ns, user, []byte("0000-wrong")); err == nil {
				t.Fatal("wrong PIN accepted")
			}
			e.hsm.failNextHMAC(1)
			if _, _, err := v.Recover(bg, ns, user, rightPIN); !errors.Is(err, vault.ErrUnavailable) {
				t.Fatalf("guess without an HSM answer: %v, want ErrUnavailable", err)
			}
			s.fault.Store(int32(faultNone))
			s.late.Wait()
			if st := e.status(user); st.AttemptsRemaining != 4 {
				t.Fatalf("after a refund with an unknown outcome: %d left, want 4", st.AttemptsRemaining)
			}
			if s.injected.Load() < 7 {
				t.Fatalf("only %d faults injected", s.injected.Load())
			}
			for _, res := range c.want {
				if gathered(t, reg, "keyvault_store_ambiguous_writes_total", res) == 0 {
					t.Errorf("no write resolved as %s", res)
				}
			}
			if n := gathered(t, reg, "keyvault_store_ambiguous_writes_total", "unresolved"); n != 0 {
				t.Errorf("%v writes unresolved", n)
			}
		})
	}
}

// A lost count whose record another vault moves before the error comes
// back can never land: it is counted again on the new record, so both
// guesses are counted.
func TestLostWriteOvertakenIsCountedAgain(t *testing.T) {
	t.Parallel()
	e, s, v, reg := ambiguousEnv(t, vault.Options{})
	e.enroll("overtaken", randBytes(32), rightPIN, 5)
	other := func() {
		if _, _, err := e.v.Recover(bg, ns, "overtaken", []byte("0000-other")); err == nil {
			t.Error("wrong PIN accepted")
		}
	}
	s.beforeAnswer.Store(&other)
	s.fault.Store(int32(faultLost))
	// Only the first write is lost; the rest pass.
	go func() {
		for s.injected.Load() == 0 {
			time.Sleep(time.Millisecond)
		}
		s.fault.Store(int32(faultNone))
	}()
	_, _, err := v.Recover(bg, ns, "overtaken", []byte("0000-wrong"))
	if r, ok := isWrongPIN(err); !ok || r != 3 {
		t.Fatalf("guess whose count was lost and overtaken: %v, want wrong_pin with 3 left", err)
	}
	if st := e.status("overtaken"); st.AttemptsRemaining != 3 {
		t.Fatalf("%d left, want 3", st.AttemptsRemaining)
	}
	if gathered(t, reg, "keyvault_store_ambiguous_writes_total", "not_applied") != 1 {
		t.Fatal("the overtaken write was not resolved as not_applied")
	}
}

// When the outcome cannot be learnt in time (the store does not answer
// reads either), the guess is answered 503 and its PIN is never checked.
func TestUnresolvedWriteChecksNoPIN(t *testing.T) {
	t.Parallel()
	e, s, v, reg := ambiguousEnv(t, vault.Options{ResolveWindow: 200 * time.Millisecond})
	e.enroll("unresolved", randBytes(32), rightPIN, 5)
	checks := e.hsm.pinChecks()
	s.fault.Store(int32(faultDown))
	if _, _, err := v.Recover(bg, ns, "unresolved", rightPIN); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("recover with the store down: %v, want ErrUnavailable", err)
	}
	if n := e.hsm.pinChecks() - checks; n != 0 {
		t.Fatalf("%d PIN checks with an unknown count", n)
	}
	if gathered(t, reg, "keyvault_store_ambiguous_writes_total", "unresolved") == 0 {
		t.Fatal("unresolved not counted")
	}
}

// 64 concurrent wrong guesses over two vaults at a backup with 5 attempts,
// with a third of the record writes given an unknown outcome at random:
// never more than 4 wrong_pin answers nor 5 PIN checks; and when every
// outcome was resolved, exactly 4 wrong_pin answers (4, 3, 2, 1 left).
func TestAmbiguousStorm(t *testing.T) {
	t.Parallel()
	const max, workers, rounds = 5, 64, 8
	e := newEnv(t, vault.Options{})
	var stores []*ambiguousStore
	var vaults []*vault.Vault
	var regs []*prometheus.Registry
	for range 2 {
		s := &ambiguousStore{Store: e.store, rate: 0.33}
		t.Cleanup(s.late.Wait)
		reg := prometheus.NewRegistry()
		stores, regs, vaults = append(stores, s), append(regs, reg), append(vaults, e.newVault(s, e.hsm, reg))
	}
	for round := range rounds {
		user := fmt.Sprintf("storm-%d", round)
		e.enroll(user, randBytes(32), rightPIN, max)
		unresolvedBefore := gathered(t, regs[0], "keyvault_store_ambiguous_writes_total", "unresolved") +
			gathered(t, regs[1], "keyvault_store_ambiguous_writes_total", "unresolved")
		checks := e.hsm.pinChecks()
		errs := make([]error, workers)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range workers {
			wg.Go(func() {
				<-start
				_, _, errs[i] = vaults[i%2].Recover(bg, ns, user, fmt.Appendf(nil, "w%04d", i))
			})
		}
		close(start)
		wg.Wait()
		for _, s := range stores {
			s.late.Wait()
		}
		var remaining []int
		for _, err := range errs {
			if r, ok := isWrongPIN(err); ok {
				remaining = append(remaining, r)
			} else if !errors.Is(err, vault.ErrLocked) && !errors.Is(err, vault.ErrUnavailable) {
				t.Errorf("round %d: unexpected answer %v", round, err)
			}
		}
		slices.Sort(remaining)
		if n := e.hsm.pinChecks() - checks; n > max {
			t.Fatalf("round %d: %d PINs checked, budget %d", round, n, max)
		}
		if len(remaining) > max-1 || len(slices.Compact(slices.Clone(remaining))) != len(remaining) {
			t.Fatalf("round %d: wrong_pin answers with remaining %v", round, remaining)
		}
		unresolved := gathered(t, regs[0], "keyvault_store_ambiguous_writes_total", "unresolved") +
			gathered(t, regs[1], "keyvault_store_ambiguous_writes_total", "unresolved") - unresolvedBefore
		if unresolved == 0 && !slices.Equal(remaining, []int{1, 2, 3, 4}) {
			t.Fatalf("round %d: every outcome resolved, yet wrong_pin answers with remaining %v, want [1 2 3 4]", round, remaining)
		}
		if r, _ := e.raw(ns, user); !r.Locked || len(r.Sealed) != 0 {
			t.Fatalf("round %d: the backup is not locked after the storm", round)
		}
	}
	if stores[0].injected.Load()+stores[1].injected.Load() == 0 {
		t.Fatal("no fault injected")
	}
}

// shortTxnKV gives each etcd Txn a deadline of 0 to 3 ms: long enough to
// reach etcd, often too short for its answer, so real etcd leaves real
// outcomes unknown (some applied, some not, some later).
type shortTxnKV struct{ clientv3.KV }

func (k shortTxnKV) Txn(ctx context.Context) clientv3.Txn {
	ctx, cancel := context.WithCancel(ctx)
	time.AfterFunc(time.Duration(rand.IntN(3000))*time.Microsecond, cancel)
	return k.KV.Txn(ctx)
}

// On a real etcd, with writes cut off by deadlines at random, wrong guesses
// from two vaults are still counted one by one: 4, 3, 2 left in turn, and
// in a storm of 64 exactly four 403s while every outcome resolved.
func TestRealDeadlinesResolveAsCounted(t *testing.T) {
	t.Parallel()
	// A real etcd in either pass of the suite: the suite's own, or one
	// for this test.
	cluster := etcdCluster
	if cluster == nil {
		cluster = etcdtest.New(t, 1)
	}
	e := newEnvOn(t, vault.Options{}, cluster.Endpoints())
	st, err := etcdstore.Open(etcdstore.Options{Endpoints: cluster.Endpoints(), KeyPrefix: e.path,
		WrapKV: func(kv clientv3.KV) clientv3.KV { return shortTxnKV{kv} }})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reg := prometheus.NewRegistry()
	v := e.newVault(st, e.hsm, reg)
	resolved := func() (n float64) {
		for _, r := range []string{"applied", "resent", "not_applied"} {
			n += gathered(t, reg, "keyvault_store_ambiguous_writes_total", r)
		}
		return n
	}
	e.enroll("deadlines", randBytes(32), rightPIN, 5)
	for want := 4; want >= 2; want-- {
		_, _, err := v.Recover(bg, ns, "deadlines", []byte("0000-wrong"))
		if r, ok := isWrongPIN(err); !ok || r != want {
			t.Fatalf("wrong guess: %v, want wrong_pin with %d left", err, want)
		}
	}
	vaults := []*vault.Vault{e.v, v}
	for round := range 5 {
		user := fmt.Sprintf("deadlines-%d", round)
		e.enroll(user, randBytes(32), rightPIN, 5)
		checks := e.hsm.pinChecks()
		errs := make([]error, 64)
		var wg sync.WaitGroup
		for i := range errs {
			wg.Go(func() { _, _, errs[i] = vaults[i%2].Recover(bg, ns, user, fmt.Appendf(nil, "w%04d", i)) })
		}
		wg.Wait()
		var left []int
		for _, err := range errs {
			if r, ok := isWrongPIN(err); ok {
				left = append(left, r)
			} else if !errors.Is(err, vault.ErrLocked) && !errors.Is(err, vault.ErrUnavailable) {
				t.Fatalf("round %d: unexpected answer %v", round, err)
			}
		}
		slices.Sort(left)
		if n := e.hsm.pinChecks() - checks; n > 5 {
			t.Fatalf("round %d: %d PINs checked, budget 5", round, n)
		}
		if gathered(t, reg, "keyvault_store_ambiguous_writes_total", "unresolved") == 0 && !slices.Equal(left, []int{1, 2, 3, 4}) ||
			len(left) > 4 {
			t.Fatalf("round %d: wrong_pin answers with remaining %v", round, left)
		}
	}
	if resolved() == 0 {
		t.Fatal("no write outcome was left unknown: the deadlines did not bite")
	}
	t.Logf("unknown outcomes resolved: applied %v, resent %v, not applied %v",
		gathered(t, reg, "keyvault_store_ambiguous_writes_total", "applied"),
		gathered(t, reg, "keyvault_store_ambiguous_writes_total", "resent"),
		gathered(t, reg, "keyvault_store_ambiguous_writes_total", "not_applied"))
}
