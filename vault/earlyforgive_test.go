package vault_test

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// CompareAndSwapEarly makes the observed store of
// TestConcurrentRightAndWrongGuesses an EarlyStore when the store under it
// is one (bbolt), so that the model test runs the path on which a lone
// reset is answered before it is durable; on etcd it is CompareAndSwap.
func (s *observedStore) CompareAndSwapEarly(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, func() error, error) {
	es, ok := s.Store.(vault.EarlyStore)
	if !ok {
		nr, err := s.CompareAndSwap(ctx, key, rev, value)
		return nr, nil, err
	}
	nr, durable, err := es.CompareAndSwapEarly(ctx, key, rev, value)
	if durable != nil {
		earlyResets.Add(1)
	}
	if err == nil {
		s.note(ctx, key, value)
	}
	return nr, durable, err
}

var _ vault.EarlyStore = (*observedStore)(nil)

// earlyResets counts the writes observed stores saw answered before they
// were durable.
var earlyResets atomic.Int64

// The model of right and wrong guesses (see
// TestConcurrentRightAndWrongGuesses) holds with lone resets answered
// before they are durable, and does run that path. On etcd, which answers
// every write once a quorum holds it, the model runs and no write is
// answered early.
func TestMixedGuessesWithEarlyResets(t *testing.T) {
	if onEtcd() {
		before := earlyResets.Load()
		mixedGuesses(t, false)
		if n := earlyResets.Load() - before; n != 0 {
			t.Fatalf("%d writes answered before they were durable on etcd", n)
		}
		return
	}
	// A reset that forgives its own guess alone is the first right guess
	// after every earlier one was forgiven: most runs of the model have
	// some, a few have none. Each run checks the model; runs repeat until
	// one went down the early path.
	before := earlyResets.Load()
	for run := 1; ; run++ {
		mixedGuesses(t, false)
		if n := earlyResets.Load() - before; n > 0 {
			t.Logf("%d resets answered before they were durable, in %d runs of the model", n, run)
			return
		}
		if run == 10 {
			t.Fatal("no reset was answered before it was durable in 10 runs of the model")
		}
	}
}

// earlyProbe is the env's store, as an EarlyStore whatever the driver,
// noting every record the vault sent through CompareAndSwapEarly.
type earlyProbe struct {
	vault.Store
	mu    sync.Mutex
	early []*vault.Record
}

func (p *earlyProbe) CompareAndSwapEarly(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, func() error, error) {
	r, err := vault.ParseRecord(value)
	if err != nil {
		return 0, nil, err
	}
	p.mu.Lock()
	p.early = append(p.early, r)
	p.mu.Unlock()
	if es, ok := p.Store.(vault.EarlyStore); ok {
		return es.CompareAndSwapEarly(ctx, key, rev, value)
	}
	nr, err := p.Store.CompareAndSwap(ctx, key, rev, value)
	return nr, nil, err
}

func (p *earlyProbe) take() []*vault.Record {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.early
	p.early = nil
	return out
}

// Only a reset that forgives its own guess and nothing else is sent to be
// answered before it is durable: losing it costs that one attempt. A reset
// that also forgives earlier wrong guesses, puts back a secret its guess
// removed, follows a refund or re-seals the record waits for durability,
// as does every other write.
func TestOnlyALoneResetIsAnsweredEarly(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	probe := &earlyProbe{Store: e.store}
	e.v = e.newVault(probe, e.hsm, prometheus.NewRegistry())
	secret := randBytes(32)
	recoverOK := func(user string, want int) {
		t.Helper()
		s, n, err := e.v.Recover(bg, ns, user, rightPIN)
		if err != nil || !bytes.Equal(s, secret) || n != want {
			t.Fatalf("recover %s: %d %v, want %d left", user, n, err, want)
		}
	}
	none := func(what string) {
		t.Helper()
		if got := probe.take(); len(got) != 0 {
			t.Fatalf("%s: %d writes sent to be answered early, want none", what, len(got))
		}
	}

	e.enroll("first-try", secret, rightPIN, 5)
	none("enroll")
	recoverOK("first-try", 5)
	got := probe.take()
	if len(got) != 1 || got[0].Guesses != 1 || got[0].Forgiven != 1 || got[0].Refunds != 0 || got[0].Locked || len(got[0].Sealed) == 0 {
		t.Fatalf("a right guess at the first try: early writes %+v, want its reset alone", got)
	}
	recoverOK("first-try", 5) // and again, each a lone reset
	if len(probe.take()) != 1 {
		t.Fatal("the next right guess's reset was not answered early")
	}

	e.enroll("after-wrong", secret, rightPIN, 5)
	e.wrong("after-wrong", 4)
	none("a wrong guess")
	recoverOK("after-wrong", 5)
	none("a reset that forgives an earlier wrong guess too")

	e.enroll("last-try", secret, rightPIN, 1)
	recoverOK("last-try", 1)
	none("a reset that puts back the secret its guess removed")

	e.enroll("refunded", secret, rightPIN, 5)
	e.hsm.failNextHMAC(1)
	if _, _, err := e.v.Recover(bg, ns, "refunded", rightPIN); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("recover with the HSM failing: %v", err)
	}
	recoverOK("refunded", 5)
	none("a reset after a refund")

	e.enroll("change-pin", secret, rightPIN, 5)
	if _, err := e.v.ChangePIN(bg, ns, "change-pin", rightPIN, []byte("13579"), vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	none("a PIN change")

	e.enroll("reseal", secret, rightPIN, 5)
	e.rotate()
	probe = &earlyProbe{Store: e.store}
	e.v = e.newVault(probe, e.hsm, prometheus.NewRegistry())
	recoverOK("reseal", 5)
	none("a reset that re-seals the record under newer keys")
	if st := e.status("reseal"); st.PINKeyVersion != 2 {
		t.Fatalf("the record was not re-sealed: %+v", st)
	}
	recoverOK("reseal", 5) // now on the newest keys: a lone reset again
	if len(probe.take()) != 1 {
		t.Fatal("a right guess on a re-sealed record was not answered early")
	}
}

// lossyEarly answers every early write as the store under it answers a
// compare-and-swap, then reports that it never became durable, as a
// bbolt commit that failed after its writes were applied.
type lossyEarly struct{ vault.Store }

var errLostCommit = errors.New("commit failed after the early answer")

func (s lossyEarly) CompareAndSwapEarly(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, func() error, error) {
	nr, err := s.CompareAndSwap(ctx, key, rev, value)
	return nr, func() error { return errLostCommit }, err
}

// A reset answered before it was durable that then fails is counted in
// keyvault_early_resets_lost_total; the answer stands.
func TestLostEarlyResetIsCounted(t *testing.T) {
	t.Parallel()
	e := newEnv(t, vault.Options{})
	reg := prometheus.NewRegistry()
	e.v = e.newVault(lossyEarly{e.store}, e.hsm, reg)
	secret := randBytes(32)
	if _, _, err := e.v.Enroll(bg, ns, "u1", secret, rightPIN, 5, vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	if s, n, err := e.v.Recover(bg, ns, "u1", rightPIN); err != nil || !bytes.Equal(s, secret) || n != 5 {
		t.Fatalf("recover: %d left, %v; want the secret and 5 left", n, err)
	}
	// The loss is noted by a goroutine once the answer has gone.
	deadline := time.Now().Add(5 * time.Second)
	for lostResets(t, reg) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("keyvault_early_resets_lost_total did not reach 1")
		}
		time.Sleep(time.Millisecond)
	}
}

func lostResets(t *testing.T, reg *prometheus.Registry) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "keyvault_early_resets_lost_total" {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatal("keyvault_early_resets_lost_total is not exported")
	return 0
}
