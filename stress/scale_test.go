package stress

import (
	"crypto/sha256"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestScale enrolls STRESS_BACKUPS backups over HTTP (the real path: API,
// HSM seal and PIN MAC, one durable bbolt write each; many clients at once)
// and reports, beside the same figures for an empty vault: bytes on disk per
// backup, the vault's resident memory, its start time, and recover latency
// p50/p99 from one client. Every enrollment must succeed and every sampled
// recovery return its secret.
func TestScale(t *testing.T) {
	softhsmtest.Module(t)
	n := knob(t, "STRESS_BACKUPS", 2000)
	samples := knob(t, "STRESS_SAMPLES", 300)
	const seeders = 32
	s := newTally(t, "scale")
	defer s.summary()
	dir := t.TempDir()
	db := filepath.Join(dir, "keyvault.db")

	// The empty vault: restarted once so that its start is that of a
	// vault with data to open, and a few backups to recover.
	startDev(t, dir).Stop()
	v := startDev(t, dir)
	c := newClient(v.API, v.Token)
	seed(s, c, 0, 64, seeders)
	empty := measure(s, v, c, 64, samples)
	v.Stop()

	v = startDev(t, dir)
	c = newClient(v.API, v.Token)
	began := time.Now()
	seed(s, c, 64, 64+n, seeders)
	seeding := time.Since(began)
	v.Stop()
	fi, err := os.Stat(db)
	if err != nil {
		t.Fatal(err)
	}
	v = startDev(t, dir)
	c = newClient(v.API, v.Token)
	full := measure(s, v, c, 64+n, samples)
	v.Stop()
	if err := checkDB(db); err != nil {
		s.violation("the DB fails its check: %v", err)
	}

	s.run()
	s.note("backups=%d seeding=%s (%.0f/s, HTTP, %d clients) bytes_per_backup=%d db=%dMiB | empty: %s | full: %s",
		n, seeding.Round(time.Second), float64(n)/seeding.Seconds(), seeders, fi.Size()/int64(64+n), fi.Size()>>20, empty, full)
}

// seedBackup is the i-th backup of the scale scenario; secrets and PINs are
// derived from i so that a million of them need no memory in the test.
func seedBackup(i int) (user string, secret []byte, pin string) {
	h := sha256.Sum256(fmt.Appendf(nil, "stress-scale-%d", i))
	return fmt.Sprintf("scale-%d", i), h[:], fmt.Sprintf("pin-%x", h[:4])
}

// seed enrolls backups [from, to) with several clients at once.
func seed(s *tally, c *client, from, to, clients int) {
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= to {
					return
				}
				user, secret, pin := seedBackup(i)
				r, err := c.enroll(user, secret, pin, 10)
				s.op(1)
				if err != nil || r.Status != http.StatusCreated {
					s.violation("enroll %s: %v %v", user, r, err)
				}
			}
		})
	}
	wg.Wait()
}

// figures are one vault's measurements.
type figures struct {
	start       time.Duration
	rss         int64
	p50, p99    time.Duration
	recoverRate float64
}

func (f figures) String() string {
	return fmt.Sprintf("start=%v rss=%dMiB recover_p50=%v recover_p99=%v",
		f.start.Round(time.Millisecond), f.rss>>20, f.p50.Round(10*time.Microsecond), f.p99.Round(10*time.Microsecond))
}

// measure recovers random backups of [0, n) one at a time, as one client
// would, and reads the vault's start time and resident memory.
func measure(s *tally, v *vault, c *client, n, samples int) figures {
	f := figures{start: v.Started}
	lat := make([]time.Duration, 0, samples)
	for i := range samples + 50 { // the first 50 warm connections and caches up

		user, secret, pin := seedBackup(mrand.IntN(n))
		t0 := time.Now()
		r, err := c.recover(user, pin)
		if i >= 50 {
			lat = append(lat, time.Since(t0))
		}
		s.op(1)
		if a, _ := answerOf(r); err != nil || r.Status != http.StatusOK || a.Secret != b64(secret) {
			s.violation("recover %s: %v %v", user, r, err)
		}
	}
	slices.Sort(lat)
	f.p50, f.p99 = lat[len(lat)/2], lat[len(lat)*99/100]
	rss, err := v.RSS()
	if err != nil {
		s.violation("resident memory: %v", err)
	}
	f.rss = rss
	return f
}
