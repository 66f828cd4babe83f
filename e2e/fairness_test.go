package e2e

import (
	"crypto/sha256"
	"encoding/hex"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestHSMFairness floods the real binary (SoftHSM, bbolt) from one client
// while another uses it at its own pace: with the HSM admission at 2
// requests (two sessions, one request each) and a 10 ms queue, 32 concurrent
// workers of client "flood" would take every place and have "dev"'s
// recoveries shed with 503. Held to half the admission, the flood gets
// 429 hsm_share_per_client for the rest, and every one of dev's recoveries
// succeeds.
func TestHSMFairness(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop()
	cfg := filepath.Join(dir, "keyvault.yaml")
	setRateLimits(t, cfg, `ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 10ms
  admitted_per_hsm_session: 1
`)
	floodToken := "e2e-flood-" + strings.ToLower(randID("t"))
	sum := sha256.Sum256([]byte(floodToken))
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	for old, repl := range map[string]string{
		"max_sessions: 8": "max_sessions: 2",
		"\nclients:\n":    "\nclients:\n  - name: flood\n    namespace: flood\n    token_sha256: " + hex.EncodeToString(sum[:]) + "\n",
	} {
		if strings.Count(text, old) != 1 {
			t.Fatalf("dev config has no single %q to replace:\n%s", old, text)
		}
		text = strings.Replace(text, old, repl, 1)
	}
	if err := os.WriteFile(cfg, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	v := startDevLimited(t, dir)
	defer v.Stop()
	dev, flood := newClient(t, v.API, v.Token), newClient(t, v.API, floodToken)

	const pin = "fairness-pin"
	devUser, devSecret := randID("dev"), randBytes(32)
	dev.mustEnroll(t, http.StatusCreated, devUser, devSecret, pin, 0)
	floodUsers := make([]string, 8)
	for i := range floodUsers {
		floodUsers[i] = randID("flood")
		flood.mustEnroll(t, http.StatusCreated, floodUsers[i], randBytes(32), pin, 0)
	}

	var stop atomic.Bool
	var mu sync.Mutex
	floodCodes := map[int]int{}
	floodAnswers := make(chan struct{}, 1)
	var wg sync.WaitGroup
	for w := range 32 {
		wg.Go(func() {
			for i := w; !stop.Load(); i++ {
				r, err := flood.call(http.MethodPost, backupPath(floodUsers[i%len(floodUsers)])+"/recover", map[string]string{"pin": pin})
				if err != nil {
					t.Errorf("flood: %v", err)
					return
				}
				mu.Lock()
				floodCodes[r.Status]++
				mu.Unlock()
				select {
				case floodAnswers <- struct{}{}:
				default:
				}
			}
		})
	}
	defer func() { stop.Store(true); wg.Wait() }()
	<-floodAnswers // the flood is on

	for i := range 30 {
		r := dev.recover(t, devUser, pin)
		if r.Status != http.StatusOK {
			t.Fatalf("dev's recovery %d during the flood: %v, want 200", i, r)
		}
	}
	stop.Store(true)
	wg.Wait()

	if floodCodes[http.StatusOK] == 0 || floodCodes[http.StatusTooManyRequests] == 0 {
		t.Fatalf("flood answers %v, want some 200s and some 429s", floodCodes)
	}
	for code := range floodCodes {
		if code != http.StatusOK && code != http.StatusTooManyRequests && code != http.StatusServiceUnavailable {
			t.Errorf("flood answers %v: %d is neither admitted nor refused", floodCodes, code)
		}
	}
	samples, _ := metrics(t, v.Admin)
	if n, _ := metricSum(samples, "keyvault_ratelimit_rejections_total", map[string]string{"limiter": "hsm_share_per_client"}); n != float64(floodCodes[http.StatusTooManyRequests]) {
		t.Errorf("keyvault_ratelimit_rejections_total{limiter=hsm_share_per_client} = %v, want the flood's %d 429s", n, floodCodes[http.StatusTooManyRequests])
	}
	// Refusals count nothing: the flood's backups keep every attempt.
	for _, u := range floodUsers {
		if m := flood.mustStatus(t, u); num(t, m, "attempts_remaining") != num(t, m, "max_attempts") {
			t.Fatalf("flood backup %s after the flood: %v, want every attempt left", u, m)
		}
	}
}
