package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestSecretsStayOut runs every endpoint and error path with distinctive
// secrets, PINs and user IDs, then looks for them, in every usual encoding,
// in the process's output, in /metrics and in every answer but the
// successful recoveries (which carry the secret by design).
func TestSecretsStayOut(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	v := startDev(t, dir)
	c := newClient(t, v.API, v.Token)

	var (
		secrets [][]byte // secrets and PINs: never in logs, metrics or answers
		users   []string // never raw in logs or metrics
		answers bytes.Buffer
	)
	secret := func(n int) []byte {
		s := randBytes(n)
		secrets = append(secrets, s)
		return s
	}
	pin := func(prefix string) string {
		p := randPIN(prefix)
		secrets = append(secrets, []byte(p))
		return p
	}
	user := func(prefix string) string {
		u := randID("leak-" + prefix)
		users = append(users, u)
		return u
	}
	// keep records an answer for the search; want checks its status.
	keep := func(what string, r response, want int) response {
		t.Helper()
		if r.Status != want {
			t.Errorf("%s: %v, want %d", what, r, want)
		}
		for k, vs := range r.Header {
			fmt.Fprintf(&answers, "%s: %s\n", k, strings.Join(vs, ", "))
		}
		answers.Write(r.Body)
		answers.WriteByte('\n')
		return r
	}
	// recovered checks a successful recovery, whose body is not searched.
	recovered := func(what string, r response, s []byte) {
		t.Helper()
		if r.Status != http.StatusOK || !bytes.Contains(r.Body, []byte(b64(s))) {
			t.Errorf("%s: %v, want 200 with the secret", what, r)
		}
	}
	put := func(u string, s []byte, p string, max int, hdr ...string) response {
		t.Helper()
		return c.enroll(t, u, s, p, max, hdr...)
	}

	// Enroll, read, recover, guess wrong, replace.
	uA := user("a")
	sA1, pA1 := secret(32), pin("pin-a1")
	keep("PUT new", put(uA, sA1, pA1, 0), http.StatusCreated)
	keep("GET", c.status(t, uA), http.StatusOK)
	recovered("recover", c.recover(t, uA, pA1), sA1)
	keep("recover, wrong PIN", c.recover(t, uA, pin("wrong-a")), http.StatusForbidden)
	keep("PIN change, wrong PIN", c.changePIN(t, uA, pin("wrong-a"), pin("new-a")), http.StatusForbidden)
	// A PIN with JSON escapes and non-ASCII takes the decoder's slow path.
	sA2, pA2 := secret(64), pin("pïn-\"ä\\-é")
	keep("PUT replace", put(uA, sA2, pA2, 7), http.StatusOK)
	recovered("recover after replace", c.recover(t, uA, pA2), sA2)
	keep("recover with the old PIN", c.recover(t, uA, pA1), http.StatusForbidden)

	// Lock out.
	uL := user("l")
	sL, pL := secret(32), pin("pin-l")
	keep("PUT max 2", put(uL, sL, pL, 2), http.StatusCreated)
	keep("wrong 1 of 2", c.recover(t, uL, pin("wrong-l")), http.StatusForbidden)
	keep("wrong 2 of 2", c.recover(t, uL, pin("wrong-l")), http.StatusGone)
	keep("right PIN when locked", c.recover(t, uL, pL), http.StatusGone)
	keep("PIN change when locked", c.changePIN(t, uL, pL, pin("new-l")), http.StatusGone)
	keep("GET locked", c.status(t, uL), http.StatusOK)

	// PIN change and its errors.
	uP := user("p")
	sP, pP, pPnew := secret(32), pin("pin-p"), pin("pin-p-new")
	gen := num(t, keep("PUT", put(uP, sP, pP, 0), http.StatusCreated).JSON(t), "generation")
	keep("PIN change, stale If-Match", c.changePIN(t, uP, pP, pPnew, "If-Match", fmt.Sprintf(`"%d"`, gen+9)), http.StatusPreconditionFailed)
	keep("PIN change, new_pin too long", c.changePIN(t, uP, pP, pin(strings.Repeat("N", 120))), http.StatusBadRequest)
	keep("PIN change, new_pin too short", c.changePIN(t, uP, pP, "x1"), http.StatusBadRequest)
	keep("PIN change", c.changePIN(t, uP, pP, pPnew), http.StatusOK)
	recovered("recover with the new PIN", c.recover(t, uP, pPnew), sP)
	keep("recover with the old PIN", c.recover(t, uP, pP), http.StatusForbidden)

	// Delete and the 404s.
	uD := user("d")
	sD, pD := secret(32), pin("pin-d")
	keep("PUT", put(uD, sD, pD, 0), http.StatusCreated)
	keep("DELETE", c.delete(t, uD), http.StatusNoContent)
	keep("GET deleted", c.status(t, uD), http.StatusNotFound)
	keep("recover deleted", c.recover(t, uD, pD), http.StatusNotFound)
	keep("PIN change deleted", c.changePIN(t, uD, pD, pin("new-d")), http.StatusNotFound)
	keep("DELETE deleted", c.delete(t, uD), http.StatusNotFound)
	keep("recover never enrolled", c.recover(t, user("x"), pin("pin-x")), http.StatusNotFound)

	// Preconditions.
	keep("PUT If-None-Match *", put(uA, secret(32), pin("pin-inm"), 0, "If-None-Match", "*"), http.StatusPreconditionFailed)
	keep("PUT If-Match stale", put(uA, secret(32), pin("pin-im"), 0, "If-Match", `"999"`), http.StatusPreconditionFailed)
	keep("DELETE If-Match stale", c.delete(t, uA, "If-Match", `"999"`), http.StatusPreconditionFailed)

	// Bad requests carrying secrets.
	uN := user("n")
	raw := func(method, path, body string) response {
		t.Helper()
		return c.do(t, method, path, rawBody(body))
	}
	keep("secret of 15 bytes", put(uN, secret(15), pin("pin-n"), 0), http.StatusBadRequest)
	keep("secret of 513 bytes", put(uN, secret(513), pin("pin-n"), 0), http.StatusBadRequest)
	notB64 := pin("not:base64")
	keep("secret not base64", raw(http.MethodPut, backupPath(uN), `{"secret":"`+notB64+`","pin":"1234"}`), http.StatusBadRequest)
	keep("PIN of 129 bytes", put(uN, secret(32), pin(strings.Repeat("P", 116)), 0), http.StatusBadRequest)
	keep("max_attempts 21", put(uN, secret(32), pin("pin-n"), 21), http.StatusBadRequest)
	keep("unknown field", raw(http.MethodPut, backupPath(uN), fmt.Sprintf(`{"secret":%q,"pin":%q,"extra":%q}`, b64(secret(32)), pin("pin-n"), pin("extra"))), http.StatusBadRequest)
	keep("trailing data", raw(http.MethodPut, backupPath(uN), fmt.Sprintf(`{"secret":%q,"pin":%q} %q`, b64(secret(32)), pin("pin-n"), pin("trail"))), http.StatusBadRequest)
	keep("broken JSON", raw(http.MethodPut, backupPath(uN), fmt.Sprintf(`{"secret":%q,"pin":%q`, b64(secret(32)), pin("pin-n"))), http.StatusBadRequest)
	keep("secret of the wrong type", raw(http.MethodPut, backupPath(uN), fmt.Sprintf(`{"secret":[%q],"pin":%q}`, b64(secret(32)), pin("pin-n"))), http.StatusBadRequest)
	bad := "bad!" + strings.ToLower(randID("uid"))
	users = append(users, bad)
	keep("bad user_id", put(bad, secret(32), pin("pin-bad"), 0), http.StatusBadRequest)
	keep("recover, trailing data", raw(http.MethodPost, backupPath(uA)+"/recover", fmt.Sprintf(`{"pin":%q}{"pin":%q}`, pA2, pin("trail"))), http.StatusBadRequest)
	keep("recover, unknown field", raw(http.MethodPost, backupPath(uA)+"/recover", fmt.Sprintf(`{"pin":%q,"pn":%q}`, pA2, pin("typo"))), http.StatusBadRequest)
	keep("recover, PIN of 129 bytes", c.recover(t, uA, pin(strings.Repeat("Q", 116))), http.StatusBadRequest)
	keep("recover, PIN a number", raw(http.MethodPost, backupPath(uA)+"/recover", `{"pin":918273645546372819}`), http.StatusBadRequest)
	secrets = append(secrets, []byte("918273645546372819"))

	// Unauthorized and too large.
	wrongToken := pin("kvdev_WRONGTOKEN")
	keep("PUT, wrong token", c.do(t, http.MethodPut, backupPath(uN), map[string]string{"secret": b64(secret(32)), "pin": pin("pin-401")}, "Authorization", "Bearer "+wrongToken), http.StatusUnauthorized)
	keep("recover, no token", c.do(t, http.MethodPost, backupPath(uA)+"/recover", map[string]string{"pin": pA2}, "Authorization", ""), http.StatusUnauthorized)
	big := fmt.Sprintf(`{"secret":%q,"pin":%q}`, b64(secret(32)), pin("pin-413"))
	keep("PUT over 64 KiB", raw(http.MethodPut, backupPath(uN), big+strings.Repeat(" ", 70000)), http.StatusRequestEntityTooLarge)
	keep("recover over 64 KiB, chunked", c.do(t, http.MethodPost, backupPath(uA)+"/recover", strings.NewReader(fmt.Sprintf(`{"pin":%q}`, pA2)+strings.Repeat(" ", 70000))), http.StatusRequestEntityTooLarge)

	recovered("the backup still works", c.recover(t, uA, pA2), sA2)
	_, text := metrics(t, v.Admin)
	v.Stop()
	logs := v.Logs()

	hsmPIN, err := os.ReadFile(filepath.Join(dir, "hsm-pin"))
	if err != nil {
		t.Fatal(err)
	}
	secrets = append(secrets, bytes.TrimSpace(hsmPIN), []byte(wrongToken))
	places := []struct {
		name string
		text []byte
	}{
		{"the process's stdout and stderr", logs},
		{"/metrics", []byte(text)},
		{"the answers", answers.Bytes()},
	}
	for _, s := range secrets {
		needles := [][]byte{s}
		if js, _ := json.Marshal(string(s)); !bytes.Equal(js[1:len(js)-1], s) {
			needles = append(needles, js[1:len(js)-1]) // as a JSON string holds it
		}
		for _, p := range places {
			for _, n := range needles {
				if enc := findEncoded(p.text, n); enc != "" {
					t.Errorf("%s hold the secret or PIN %q (%s)", p.name, s, enc)
				}
			}
		}
	}
	// The bearer token is printed by `keyvault dev` on purpose, but belongs
	// nowhere else.
	for _, p := range places[1:] {
		if bytes.Contains(p.text, []byte(v.Token)) {
			t.Errorf("%s hold the bearer token", p.name)
		}
	}
	for _, u := range users {
		for _, p := range places[:2] {
			if bytes.Contains(p.text, []byte(u)) {
				t.Errorf("%s hold the raw user_id %q", p.name, u)
			}
		}
	}
	if t.Failed() {
		t.Logf("the process's output:\n%s", logs)
	}
}
