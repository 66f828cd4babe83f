package stress

import (
	"fmt"
	"net/http"
	"sync"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestStorms fires storms of 64 concurrent wrong guesses, each at a fresh
// backup whose max_attempts runs through 1..20, and counts every storm in
// which the vault let more wrong PINs be checked than the budget allows:
// more than max_attempts-1 answers of 403, two 403s with the same
// attempts_remaining (one guess counted for two), no 410, any other answer,
// or a backup that is not locked for good afterwards.
func TestStorms(t *testing.T) {
	softhsmtest.Module(t)
	storms := knob(t, "STRESS_STORMS", 10)
	const (
		guesses  = 64
		parallel = 2 // storms at once, on different backups
	)
	s := newTally(t, "storms")
	defer s.summary()
	v := startDev(t, t.TempDir())
	c := newClient(v.API, v.Token)

	var wg sync.WaitGroup
	next := make(chan int)
	for range parallel {
		wg.Go(func() {
			for i := range next {
				storm(s, c, fmt.Sprintf("storm%d", i), 1+i%20, guesses)
			}
		})
	}
	for i := range storms {
		next <- i
	}
	close(next)
	wg.Wait()
	lockouts := metricSum(t, v.Admin, "keyvault_lockouts_total")
	if lockouts != float64(storms) {
		s.violation("keyvault_lockouts_total = %v after %d storms that each locked one backup", lockouts, storms)
	}
	v.Stop()
}

// storm runs one storm and checks its answers.
func storm(s *tally, c *client, prefix string, maxAttempts, guesses int) {
	s.run()
	user, secret, pin := randID(prefix), randBytes(32), randPIN("s")
	s.op(1)
	if r, err := c.enroll(user, secret, pin, maxAttempts); err != nil || r.Status != http.StatusCreated {
		s.violation("%s: enroll: %v %v", user, r, err)
		return
	}
	start := make(chan struct{})
	answers := make([]response, guesses)
	errs := make([]error, guesses)
	var wg sync.WaitGroup
	for g := range guesses {
		wg.Go(func() {
			<-start
			answers[g], errs[g] = c.recover(user, fmt.Sprintf("wrong-%d", g))
		})
	}
	close(start)
	wg.Wait()
	s.op(guesses)

	n403, n410 := 0, 0
	seen := map[int]bool{}
	for g, r := range answers {
		if errs[g] != nil {
			s.violation("%s: guess %d: %v", user, g, errs[g])
			continue
		}
		a, _ := answerOf(r)
		switch {
		case r.Status == http.StatusForbidden && a.Code == "wrong_pin":
			n403++
			if a.AttemptsRemaining < 1 || a.AttemptsRemaining >= maxAttempts || seen[a.AttemptsRemaining] {
				s.violation("%s (max %d): a 403 with attempts_remaining %d (out of range, or twice)", user, maxAttempts, a.AttemptsRemaining)
			}
			seen[a.AttemptsRemaining] = true
		case r.Status == http.StatusGone && a.Code == "locked":
			n410++
		default:
			s.violation("%s: a wrong guess answered %v", user, r)
		}
	}
	// Each 403 is one wrong PIN checked, and the guess that used the last
	// attempt one more: more would be over the budget, fewer a 410 sent
	// before the backup was locked.
	if n403 != maxAttempts-1 || n410 == 0 {
		s.violation("%s (max %d): %d answers of 403 and %d of 410 to %d wrong guesses, want %d and the rest", user, maxAttempts, n403, n410, guesses, maxAttempts-1)
	}
	s.op(2)
	if r, err := c.status(user); err != nil || r.Status != http.StatusOK {
		s.violation("%s: GET after the storm: %v %v", user, r, err)
	} else if a, _ := answerOf(r); !a.Locked || a.AttemptsRemaining != 0 {
		s.violation("%s: after %d wrong guesses, GET says %v", user, guesses, r)
	}
	if r, err := c.recover(user, pin); err != nil || r.Status != http.StatusGone {
		s.violation("%s: the right PIN after the lockout answered %v %v, want 410", user, r, err)
	}
}
