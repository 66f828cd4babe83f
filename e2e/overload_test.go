package e2e

import (
	"net/http"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkOverload drives the real binary (SoftHSM, bbolt) at about twice
// its capacity and reports what admission control does with the excess:
// the latency of the recoveries admitted (p50, p99), the share shed with
// 503, and how fast a shed request hears so. Rate limits are off; HSM
// admission is on with the default 50ms queue timeout.
//
//	go test ./e2e -run '^$' -bench Overload -benchtime 1x
func BenchmarkOverload(b *testing.B) {
	dir := b.TempDir()
	startDev(b, dir).Stop()
	setRateLimits(b, filepath.Join(dir, "keyvault.yaml"), `ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 50ms
`)
	v := startDevLimited(b, dir)
	defer v.Stop()
	c := newClient(b, v.API, v.Token)
	const users, pin = 200, "overload-pin"
	ids := make([]string, users)
	for i := range ids {
		ids[i] = randID("ol")
		c.mustEnroll(b, http.StatusCreated, ids[i], randBytes(32), pin, 0)
	}
	recoverOne := func(i int) (int, time.Duration) {
		start := time.Now()
		r, err := c.call(http.MethodPost, backupPath(ids[i%users])+"/recover", map[string]string{"pin": pin})
		if err != nil {
			return 0, time.Since(start)
		}
		return r.Status, time.Since(start)
	}

	for range b.N {
		// Capacity: a closed loop of 32 workers for 2 s.
		var done atomic.Int64
		stop := time.Now().Add(2 * time.Second)
		var wg sync.WaitGroup
		for w := range 32 {
			wg.Go(func() {
				for i := w; time.Now().Before(stop); i += 32 {
					if st, _ := recoverOne(i); st == http.StatusOK {
						done.Add(1)
					}
				}
			})
		}
		wg.Wait()
		capacity := float64(done.Load()) / 2

		// Overload: open-loop arrivals at twice that rate for 3 s.
		offered := 2 * capacity
		interval := time.Duration(float64(time.Second) / offered)
		var mu sync.Mutex
		var admitted, shed []time.Duration
		other := 0
		tick := time.NewTicker(interval)
		end := time.After(3 * time.Second)
		sent := 0
	loop:
		for {
			select {
			case <-end:
				break loop
			case <-tick.C:
				sent++
				i := sent
				wg.Go(func() {
					st, d := recoverOne(i)
					mu.Lock()
					defer mu.Unlock()
					switch st {
					case http.StatusOK:
						admitted = append(admitted, d)
					case http.StatusServiceUnavailable:
						shed = append(shed, d)
					default:
						other++
					}
				})
			}
		}
		tick.Stop()
		wg.Wait()
		if other > 0 {
			b.Errorf("%d answers neither 200 nor 503 under overload", other)
		}
		slices.Sort(admitted)
		slices.Sort(shed)
		pct := func(xs []time.Duration, p float64) float64 {
			if len(xs) == 0 {
				return 0
			}
			return float64(xs[int(p*float64(len(xs)-1))].Microseconds()) / 1000
		}
		total := len(admitted) + len(shed) + other
		b.ReportMetric(capacity, "capacity_rps")
		b.ReportMetric(float64(total)/3, "offered_rps")
		b.ReportMetric(float64(len(admitted))/3, "admitted_rps")
		b.ReportMetric(pct(admitted, 0.5), "admitted_p50_ms")
		b.ReportMetric(pct(admitted, 0.99), "admitted_p99_ms")
		b.ReportMetric(float64(len(shed))/float64(max(total, 1)), "shed_ratio")
		b.ReportMetric(pct(shed, 0.99), "shed_p99_ms")
	}
}
