package e2e

import (
	"net/http"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestLoneSurrogatePINs plays the attack of two different PINs made equal
// by unpaired surrogate escapes, which encoding/json decodes to U+FFFD:
// enrolled with "\ud800\ud800\ud800\ud800", a backup would open with
// "\udfff\udc00\ud9ab\ufffd". Over real HTTP, on SoftHSM, each such body
// is a 400 invalid_request on enroll, recover and PIN change, and nothing
// is written or counted. A valid surrogate pair and an escaped U+FFFD are
// ordinary PIN text, held byte for byte.
func TestLoneSurrogatePINs(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	v := startDevLimited(t, t.TempDir())
	defer v.Stop()
	c := newClient(t, v.API, v.Token)
	secret := randBytes(32)
	put := func(user, pinJSON string) response {
		return c.do(t, http.MethodPut, backupPath(user), rawBody(`{"secret":"`+b64(secret)+`","pin":"`+pinJSON+`","max_attempts":5}`))
	}
	recoverRaw := func(user, pinJSON string) response {
		return c.do(t, http.MethodPost, backupPath(user)+"/recover", rawBody(`{"pin":"`+pinJSON+`"}`))
	}
	const enrolledWith, recoveredWith = `\ud800\ud800\ud800\ud800`, `\udfff\udc00\ud9ab\ufffd`

	// The attack as written: nothing is enrolled, nothing recovered.
	victim := randID("surrogate")
	wantProblem(t, "enroll with unpaired surrogates", put(victim, enrolledWith), http.StatusBadRequest, "invalid_request")
	wantProblem(t, "GET after the refused enroll", c.status(t, victim), http.StatusNotFound, "not_found")
	wantProblem(t, "recover with other unpaired surrogates", recoverRaw(victim, recoveredWith), http.StatusBadRequest, "invalid_request")

	// On a backup that exists, the same bodies replace nothing and count
	// nothing.
	user, pin := randID("surrogate"), randPIN("surrogate")
	c.mustEnroll(t, http.StatusCreated, user, secret, pin, 5)
	wantProblem(t, "PUT over a backup with unpaired surrogates", put(user, enrolledWith), http.StatusBadRequest, "invalid_request")
	for range 3 {
		wantProblem(t, "recover with unpaired surrogates", recoverRaw(user, recoveredWith), http.StatusBadRequest, "invalid_request")
	}
	wantProblem(t, "PIN change to unpaired surrogates",
		c.do(t, http.MethodPost, backupPath(user)+"/pin", rawBody(`{"pin":"`+pin+`","new_pin":"`+enrolledWith+`"}`)),
		http.StatusBadRequest, "invalid_request")
	st := c.mustStatus(t, user)
	if num(t, st, "attempts_remaining") != 5 || num(t, st, "generation") != 1 {
		t.Fatalf("after the refused bodies: %v, want generation 1 with 5 attempts remaining", st)
	}
	samples, _ := metrics(t, v.Admin)
	if n, _ := metricSum(samples, "keyvault_recoveries_total", map[string]string{"result": "wrong_pin"}); n != 0 {
		t.Fatalf("keyvault_recoveries_total{result=wrong_pin} = %v, want 0", n)
	}
	c.mustRecover(t, user, pin, secret)

	// What is text stays text: a pair, and U+FFFD written as an escape,
	// each the one PIN it names.
	pair, fffd := randID("pair"), randID("fffd")
	if r := put(pair, `\ud83d\ude00\ud83d\ude00`); r.Status != http.StatusCreated {
		t.Fatalf("enroll with a surrogate pair: %v, want 201", r)
	}
	if r := recoverRaw(pair, "\U0001F600\U0001F600"); r.Status != http.StatusOK {
		t.Fatalf("recover with the pair written raw: %v, want 200", r)
	}
	if r := put(fffd, `\ufffd\ufffd\ufffd\ufffd`); r.Status != http.StatusCreated {
		t.Fatalf("enroll with escaped U+FFFD: %v, want 201", r)
	}
	wantProblem(t, "recover with U+FFFD three times", recoverRaw(fffd, `\ufffd\ufffd\ufffd`), http.StatusForbidden, "wrong_pin")
	if r := recoverRaw(fffd, "\uFFFD\uFFFD\uFFFD\uFFFD"); r.Status != http.StatusOK {
		t.Fatalf("recover with U+FFFD written raw: %v, want 200", r)
	}
}
