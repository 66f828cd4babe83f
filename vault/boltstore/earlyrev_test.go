package boltstore_test

import (
	"errors"
	"testing"

	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// A revision handed out by an early answer is never handed out again for
// other content of the key, even when that answer's transaction failed
// and the store's counter went back with it: a compare-and-swap built on
// the early write then conflicts, and cannot land on content it never
// read.
func TestEarlyRevisionNeverReissued(t *testing.T) {
	s, _ := tempStore(t)
	r1 := mustCAS(t, s, "k", 0, "v1")

	fail := true
	boltstore.SetOnEarly(s, func() error {
		if fail {
			fail = false
			return errors.New("the commit of the early batch failed")
		}
		return nil
	})
	r2, durable, err := s.CompareAndSwapEarly(bg, []byte("k"), r1, []byte("v2-answered-early"))
	if err != nil || durable == nil {
		t.Fatalf("early CAS: %d %v", r2, err)
	}
	if err := durable(); err == nil {
		t.Fatal("the early batch was meant to fail")
	}
	boltstore.SetOnEarly(s, nil)
	// The store is back at v1; another writer moves k on from there.
	r3 := mustCAS(t, s, "k", r1, "v2-other")
	if r3 == r2 {
		t.Errorf("revision %d was returned for %q (never landed) and again for %q", r2, "v2-answered-early", "v2-other")
	}
	if _, err := s.CompareAndSwap(bg, []byte("k"), r2, []byte("built-on-v2-answered-early")); !errors.Is(err, vault.ErrConflict) {
		v, rev, _ := s.Get(bg, []byte("k"))
		t.Fatalf("a CAS at the revision of a write that never landed: %v (k is now %q at %d), want ErrConflict", err, v, rev)
	}
}
