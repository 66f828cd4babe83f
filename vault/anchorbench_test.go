package vault_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// slowAnchors is a member's anchor object store whose writes take delay
// longer, as on a token whose object writes are slow; it also records the
// most anchor writes it saw in flight to one member at once.
type slowAnchors struct {
	boltstore.Anchors
	delay time.Duration

	mu       sync.Mutex
	inFlight map[string]int
	most     int
}

func (s *slowAnchors) WriteAnchor(ctx context.Context, member string, w uint64, value []byte) error {
	s.mu.Lock()
	s.inFlight[member]++
	s.most = max(s.most, s.inFlight[member])
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inFlight[member]--
		s.mu.Unlock()
	}()
	select {
	case <-time.After(s.delay):
	case <-ctx.Done():
		return ctx.Err()
	}
	return s.Anchors.WriteAnchor(ctx, member, w, value)
}

// anchoredBenchVault is benchVault with rollback anchoring on, its anchor
// writes slowed by delay.
func anchoredBenchVault(b *testing.B, delay time.Duration) (*vault.Vault, *slowAnchors) {
	b.Helper()
	pool, store := benchParts(b, vault.ProfileHMAC)
	ctx := context.Background()
	keys, err := vault.DeriveAnchorKeys(ctx, pool)
	if err != nil {
		b.Fatal(err)
	}
	members, err := pool.AnchorMembers(ctx)
	if err != nil {
		b.Fatal(err)
	}
	slow := &slowAnchors{Anchors: members, delay: delay, inFlight: map[string]int{}}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if _, err := store.Anchor(ctx, keys, slow, prometheus.NewRegistry(), log); err != nil {
		b.Fatal(err)
	}
	v, err := vault.New(ctx, store, pool, vault.Options{Logger: log})
	if err != nil {
		b.Fatal(err)
	}
	return v, slow
}

// BenchmarkAnchoredLatency: the latency of recoveries and enrollments
// with rollback anchoring on, on SoftHSM and bbolt, from 8 goroutines,
// when every anchor write takes 0 or 20 ms more (a token whose object
// writes are slow). A batch's answers wait for its anchor write, and the
// next batch waits for that anchor, so a slow token costs every request
// about one to two anchor writes per store write, not a queue of them:
// at most one anchor write is in flight per member.
//
//	go test ./vault -run '^$' -bench AnchoredLatency -benchtime 3s
func BenchmarkAnchoredLatency(b *testing.B) {
	for _, delay := range []time.Duration{0, 20 * time.Millisecond} {
		for _, op := range []string{"recover", "enroll"} {
			b.Run(fmt.Sprintf("anchor=%v/op=%s", delay, op), func(b *testing.B) {
				v, slow := anchoredBenchVault(b, delay)
				ctx := context.Background()
				for i := range 64 {
					if _, _, err := v.Enroll(ctx, "bench", fmt.Sprintf("u%d", i+1), benchSecret, benchPIN, 0, vault.Precondition{}); err != nil {
						b.Fatal(err)
					}
				}
				do := func(user string) error {
					if op == "enroll" {
						_, _, err := v.Enroll(ctx, "bench", user, benchSecret, benchPIN, 0, vault.Precondition{})
						return err
					}
					_, _, err := v.Recover(ctx, "bench", user, benchPIN)
					return err
				}
				var next atomic.Int64
				var mu sync.Mutex
				var lat []time.Duration
				b.SetParallelism(max(1, 8/runtime.GOMAXPROCS(0)))
				start := time.Now()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					user := fmt.Sprintf("u%d", next.Add(1))
					var mine []time.Duration
					for pb.Next() {
						t0 := time.Now()
						if err := do(user); err != nil {
							b.Error(err)
							return
						}
						mine = append(mine, time.Since(t0))
					}
					mu.Lock()
					lat = append(lat, mine...)
					mu.Unlock()
				})
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "ops/s")
				slices.Sort(lat)
				if len(lat) > 0 {
					b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
					b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
				}
				if slow.most > 1 {
					b.Fatalf("%d anchor writes in flight to one member at once, want at most 1", slow.most)
				}
			})
		}
	}
}

var _ boltstore.Anchors = (*slowAnchors)(nil)
