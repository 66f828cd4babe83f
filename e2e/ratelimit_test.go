package e2e

import (
	"net/http"
	"strconv"
	"sync"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestRateLimits runs the binary with its default limits (5 guesses per
// user per minute, burst 5): a storm of 40 concurrent wrong guesses on one
// backup gets exactly 5 answers that were checked and 35 429s with a
// truthful integer Retry-After, the budget shows exactly 5 attempts used,
// the durable escalating delay then refuses even the right PIN, and the
// rejections metric counts each by its limiter.
func TestRateLimits(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	v := startDevLimited(t, t.TempDir())
	c := newClient(t, v.API, v.Token)
	user, pin := randID("limited"), randPIN("limited")
	c.mustEnroll(t, http.StatusCreated, user, randBytes(32), pin, 10)

	const storm = 40
	var mu sync.Mutex
	codes := map[int]int{}
	var wg sync.WaitGroup
	for i := range storm {
		wg.Go(func() {
			r := c.recover(t, user, "wrong-"+strconv.Itoa(i))
			mu.Lock()
			defer mu.Unlock()
			codes[r.Status]++
			if r.Status == http.StatusTooManyRequests {
				wantProblem(t, "a refused guess", r, http.StatusTooManyRequests, "rate_limited")
				// Burst 5 refilled at 5 per minute: the next token is 12 s
				// away; once five wrong guesses are counted, the escalating
				// delay says 60 s.
				if s, err := strconv.Atoi(r.Header.Get("Retry-After")); err != nil || s < 1 || s > 12 && s != 60 {
					t.Errorf("Retry-After %q, want whole seconds from 1 to 12, or 60", r.Header.Get("Retry-After"))
				}
			}
		})
	}
	wg.Wait()
	if codes[http.StatusForbidden] != 5 || codes[http.StatusTooManyRequests] != storm-5 {
		t.Fatalf("answers %v, want 5 x 403 and %d x 429", codes, storm-5)
	}
	if rem := num(t, c.mustStatus(t, user), "attempts_remaining"); rem != 5 {
		t.Fatalf("attempts_remaining %d after the storm, want 5: a 429 counted a guess", rem)
	}
	// The right PIN is refused too, not checked: five wrong in a row start
	// the escalating delay (1 minute), longer than the bucket's refill, and
	// Retry-After says the longer wait.
	r := c.recover(t, user, pin)
	if s, _ := strconv.Atoi(r.Header.Get("Retry-After")); r.Status != http.StatusTooManyRequests || s < 50 || s > 60 {
		t.Fatalf("the right PIN right after the storm: %v Retry-After %q, want 429 with about 60", r, r.Header.Get("Retry-After"))
	}
	samples, _ := metrics(t, v.Admin)
	perUser, _ := metricSum(samples, "keyvault_ratelimit_rejections_total", map[string]string{"limiter": "guesses_per_user"})
	delayed, _ := metricSum(samples, "keyvault_ratelimit_rejections_total", map[string]string{"limiter": "escalating_delay"})
	if perUser+delayed != storm-5+1 || delayed < 1 {
		t.Fatalf("rejections: %v by guesses_per_user and %v by escalating_delay, want %d in all and the last by the delay", perUser, delayed, storm-5+1)
	}
	if n, _ := metricSum(samples, "keyvault_recoveries_total", map[string]string{"result": "rate_limited"}); n != storm-5+1 {
		t.Fatalf("keyvault_recoveries_total{result=rate_limited} = %v, want %d", n, storm-5+1)
	}
	// Another user of the same client is not held back by this one.
	other, secret := randID("free"), randBytes(32)
	c.mustEnroll(t, http.StatusCreated, other, secret, pin, 0)
	c.mustRecover(t, other, pin, secret)
	v.Stop()
}
