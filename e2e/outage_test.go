package e2e

import (
	"net/http"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestHSMOutage takes the dev SoftHSM token away from under the running
// vault (its directory is renamed: SoftHSM then fails every operation on
// the existing keys, as a rebooted network HSM would), and puts it back.
// While it is gone, every call that needs the HSM answers 503 unavailable
// with Retry-After and counts no guess, GET still answers, and /readyz
// fails. Once it is back, the vault serves again without a restart.
func TestHSMOutage(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	v := startDev(t, dir)
	c := newClient(t, v.API, v.Token)
	e := enrolled{randID("outage"), randBytes(32), randPIN("outage")}
	c.mustEnroll(t, http.StatusCreated, e.user, e.secret, e.pin, 10)
	wantProblem(t, "a wrong guess", c.recover(t, e.user, "wrong-pin"), http.StatusForbidden, "wrong_pin")
	gen := num(t, c.mustStatus(t, e.user), "generation")

	restore := takeTokensAway(t, dir)
	// SoftHSM notices within about 10 ms; until then, operations still
	// work. Wait for that with enrollments of throwaway backups, which count
	// no guess.
	deadline := time.Now().Add(5 * time.Second)
	for {
		r := c.enroll(t, randID("outage-probe"), randBytes(32), "1234", 0)
		if r.Status == http.StatusServiceUnavailable {
			break
		}
		if r.Status != http.StatusCreated || time.Now().After(deadline) {
			t.Fatalf("PUT after the token went away: %v, want 201 and soon 503", r)
		}
		time.Sleep(20 * time.Millisecond)
	}

	t.Run("token gone", func(t *testing.T) {
		unavailable := func(what string, r response) {
			t.Helper()
			wantProblem(t, what, r, http.StatusServiceUnavailable, "unavailable")
			if r.Status == http.StatusServiceUnavailable && r.Header.Get("Retry-After") == "" {
				t.Errorf("%s: 503 without Retry-After", what)
			}
		}
		for range 3 {
			unavailable("recover, right PIN", c.recover(t, e.user, e.pin))
			unavailable("recover, wrong PIN", c.recover(t, e.user, "wrong-pin"))
			unavailable("PIN change", c.changePIN(t, e.user, e.pin, "new-pin-1"))
		}
		unavailable("PUT", c.enroll(t, randID("outage-new"), randBytes(32), "1234", 0))
		g := c.mustStatus(t, e.user)
		if num(t, g, "attempts_remaining") != 9 || num(t, g, "generation") != gen {
			t.Errorf("after the 503s: %v, want attempts_remaining 9 and generation %d (a 503 counts nothing)", g, gen)
		}
		if r := get(t, v.Admin+"/readyz"); r.Status != http.StatusServiceUnavailable {
			t.Errorf("/readyz with no HSM: %v, want 503", r)
		}
		if r := get(t, v.Admin+"/healthz"); r.Status != http.StatusOK {
			t.Errorf("/healthz with no HSM: %v, want 200", r)
		}
		samples, _ := metrics(t, v.Admin)
		if up, ok := metricSum(samples, "keyvault_hsm_member_up", map[string]string{"member": "dev"}); !ok || up != 0 {
			t.Errorf("keyvault_hsm_member_up{member=dev} = %v (present %v), want 0", up, ok)
		}
	})

	restore()
	t.Run("token back", func(t *testing.T) {
		// The pool probes with a backoff that has grown for a second or
		// two; 20 s is plenty.
		deadline := time.Now().Add(20 * time.Second)
		var last response
		for time.Now().Before(deadline) {
			if last = c.recover(t, e.user, e.pin); last.Status != http.StatusServiceUnavailable {
				break
			}
			time.Sleep(250 * time.Millisecond)
		}
		if last.Status != http.StatusOK {
			r := get(t, v.Admin+"/readyz")
			samples, _ := metrics(t, v.Admin)
			up, _ := metricSum(samples, "keyvault_hsm_member_up", map[string]string{"member": "dev"})
			t.Fatalf("20 s after the token came back, recover answers %v; meanwhile /readyz answers %v and keyvault_hsm_member_up is %v; the log ends:\n%s",
				last, r, up, tail(v.Logs(), 12))
		}
		c.mustRecover(t, e.user, e.pin, e.secret)
		if r := get(t, v.Admin+"/readyz"); r.Status != http.StatusOK {
			t.Errorf("/readyz: %v, want 200", r)
		}
	})
	v.Stop()
}

// tail returns the last n lines of out.
var tail = kvproc.Tail
