package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/etcdtest"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
	"github.com/keyvault/keyvault/vault/etcdstore"
)

// TestEtcdBench measures, in one run on a 3-member embedded etcd: the raw
// compare-and-swap rate (read, then Txn on ModRevision, distinct keys) at
// concurrency 1 and 32, then recover throughput and p99 through one
// keyvault node and through three (32 workers in all, `keyvault bench`).
// It is a measurement more than a check: make test runs a short pass (1 s
// each, so that it cannot rot); KEYVAULT_ETCD_BENCH=1 runs it for
// BENCH_DURATION (default 5s) each.
//
//	KEYVAULT_ETCD_BENCH=1 go test -run TestEtcdBench -v ./e2e
func TestEtcdBench(t *testing.T) {
	softhsmtest.Module(t)
	d := time.Second
	if os.Getenv("KEYVAULT_ETCD_BENCH") == "1" {
		d = 5 * time.Second
	}
	if s := os.Getenv("BENCH_DURATION"); s != "" {
		var err error
		if d, err = time.ParseDuration(s); err != nil {
			t.Fatal(err)
		}
	}
	cluster := etcdtest.New(t, 3)

	st, err := etcdstore.Open(etcdstore.Options{Endpoints: cluster.Endpoints(), KeyPrefix: "/bench-raw/"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, conc := range []int{1, 32} {
		var mu sync.Mutex
		var lat []time.Duration
		var wg sync.WaitGroup
		end := time.Now().Add(d)
		for w := range conc {
			wg.Go(func() {
				key := fmt.Appendf(nil, "k-%d-%d", conc, w)
				var mine []time.Duration
				for time.Now().Before(end) {
					start := time.Now()
					_, rev, err := st.Get(context.Background(), key)
					if err == nil {
						_, err = st.CompareAndSwap(context.Background(), key, rev, []byte("v"))
					}
					if err != nil {
						t.Errorf("raw CAS: %v", err)
						return
					}
					mine = append(mine, time.Since(start))
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			})
		}
		wg.Wait()
		slices.Sort(lat)
		t.Logf("raw etcd CAS (get + txn), concurrency %2d: %6.0f/s, p50 %.1f ms, p99 %.1f ms",
			conc, float64(len(lat))/d.Seconds(), ms(lat[len(lat)/2]), ms(lat[len(lat)*99/100]))
	}

	nodes := etcdNodes(t, cluster, 3)
	token := filepath.Join(nodes[0].Dir, "token")
	for _, n := range []int{1, 3} {
		results := make([]struct {
			PerSecond float64 `json:"succeeded_per_second"`
			P99       float64 `json:"p99_ms"`
			Errors    map[string]int64
		}, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				out, err := exec.Command(keyvaultBin, "bench", "--url", nodes[i].API, "--token-file", token, "--op", "recover",
					"--concurrency", fmt.Sprint(32/n), "--users", "300", "--user-prefix", fmt.Sprintf("b%d-%d-", n, i), "--duration", d.String(), "--json").Output()
				if err != nil {
					t.Errorf("bench on node %d: %v\n%s", i, err, out)
					return
				}
				if err := json.Unmarshal(out, &results[i]); err != nil {
					t.Errorf("bench output: %v: %s", err, out)
				}
			})
		}
		wg.Wait()
		var total, p99 float64
		for _, r := range results {
			total += r.PerSecond
			p99 = max(p99, r.P99)
		}
		t.Logf("recover through %d keyvault node(s), 32 workers: %6.0f/s, p99 %.1f ms (worst node), errors %v", n, total, p99, results[0].Errors)
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
