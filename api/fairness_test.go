package api

import (
	"context"
	"crypto/sha256"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/ratelimit"
	"github.com/keyvault/keyvault/vault"
)

// heldBackups is a vault whose recoveries wait until release is closed,
// so that requests stay in flight.
type heldBackups struct {
	stubBackups
	entered chan struct{}
	release chan struct{}
	recover atomic.Int64
}

func (h *heldBackups) Recover(context.Context, string, string, []byte) ([]byte, int, error) {
	h.recover.Add(1)
	h.entered <- struct{}{}
	<-h.release
	return []byte("0123456789abcdef"), 5, nil
}

func (h *heldBackups) CountRefused(string, string) {}

// countingAdmitter admits up to capacity requests at once and refuses the
// rest (as the pool does past its queue timeout), counting what it holds.
type countingAdmitter struct {
	capacity int64
	held     atomic.Int64
	asked    atomic.Int64
}

func (c *countingAdmitter) Admit(context.Context) (func(), error) {
	c.asked.Add(1)
	if c.held.Add(1) > c.capacity {
		c.held.Add(-1)
		return nil, vault.ErrUnavailable
	}
	var once sync.Once
	return func() { once.Do(func() { c.held.Add(-1) }) }, nil
}

// With two clients, one client holds at most its share of the HSM
// admission: past it, its next request is a 429 hsm_share_per_client that
// reaches neither the admission nor the vault and takes no guess from the
// user, while the other client is still admitted. A request the admission
// then refuses gives its share back.
func TestHSMShareBetweenClients(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	adm := &countingAdmitter{capacity: 4}
	limits := ratelimit.New(ratelimit.Config{GuessesPerUser: perMinute(1, 1), HSMSharePerClientPercent: 50},
		ratelimit.Options{Registerer: reg, HSMCapacity: func() int { return int(adm.capacity) }})
	b := &heldBackups{entered: make(chan struct{}, 16), release: make(chan struct{})}
	h := newTestRouterWith(b, Options{Registerer: reg, Limits: limits, Admission: adm})
	recoverAs := func(token, user string) *httptest.ResponseRecorder {
		return do(h, "POST", "/v1/backups/"+user+"/recover", token, `{"pin":"1234"}`)
	}

	// Client a floods: two recoveries (its share of 4) stay in flight.
	var wg sync.WaitGroup
	codes := make(chan int, 3)
	for _, u := range []string{"a1", "a2"} {
		wg.Go(func() { codes <- recoverAs("token-a", u).Code })
	}
	<-b.entered
	<-b.entered
	asked := adm.asked.Load()
	w := recoverAs("token-a", "a3")
	if w.Code != 429 || decodeProblem(t, w).Code != "rate_limited" || w.Header().Get("Retry-After") != "1" {
		t.Fatalf("client a past its share: %d Retry-After %q %s, want 429 rate_limited with Retry-After 1", w.Code, w.Header().Get("Retry-After"), w.Body)
	}
	if adm.asked.Load() != asked || b.recover.Load() != 2 {
		t.Fatal("a request past the client's share reached the HSM admission or the vault")
	}
	if rejections(t, reg, ratelimit.LimiterHSMSharePerClient) != 1 {
		t.Fatal("the refusal is not counted under hsm_share_per_client")
	}
	// Client b is admitted while a is at its share.
	wg.Go(func() { codes <- recoverAs("token-b", "b1").Code })
	select {
	case <-b.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("client b was not admitted while client a held its share")
	}
	close(b.release)
	wg.Wait()
	close(codes)
	for c := range codes {
		if c != 200 {
			t.Fatalf("an admitted recovery answered %d", c)
		}
	}
	// The refused guess took no token from a3's bucket (1 a minute).
	if w := recoverAs("token-a", "a3"); w.Code != 200 {
		t.Fatalf("a3 after its refused guess: %d, want 200: the refusal took its token: %s", w.Code, w.Body)
	}

	// A request the admission refuses gives its share back: with the
	// admission full, client a's refusals are 503s, never 429s.
	adm.held.Store(adm.capacity)
	for range 4 {
		if w := recoverAs("token-a", "a4"); w.Code != 503 {
			t.Fatalf("with the admission full: %d, want 503", w.Code)
		}
	}
}

// One client alone is not held to a share: there is no other client to
// leave room for.
func TestHSMShareOneClient(t *testing.T) {
	t.Parallel()
	adm := &countingAdmitter{capacity: 4}
	limits := ratelimit.New(ratelimit.Config{HSMSharePerClientPercent: 25},
		ratelimit.Options{HSMCapacity: func() int { return int(adm.capacity) }})
	b := &heldBackups{entered: make(chan struct{}, 16), release: make(chan struct{})}
	h := NewRouter(b, Options{Limits: limits, Admission: adm, Clients: []Client{{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{sha256.Sum256([]byte("token-a"))}}}})
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			if w := do(h, "POST", "/v1/backups/u"+string(rune('0'+i))+"/recover", "token-a", `{"pin":"1234"}`); w.Code != 200 {
				t.Errorf("recovery %d: %d, want 200", i, w.Code)
			}
		})
	}
	for range 4 {
		select {
		case <-b.entered:
		case <-time.After(10 * time.Second):
			t.Fatal("the only client was held to a share")
		}
	}
	close(b.release)
	wg.Wait()
}
