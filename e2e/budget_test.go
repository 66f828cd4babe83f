package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	mrand "math/rand/v2"
	"net/http"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestConcurrentWrongGuesses fires 64 requests at once at a backup with
// max_attempts 5: wrong guesses by recover and by PIN change, and in some
// rounds PIN changes with a stale If-Match. Exactly 4 wrong guesses may
// answer 403 (with 4, 3, 2 and 1 left), every other one 410, every stale
// precondition 412; the right PIN afterwards is refused. Repeated on fresh
// backups to give a race many chances to show.
func TestConcurrentWrongGuesses(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	v := startDev(t, t.TempDir())
	c := newClient(t, v.API, v.Token)
	const (
		rounds      = 45
		requests    = 64
		maxAttempts = 5
	)
	kinds := []string{"recover only", "recover and PIN change", "with stale If-Match"}
	total403 := 0
	for round := range rounds {
		kind := round % len(kinds)
		u := randID(fmt.Sprintf("storm%d", round))
		s, pin := randBytes(32), randPIN("right")
		gen := num(t, c.mustEnroll(t, http.StatusCreated, u, s, pin, maxAttempts), "generation")

		var wg sync.WaitGroup
		start := make(chan struct{})
		results := make([]response, requests)
		errs := make([]error, requests)
		stale := make([]bool, requests)
		for i := range requests {
			wrong := fmt.Sprintf("wrong-%d", i)
			var call func() (response, error)
			switch {
			case kind == 2 && i%4 == 3:
				stale[i] = true
				call = func() (response, error) {
					return c.call(http.MethodPost, backupPath(u)+"/pin", map[string]string{"pin": pin, "new_pin": "new-pin-1"}, "If-Match", fmt.Sprintf(`"%d"`, gen+1))
				}
			case kind > 0 && i%2 == 1:
				call = func() (response, error) {
					return c.call(http.MethodPost, backupPath(u)+"/pin", map[string]string{"pin": wrong, "new_pin": "new-pin-1"})
				}
			default:
				call = func() (response, error) {
					return c.call(http.MethodPost, backupPath(u)+"/recover", map[string]string{"pin": wrong})
				}
			}
			wg.Go(func() {
				<-start
				results[i], errs[i] = call()
			})
		}
		close(start)
		wg.Wait()

		var left []int
		n403, n410, n412, guesses := 0, 0, 0, 0
		for i, r := range results {
			if errs[i] != nil {
				t.Fatalf("round %d: request %d: %v", round, i, errs[i])
			}
			var p struct {
				Code              string `json:"code"`
				AttemptsRemaining *int   `json:"attempts_remaining"`
			}
			_ = json.Unmarshal(r.Body, &p)
			if !stale[i] {
				guesses++
			}
			switch {
			case stale[i] && r.Status == http.StatusPreconditionFailed && p.Code == "precondition_failed":
				n412++
			case !stale[i] && r.Status == http.StatusForbidden && p.Code == "wrong_pin" && p.AttemptsRemaining != nil:
				n403++
				left = append(left, *p.AttemptsRemaining)
			case !stale[i] && r.Status == http.StatusGone && p.Code == "locked":
				n410++
			default:
				t.Errorf("round %d (%s): request %d (stale If-Match %v): unexpected answer %v", round, kinds[kind], i, stale[i], r)
			}
		}
		total403 += n403
		sort.Sort(sort.Reverse(sort.IntSlice(left)))
		if n403 != maxAttempts-1 || n410 != guesses-maxAttempts+1 || n412 != requests-guesses || fmt.Sprint(left) != "[4 3 2 1]" {
			t.Errorf("round %d (%s): %d wrong guesses answered 403 (attempts_remaining %v) and %d answered 410, %d stale preconditions 412; want 4 (4 3 2 1), %d and %d",
				round, kinds[kind], n403, left, n410, n412, guesses-maxAttempts+1, requests-guesses)
		}
		wantProblem(t, fmt.Sprintf("round %d: right PIN after the storm", round), c.recover(t, u, pin), http.StatusGone, "locked")
		if g := c.mustStatus(t, u); g["locked"] != true || num(t, g, "attempts_remaining") != 0 || num(t, g, "generation") != gen {
			t.Errorf("round %d: GET after the storm: %v, want locked, generation %d", round, g, gen)
		}
	}
	samples, _ := metrics(t, v.Admin)
	n := 0.0
	for _, route := range []string{"/v1/backups/{user_id}/recover", "/v1/backups/{user_id}/pin"} {
		m, _ := metricSum(samples, "keyvault_http_requests_total", map[string]string{"route": route, "code": "403"})
		n += m
	}
	if int(n) != total403 {
		t.Errorf("keyvault_http_requests_total of 403s = %v, want %d", n, total403)
	}
	if n, _ := metricSum(samples, "keyvault_lockouts_total", nil); n != rounds {
		t.Errorf("keyvault_lockouts_total = %v, want %d", n, rounds)
	}
}

// enrolled is a backup the test knows the secret and PIN of.
type enrolled struct {
	user   string
	secret []byte
	pin    string
}

// stormTarget is a backup under a storm of wrong guesses, and what the
// test heard back before the kill.
type stormTarget struct {
	enrolled
	n403, n410   atomic.Int64
	minRemaining atomic.Int64 // the smallest attempts_remaining a 403 carried
}

// TestCrashMidStorm kills the vault with SIGKILL in the middle of a storm
// of wrong guesses, enrollments and PIN changes, three times over on one
// directory, then stops it once with SIGTERM mid-storm. After each restart,
// every guess that was answered is still counted, every backup whose
// enrollment was answered 201 recovers, a PIN change answered 200 holds, a
// backup that answered 410 stays locked, and the bbolt file passes its
// consistency check.
func TestCrashMidStorm(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	db := filepath.Join(dir, "keyvault.db")
	stops := []string{"SIGKILL", "SIGKILL", "SIGKILL", "SIGTERM"}
	const (
		targets     = 16
		workers     = 16
		maxAttempts = 20
	)
	var keep []enrolled // must all recover after every restart

	v := startDev(t, dir)
	for cycle, stop := range stops {
		c := newClient(t, v.API, v.Token)
		// Backups that no guess touches.
		for i := range 3 {
			e := enrolled{randID(fmt.Sprintf("keep%d-%d", cycle, i)), randBytes(32), randPIN("keep")}
			c.mustEnroll(t, http.StatusCreated, e.user, e.secret, e.pin, maxAttempts)
			keep = append(keep, e)
		}
		ts := make([]*stormTarget, targets)
		for i := range ts {
			ts[i] = &stormTarget{enrolled: enrolled{randID(fmt.Sprintf("target%d-%d", cycle, i)), randBytes(32), randPIN("tgt")}}
			ts[i].minRemaining.Store(maxAttempts)
			c.mustEnroll(t, http.StatusCreated, ts[i].user, ts[i].secret, ts[i].pin, maxAttempts)
		}

		// A backup whose PIN keeps changing: pin is the last change
		// answered 200, inFlight one the kill may have cut off.
		chg := enrolled{randID(fmt.Sprintf("chg%d", cycle)), randBytes(32), randPIN("chg")}
		c.mustEnroll(t, http.StatusCreated, chg.user, chg.secret, chg.pin, maxAttempts)
		var inFlight string

		ctx, cancel := context.WithCancel(context.Background())
		var (
			wg       sync.WaitGroup
			answered atomic.Int64
			mu       sync.Mutex
			created  []enrolled // enrollments answered 201 during the storm
		)
		for w := range workers {
			wg.Go(func() {
				for i := w; ctx.Err() == nil; i += workers {
					// Skewed so that some targets lock and others keep
					// attempts, whenever the kill lands.
					tg := ts[int(targets*math.Pow(mrand.Float64(), 3))]
					r, err := c.call(http.MethodPost, backupPath(tg.user)+"/recover", map[string]string{"pin": fmt.Sprintf("wrong-%d", i)})
					if err != nil {
						return // the vault is gone
					}
					answered.Add(1)
					var p struct {
						Code              string `json:"code"`
						AttemptsRemaining int    `json:"attempts_remaining"`
					}
					_ = json.Unmarshal(r.Body, &p)
					switch {
					case r.Status == http.StatusForbidden && p.Code == "wrong_pin":
						tg.n403.Add(1)
						for {
							m := tg.minRemaining.Load()
							if int64(p.AttemptsRemaining) >= m || tg.minRemaining.CompareAndSwap(m, int64(p.AttemptsRemaining)) {
								break
							}
						}
					case r.Status == http.StatusGone && p.Code == "locked":
						tg.n410.Add(1)
					default:
						t.Errorf("cycle %d: wrong guess on %s: unexpected answer %v", cycle, tg.user, r)
						return
					}
				}
			})
		}
		for e := range 2 {
			wg.Go(func() {
				for i := 0; ctx.Err() == nil; i++ {
					en := enrolled{randID(fmt.Sprintf("new%d-%d-%d", cycle, e, i)), randBytes(32), randPIN("new")}
					r, err := c.call(http.MethodPut, backupPath(en.user), map[string]any{"secret": b64(en.secret), "pin": en.pin})
					if err != nil {
						return
					}
					if r.Status != http.StatusCreated {
						t.Errorf("cycle %d: enrollment during the storm: %v", cycle, r)
						return
					}
					mu.Lock()
					created = append(created, en)
					mu.Unlock()
				}
			})
		}

		wg.Go(func() {
			for ctx.Err() == nil {
				next := randPIN("chg")
				r, err := c.call(http.MethodPost, backupPath(chg.user)+"/pin", map[string]string{"pin": chg.pin, "new_pin": next})
				if err != nil {
					inFlight = next
					return
				}
				if r.Status != http.StatusOK {
					t.Errorf("cycle %d: PIN change during the storm: %v", cycle, r)
					return
				}
				chg.pin = next
			}
		})

		// Stop under load: once answers flow, after a random 50-300 ms.
		deadline := time.Now().Add(10 * time.Second)
		for answered.Load() < workers && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(time.Duration(50+mrand.IntN(251)) * time.Millisecond)
		if stop == "SIGKILL" {
			v.Kill()
		} else {
			v.Stop()
		}
		cancel()
		wg.Wait()
		mu.Lock()
		keep = append(keep, created...)
		t.Logf("cycle %d: %s after %d answered guesses and %d enrollments", cycle, stop, answered.Load(), len(created))
		mu.Unlock()
		if answered.Load() == 0 {
			t.Fatalf("cycle %d: no guess was answered before the kill:\n%s", cycle, v.Logs())
		}
		checkDB(t, db)

		v = startDev(t, dir)
		c = newClient(t, v.API, v.Token)
		nLocked := 0
		for _, tg := range ts {
			g := c.mustStatus(t, tg.user)
			locked := g["locked"] == true
			used := maxAttempts - num(t, g, "attempts_remaining")
			if locked {
				used = maxAttempts
			}
			n403, n410 := int(tg.n403.Load()), int(tg.n410.Load())
			heard := min(maxAttempts, n403+n410)
			if used < heard || used < maxAttempts-int(tg.minRemaining.Load()) {
				t.Errorf("cycle %d: %s: %d attempts used after the restart, but before the kill %d guesses were answered 403 (least attempts_remaining %d) and %d answered 410",
					cycle, tg.user, used, n403, tg.minRemaining.Load(), n410)
			}
			if n410 > 0 && !locked {
				t.Errorf("cycle %d: %s answered 410 before the kill but is not locked after the restart: %v", cycle, tg.user, g)
			}
			if locked {
				nLocked++
				wantProblem(t, "right PIN on a locked target", c.recover(t, tg.user, tg.pin), http.StatusGone, "locked")
			} else {
				c.mustRecover(t, tg.user, tg.pin, tg.secret)
			}
		}
		t.Logf("cycle %d: %d of %d targets locked", cycle, nLocked, targets)
		if r := c.recover(t, chg.user, chg.pin); r.Status != http.StatusOK {
			if inFlight == "" {
				t.Errorf("cycle %d: recover with the PIN of the last change answered 200: %v", cycle, r)
			} else {
				// The change the kill cut off may have landed.
				c.mustRecover(t, chg.user, inFlight, chg.secret)
			}
		} else if !bytes.Contains(r.Body, []byte(b64(chg.secret))) {
			t.Errorf("cycle %d: PIN-changed backup recovered a different secret: %v", cycle, r)
		}
		for _, e := range keep {
			c.mustRecover(t, e.user, e.pin, e.secret)
		}
		if t.Failed() {
			t.FailNow()
		}
	}
	v.Stop()
	checkDB(t, db)
}
