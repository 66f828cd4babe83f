package boltstore_test

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
	bolt "go.etcd.io/bbolt"
)

// fakeAnchors keeps anchors in memory, for exact interleavings; the real
// members (SoftHSM data objects) are tested in hsmpool and e2e. A write
// waits while gate is closed.
type fakeAnchors struct {
	members []string        // default: one, "m"
	hang    map[string]bool // members whose writes never answer

	mu       sync.Mutex
	values   map[string][]byte
	writes   int
	attempts map[string]int
	gate     chan struct{} // nil: open
	wrote    chan int      // told each write's number, if set
}

func (f *fakeAnchors) Members() []string {
	if f.members == nil {
		return []string{"m"}
	}
	return f.members
}

func (f *fakeAnchors) ReadAnchors(context.Context) []anchor.Found {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []anchor.Found
	for _, m := range f.Members() {
		fd := anchor.Found{Member: m}
		if v := f.values[m]; v != nil {
			fd.Values = [][]byte{v}
		}
		out = append(out, fd)
	}
	return out
}

func (f *fakeAnchors) WriteAnchor(ctx context.Context, member string, _ uint64, value []byte) error {
	f.mu.Lock()
	if f.attempts == nil {
		f.attempts = map[string]int{}
	}
	f.attempts[member]++
	f.mu.Unlock()
	if f.hang[member] {
		<-ctx.Done()
		return ctx.Err()
	}
	f.mu.Lock()
	gate := f.gate
	f.writes++
	n := f.writes
	wrote := f.wrote
	f.mu.Unlock()
	if wrote != nil {
		wrote <- n
	}
	if gate != nil {
		<-gate
	}
	f.mu.Lock()
	f.values[member] = value
	f.mu.Unlock()
	return nil
}

func anchorKeys() anchor.Keys {
	k := anchor.Keys{Anchor: make([]byte, 32), Digest: make([]byte, 32), Meta: make([]byte, 32)}
	rand.Read(k.Anchor)
	rand.Read(k.Digest)
	rand.Read(k.Meta)
	return k
}

// The write order of rollback resistance, one instant at a time: a batch
// commits on an anchored position and is answered only after an anchor
// vouches for the position it made; a store caught between the two (killed
// after the commit) is one batch past its anchor and is accepted, and the
// store from before the batch is refused once the anchor has moved.
func TestAnchorWriteOrder(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	keys, fa := anchorKeys(), &fakeAnchors{values: map[string][]byte{}}
	dec, err := s.Anchor(bg, keys, fa, nil, nil)
	if err != nil || !dec.Fresh {
		t.Fatalf("fresh store: %+v %v", dec, err)
	}
	mustCAS(t, s, "a", 0, "v")
	beforeB, anchorsBeforeB := copyStore(t, path, filepath.Join(dir, "before-b.db")), fa.snapshot()

	gate, wrote := make(chan struct{}), make(chan int, 4)
	fa.mu.Lock()
	fa.gate, fa.wrote = gate, wrote
	fa.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		_, err := s.CompareAndSwap(bg, []byte("b"), 0, []byte("v"))
		done <- err
	}()
	// A broken order shows as a write that never comes: wait, but not
	// for ever (and open the gate on the way out, so Close can finish).
	defer func() {
		fa.mu.Lock()
		fa.gate = nil
		fa.mu.Unlock()
		select {
		case <-gate:
		default:
			close(gate)
		}
	}()
	select {
	case <-wrote:
	case <-time.After(10 * time.Second):
		t.Fatal("no anchor write for b's batch")
	}
	// The anchor vouching for b is held at the gate: b is committed, not
	// answered.
	if v, _, _ := s.Get(bg, []byte("b")); v == nil {
		t.Fatal("b's batch was not committed before the anchor that vouches for it")
	}
	select {
	case err := <-done:
		t.Fatalf("b was answered (%v) before an anchor vouched for it", err)
	case <-time.After(50 * time.Millisecond):
	}
	// Killed now: the store is one batch past its anchor.
	killed, anchorsAtKill := copyStore(t, path, filepath.Join(dir, "killed.db")), fa.snapshot()
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	start := func(path string, anchors map[string][]byte) error {
		t.Helper()
		s, err := boltstore.Open(boltstore.Options{Path: path})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		_, err = s.Anchor(bg, keys, &fakeAnchors{values: anchors}, nil, nil)
		return err
	}
	if err := start(killed, anchorsAtKill); err != nil {
		t.Fatalf("the store killed between b's commit and its anchor: %v", err)
	}
	if err := start(copyStore(t, beforeB, filepath.Join(dir, "before-b-2.db")), anchorsBeforeB); err != nil {
		t.Fatalf("the store before b, with its anchors: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := start(path, fa.snapshot()); err != nil {
		t.Fatalf("restart on the current store: %v", err)
	}
	if r, _ := anchor.IsRefused(start(beforeB, fa.snapshot())); r != anchor.ReasonRollback {
		t.Fatalf("the store from before b, after b's anchor: %v, want refused as rollback", r)
	}
}

// While the anchor for the last batch fails, no batch is written on top of
// it: the store stays at most one batch past its anchor, the position the
// start-up check can follow. The first anchor that succeeds lets writes on.
func TestNoWriteOnAnUnanchoredPosition(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a"}, values: map[string][][]byte{}}
	fa.set()
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatal(err)
	}
	fa.set("a")
	if _, err := s.CompareAndSwap(bg, []byte("c"), 0, []byte("v")); !errors.Is(err, vault.ErrWithheld) {
		t.Fatalf("a write whose anchor failed: %v, want ErrWithheld", err)
	}
	if _, err := s.CompareAndSwap(bg, []byte("d"), 0, []byte("v")); !errors.Is(err, vault.ErrWithheld) {
		t.Fatalf("a write on an unanchored position: %v, want ErrWithheld", err)
	}
	if v, _, _ := s.Get(bg, []byte("d")); v != nil {
		t.Fatal("d was written on a position no anchor vouches for")
	}
	fa.set()
	mustCAS(t, s, "d", 0, "v")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s, err = boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatalf("restart: %v", err)
	}
	for _, k := range []string{"c", "d"} {
		if v, _, _ := s.Get(bg, []byte(k)); v == nil {
			t.Fatalf("%s is gone", k)
		}
	}
}

// copyStore copies a store file (open or not: bbolt's committed pages are
// consistent) to dst, as a backup or a kill at that instant would leave it.
func copyStore(t *testing.T, src, dst string) string {
	t.Helper()
	data, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return dst
}

func (f *fakeAnchors) snapshot() map[string][]byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	return maps.Clone(f.values)
}

// A member that hangs costs one anchor timeout, then drops out of the live
// set and is not waited on again by the writes that follow; the anchors
// name only the member that took them.
func TestHungMemberIsNotWaitedOn(t *testing.T) {
	s, err := boltstore.Open(boltstore.Options{Path: filepath.Join(t.TempDir(), "store.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	keys := anchorKeys()
	fa := &fakeAnchors{values: map[string][]byte{}, members: []string{"a", "b"}, hang: map[string]bool{"b": true}}
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatal(err)
	}
	fa.mu.Lock()
	before := fa.attempts["b"]
	fa.mu.Unlock()
	for i := range 20 {
		mustCAS(t, s, fmt.Sprintf("k%d", i), 0, "v")
	}
	// 40 anchor writes; b, hung, is tried again only as its backoff
	// (1 s, doubling) comes due, whatever the pace of the writes.
	fa.mu.Lock()
	tried := fa.attempts["b"] - before
	fa.mu.Unlock()
	if tried > 5 {
		t.Fatalf("the hung member was tried %d times in 40 anchor writes", tried)
	}
	a, err := keys.ParseAnchor(fa.values["a"])
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Live) != 1 || a.Live[0] != "a" || fa.values["b"] != nil {
		t.Fatalf("newest anchor on a names %v as live; b holds %d bytes", a.Live, len(fa.values["b"]))
	}
}

// ctlAnchors: members whose writes fail, and members that do not answer
// reads.
type ctlAnchors struct {
	mu     sync.Mutex
	names  []string
	values map[string][][]byte
	fail   map[string]bool
	silent map[string]bool
}

func (f *ctlAnchors) Members() []string { return f.names }
func (f *ctlAnchors) ReadAnchors(context.Context) []anchor.Found {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []anchor.Found
	for _, m := range f.names {
		if f.silent[m] {
			out = append(out, anchor.Found{Member: m, Err: errors.New("silent")})
			continue
		}
		out = append(out, anchor.Found{Member: m, Values: f.values[m]})
	}
	return out
}
func (f *ctlAnchors) WriteAnchor(_ context.Context, m string, _ uint64, v []byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail[m] {
		return errors.New("down")
	}
	f.values[m] = [][]byte{v}
	return nil
}
func (f *ctlAnchors) set(fail ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = map[string]bool{}
	for _, m := range fail {
		f.fail[m] = true
	}
}

// Live set {a} -> {a,b} -> {b}: a keeps an anchor naming only itself, and
// stands in for b, which holds the newer ones.
func TestStaleMemberCannotStandIn(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a", "b"}, values: map[string][][]byte{}}
	fa.set("b")
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatal(err)
	}
	mustCAS(t, s, "x", 0, "v0") // live {a}
	old, _ := os.ReadFile(path) // the store at this point: the copy to roll back to
	fa.set()
	time.Sleep(1100 * time.Millisecond) // b's retry is due
	// prepare write: reaches a and b, names Live={a}; then a fails.
	yErr := make(chan error, 1)
	go func() {
		_, err := s.CompareAndSwap(bg, []byte("y"), 0, []byte("v1"))
		yErr <- err
	}()
	// make a fail right after the prepare write: poll until b holds an anchor
	for {
		fa.mu.Lock()
		n := len(fa.values["b"])
		if n > 0 {
			fa.fail = map[string]bool{"a": true}
		}
		fa.mu.Unlock()
		if n > 0 {
			break
		}
		time.Sleep(50 * time.Microsecond)
	}
	errY := <-yErr // answered only if an anchor vouched for it
	_, errZ := s.CompareAndSwap(bg, []byte("z"), 0, []byte("released"))
	for _, err := range []error{errY, errZ} {
		if err != nil && !errors.Is(err, vault.ErrWithheld) {
			t.Fatalf("an unanchored write failed with %v, want ErrWithheld", err)
		}
	}
	answered := errY == nil || errZ == nil
	s.Close()
	if err := os.WriteFile(path, old, 0o600); err != nil { // roll the store back
		t.Fatal(err)
	}
	fa.set("b")
	fa.silent = map[string]bool{"b": true} // b does not answer; a is back
	s2, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	aa, _ := keys.ParseAnchor(fa.values["a"][0])
	bb, _ := keys.ParseAnchor(fa.values["b"][0])
	t.Logf("a: W=%d live=%v base=%d; b: W=%d live=%v base=%d", aa.W, aa.Live, aa.Base.Seq, bb.W, bb.Live, bb.Base.Seq)
	if _, err := s2.Anchor(bg, keys, fa, nil, nil); err == nil && answered {
		t.Fatalf("a store rolled back past answered writes (y: %v, z: %v) was accepted on the stale member a alone", errY, errZ)
	} else {
		t.Logf("y: %v; z: %v; start on the rolled-back store: %v", errY, errZ, err)
	}
}

// A failed anchor write uses up its write number: it may have landed on
// some member, and another anchor under the same number would make a
// clean store look tampered with.
func TestFailedAnchorWriteUsesUpItsNumber(t *testing.T) {
	s, err := boltstore.Open(boltstore.Options{Path: filepath.Join(t.TempDir(), "store.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a"}, values: map[string][][]byte{}}
	fa.set()
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil { // write 1
		t.Fatal(err)
	}
	first, err := keys.ParseAnchor(fa.values["a"][0])
	if err != nil {
		t.Fatal(err)
	}
	fa.set("a")
	// Write 2 fails, and says its outcome is withheld: the vault must
	// answer 503 at once rather than look for the write and act on it.
	if _, err := s.CompareAndSwap(bg, []byte("x"), 0, []byte("v")); !errors.Is(err, vault.ErrWithheld) {
		t.Fatalf("a write whose anchor reached no member: %v, want ErrWithheld", err)
	}
	fa.set()
	mustCAS(t, s, "y", 0, "v") // writes 3 (for x's position, first) and 4 (for y's)
	a, err := keys.ParseAnchor(fa.values["a"][0])
	if err != nil || a.W != first.W+3 {
		t.Fatalf("newest anchor: write %d (%v), want %d: the failed write's number was reused", a.W, err, first.W+3)
	}
}

// An accept needs every member: one that does not answer may hold the
// newest anchors. Once it is back, the store it vouches for starts.
func TestAcceptNeedsEveryMember(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a", "b"}, values: map[string][][]byte{}}
	fa.set()
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatal(err)
	}
	mustCAS(t, s, "x", 0, "v")
	fa.set("a") // a drops out; b carries on
	for _, k := range []string{"y", "z", "w", "u"} {
		mustCAS(t, s, k, 0, "v")
	}
	s.Close()
	fa.set("b")
	fa.silent = map[string]bool{"b": true}
	if s, err = boltstore.Open(boltstore.Options{Path: path}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err == nil {
		t.Fatal("b, the current member, is silent, and the store was accepted")
	}
	if _, err := s.AcceptRestore(bg, keys, fa); err == nil || !strings.Contains(err.Error(), "member b does not answer") {
		t.Fatalf("accept with b silent: %v", err)
	}
	s.Close()
	restartAnchored(t, path, keys, fa, "b is back")
}

// restartAnchored brings every member back and opens the store again,
// which must pass the rollback check.
func restartAnchored(t *testing.T, path string, keys anchor.Keys, fa *ctlAnchors, what string) {
	t.Helper()
	fa.set()
	fa.silent = nil
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// A first start while no member answers writes nothing, and a later one,
// with the member back, starts the store fresh.
func TestFirstStartWithoutMembers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a"}, values: map[string][][]byte{}, silent: map[string]bool{"a": true}}
	fa.set("a")
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err == nil {
		t.Fatal("a first start with no member answering was accepted")
	}
	s.Close()
	restartAnchored(t, path, keys, fa, "an untouched, empty store")
}

// A key's revision only grows, even if the store-wide counter (outside the
// digest) is set back while the vault is stopped: two compare-and-swaps
// from one read cannot both land.
func TestRevisionsOnlyGrow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, _ := boltstore.Open(boltstore.Options{Path: path})
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a"}, values: map[string][][]byte{}}
	fa.set()
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatal(err)
	}
	rx := mustCAS(t, s, "x", 0, "attempts=0")
	s.Close()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("meta")).Put([]byte("revision"), binary.BigEndian.AppendUint64(nil, rx-1))
	})
	db.Close()
	s, _ = boltstore.Open(boltstore.Options{Path: path})
	defer s.Close()
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatalf("edited counter refused: %v", err)
	}
	// Two guesses read x at rx; both compare-and-swap from rx.
	r1, err1 := s.CompareAndSwap(bg, []byte("x"), rx, []byte("attempts=1"))
	r2, err2 := s.CompareAndSwap(bg, []byte("x"), rx, []byte("attempts=1"))
	if err1 == nil && err2 == nil {
		t.Fatalf("both compare-and-swaps from rev %d landed (new revs %d, %d): one guess lost", rx, r1, r2)
	}
}

// A transaction that reports failure may have landed all the same (an
// fsync failing after bbolt wrote its meta page). With anchoring on its
// writes are withheld, not failed, since resolving them would act on a
// state no anchor vouches for; and the writer reads the store back before
// the next batch, so its digest and position follow what is on disk and a
// restart accepts the store.
func TestCommitThatLandedButFailed(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	keys, fa := anchorKeys(), &fakeAnchors{values: map[string][]byte{}}
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatal(err)
	}
	mustCAS(t, s, "a", 0, "v")
	boltstore.SetAfterCommit(s, func() error { return errors.New("fdatasync: input/output error") })
	if _, err := s.CompareAndSwap(bg, []byte("b"), 0, []byte("v")); !errors.Is(err, vault.ErrWithheld) {
		t.Fatalf("a commit that reported failure: %v, want ErrWithheld", err)
	}
	boltstore.SetAfterCommit(s, nil)
	if v, _, _ := s.Get(bg, []byte("b")); v == nil {
		t.Fatal("the failed commit did not land; the test needs one that did")
	}
	mustCAS(t, s, "c", 0, "v")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := s2.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatalf("restart after a commit that landed but failed: %v", err)
	}
	for _, k := range []string{"a", "b", "c"} {
		if v, _, _ := s2.Get(bg, []byte(k)); v == nil {
			t.Fatalf("%s is gone", k)
		}
	}
}

// Options.Anchoring turns anchoring on at Open: every batch is anchored,
// and a store the check refuses is not opened (its file is free again).
func TestOpenWithAnchoring(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store.db")
	keys, fa := anchorKeys(), &fakeAnchors{values: map[string][]byte{}}
	anchoring := &boltstore.Anchoring{Keys: keys, Members: fa, Log: slog.New(slog.DiscardHandler)}
	s, err := boltstore.Open(boltstore.Options{Path: path, Anchoring: anchoring})
	if err != nil {
		t.Fatalf("fresh store: %v", err)
	}
	mustCAS(t, s, "a", 0, "v")
	old := copyStore(t, path, filepath.Join(dir, "old.db"))
	fa.mu.Lock()
	before := fa.writes
	fa.mu.Unlock()
	mustCAS(t, s, "b", 0, "v")
	fa.mu.Lock()
	after := fa.writes
	fa.mu.Unlock()
	if after != before+1 {
		t.Fatalf("a write made %d anchor writes, want 1", after-before)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = boltstore.Open(boltstore.Options{Path: old, Anchoring: anchoring})
	if r, ok := anchor.IsRefused(err); !ok || r != anchor.ReasonRollback {
		t.Fatalf("the copy from before b: %v, want a rollback refusal", err)
	}
	plain, err := boltstore.Open(boltstore.Options{Path: old})
	if err != nil {
		t.Fatalf("the refused store's file is still held: %v", err)
	}
	plain.Close()
	s, err = boltstore.Open(boltstore.Options{Path: path, Anchoring: anchoring})
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	defer s.Close()
	mustCAS(t, s, "c", 0, "v")
}
