package e2e

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	kvclient "github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestClient drives the Go client package against the real binary: every
// method through its success path and each typed error (wrong PIN with
// the attempts left, locked, not found, precondition, invalid,
// unauthorized, rate limited), with generations and counters checked
// through Status.
func TestClient(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()

	t.Run("rate limited", func(t *testing.T) {
		t.Parallel()
		v := startDevLimited(t, t.TempDir())
		c := newKVClient(t, v.API, v.Token)
		ctx := t.Context()
		user, pin := randID("cl-limited"), randPIN("cl-limited")
		if _, _, err := c.Enroll(ctx, user, randBytes(32), pin, kvclient.MaxAttempts(10)); err != nil {
			t.Fatal(err)
		}
		// Burst 5 per user: five wrong guesses are checked, the sixth is
		// refused with a Retry-After (12 s, or the escalating delay's 60 s)
		// above the client's 5 s maximum wait, so it comes back at once.
		for i := range 5 {
			_, left, err := c.Recover(ctx, user, "wrong-"+pin)
			wantKVErr(t, "wrong guess", err, kvclient.ErrWrongPIN, 403)
			if left != 9-i {
				t.Fatalf("guess %d: %d attempts left, want %d", i+1, left, 9-i)
			}
		}
		start := time.Now()
		_, _, err := c.Recover(ctx, user, pin)
		e := wantKVErr(t, "sixth guess", err, kvclient.ErrRateLimited, 429)
		if e.RetryAfter < time.Second || e.RetryAfter > time.Minute {
			t.Errorf("RetryAfter %v, want 1s to 1m", e.RetryAfter)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("the refused guess took %v: the client slept on a long Retry-After", d)
		}
		if b, err := c.Status(ctx, user); err != nil || b.AttemptsRemaining != 5 {
			t.Fatalf("Status after the refusal: %+v, %v; want 5 attempts left", b, err)
		}
		v.Stop()
	})

	v := startDev(t, t.TempDir())
	c := newKVClient(t, v.API, v.Token)
	ctx := t.Context()
	user, pin, secret := randID("client"), randPIN("client"), randBytes(32)
	wrong := randPIN("wrong")

	// Not there yet.
	_, err := c.Status(ctx, user)
	if e := wantKVErr(t, "Status before Enroll", err, kvclient.ErrNotFound, 404); e.RequestID == "" {
		t.Errorf("no request ID in %v", e)
	}
	_, _, err = c.Recover(ctx, user, pin)
	wantKVErr(t, "Recover before Enroll", err, kvclient.ErrNotFound, 404)

	// Enroll, only if new.
	before := time.Now()
	b, created, err := c.Enroll(ctx, user, secret, pin, kvclient.MaxAttempts(3), kvclient.IfNoneMatch())
	if err != nil || !created {
		t.Fatalf("Enroll: %v, created %v", err, created)
	}
	if b.UserID != user || b.Generation < 1 || b.MaxAttempts != 3 || b.AttemptsRemaining != 3 || b.Locked ||
		b.KeyVersion < 1 || b.PINKeyVersion < 1 || b.CreatedAt.Before(before.Add(-time.Second)) || b.CreatedAt.After(time.Now().Add(time.Second)) {
		t.Fatalf("Enroll: %+v", b)
	}
	g1 := b.Generation
	_, _, err = c.Enroll(ctx, user, randBytes(32), pin, kvclient.IfNoneMatch())
	wantKVErr(t, "Enroll If-None-Match over a backup", err, kvclient.ErrPrecondition, 412)

	st, err := c.Status(ctx, user)
	if err != nil || st.Generation != g1 || st.AttemptsRemaining != 3 || st.Locked || st.UpdatedAt.Before(st.CreatedAt) || !st.CreatedAt.Equal(b.CreatedAt) {
		t.Fatalf("Status: %+v, %v; Enroll said %+v", st, err, b)
	}

	// Recover: right, then wrong (counted, with the attempts left).
	got, left, err := c.Recover(ctx, user, pin)
	if err != nil || !bytes.Equal(got, secret) || left != 3 {
		t.Fatalf("Recover: %v, %d attempts, same secret %v", err, left, bytes.Equal(got, secret))
	}
	_, left, err = c.Recover(ctx, user, wrong)
	e := wantKVErr(t, "wrong PIN", err, kvclient.ErrWrongPIN, 403)
	if left != 2 || e.AttemptsRemaining != 2 {
		t.Fatalf("wrong PIN: %d and %d attempts left, want 2", left, e.AttemptsRemaining)
	}
	for _, s := range []string{wrong, pin, user, v.Token} {
		if strings.Contains(err.Error(), s) {
			t.Errorf("error %q quotes a request value", err)
		}
	}

	// Change the PIN: a stale generation counts nothing; a wrong old PIN
	// counts; the right one resets the counter in a new generation.
	_, err = c.ChangePIN(ctx, user, pin, "new-"+pin, kvclient.IfMatch(g1+100))
	wantKVErr(t, "ChangePIN with a stale If-Match", err, kvclient.ErrPrecondition, 412)
	_, err = c.ChangePIN(ctx, user, pin, "1", kvclient.IfMatch(g1))
	wantKVErr(t, "ChangePIN to a too short PIN", err, kvclient.ErrInvalid, 400)
	if st, err := c.Status(ctx, user); err != nil || st.AttemptsRemaining != 2 {
		t.Fatalf("after a 412 and a 400: %+v, %v; want 2 attempts left (nothing counted)", st, err)
	}
	_, err = c.ChangePIN(ctx, user, wrong, "new-"+pin, kvclient.IfMatch(g1))
	if e := wantKVErr(t, "ChangePIN with a wrong PIN", err, kvclient.ErrWrongPIN, 403); e.AttemptsRemaining != 1 {
		t.Fatalf("ChangePIN with a wrong PIN: %d attempts left, want 1", e.AttemptsRemaining)
	}
	newPIN := "new-" + pin
	b, err = c.ChangePIN(ctx, user, pin, newPIN, kvclient.IfMatch(g1))
	if err != nil || b.Generation <= g1 || b.AttemptsRemaining != 3 || b.MaxAttempts != 3 {
		t.Fatalf("ChangePIN: %+v, %v", b, err)
	}
	g2 := b.Generation
	_, _, err = c.Recover(ctx, user, pin)
	wantKVErr(t, "Recover with the old PIN", err, kvclient.ErrWrongPIN, 403)
	if got, _, err := c.Recover(ctx, user, newPIN); err != nil || !bytes.Equal(got, secret) {
		t.Fatalf("Recover with the new PIN: %v", err)
	}

	// Replace, only over the generation we know.
	secret2 := randBytes(48)
	_, _, err = c.Enroll(ctx, user, secret2, pin, kvclient.IfMatch(g1))
	wantKVErr(t, "Enroll If-Match stale", err, kvclient.ErrPrecondition, 412)
	b, created, err = c.Enroll(ctx, user, secret2, pin, kvclient.IfMatch(g2), kvclient.MaxAttempts(3))
	if err != nil || created || b.Generation <= g2 {
		t.Fatalf("Enroll If-Match: %+v, created %v, %v", b, created, err)
	}
	g3 := b.Generation

	// Lock it: 403 with 2, 403 with 1, then 410.
	for _, want := range []int{2, 1} {
		_, left, err := c.Recover(ctx, user, wrong)
		wantKVErr(t, "wrong PIN", err, kvclient.ErrWrongPIN, 403)
		if left != want {
			t.Fatalf("%d attempts left, want %d", left, want)
		}
	}
	_, left, err = c.Recover(ctx, user, wrong)
	wantKVErr(t, "the last wrong PIN", err, kvclient.ErrLocked, 410)
	if left != 0 {
		t.Errorf("locked: %d attempts left", left)
	}
	_, _, err = c.Recover(ctx, user, pin)
	wantKVErr(t, "the right PIN after the lock", err, kvclient.ErrLocked, 410)
	_, err = c.ChangePIN(ctx, user, pin, newPIN)
	wantKVErr(t, "ChangePIN after the lock", err, kvclient.ErrLocked, 410)
	if st, err := c.Status(ctx, user); err != nil || !st.Locked || st.AttemptsRemaining != 0 || st.Generation != g3 {
		t.Fatalf("Status locked: %+v, %v", st, err)
	}

	// Delete: only the generation we know, then gone.
	wantKVErr(t, "Delete stale", c.Delete(ctx, user, kvclient.IfMatch(g2)), kvclient.ErrPrecondition, 412)
	if err := c.Delete(ctx, user, kvclient.IfMatch(g3)); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	_, err = c.Status(ctx, user)
	wantKVErr(t, "Status after Delete", err, kvclient.ErrNotFound, 404)
	_, _, err = c.Recover(ctx, user, pin)
	wantKVErr(t, "Recover after Delete", err, kvclient.ErrNotFound, 404)
	_, err = c.ChangePIN(ctx, user, pin, newPIN)
	wantKVErr(t, "ChangePIN after Delete", err, kvclient.ErrNotFound, 404)
	wantKVErr(t, "Delete again", c.Delete(ctx, user), kvclient.ErrNotFound, 404)

	// Enroll again: a new, higher generation (the tombstone keeps it).
	b, created, err = c.Enroll(ctx, user, secret, pin)
	if err != nil || !created || b.Generation <= g3 || b.AttemptsRemaining != 10 {
		t.Fatalf("Enroll after Delete: %+v, created %v, %v; want a generation above %d and the default 10 attempts", b, created, err, g3)
	}
	if err := c.Delete(ctx, user); err != nil {
		t.Fatalf("blind Delete: %v", err)
	}

	// Invalid requests, refused by the vault or by the client.
	_, _, err = c.Enroll(ctx, user, randBytes(8), pin)
	wantKVErr(t, "an 8-byte secret", err, kvclient.ErrInvalid, 400)
	_, _, err = c.Enroll(ctx, user, secret, pin, kvclient.MaxAttempts(1000))
	wantKVErr(t, "max_attempts 1000", err, kvclient.ErrInvalid, 400)
	_, _, err = c.Recover(ctx, user, "12")
	wantKVErr(t, "a 2-byte PIN", err, kvclient.ErrInvalid, 400)
	_, err = c.Status(ctx, "no/slash")
	wantKVErr(t, "a user_id with a slash", err, kvclient.ErrInvalid, 0)

	// The caller's request ID reaches the vault and comes back.
	_, err = c.Status(kvclient.ContextWithRequestID(ctx, "e2e-client.42"), user)
	if e := wantKVErr(t, "Status with a request ID", err, kvclient.ErrNotFound, 404); e.RequestID != "e2e-client.42" {
		t.Errorf("request ID %q, want e2e-client.42", e.RequestID)
	}

	// Another token is refused.
	bad := newKVClient(t, v.API, "kvdev_NOTATOKEN")
	_, err = bad.Status(ctx, user)
	wantKVErr(t, "an unknown token", err, kvclient.ErrUnauthorized, 401)

	v.Stop()
	for _, s := range [][]byte{secret, secret2, []byte(pin), []byte(newPIN), []byte(wrong)} {
		if enc := findEncoded(v.Logs(), s); enc != "" {
			t.Errorf("the vault's logs hold a PIN or secret (%s)", enc)
		}
	}
}

func newKVClient(t *testing.T, api, token string) *kvclient.Client {
	t.Helper()
	c, err := kvclient.New(api, token)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// wantKVErr requires a *kvclient.Error matching sentinel with this status
// (0: refused by the client) and returns it.
func wantKVErr(t *testing.T, what string, err, sentinel error, status int) *kvclient.Error {
	t.Helper()
	var e *kvclient.Error
	if !errors.As(err, &e) {
		t.Fatalf("%s: %v (%T), want a *client.Error matching %v", what, err, err, sentinel)
	}
	if !errors.Is(err, sentinel) || e.Status != status {
		t.Fatalf("%s: %v (status %d), want %v with status %d", what, err, e.Status, sentinel, status)
	}
	return e
}
