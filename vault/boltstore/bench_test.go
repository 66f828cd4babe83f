package boltstore_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyvault/keyvault/vault/boltstore"
)

// benchRecords is about the number of records a loaded vault's store
// holds in the benchmarks below, each about a record's size.
const benchRecords = 2000

var benchValue = bytes.Repeat([]byte("r"), 300)

// fill writes benchRecords records, user-0 to user-1999, at revision 0.
func fill(b *testing.B, s *boltstore.Store) {
	b.Helper()
	for i := range benchRecords {
		if _, err := s.CompareAndSwap(bg, fmt.Appendf(nil, "user-%d", i), 0, benchValue); err != nil {
			b.Fatal(err)
		}
	}
}

// cpuTime is the CPU time the process has used, user and system: the
// benchmarks report it per operation, as their wall time is mostly fsyncs
// and waits.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports the CPU time used since start per operation.
func reportCPU(b *testing.B, start time.Duration) {
	b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "cpu-ns/op")
}

// BenchmarkGet: one read of a record among benchRecords, as the vault
// makes two per recovery.
//
//	go test ./vault/boltstore -run '^$' -bench Get -benchmem
func BenchmarkGet(b *testing.B) {
	s, err := boltstore.Open(boltstore.Options{Path: filepath.Join(b.TempDir(), "store.db")})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	fill(b, s)
	keys := make([][]byte, benchRecords)
	for i := range keys {
		keys[i] = fmt.Appendf(nil, "user-%d", i)
	}
	b.ResetTimer()
	start := cpuTime(b)
	i := 0
	for b.Loop() {
		v, _, err := s.Get(bg, keys[i%benchRecords])
		if err != nil || len(v) != len(benchValue) {
			b.Fatalf("Get: %d bytes, %v", len(v), err)
		}
		i++
	}
	reportCPU(b, start)
}

// BenchmarkAnchoredRecovery: what the vault asks of the store per
// recovery, with rollback anchoring on (to in-memory members): two reads,
// one durable compare-and-swap (the guess count) and one early one (the
// reset), from 1 and from 32 concurrent users among benchRecords.
//
//	go test ./vault/boltstore -run '^$' -bench AnchoredRecovery -benchmem
func BenchmarkAnchoredRecovery(b *testing.B) {
	for _, users := range []int{1, 32} {
		b.Run(fmt.Sprintf("users=%d", users), func(b *testing.B) {
			fa := &fakeAnchors{values: map[string][]byte{}}
			s, err := boltstore.Open(boltstore.Options{Path: filepath.Join(b.TempDir(), "store.db"),
				Anchoring: &boltstore.Anchoring{Keys: anchorKeys(), Members: fa, Log: slog.New(slog.DiscardHandler)}})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			fill(b, s)
			var next atomic.Int64
			work := func(more func() bool) {
				key := fmt.Appendf(nil, "user-%d", next.Add(1)-1)
				for more() {
					_, rev, err := s.Get(bg, key)
					if err == nil {
						_, rev, err = s.Get(bg, key)
					}
					if err == nil {
						rev, err = s.CompareAndSwap(bg, key, rev, benchValue)
					}
					var durable func() error
					if err == nil {
						_, durable, err = s.CompareAndSwapEarly(bg, key, rev, benchValue)
					}
					if err == nil && durable != nil {
						err = durable()
					}
					if err != nil {
						b.Error(err)
						return
					}
				}
			}
			b.ResetTimer()
			start := cpuTime(b)
			runFrom(b, users, work)
			reportCPU(b, start)
		})
	}
}

// runFrom runs work from n goroutines, b.Loop's own for one.
func runFrom(b *testing.B, n int, work func(more func() bool)) {
	if n == 1 {
		work(b.Loop)
		return
	}
	// RunParallel starts parallelism x GOMAXPROCS goroutines.
	b.SetParallelism(max(1, n/runtime.GOMAXPROCS(0)))
	b.RunParallel(func(pb *testing.PB) { work(pb.Next) })
}
