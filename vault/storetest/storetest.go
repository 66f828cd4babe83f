// Package storetest holds the behaviours of the vault.Store contract as
// one suite, run by every store driver's tests (boltstore, etcdstore), so
// that "compare-and-swap by revision" means the same thing on each.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/keyvault/keyvault/vault"
)

// Run runs the suite. open returns a fresh, empty store (or one with a
// fresh key prefix) that the test may use alone; the caller closes it.
func Run(t *testing.T, open func(t *testing.T) vault.Store) {
	bg := context.Background()
	cas := func(t *testing.T, s vault.Store, key string, rev uint64, val string) uint64 {
		t.Helper()
		nr, err := s.CompareAndSwap(bg, []byte(key), rev, []byte(val))
		if err != nil {
			t.Fatalf("CAS %s at %d: %v", key, rev, err)
		}
		return nr
	}
	t.Run("CreateUpdateConflict", func(t *testing.T) {
		s := open(t)
		r1 := cas(t, s, "k", 0, "v1")
		if r1 == 0 {
			t.Fatal("a created key has revision 0")
		}
		if v, rev, err := s.Get(bg, []byte("k")); err != nil || string(v) != "v1" || rev != r1 {
			t.Fatalf("get: %q %d %v", v, rev, err)
		}
		if _, err := s.CompareAndSwap(bg, []byte("k"), 0, []byte("again")); !errors.Is(err, vault.ErrConflict) {
			t.Fatalf("create over an existing key: %v, want ErrConflict", err)
		}
		r2 := cas(t, s, "k", r1, "v2")
		if r2 <= r1 {
			t.Fatalf("revision did not grow: %d then %d", r1, r2)
		}
		if _, err := s.CompareAndSwap(bg, []byte("k"), r1, []byte("stale")); !errors.Is(err, vault.ErrConflict) {
			t.Fatalf("CAS at a stale revision: %v, want ErrConflict", err)
		}
		if v, rev, _ := s.Get(bg, []byte("k")); string(v) != "v2" || rev != r2 {
			t.Fatalf("a refused CAS changed the value: %q %d", v, rev)
		}
		if _, err := s.CompareAndSwap(bg, []byte("missing"), 7, []byte("x")); !errors.Is(err, vault.ErrConflict) {
			t.Fatalf("CAS on a missing key at revision 7: %v, want ErrConflict", err)
		}
	})
	t.Run("GetMissingAndEmpty", func(t *testing.T) {
		s := open(t)
		if v, rev, err := s.Get(bg, []byte("nope")); v != nil || rev != 0 || err != nil {
			t.Fatalf("missing key: %q %d %v", v, rev, err)
		}
		cas(t, s, "empty", 0, "")
		if v, rev, err := s.Get(bg, []byte("empty")); v == nil || len(v) != 0 || rev == 0 || err != nil {
			t.Fatalf("empty value: %q (nil %v) %d %v", v, v == nil, rev, err)
		}
	})
	t.Run("BinaryKeys", func(t *testing.T) {
		s := open(t)
		k := []byte{'r', 0, 0xff, '/', 1}
		if _, err := s.CompareAndSwap(bg, k, 0, []byte{0, 1, 2}); err != nil {
			t.Fatal(err)
		}
		if v, _, err := s.Get(bg, k); err != nil || !bytes.Equal(v, []byte{0, 1, 2}) {
			t.Fatalf("binary key: %v %v", v, err)
		}
	})
	t.Run("CanceledContextWritesNothing", func(t *testing.T) {
		s := open(t)
		ctx, cancel := context.WithCancel(bg)
		cancel()
		if _, err := s.CompareAndSwap(ctx, []byte("k"), 0, []byte("v")); err == nil {
			t.Fatal("a CAS with a done context succeeded")
		}
		if v, _, _ := s.Get(bg, []byte("k")); v != nil {
			t.Fatal("a CAS with a done context wrote")
		}
	})
	t.Run("ScanPrefixInOrder", func(t *testing.T) {
		s := open(t)
		revs := map[string]uint64{}
		for _, k := range []string{"b2", "a1", "b1", "b\xff", "c", "b"} {
			revs[k] = cas(t, s, k, 0, "v-"+k)
		}
		var got []string
		err := s.Scan(bg, []byte("b"), func(k, v []byte, rev uint64) error {
			if string(v) != "v-"+string(k) || rev != revs[string(k)] {
				return fmt.Errorf("scan %q: value %q rev %d, want rev %d", k, v, rev, revs[string(k)])
			}
			got = append(got, string(k))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if want := []string{"b", "b1", "b2", "b\xff"}; fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("scan b: %q, want %q", got, want)
		}
		stop := errors.New("stop")
		n := 0
		if err := s.Scan(bg, nil, func(k, v []byte, rev uint64) error { n++; return stop }); !errors.Is(err, stop) || n != 1 {
			t.Fatalf("scan stops at fn's error: %v after %d", err, n)
		}
	})
	t.Run("ScanManyPages", func(t *testing.T) {
		s := open(t)
		const n = 1200 // more than one page of any driver that pages
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Go(func() {
				for i := w; i < n; i += 8 {
					if _, err := s.CompareAndSwap(bg, fmt.Appendf(nil, "p%05d", i), 0, []byte("v")); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		var last string
		count := 0
		err := s.Scan(bg, []byte("p"), func(k, _ []byte, _ uint64) error {
			if string(k) <= last {
				return fmt.Errorf("scan out of order: %q after %q", k, last)
			}
			last = string(k)
			count++
			return nil
		})
		if err != nil || count != n {
			t.Fatalf("scan: %d keys, %v; want %d", count, err, n)
		}
	})
	t.Run("ValuesAreCopies", func(t *testing.T) {
		s := open(t)
		val := []byte("original")
		cas(t, s, "k", 0, string(val))
		copy(val, "XXXXXXXX")
		v, _, _ := s.Get(bg, []byte("k"))
		if string(v) != "original" {
			t.Fatalf("the store kept the caller's slice: %q", v)
		}
		copy(v, "YYYYYYYY")
		if v2, _, _ := s.Get(bg, []byte("k")); string(v2) != "original" {
			t.Fatalf("Get returned the store's own slice: %q", v2)
		}
	})
	t.Run("ConcurrentCASCounter", func(t *testing.T) {
		// Each worker increments a shared counter by read + CAS, retrying on
		// conflict: no increment may be lost or doubled.
		s := open(t)
		countConcurrently(t, s, "ctr", 8, 15, func(key []byte, rev uint64, v []byte) error {
			_, err := s.CompareAndSwap(bg, key, rev, v)
			return err
		})
	})
	// A driver that answers writes before they are durable (the optional
	// vault.EarlyStore) keeps compare-and-swap's meaning, and its reads
	// never show a key as it was before an answered write.
	t.Run("EarlyAnswers", func(t *testing.T) {
		s := open(t)
		es, ok := s.(vault.EarlyStore)
		if !ok {
			t.Skip("the driver answers every write once it is durable")
		}
		r1 := cas(t, s, "k", 0, "v1")
		r2, durable, err := es.CompareAndSwapEarly(bg, []byte("k"), r1, []byte("v2"))
		if err != nil || r2 <= r1 {
			t.Fatalf("early CAS: %d %v, want a revision above %d", r2, err, r1)
		}
		if v, rev, err := s.Get(bg, []byte("k")); err != nil || string(v) != "v2" || rev != r2 {
			t.Fatalf("get after an early answer: %q %d %v, want v2 at %d", v, rev, err, r2)
		}
		if durable == nil {
			t.Fatal("an applied early CAS gave no way to wait for its durability")
		}
		if err := durable(); err != nil {
			t.Fatalf("durable: %v", err)
		}
		if _, d, err := es.CompareAndSwapEarly(bg, []byte("k"), r1, []byte("stale")); !errors.Is(err, vault.ErrConflict) || d != nil {
			t.Fatalf("early CAS at a stale revision: %v (durable %v), want ErrConflict and none", err, d != nil)
		}
		if _, d, err := es.CompareAndSwapEarly(bg, []byte("new"), 0, []byte("x")); err != nil || d == nil || d() != nil {
			t.Fatalf("early create: %v", err)
		}
		// Concurrent early increments lose nothing.
		countConcurrently(t, s, "ectr", 8, 20, func(key []byte, rev uint64, v []byte) error {
			_, d, err := es.CompareAndSwapEarly(bg, key, rev, v)
			if err == nil {
				if err := d(); err != nil {
					t.Error(err)
				}
			}
			return err
		})
	})
}

// countConcurrently has workers goroutines each increment a counter at key
// each times, by a read and swap, retrying on conflict; it fails t unless
// the counter ends at workers×each: no increment lost or doubled.
func countConcurrently(t *testing.T, s vault.Store, key string, workers, each int, swap func(key []byte, rev uint64, v []byte) error) {
	bg := context.Background()
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range each {
				for {
					v, rev, err := s.Get(bg, []byte(key))
					if err != nil {
						t.Error(err)
						return
					}
					var n int
					if v != nil {
						fmt.Sscan(string(v), &n)
					}
					err = swap([]byte(key), rev, fmt.Append(nil, n+1))
					if err == nil {
						break
					}
					if !errors.Is(err, vault.ErrConflict) {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if v, _, _ := s.Get(bg, []byte(key)); string(v) != fmt.Sprint(workers*each) {
		t.Fatalf("counter %s, want %d", v, workers*each)
	}
}
