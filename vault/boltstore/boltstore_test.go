package boltstore_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

var bg = context.Background()

func open(t *testing.T, path string) *boltstore.Store {
	t.Helper()
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func tempStore(t *testing.T) (*boltstore.Store, string) {
	path := filepath.Join(t.TempDir(), "store.db")
	return open(t, path), path
}

func mustCAS(t *testing.T, s *boltstore.Store, key string, rev uint64, val string) uint64 {
	t.Helper()
	nr, err := s.CompareAndSwap(bg, []byte(key), rev, []byte(val))
	if err != nil {
		t.Fatalf("CAS %s at %d: %v", key, rev, err)
	}
	return nr
}

func TestCompareAndSwap(t *testing.T) {
	t.Parallel()
	s, _ := tempStore(t)
	r1 := mustCAS(t, s, "k", 0, "v1")
	if r1 == 0 {
		t.Fatal("a created key has revision 0")
	}
	if v, rev, err := s.Get(bg, []byte("k")); err != nil || string(v) != "v1" || rev != r1 {
		t.Fatalf("get: %q %d %v", v, rev, err)
	}
	// Creating again, or writing at a stale or made-up revision, conflicts and writes nothing.
	for _, rev := range []uint64{0, r1 - 1, r1 + 1, ^uint64(0)} {
		if _, err := s.CompareAndSwap(bg, []byte("k"), rev, []byte("bad")); !errors.Is(err, vault.ErrConflict) {
			t.Fatalf("CAS at revision %d over %d: %v, want ErrConflict", rev, r1, err)
		}
	}
	r2 := mustCAS(t, s, "k", r1, "v2")
	if r2 <= r1 {
		t.Fatalf("revision went from %d to %d", r1, r2)
	}
	if _, err := s.CompareAndSwap(bg, []byte("k"), r1, []byte("stale")); !errors.Is(err, vault.ErrConflict) {
		t.Fatalf("CAS at the stale revision: %v", err)
	}
	if v, rev, _ := s.Get(bg, []byte("k")); string(v) != "v2" || rev != r2 {
		t.Fatalf("after conflicts: %q at %d, want v2 at %d", v, rev, r2)
	}
	// A missing key needs revision 0.
	if _, err := s.CompareAndSwap(bg, []byte("new"), 5, []byte("x")); !errors.Is(err, vault.ErrConflict) {
		t.Fatalf("CAS of a missing key at revision 5: %v", err)
	}
	// Revisions come from one store-wide counter: they increase across keys.
	r3 := mustCAS(t, s, "other", 0, "o")
	if r3 <= r2 {
		t.Fatalf("revision of another key %d not above %d", r3, r2)
	}
	// An empty value is a value, not a missing key.
	re := mustCAS(t, s, "empty", 0, "")
	if v, rev, err := s.Get(bg, []byte("empty")); err != nil || v == nil || len(v) != 0 || rev != re {
		t.Fatalf("empty value: %v (nil=%v) %d %v", v, v == nil, rev, err)
	}
}

func TestGetMissing(t *testing.T) {
	t.Parallel()
	s, _ := tempStore(t)
	v, rev, err := s.Get(bg, []byte("nothing"))
	if v != nil || rev != 0 || err != nil {
		t.Fatalf("missing key: %v %d %v, want nil, 0, nil", v, rev, err)
	}
}

func TestCanceledContextWritesNothing(t *testing.T) {
	t.Parallel()
	s, _ := tempStore(t)
	ctx, cancel := context.WithCancel(bg)
	cancel()
	if _, err := s.CompareAndSwap(ctx, []byte("k"), 0, []byte("v")); !errors.Is(err, context.Canceled) {
		t.Fatalf("CAS with a canceled context: %v", err)
	}
	if _, _, err := s.Get(ctx, []byte("k")); !errors.Is(err, context.Canceled) {
		t.Fatalf("get with a canceled context: %v", err)
	}
	if v, _, _ := s.Get(bg, []byte("k")); v != nil {
		t.Fatal("a canceled CAS wrote")
	}
	// context.WithoutCancel, as the vault uses for counting writes, writes.
	if _, err := s.CompareAndSwap(context.WithoutCancel(ctx), []byte("k"), 0, []byte("v")); err != nil {
		t.Fatalf("CAS under WithoutCancel: %v", err)
	}
}

func TestScan(t *testing.T) {
	t.Parallel()
	s, _ := tempStore(t)
	revs := map[string]uint64{}
	for _, k := range []string{"b2", "a3", "a1", "c", "a2", "a", "b1", "ab"} {
		revs[k] = mustCAS(t, s, k, 0, "val-"+k)
	}
	scan := func(prefix string) []string {
		t.Helper()
		var keys []string
		err := s.Scan(bg, []byte(prefix), func(k, v []byte, rev uint64) error {
			if string(v) != "val-"+string(k) || rev != revs[string(k)] {
				t.Errorf("scan: %s = %q at %d", k, v, rev)
			}
			keys = append(keys, string(k))
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	for _, c := range []struct {
		prefix string
		want   []string
	}{
		{"a", []string{"a", "a1", "a2", "a3", "ab"}},
		{"b", []string{"b1", "b2"}},
		{"ab", []string{"ab"}},
		{"", []string{"a", "a1", "a2", "a3", "ab", "b1", "b2", "c"}},
		{"d", nil},
		{"a4", nil},
	} {
		if got := scan(c.prefix); fmt.Sprint(got) != fmt.Sprint(c.want) {
			t.Errorf("scan %q: %v, want %v", c.prefix, got, c.want)
		}
	}
	// An error from fn stops the scan and is returned.
	stop := errors.New("stop")
	n := 0
	if err := s.Scan(bg, []byte("a"), func(k, v []byte, rev uint64) error { n++; return stop }); !errors.Is(err, stop) || n != 1 {
		t.Fatalf("scan with a failing fn: %v after %d keys", err, n)
	}
	// A canceled context stops it too.
	ctx, cancel := context.WithCancel(bg)
	cancel()
	if err := s.Scan(ctx, nil, func(k, v []byte, rev uint64) error { return nil }); !errors.Is(err, context.Canceled) {
		t.Fatalf("scan with a canceled context: %v", err)
	}
}

func TestReopenKeepsDataAndRevisions(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	r1 := mustCAS(t, s, "k", 0, "v1")
	r2 := mustCAS(t, s, "k2", 0, "v2")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, path)
	if err := s.Ping(bg); err != nil {
		t.Fatal(err)
	}
	if v, rev, err := s.Get(bg, []byte("k")); err != nil || string(v) != "v1" || rev != r1 {
		t.Fatalf("after reopen: %q %d %v", v, rev, err)
	}
	if _, err := s.CompareAndSwap(bg, []byte("k"), 0, []byte("x")); !errors.Is(err, vault.ErrConflict) {
		t.Fatal("after reopen a stale revision writes")
	}
	// The revision counter survives too: no revision is ever handed out twice.
	if r3 := mustCAS(t, s, "k", r1, "v3"); r3 <= r2 {
		t.Fatalf("revision %d after reopen, not above %d", r3, r2)
	}
}

func TestValuesAreCopies(t *testing.T) {
	t.Parallel()
	s, _ := tempStore(t)
	r := mustCAS(t, s, "k", 0, "original")
	in2 := []byte("second-value")
	if _, err := s.CompareAndSwap(bg, []byte("k"), r, in2); err != nil {
		t.Fatal(err)
	}
	in2[0] = 'X' // the caller's slice after the write
	v, _, _ := s.Get(bg, []byte("k"))
	if string(v) != "second-value" {
		t.Fatalf("the store kept the caller's slice: %q", v)
	}
	for i := range v {
		v[i] = 0 // the returned slice
	}
	if v2, _, _ := s.Get(bg, []byte("k")); string(v2) != "second-value" {
		t.Fatalf("mutating a returned value changed the store: %q", v2)
	}
	// Values read in other transactions stay intact after many writes.
	held, _, _ := s.Get(bg, []byte("k"))
	for i := range 50 {
		mustCAS(t, s, fmt.Sprintf("fill-%d", i), 0, string(bytes.Repeat([]byte{byte(i)}, 4096)))
	}
	if string(held) != "second-value" {
		t.Fatalf("a value returned earlier changed under later writes: %q", held)
	}
}

func TestConcurrentCASCounter(t *testing.T) {
	t.Parallel()
	s, _ := tempStore(t)
	const writers, each = 2, 200
	var wg sync.WaitGroup
	conflicts := make([]int, writers)
	for w := range writers {
		wg.Go(func() {
			for range each {
				for {
					v, rev, err := s.Get(bg, []byte("counter"))
					if err != nil {
						t.Error(err)
						return
					}
					var n uint64
					if v != nil {
						n = binary.BigEndian.Uint64(v)
					}
					_, err = s.CompareAndSwap(bg, []byte("counter"), rev, binary.BigEndian.AppendUint64(nil, n+1))
					if err == nil {
						break
					}
					if !errors.Is(err, vault.ErrConflict) {
						t.Error(err)
						return
					}
					conflicts[w]++
				}
			}
		})
	}
	wg.Wait()
	v, _, _ := s.Get(bg, []byte("counter"))
	if n := binary.BigEndian.Uint64(v); n != writers*each {
		t.Fatalf("counter %d, want %d (lost updates)", n, writers*each)
	}
	t.Logf("conflicts retried: %v", conflicts)
}

func TestOpenTwiceFailsFast(t *testing.T) {
	t.Parallel()
	_, path := tempStore(t)
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		s, err := boltstore.Open(boltstore.Options{Path: path})
		if err == nil {
			s.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("a second Open of a file in use succeeded")
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("the second Open took %v", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the second Open hangs")
	}
}

func TestOpenRefusesAnotherLayout(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "store.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		m, err := tx.CreateBucketIfNotExists([]byte("meta"))
		if err != nil {
			return err
		}
		return m.Put([]byte("layout"), []byte{2})
	})
	db.Close()
	if err != nil {
		t.Fatal(err)
	}
	if s, err := boltstore.Open(boltstore.Options{Path: path}); err == nil {
		s.Close()
		t.Fatal("opened a store of layout 2")
	}
}

func TestTruncatedValueIsAnIntegrityError(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	key := []byte("rkey-of-some-user")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket([]byte("kv")).Put(key, []byte{1, 2, 3}) }); err != nil {
		t.Fatal(err)
	}
	db.Close()
	s = open(t, path)
	// Damage, not an outage: each is an integrity error, and none names the
	// key (it holds a user ID).
	_, _, gerr := s.Get(bg, key)
	_, cerr := s.CompareAndSwap(bg, key, 0, []byte("v"))
	serr := s.Scan(bg, nil, func(k, v []byte, rev uint64) error { return nil })
	for op, err := range map[string]error{"get": gerr, "CAS": cerr, "scan": serr} {
		if !errors.Is(err, vault.ErrIntegrity) || errors.Is(err, vault.ErrConflict) {
			t.Errorf("%s over a value shorter than its revision: %v, want ErrIntegrity", op, err)
			continue
		}
		if msg := err.Error(); strings.Contains(msg, string(key)) || strings.Contains(msg, hex.EncodeToString(key)) {
			t.Errorf("%s error names the key: %s", op, msg)
		}
	}
}

func TestTransactionMetrics(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	s, err := boltstore.Open(boltstore.Options{Path: filepath.Join(t.TempDir(), "store.db"), Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	mustCAS(t, s, "k", 0, "v")
	s.Get(bg, []byte("k"))
	s.Scan(bg, nil, func(k, v []byte, rev uint64) error { return nil })
	// The committer answers a write before it records the commit's
	// duration, so that one may come a moment after the answer.
	var ops map[string]uint64
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		ops = map[string]uint64{}
		for _, mf := range mfs {
			if mf.GetName() != "keyvault_store_transaction_duration_seconds" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "op" {
						ops[l.GetValue()] = m.GetHistogram().GetSampleCount()
					}
				}
			}
		}
		if ops["commit"] != 0 || time.Now().After(deadline) {
			break
		}
	}
	if ops["cas"] != 1 || ops["get"] != 1 || ops["scan"] != 1 || ops["commit"] != 1 {
		t.Fatalf("transaction histogram counts %v, want one of each", ops)
	}
}

// commitWrites reads the group-commit histogram: commits and writes.
func commitWrites(t testing.TB, reg *prometheus.Registry) (commits uint64, writes float64) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "keyvault_store_commit_writes" {
			h := mf.GetMetric()[0].GetHistogram()
			return h.GetSampleCount(), h.GetSampleSum()
		}
	}
	t.Fatal("no keyvault_store_commit_writes")
	return 0, 0
}

// Concurrent writers share commits, and every write still lands exactly
// once with its own revision, readable after a reopen.
func TestGroupCommit(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "store.db")
	reg := prometheus.NewRegistry()
	s, err := boltstore.Open(boltstore.Options{Path: path, Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	const writers, each = 64, 20
	revs := make([][]uint64, writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				r, err := s.CompareAndSwap(bg, fmt.Appendf(nil, "k%02d-%02d", w, i), 0, fmt.Appendf(nil, "v%d-%d", w, i))
				if err != nil {
					t.Error(err)
					return
				}
				revs[w] = append(revs[w], r)
			}
		})
	}
	wg.Wait()
	commits, writes := commitWrites(t, reg)
	if writes != writers*each {
		t.Fatalf("commits applied %v writes, want %d", writes, writers*each)
	}
	if commits >= writers*each {
		t.Errorf("%d commits for %d concurrent writes: none was shared", commits, writers*each)
	}
	t.Logf("%d writes in %d commits", writers*each, commits)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, path)
	seen := map[uint64]bool{}
	for w := range writers {
		for i, r := range revs[w] {
			if seen[r] {
				t.Fatalf("revision %d handed out twice", r)
			}
			seen[r] = true
			v, rev, err := s.Get(bg, fmt.Appendf(nil, "k%02d-%02d", w, i))
			if err != nil || rev != r || string(v) != fmt.Sprintf("v%d-%d", w, i) {
				t.Fatalf("after reopen: %q rev %d (want %d) %v", v, rev, r, err)
			}
		}
	}
}

// A write bbolt refuses (a key over its size limit) fails alone: the
// writes committed beside it land.
func TestRefusedWriteFailsAlone(t *testing.T) {
	t.Parallel()
	s, _ := tempStore(t)
	var wg sync.WaitGroup
	errs := make([]error, 33)
	for i := range errs {
		wg.Go(func() {
			key := fmt.Appendf(nil, "ok%d", i)
			if i == 0 {
				key = bytes.Repeat([]byte("x"), bolt.MaxKeySize+1)
			}
			_, errs[i] = s.CompareAndSwap(bg, key, 0, []byte("v"))
		})
	}
	wg.Wait()
	if errs[0] == nil {
		t.Fatal("an oversized key was accepted")
	}
	for i, err := range errs[1:] {
		if err != nil {
			t.Errorf("write %d beside the refused one: %v", i+1, err)
		}
		if v, _, _ := s.Get(bg, fmt.Appendf(nil, "ok%d", i+1)); string(v) != "v" {
			t.Errorf("write %d did not land", i+1)
		}
	}
}

// Close while writers run: each write either lands (and survives the
// reopen) or fails; none hangs, and none is reported failed yet applied.
func TestCloseUnderWrites(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	const writers = 16
	acked := make([][]string, writers)
	failed := make([][]string, writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Go(func() {
			for i := 0; ; i++ {
				k := fmt.Sprintf("w%02d-%05d", w, i)
				if _, err := s.CompareAndSwap(bg, []byte(k), 0, []byte(k)); err != nil {
					failed[w] = append(failed[w], k)
					return
				}
				acked[w] = append(acked[w], k)
			}
		})
	}
	time.Sleep(50 * time.Millisecond)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	s = open(t, path)
	for w := range writers {
		for _, k := range acked[w] {
			if v, _, err := s.Get(bg, []byte(k)); err != nil || string(v) != k {
				t.Fatalf("acknowledged %s lost: %q %v", k, v, err)
			}
		}
		for _, k := range failed[w] {
			if v, _, _ := s.Get(bg, []byte(k)); v != nil {
				t.Fatalf("%s reported failed but applied", k)
			}
		}
	}
}

var _ vault.Store = (*boltstore.Store)(nil)

// BenchmarkCompareAndSwap: durable compare-and-swaps per second from 1 and
// from 32 concurrent writers on distinct keys, as recoveries of different
// users make them. With group commit, 32 writers share fsyncs:
//
//	go test ./vault/boltstore -run '^$' -bench CompareAndSwap -benchmem
func BenchmarkCompareAndSwap(b *testing.B) {
	for _, writers := range []int{1, 32} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			reg := prometheus.NewRegistry()
			s, err := boltstore.Open(boltstore.Options{Path: filepath.Join(b.TempDir(), "store.db"), Registerer: reg})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			value := bytes.Repeat([]byte("r"), 300) // about a record
			var next atomic.Int64
			work := func(more func() bool) {
				key := fmt.Appendf(nil, "user-%d", next.Add(1))
				var rev uint64
				for more() {
					r, err := s.CompareAndSwap(bg, key, rev, value)
					if err != nil {
						b.Error(err)
						return
					}
					rev = r
				}
			}
			start := time.Now()
			b.ResetTimer()
			cpu := cpuTime(b)
			runFrom(b, writers, work)
			reportCPU(b, cpu)
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "writes/s")
			commits, writes := commitWrites(b, reg)
			b.ReportMetric(writes/float64(commits), "writes/commit")
		})
	}
}

// Open takes its options as etcdstore does: a store without a path is
// refused, and Ping honours a done context.
func TestOpenOptionsAndPing(t *testing.T) {
	t.Parallel()
	if s, err := boltstore.Open(boltstore.Options{}); err == nil {
		s.Close()
		t.Fatal("Open without a path succeeded")
	}
	s := open(t, filepath.Join(t.TempDir(), "store.db"))
	if err := s.Ping(bg); err != nil {
		t.Fatalf("Ping: %v", err)
	}
	ctx, cancel := context.WithCancel(bg)
	cancel()
	if err := s.Ping(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ping with a done context: %v, want context.Canceled", err)
	}
}
