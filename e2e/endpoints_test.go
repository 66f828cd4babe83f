package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestEndpoints walks every endpoint of the REST API (docs/api.md) through its
// success paths and each documented error answer, on one `keyvault dev`
// process, then checks namespace isolation on `keyvault serve` with two
// clients.
func TestEndpoints(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	v := startDev(t, dir)
	c := newClient(t, v.API, v.Token)

	var users []string // every user_id used, to look for in /metrics
	newUser := func(prefix string) string {
		u := randID("ep-" + prefix)
		users = append(users, u)
		return u
	}
	// remaining reads attempts_remaining and generation from GET.
	remaining := func(t *testing.T, user string) (int, int) {
		t.Helper()
		m := c.mustStatus(t, user)
		return num(t, m, "attempts_remaining"), num(t, m, "generation")
	}

	t.Run("health", func(t *testing.T) {
		for _, p := range []string{"/healthz", "/readyz"} {
			if r := get(t, v.Admin+p); r.Status != http.StatusOK {
				t.Errorf("%s: %v, want 200", p, r)
			}
		}
	})

	t.Run("enroll, status, replace, recover", func(t *testing.T) {
		u := newUser("alice")
		s1, pin1 := randBytes(32), randPIN("p1")
		before := time.Now()
		r := c.enroll(t, u, s1, pin1, 0)
		if r.Status != http.StatusCreated {
			t.Fatalf("PUT new: %v, want 201", r)
		}
		m := r.JSON(t)
		wantKeys(t, "PUT 201", m, putFields...)
		if m["user_id"] != u || num(t, m, "max_attempts") != 10 || num(t, m, "attempts_remaining") != 10 || num(t, m, "key_version") != 1 {
			t.Errorf("PUT 201 body %v: want user_id %s, max_attempts 10 (the default), attempts_remaining 10, key_version 1", m, u)
		}
		gen1 := num(t, m, "generation")
		if gen1 < 1 {
			t.Errorf("generation %d, want >= 1", gen1)
		}
		created, err := time.Parse(time.RFC3339Nano, fmt.Sprint(m["created_at"]))
		if err != nil || created.Before(before.Add(-time.Minute)) || created.After(time.Now().Add(time.Minute)) {
			t.Errorf("created_at %v: want an RFC 3339 time of now (%v)", m["created_at"], err)
		}
		if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
			t.Errorf("PUT Content-Type %q, want application/json", ct)
		}

		g := c.mustStatus(t, u)
		wantKeys(t, "GET", g, "user_id", "generation", "max_attempts", "attempts_remaining", "locked",
			"key_version", "pin_key_version", "created_at", "updated_at")
		if g["user_id"] != u || num(t, g, "generation") != gen1 || num(t, g, "max_attempts") != 10 ||
			num(t, g, "attempts_remaining") != 10 || g["locked"] != false || num(t, g, "key_version") != 1 ||
			num(t, g, "pin_key_version") != 1 || g["created_at"] != m["created_at"] {
			t.Errorf("GET body %v does not match the enrollment %v", g, m)
		}
		if _, err := time.Parse(time.RFC3339Nano, fmt.Sprint(g["updated_at"])); err != nil {
			t.Errorf("updated_at %v: %v", g["updated_at"], err)
		}

		rec := c.mustRecover(t, u, pin1, s1)
		wantKeys(t, "recover 200", rec, "secret", "attempts_remaining")
		if num(t, rec, "attempts_remaining") != 10 {
			t.Errorf("recover: attempts_remaining %v, want 10", rec["attempts_remaining"])
		}

		// Replacing: 200, a new generation, the new max_attempts, a fresh counter.
		s2, pin2 := randBytes(48), randPIN("p2")
		r = c.enroll(t, u, s2, pin2, 7)
		if r.Status != http.StatusOK {
			t.Fatalf("PUT over existing: %v, want 200", r)
		}
		m2 := r.JSON(t)
		wantKeys(t, "PUT 200", m2, putFields...)
		if num(t, m2, "generation") <= gen1 || num(t, m2, "max_attempts") != 7 || num(t, m2, "attempts_remaining") != 7 {
			t.Errorf("PUT 200 body %v: want generation > %d, max_attempts 7, attempts_remaining 7", m2, gen1)
		}
		c.mustRecover(t, u, pin2, s2)
		wantProblem(t, "recover with the replaced generation's PIN", c.recover(t, u, pin1), http.StatusForbidden, "wrong_pin")
		c.mustRecover(t, u, pin2, s2)

		// Boundaries that are valid.
		c.mustEnroll(t, http.StatusCreated, newUser("min"), randBytes(16), "1234", 1)
		c.mustEnroll(t, http.StatusCreated, newUser("max"), randBytes(512), strings.Repeat("x", 128), 20)
		long := strings.Repeat("L", 128-3) + ".~@" // 128 characters, odd ones included
		users = append(users, long)
		sl := randBytes(16)
		c.mustEnroll(t, http.StatusCreated, long, sl, "1234", 0)
		c.mustRecover(t, long, "1234", sl)
	})

	t.Run("wrong PIN and reset", func(t *testing.T) {
		u := newUser("bob")
		s, pin := randBytes(32), randPIN("pb")
		c.mustEnroll(t, http.StatusCreated, u, s, pin, 5)
		for want := 4; want >= 3; want-- {
			p := wantProblem(t, "wrong PIN", c.recover(t, u, pin+"x"), http.StatusForbidden, "wrong_pin")
			if p != nil && num(t, p, "attempts_remaining") != want {
				t.Errorf("wrong PIN: attempts_remaining %v, want %d", p["attempts_remaining"], want)
			}
		}
		if n, _ := remaining(t, u); n != 3 {
			t.Errorf("GET after 2 wrong guesses of 5: attempts_remaining %d, want 3", n)
		}
		if rec := c.mustRecover(t, u, pin, s); num(t, rec, "attempts_remaining") != 5 {
			t.Errorf("right PIN: attempts_remaining %v, want 5 (reset)", rec["attempts_remaining"])
		}
		if n, _ := remaining(t, u); n != 5 {
			t.Errorf("GET after reset: attempts_remaining %d, want 5", n)
		}
	})

	t.Run("lockout", func(t *testing.T) {
		u := newUser("carol")
		s, pin := randBytes(32), randPIN("pc")
		c.mustEnroll(t, http.StatusCreated, u, s, pin, 3)
		for want := 2; want >= 1; want-- {
			p := wantProblem(t, "wrong PIN", c.recover(t, u, "wrong-"+strconv.Itoa(want)), http.StatusForbidden, "wrong_pin")
			if p != nil && num(t, p, "attempts_remaining") != want {
				t.Errorf("attempts_remaining %v, want %d", p["attempts_remaining"], want)
			}
		}
		wantProblem(t, "the guess that uses the last attempt", c.recover(t, u, "wrong-0"), http.StatusGone, "locked")
		wantProblem(t, "right PIN after lockout", c.recover(t, u, pin), http.StatusGone, "locked")
		wantProblem(t, "wrong PIN after lockout", c.recover(t, u, "wrong-again"), http.StatusGone, "locked")
		wantProblem(t, "PIN change after lockout", c.changePIN(t, u, pin, "new-pin-1"), http.StatusGone, "locked")
		g := c.mustStatus(t, u)
		if g["locked"] != true || num(t, g, "attempts_remaining") != 0 {
			t.Errorf("GET locked backup: %v, want locked true, attempts_remaining 0", g)
		}
		gen := num(t, g, "generation")

		s2, pin2 := randBytes(32), randPIN("pc2")
		m := c.mustEnroll(t, http.StatusOK, u, s2, pin2, 3)
		if num(t, m, "generation") <= gen || num(t, m, "attempts_remaining") != 3 {
			t.Errorf("PUT over locked: %v, want generation > %d and attempts_remaining 3", m, gen)
		}
		if g := c.mustStatus(t, u); g["locked"] != false {
			t.Errorf("GET after re-enrolling: locked %v", g["locked"])
		}
		c.mustRecover(t, u, pin2, s2)

		// max_attempts 1: the first wrong guess is the last.
		one := newUser("one")
		c.mustEnroll(t, http.StatusCreated, one, s, pin, 1)
		wantProblem(t, "max_attempts 1, wrong guess", c.recover(t, one, "nope-nope"), http.StatusGone, "locked")
		wantProblem(t, "max_attempts 1, right PIN after", c.recover(t, one, pin), http.StatusGone, "locked")
	})

	t.Run("change PIN", func(t *testing.T) {
		u := newUser("dave")
		s, pin, newPIN := randBytes(32), randPIN("pd"), randPIN("pd-new")
		m := c.mustEnroll(t, http.StatusCreated, u, s, pin, 6)
		gen := num(t, m, "generation")
		p := wantProblem(t, "PIN change with a wrong PIN", c.changePIN(t, u, "wrong-pin", newPIN), http.StatusForbidden, "wrong_pin")
		if p != nil && num(t, p, "attempts_remaining") != 5 {
			t.Errorf("attempts_remaining %v, want 5", p["attempts_remaining"])
		}
		r := c.changePIN(t, u, pin, newPIN)
		if r.Status != http.StatusOK {
			t.Fatalf("PIN change: %v, want 200", r)
		}
		m = r.JSON(t)
		wantKeys(t, "PIN change 200", m, putFields...)
		if m["user_id"] != u || num(t, m, "generation") <= gen || num(t, m, "max_attempts") != 6 || num(t, m, "attempts_remaining") != 6 {
			t.Errorf("PIN change body %v: want a generation > %d, max_attempts 6, attempts_remaining 6", m, gen)
		}
		wantProblem(t, "recover with the old PIN", c.recover(t, u, pin), http.StatusForbidden, "wrong_pin")
		c.mustRecover(t, u, newPIN, s)
		// With a matching If-Match the change goes through.
		g := c.mustStatus(t, u)
		r = c.changePIN(t, u, newPIN, pin, "If-Match", fmt.Sprintf(`"%d"`, num(t, g, "generation")))
		if r.Status != http.StatusOK {
			t.Fatalf("PIN change with a matching If-Match: %v", r)
		}
		c.mustRecover(t, u, pin, s)
	})

	t.Run("delete and tombstone", func(t *testing.T) {
		u := newUser("erin")
		s, pin := randBytes(32), randPIN("pe")
		c.mustEnroll(t, http.StatusCreated, u, s, pin, 0)
		gen := num(t, c.mustEnroll(t, http.StatusOK, u, s, pin, 0), "generation")
		r := c.delete(t, u)
		if r.Status != http.StatusNoContent || len(r.Body) != 0 {
			t.Fatalf("DELETE: %v, want 204 with no body", r)
		}
		wantProblem(t, "GET deleted", c.status(t, u), http.StatusNotFound, "not_found")
		wantProblem(t, "recover deleted", c.recover(t, u, pin), http.StatusNotFound, "not_found")
		wantProblem(t, "DELETE deleted", c.delete(t, u), http.StatusNotFound, "not_found")
		wantProblem(t, "PIN change of deleted", c.changePIN(t, u, pin, "abcdef"), http.StatusNotFound, "not_found")
		wantProblem(t, "GET never enrolled", c.status(t, newUser("nobody")), http.StatusNotFound, "not_found")
		wantProblem(t, "recover never enrolled", c.recover(t, newUser("nobody"), pin), http.StatusNotFound, "not_found")
		m := c.mustEnroll(t, http.StatusCreated, u, s, pin, 0)
		if num(t, m, "generation") <= gen {
			t.Errorf("PUT after DELETE: generation %v, want > %d (the tombstone keeps it)", m["generation"], gen)
		}
		c.mustRecover(t, u, pin, s)
	})

	t.Run("preconditions", func(t *testing.T) {
		u := newUser("frank")
		s, pin := randBytes(32), randPIN("pf")
		gen := num(t, c.mustEnroll(t, http.StatusCreated, u, s, pin, 8), "generation")
		wantProblem(t, "a wrong guess first", c.recover(t, u, "wrong-guess"), http.StatusForbidden, "wrong_pin")
		stale := fmt.Sprintf(`"%d"`, gen+5)
		wantProblem(t, "PUT If-Match stale", c.enroll(t, u, randBytes(32), pin, 0, "If-Match", stale), http.StatusPreconditionFailed, "precondition_failed")
		wantProblem(t, "PUT If-None-Match * over a backup", c.enroll(t, u, randBytes(32), pin, 0, "If-None-Match", "*"), http.StatusPreconditionFailed, "precondition_failed")
		wantProblem(t, "PIN change If-Match stale, right PIN", c.changePIN(t, u, pin, "other-pin", "If-Match", stale), http.StatusPreconditionFailed, "precondition_failed")
		wantProblem(t, "PIN change If-Match stale, wrong PIN", c.changePIN(t, u, "wrong-pin", "other-pin", "If-Match", stale), http.StatusPreconditionFailed, "precondition_failed")
		wantProblem(t, "DELETE If-Match stale", c.delete(t, u, "If-Match", stale), http.StatusPreconditionFailed, "precondition_failed")
		if n, g := remaining(t, u); n != 7 || g != gen {
			t.Errorf("after five 412s: attempts_remaining %d generation %d, want 7 and %d (a 412 counts and changes nothing)", n, g, gen)
		}
		c.mustRecover(t, u, pin, s)

		fresh := newUser("fresh")
		c.mustEnroll(t, http.StatusCreated, fresh, s, pin, 0)
		r := c.enroll(t, fresh+"x", s, pin, 0, "If-None-Match", "*")
		users = append(users, fresh+"x")
		if r.Status != http.StatusCreated {
			t.Errorf("PUT If-None-Match * of a new backup: %v, want 201", r)
		}
		never := newUser("never")
		wantProblem(t, "PUT If-Match on no backup", c.enroll(t, never, s, pin, 0, "If-Match", `"1"`), http.StatusPreconditionFailed, "precondition_failed")
		wantProblem(t, "the 412 enrolled nothing", c.status(t, never), http.StatusNotFound, "not_found")
		gone := newUser("gone")
		c.mustEnroll(t, http.StatusCreated, gone, s, pin, 0)
		if r := c.delete(t, gone); r.Status != http.StatusNoContent {
			t.Fatalf("DELETE: %v", r)
		}
		if r := c.enroll(t, gone, s, pin, 0, "If-None-Match", "*"); r.Status != http.StatusCreated {
			t.Errorf("PUT If-None-Match * over a deleted backup: %v, want 201", r)
		}
		r = c.enroll(t, u, s, pin, 8, "If-Match", fmt.Sprintf(`"%d"`, gen))
		if r.Status != http.StatusOK || num(t, r.JSON(t), "generation") <= gen {
			t.Fatalf("PUT with a matching If-Match: %v, want 200 and a new generation", r)
		}
		gen2 := num(t, r.JSON(t), "generation")
		if et := r.Header.Get("ETag"); et != "" && et != fmt.Sprintf(`"%d"`, gen2) {
			t.Errorf("ETag %q, want %q", et, fmt.Sprintf(`"%d"`, gen2))
		}
		r = c.delete(t, u, "If-Match", fmt.Sprintf(`"%d"`, gen2))
		if r.Status != http.StatusNoContent {
			t.Errorf("DELETE with a matching If-Match: %v, want 204", r)
		}
	})

	t.Run("bad requests count nothing", func(t *testing.T) {
		u := newUser("grace")
		s, pin := randBytes(32), randPIN("pg")
		c.mustEnroll(t, http.StatusCreated, u, s, pin, 9)
		wantProblem(t, "a wrong guess first", c.recover(t, u, "wrong-guess"), http.StatusForbidden, "wrong_pin")
		other := newUser("nobody")
		put := func(body string) func() response {
			return func() response { return c.do(t, http.MethodPut, backupPath(other), rawBody(body)) }
		}
		rec := func(body string) func() response {
			return func() response { return c.do(t, http.MethodPost, backupPath(u)+"/recover", rawBody(body)) }
		}
		pinc := func(body string) func() response {
			return func() response { return c.do(t, http.MethodPost, backupPath(u)+"/pin", rawBody(body)) }
		}
		good := b64(randBytes(32))
		cases := []struct {
			name string
			call func() response
		}{
			{"user_id with a space", func() response { return c.enroll(t, "bad%20id", s, pin, 0) }},
			{"user_id with !", func() response { return c.enroll(t, "bad!id", s, pin, 0) }},
			{"user_id with a slash, encoded", func() response { return c.status(t, "a%2Fb") }},
			{"user_id non-ASCII", func() response { return c.status(t, "j%C3%B6rg") }},
			{"user_id of 129 characters", func() response { return c.status(t, strings.Repeat("a", 129)) }},
			{"user_id of 129 characters, recover", func() response { return c.recover(t, strings.Repeat("b", 129), pin) }},
			{"secret of 15 bytes", func() response { return c.enroll(t, other, randBytes(15), pin, 0) }},
			{"secret of 513 bytes", func() response { return c.enroll(t, other, randBytes(513), pin, 0) }},
			{"secret not base64", put(`{"secret":"!!not base64!!","pin":"1234"}`)},
			{"secret without padding", put(`{"secret":"` + base64.RawStdEncoding.EncodeToString(randBytes(17)) + `","pin":"1234"}`)},
			{"secret in URL base64", put(`{"secret":"` + strings.Repeat("-_", 12) + `","pin":"1234"}`)},
			{"secret with a line break", put(`{"secret":"` + good[:8] + `\n` + good[8:] + `","pin":"1234"}`)},
			{"secret missing", put(`{"pin":"1234"}`)},
			{"secret a number", put(`{"secret":12345,"pin":"1234"}`)},
			{"PIN of 3 bytes", func() response { return c.enroll(t, other, s, "123", 0) }},
			{"PIN of 129 bytes", func() response { return c.enroll(t, other, s, strings.Repeat("p", 129), 0) }},
			{"PIN missing", put(`{"secret":"` + good + `"}`)},
			{"unknown field", put(`{"secret":"` + good + `","pin":"1234","extra":1}`)},
			{"trailing data", put(`{"secret":"` + good + `","pin":"1234"}{}`)},
			{"trailing garbage", put(`{"secret":"` + good + `","pin":"1234"} x`)},
			{"broken JSON", put(`{"secret":`)},
			{"empty body", put(``)},
			{"a JSON array", put(`[]`)},
			{"max_attempts 0", put(`{"secret":"` + good + `","pin":"1234","max_attempts":0}`)},
			{"max_attempts 21", func() response { return c.enroll(t, other, s, pin, 21) }},
			{"max_attempts -1", func() response { return c.enroll(t, other, s, pin, -1) }},
			{"max_attempts a string", put(`{"secret":"` + good + `","pin":"1234","max_attempts":"5"}`)},
			{"max_attempts 2.5", put(`{"secret":"` + good + `","pin":"1234","max_attempts":2.5}`)},
			{"If-Match not a generation", func() response { return c.enroll(t, u, s, pin, 0, "If-Match", `"abc"`) }},
			{"If-None-Match not *", func() response { return c.enroll(t, u, s, pin, 0, "If-None-Match", `"3"`) }},
			{"recover: PIN of 3 bytes", rec(`{"pin":"123"}`)},
			{"recover: PIN of 129 bytes", rec(`{"pin":"` + strings.Repeat("q", 129) + `"}`)},
			{"recover: PIN a number", rec(`{"pin":12345678}`)},
			{"recover: unknown field", rec(`{"pin":"` + pin + `","x":1}`)},
			{"recover: trailing data", rec(`{"pin":"` + pin + `"} {"pin":"` + pin + `"}`)},
			{"recover: no body", rec(``)},
			{"recover: PIN missing", rec(`{}`)},
			{"PIN change: new_pin of 3 bytes, right PIN", pinc(`{"pin":"` + pin + `","new_pin":"123"}`)},
			{"PIN change: new_pin of 3 bytes, wrong PIN", pinc(`{"pin":"wrong-pin","new_pin":"123"}`)},
			{"PIN change: new_pin of 129 bytes", pinc(`{"pin":"wrong-pin","new_pin":"` + strings.Repeat("n", 129) + `"}`)},
			{"PIN change: new_pin missing", pinc(`{"pin":"wrong-pin"}`)},
			{"PIN change: PIN of 3 bytes", pinc(`{"pin":"123","new_pin":"12345"}`)},
			{"PIN change: unknown field", pinc(`{"pin":"wrong-pin","new_pin":"12345","x":true}`)},
			{"PIN change: trailing data", pinc(`{"pin":"wrong-pin","new_pin":"12345"}]`)},
			{"PIN change: If-Match not a generation", func() response { return c.changePIN(t, u, "wrong-pin", "12345", "If-Match", "W/1") }},
			{"DELETE: If-Match not a generation", func() response { return c.delete(t, u, "If-Match", "zero") }},
		}
		for _, tc := range cases {
			wantProblem(t, tc.name, tc.call(), http.StatusBadRequest, "invalid_request")
		}
		// A body not sent as application/json (curl -d without -H sends a
		// form) is a 415, before anything is counted.
		for _, ct := range []string{"application/x-www-form-urlencoded", "text/plain", "application/json; charset=latin1", ""} {
			r := c.do(t, http.MethodPost, backupPath(u)+"/recover", rawBody(`{"pin":"wrong-pin"}`), "Content-Type", ct)
			wantProblem(t, "recover with Content-Type "+ct, r, http.StatusUnsupportedMediaType, "invalid_request")
		}
		for _, ct := range []string{"application/json; charset=utf-8", "application/json;charset=UTF-8"} {
			r := c.do(t, http.MethodGet, backupPath(u), nil, "Content-Type", ct)
			if r.Status != http.StatusOK {
				t.Errorf("GET with Content-Type %s and no body: %v, want 200", ct, r)
			}
		}
		if n, _ := remaining(t, u); n != 8 {
			t.Errorf("after the 400s: attempts_remaining %d, want 8 (a 400 counts nothing)", n)
		}
		wantProblem(t, "nothing was enrolled by the 400s", c.status(t, other), http.StatusNotFound, "not_found")
		c.mustRecover(t, u, pin, s)
	})

	t.Run("unauthorized", func(t *testing.T) {
		u := newUser("heidi")
		s, pin := randBytes(32), randPIN("ph")
		c.mustEnroll(t, http.StatusCreated, u, s, pin, 4)
		newU := newUser("nobody")
		cases := []struct {
			name, auth string
		}{
			{"no token", ""},
			{"wrong token", "Bearer kvdev_NOTTHETOKEN"},
			{"empty bearer", "Bearer "},
			{"basic auth", "Basic " + base64.StdEncoding.EncodeToString([]byte("dev:"+v.Token))},
			{"token without scheme", v.Token},
			{"token with a suffix", "Bearer " + v.Token + "x"},
		}
		for _, tc := range cases {
			for _, call := range []struct {
				what string
				do   func() response
			}{
				{"GET", func() response { return c.do(t, http.MethodGet, backupPath(u), nil, "Authorization", tc.auth) }},
				{"recover", func() response {
					return c.do(t, http.MethodPost, backupPath(u)+"/recover", map[string]string{"pin": "wrong-pin"}, "Authorization", tc.auth)
				}},
				{"PUT", func() response {
					return c.do(t, http.MethodPut, backupPath(newU), map[string]string{"secret": b64(s), "pin": pin}, "Authorization", tc.auth)
				}},
				{"DELETE", func() response { return c.do(t, http.MethodDelete, backupPath(u), nil, "Authorization", tc.auth) }},
				{"PIN change", func() response {
					return c.do(t, http.MethodPost, backupPath(u)+"/pin", map[string]string{"pin": pin, "new_pin": "12345"}, "Authorization", tc.auth)
				}},
			} {
				r := call.do()
				wantProblem(t, tc.name+", "+call.what, r, http.StatusUnauthorized, "unauthorized")
				if r.Status == http.StatusUnauthorized && !strings.HasPrefix(r.Header.Get("WWW-Authenticate"), "Bearer") {
					t.Errorf("%s, %s: WWW-Authenticate %q, want a Bearer challenge", tc.name, call.what, r.Header.Get("WWW-Authenticate"))
				}
			}
		}
		if n, _ := remaining(t, u); n != 4 {
			t.Errorf("after the 401s: attempts_remaining %d, want 4", n)
		}
		wantProblem(t, "nothing was enrolled by the 401s", c.status(t, newU), http.StatusNotFound, "not_found")
		c.mustRecover(t, u, pin, s)
	})

	t.Run("body limit", func(t *testing.T) {
		u := newUser("ivan")
		s, pin := randBytes(32), randPIN("pi")
		c.mustEnroll(t, http.StatusCreated, u, s, pin, 5)
		pad := func(body string, size int) rawBody {
			return rawBody(body + strings.Repeat(" ", size-len(body)))
		}
		big := `{"secret":"` + strings.Repeat("A", 70000) + `","pin":"1234"}`
		wantProblem(t, "PUT of 70000 bytes", c.do(t, http.MethodPut, backupPath(newUser("big")), rawBody(big)), http.StatusRequestEntityTooLarge, "payload_too_large")
		wantProblem(t, "PUT of 70000 bytes, chunked", c.do(t, http.MethodPut, backupPath(newUser("big")), strings.NewReader(big)), http.StatusRequestEntityTooLarge, "payload_too_large")
		wrong := `{"pin":"wrong-pin"}`
		wantProblem(t, "recover of 64 KiB + 1", c.do(t, http.MethodPost, backupPath(u)+"/recover", pad(wrong, 64<<10+1)), http.StatusRequestEntityTooLarge, "payload_too_large")
		wantProblem(t, "recover chunked, 64 KiB + 1", c.do(t, http.MethodPost, backupPath(u)+"/recover", bytes.NewReader(pad(wrong, 64<<10+1))), http.StatusRequestEntityTooLarge, "payload_too_large")
		wantProblem(t, "PIN change of 1 MiB", c.do(t, http.MethodPost, backupPath(u)+"/pin", pad(`{"pin":"wrong-pin","new_pin":"12345"}`, 1<<20)), http.StatusRequestEntityTooLarge, "payload_too_large")
		if n, _ := remaining(t, u); n != 5 {
			t.Errorf("after the 413s: attempts_remaining %d, want 5 (nothing counted)", n)
		}
		// Exactly 64 KiB is allowed.
		r := c.do(t, http.MethodPost, backupPath(u)+"/recover", pad(`{"pin":"`+pin+`"}`, 64<<10))
		if r.Status != http.StatusOK {
			t.Errorf("recover with a body of exactly 64 KiB: %v, want 200", r)
		}
	})

	t.Run("request id", func(t *testing.T) {
		u := newUser("judy")
		c.mustEnroll(t, http.StatusCreated, u, randBytes(32), "1234", 0)
		for _, tc := range []struct {
			name string
			do   func(hdr ...string) response
		}{
			{"GET 200", func(h ...string) response { return c.do(t, http.MethodGet, backupPath(u), nil, h...) }},
			{"GET 404", func(h ...string) response { return c.do(t, http.MethodGet, backupPath(u+"-none"), nil, h...) }},
			{"401", func(h ...string) response {
				return c.do(t, http.MethodGet, backupPath(u), nil, append(h, "Authorization", "")...)
			}},
			{"400", func(h ...string) response { return c.do(t, http.MethodPut, backupPath(u), rawBody("{"), h...) }},
			{"403", func(h ...string) response {
				return c.do(t, http.MethodPost, backupPath(u)+"/recover", map[string]string{"pin": "9999"}, h...)
			}},
		} {
			id := "e2e-req." + strings.ToLower(randID("x"))
			if got := tc.do("X-Request-Id", id).Header.Get("X-Request-Id"); got != id {
				t.Errorf("%s: X-Request-Id %q, want the one sent, %q", tc.name, got, id)
			}
			a, b := tc.do().Header.Get("X-Request-Id"), tc.do().Header.Get("X-Request-Id")
			if a == "" || b == "" || a == b {
				t.Errorf("%s without X-Request-Id: got %q and %q, want two different generated IDs", tc.name, a, b)
			}
		}
	})

	t.Run("other routes and methods", func(t *testing.T) {
		u, sk := newUser("kim"), randBytes(32)
		c.mustEnroll(t, http.StatusCreated, u, sk, "1234", 0)
		wantProblem(t, "unknown route", c.do(t, http.MethodGet, "/v1/nothing-here", nil), http.StatusNotFound, "")
		wantProblem(t, "unknown route outside /v1", c.do(t, http.MethodGet, "/v2/backups/"+u, nil), http.StatusNotFound, "")
		wantProblem(t, "GET on recover", c.do(t, http.MethodGet, backupPath(u)+"/recover", nil), http.StatusMethodNotAllowed, "")
		wantProblem(t, "PATCH a backup", c.do(t, http.MethodPatch, backupPath(u), rawBody(`{"pin":"1234"}`)), http.StatusMethodNotAllowed, "")
		wantProblem(t, "POST a backup", c.do(t, http.MethodPost, backupPath(u), rawBody(`{"pin":"1234"}`)), http.StatusMethodNotAllowed, "")
		c.mustRecover(t, u, "1234", sk)
	})

	t.Run("metrics", func(t *testing.T) {
		samples, text := metrics(t, v.Admin)
		route := "/v1/backups/{user_id}/recover"
		for _, code := range []string{"200", "400", "403", "404", "410", "413"} {
			n, ok := metricSum(samples, "keyvault_http_requests_total", map[string]string{"route": route, "method": "POST", "code": code})
			if !ok || n < 1 {
				t.Errorf("keyvault_http_requests_total{route=%q,method=POST,code=%s} = %v (present %v), want >= 1", route, code, n, ok)
			}
		}
		for _, result := range []string{"success", "wrong_pin", "locked", "not_found"} {
			if n, ok := metricSum(samples, "keyvault_recoveries_total", map[string]string{"result": result}); !ok || n < 1 {
				t.Errorf("keyvault_recoveries_total{result=%q} = %v (present %v), want >= 1", result, n, ok)
			}
		}
		if n, _ := metricSum(samples, "keyvault_lockouts_total", nil); n < 2 {
			t.Errorf("keyvault_lockouts_total = %v, want >= 2", n)
		}
		if n, ok := metricSum(samples, "keyvault_integrity_failures_total", nil); !ok || n != 0 {
			t.Errorf("keyvault_integrity_failures_total = %v (present %v), want 0", n, ok)
		}
		for _, u := range users {
			if strings.Contains(text, u) {
				t.Errorf("/metrics holds the raw user_id %q", u)
			}
		}
		// Requests refused before routing (401s) may carry a coarser
		// pattern such as /v1/*; a label must never be a path.
		for _, s := range samples {
			if r, ok := s.labels["route"]; ok && r != "unmatched" && !strings.ContainsAny(r, "{*") {
				t.Errorf("%s has route label %q: a path, not a pattern", s.name, r)
			}
		}
	})

	t.Run("contract-check", func(t *testing.T) {
		script := filepath.Join(moduleRoot, "..", "shared", "contract-check")
		python, err := exec.LookPath("python3")
		if err == nil {
			_, err = os.Stat(script)
		}
		needTool(t, "the contract checker", err)
		cmd := exec.Command(python, script, "--url", v.API, "--token-file", filepath.Join(dir, "token"))
		cmd.Dir = moduleRoot
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Errorf("contract-check: %v\n%s", err, out)
		} else {
			t.Logf("contract-check: %s", bytes.TrimSpace(out))
		}
	})

	// Last: this stops the dev process and serves the same directory with
	// two clients.
	t.Run("namespaces", func(t *testing.T) {
		shared := newUser("shared")
		s1, pin1 := randBytes(32), randPIN("ns1")
		c.mustEnroll(t, http.StatusCreated, shared, s1, pin1, 0)
		v.Stop()

		token2 := "e2e-other-" + strings.ToLower(randID("t"))
		sum := sha256.Sum256([]byte(token2))
		cfg, err := os.ReadFile(filepath.Join(dir, "keyvault.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		text := portZero(t, string(cfg))
		i := strings.Index(text, "\nclients:\n")
		if i < 0 {
			t.Fatalf("no clients section in the dev config:\n%s", cfg)
		}
		text = text[:i] + "\nclients:\n  - name: other\n    namespace: other-ns\n    token_sha256: " + hex.EncodeToString(sum[:]) + "\n" + text[i+len("\nclients:\n"):]
		path := filepath.Join(dir, "two-clients.yaml")
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		sv := startServe(t, dir, path)
		c1, c2 := newClient(t, sv.API, v.Token), newClient(t, sv.API, token2)

		c1.mustRecover(t, shared, pin1, s1) // the dev client still sees its backup
		wantProblem(t, "the other client GETs dev's backup", c2.status(t, shared), http.StatusNotFound, "not_found")
		wantProblem(t, "the other client recovers dev's backup", c2.recover(t, shared, pin1), http.StatusNotFound, "not_found")
		wantProblem(t, "the other client deletes dev's backup", c2.delete(t, shared), http.StatusNotFound, "not_found")
		s2, pin2 := randBytes(32), randPIN("ns2")
		if m := c2.mustEnroll(t, http.StatusCreated, shared, s2, pin2, 5); num(t, m, "generation") < 1 {
			t.Errorf("other's PUT: %v", m)
		}
		c1.mustRecover(t, shared, pin1, s1)
		c2.mustRecover(t, shared, pin2, s2)
		wantProblem(t, "dev's PIN against other's backup", c2.recover(t, shared, pin1), http.StatusForbidden, "wrong_pin")
		if g := c1.mustStatus(t, shared); num(t, g, "attempts_remaining") != 10 {
			t.Errorf("a wrong guess in another namespace counted on dev's backup: %v", g)
		}
		if r := c2.delete(t, shared); r.Status != http.StatusNoContent {
			t.Errorf("other's DELETE: %v", r)
		}
		c1.mustRecover(t, shared, pin1, s1)
		wantProblem(t, "other's backup is gone", c2.status(t, shared), http.StatusNotFound, "not_found")
		sv.Stop()
	})
}

// putFields are the fields of a PUT or PIN change answer (docs/api.md); the
// vault also sends pin_key_version, which wantKeys allows.
var putFields = []string{"user_id", "generation", "max_attempts", "attempts_remaining", "key_version", "created_at", "?pin_key_version"}

// portZero rewrites a config's listen and admin_listen to pick free ports.
func portZero(t testing.TB, cfg string) string {
	t.Helper()
	var out []string
	n := 0
	for _, line := range strings.Split(cfg, "\n") {
		switch {
		case strings.HasPrefix(line, "listen:"):
			line, n = "listen: 127.0.0.1:0", n+1
		case strings.HasPrefix(line, "admin_listen:"):
			line, n = "admin_listen: 127.0.0.1:0", n+1
		}
		out = append(out, line)
	}
	if n != 2 {
		t.Fatalf("config has %d listen lines, want 2:\n%s", n, cfg)
	}
	return strings.Join(out, "\n")
}
