package boltstore_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// fakeAnchors keeps anchors in memory, for exact interleavings; the real
// members (SoftHSM data objects) are tested in hsmpool and e2e. A write
// waits while gate is closed.
type fakeAnchors struct {
	members []string        // default: one, "m"
	hang    map[string]bool // members whose writes never answer

	mu     sync.Mutex
	values map[string][]byte
	writes int
	gate   chan struct{} // nil: open
	wrote  chan int      // told each write's number, if set
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

func (f *fakeAnchors) WriteAnchor(ctx context.Context, member string, value []byte) error {
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

// The two ordering rules of rollback resistance, one instant at a time:
// a batch commits only after the anchor naming it as pending is written,
// and its answer goes out only after an anchor vouches for it as base.
func TestAnchorWriteOrder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(path, nil)
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
	// for ever.
	next := func(what string) {
		t.Helper()
		select {
		case <-wrote:
		case <-time.After(10 * time.Second):
			t.Fatalf("no anchor write: %s", what)
		}
	}
	next("the anchor naming b's batch as pending") // held at the gate
	if v, _, _ := s.Get(bg, []byte("b")); v != nil {
		t.Fatal("rule 1: the batch committed before its pending anchor was written")
	}
	gate <- struct{}{}                         // let the pending anchor land
	next("the idle anchor that vouches for b") // held at the gate
	if v, _, _ := s.Get(bg, []byte("b")); v == nil {
		t.Fatal("b did not commit after its pending anchor")
	}
	select {
	case err := <-done:
		t.Fatalf("rule 2: b was answered (%v) before an anchor vouched for it", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// Every state the writes went through is accepted at the next start;
	// with the anchors unchanged, a store rolled back is not.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := boltstore.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	fa.gate, fa.wrote = nil, nil
	if _, err := s2.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatalf("restart on the current store: %v", err)
	}
}

// A member that hangs costs one anchor timeout, then drops out of the live
// set and is not waited on again by the writes that follow; the anchors
// name only the member that took them.
func TestHungMemberIsNotWaitedOn(t *testing.T) {
	s, err := boltstore.Open(filepath.Join(t.TempDir(), "store.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	keys := anchorKeys()
	fa := &fakeAnchors{values: map[string][]byte{}, members: []string{"a", "b"}, hang: map[string]bool{"b": true}}
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	for i := range 20 {
		mustCAS(t, s, fmt.Sprintf("k%d", i), 0, "v")
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("20 writes took %v: the hung member is waited on", d)
	}
	a, err := keys.ParseAnchor(fa.values["a"])
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Live) != 1 || a.Live[0] != "a" || fa.values["b"] != nil {
		t.Fatalf("newest anchor on a names %v as live; b holds %d bytes", a.Live, len(fa.values["b"]))
	}
}
