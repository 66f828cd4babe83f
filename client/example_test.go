package client_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"net/http/httptest"

	"github.com/keyvault/keyvault/client"
)

// Enroll a history key under a PIN, recover it, and handle wrong PINs up to
// the lockout. The vault here is an in-memory stand-in; in production pass
// the vault's https:// URL and the client's bearer token.
func Example() {
	vault := httptest.NewServer(newFakeVault("kvdev_EXAMPLETOKEN"))
	defer vault.Close()
	ctx := context.Background()

	c, err := client.New(vault.URL, "kvdev_EXAMPLETOKEN")
	if err != nil {
		log.Fatal(err)
	}

	// Enroll: IfNoneMatch refuses to overwrite another device's backup, and
	// makes the call safe to retry.
	historyKey := bytes.Repeat([]byte{0x42}, 32)
	b, created, err := c.Enroll(ctx, "alice", historyKey, "2468", client.MaxAttempts(3), client.IfNoneMatch())
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("enrolled:", created, "generation", b.Generation, "attempts", b.AttemptsRemaining)

	// Recover on a new device. Each guess is counted before it is answered.
	guess := func(pin string) {
		key, left, err := c.Recover(ctx, "alice", pin)
		var e *client.Error
		switch {
		case err == nil:
			defer clear(key) // wipe the key when done with it
			fmt.Println("recovered:", bytes.Equal(key, historyKey), "attempts reset to", left)
		case errors.Is(err, client.ErrWrongPIN):
			fmt.Println("wrong PIN, attempts left:", left)
		case errors.Is(err, client.ErrLocked):
			fmt.Println("locked: the history key is destroyed; enroll a new one")
		case errors.Is(err, client.ErrRateLimited) && errors.As(err, &e):
			fmt.Println("too many guesses: try again in", e.RetryAfter)
		case errors.Is(err, client.ErrNotFound):
			fmt.Println("no backup for this user")
		default:
			// Unavailable after retries, or lost in transit: the guess may
			// have been counted; Status shows the attempts left.
			fmt.Println("try again later:", err)
		}
	}
	guess("1357")
	guess("2468")
	guess("0000")
	guess("1111")
	guess("2222")

	st, err := c.Status(ctx, "alice")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("status: locked", st.Locked)

	// Output:
	// enrolled: true generation 1 attempts 3
	// wrong PIN, attempts left: 2
	// recovered: true attempts reset to 3
	// wrong PIN, attempts left: 2
	// wrong PIN, attempts left: 1
	// locked: the history key is destroyed; enroll a new one
	// status: locked true
}
