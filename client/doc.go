// Package client is the Go client of the keyvault REST API (v1), for the
// messaging backends that store their users' history keys in the vault
// under a PIN. It uses the standard library only.
//
//	c, err := client.New("https://keyvault.internal:8443", token, client.WithMaxWait(2*time.Second))
//	b, created, err := c.Enroll(ctx, userID, historyKey, pin, client.IfNoneMatch())
//	key, left, err := c.Recover(ctx, userID, pin)
//	switch {
//	case errors.Is(err, client.ErrWrongPIN): // counted; left attempts remain (also in *client.Error)
//	case errors.Is(err, client.ErrLocked):   // the key is destroyed; enroll again
//	}
//	b, err = c.ChangePIN(ctx, userID, pin, newPIN, client.IfMatch(b.Generation))
//
// # Options
//
// Every option is a function argument after the required ones: New takes
// Options (WithRetry, WithMaxWait, ...), and each write takes its own,
// typed so that the compiler refuses one the call has no use for: Enroll
// takes IfMatch, IfNoneMatch and MaxAttempts; ChangePIN and Delete take
// IfMatch. With none, a write has no precondition and Enroll uses the
// vault's default max_attempts. Recover and Status take none.
//
// The types follow the API's OpenAPI document (api/openapi.yaml):
// Backup is its BackupStatus, Generation an int64, and an Error carries
// every member of its Problem.
//
// # Errors
//
// Every answer of the vault other than success is an *Error, which matches
// one sentinel (ErrWrongPIN, ErrLocked, ErrNotFound, ErrPrecondition,
// ErrRateLimited, ErrUnavailable, ErrIntegrity, ErrUnauthorized,
// ErrInvalid, ErrTooLarge, ErrInternal) by its problem code with
// errors.Is, and carries the status, code, type, texts, request ID,
// AttemptsRemaining (wrong PIN) and RetryAfter for errors.As. A call the
// client refuses to send (a user_id outside [A-Za-z0-9._~:@-]{1,128}, a PIN
// that is not UTF-8, IfMatch below 1, IfMatch with IfNoneMatch) is an
// *Error with Status 0 matching ErrInvalid. Any
// other error is a failure in transit (or the context's), and then, for a
// write or a guess, the vault may or may not have acted on the request:
// the error text says so. No error text holds a PIN, a secret, the bearer
// token or a user_id.
//
// # Retries
//
// A call is retried at most WithRetry's max times (default 2), after a
// backoff that starts at its baseDelay, doubles, honours Retry-After (the
// wait is never shorter), adds up to 25% jitter, and stops at the
// context's deadline. A Retry-After above WithMaxWait (default 5 s) is not
// slept on: the *Error comes back with RetryAfter set, to schedule or show
// to the user. One call keeps one X-Request-Id across its attempts.
//
// Whether a failure is retried depends on what a repeat could do. The rule
// protects the guess budget first: a guess whose answer was lost after
// sending is never sent again, because the vault has most likely counted
// and checked it, and a repeat of a wrong PIN would be counted twice. A
// guess is repeated after an answer only when the vault said that it told
// no outcome (503 unavailable), which but for rare cases means nothing
// stays counted; the repeat is counted like any guess, so it costs the user
// at most one attempt more than one send would, and never checks a PIN
// uncounted.
//
//	                                   Status,           Enroll without a  Recover,
//	                                   Enroll with       precondition,     ChangePIN
//	                                   IfMatch or        Delete without
//	                                   IfNoneMatch,      IfMatch
//	                                   Delete with
//	                                   IfMatch
//	the vault's 429 rate_limited       retry             retry             retry
//	the vault's 503 unavailable        retry             retry             retry
//	could not connect (dial error)     retry             retry             retry
//	lost after sending (reset, EOF,    retry             no                no
//	  timeout, unreadable answer)
//	429, 502, 503, 504 that is not     retry             no                no
//	  a keyvault problem document
//	anything else                      no                no                no
//
// Why:
//
//   - The vault answers 429 rate_limited before checking or counting
//     anything. So any call may be repeated.
//   - The vault answers 503 unavailable when it tells no outcome. A guess
//     was then refused before counting, refunded after the HSMs gave no
//     result, or had its count taken away while the HSM checked it (a later
//     success forgave it, or its backup was replaced or deleted) and could
//     not be counted again; a repeat is a new guess, counted before its
//     outcome is told, so it never lets a PIN be checked uncounted. In rare
//     cases the first guess stays counted: a refund the store could not
//     write, a count whose write the store could neither confirm nor deny,
//     and a backup replaced by a concurrent PIN change, which carries the
//     guesses counted while it ran onto the new generation. There the
//     repeat counts one guess more than one send would, never fewer; a
//     repeated ChangePIN with IfMatch finds the replaced generation and
//     answers 412, counting nothing. A write answered 503 was usually not
//     made, but one the store could neither confirm nor deny may have been,
//     so the answers after it have Error.Uncertain set, as below. A write
//     without a precondition is repeated all the same: what a repeat could
//     do (replace whatever backup is there) is what it asked for, and
//     shedding under load, which a repeat rides out, is the common 503.
//   - A failure to connect means the request never left.
//   - After the request was sent, a lost answer is ambiguous: the vault may
//     have counted the guess, written the backup, or deleted it. A recover
//     or PIN change is never repeated then, not even with If-Match: that
//     makes a repeat of a successful PIN change harmless (412), but a repeat
//     of a wrong one would burn a second attempt. A write is repeated only
//     when its precondition makes a second application impossible: a PUT
//     with If-None-Match or If-Match, or a DELETE with If-Match, applied
//     once, fails its precondition (412) or finds nothing (404) the second
//     time. Without one, a repeat could overwrite or delete a backup that
//     another device wrote in between (and a repeated PUT resets the guess
//     counter). The answer that follows such a repeat has Error.Uncertain
//     set: a 412 or 404 may be this call's own earlier success, so read the
//     backup with Status before telling the user it failed.
//   - A 502, 504, or a 503 or 429 that is not the vault's problem document
//     comes from something in between (a proxy, a load balancer), which
//     may have forwarded the request before failing; it is treated as lost
//     after sending.
//
// # Secrets
//
// PIN and secret go only into request bodies the client builds by hand and
// wipes (clear) as soon as the transport is done with them; a recovered
// secret is decoded from the response into one slice, which the caller
// owns and should wipe, and the response buffer is wiped. Strings (the
// PIN parameters) and the transport's own buffers cannot be wiped. The
// vault compares PIN bytes exactly: normalise PINs to NFC first (for
// example with golang.org/x/text/unicode/norm).
//
// The client refuses plain http:// except to loopback (see
// WithInsecurePlaintext), never follows redirects, and names itself
// without its token when printed.
//
// A holder of the bearer token can replace any backup of its namespace
// without the PIN (docs/api.md, "The guess budget"), so check a recovered key, for
// example against the user's message history, before trusting it.
package client
