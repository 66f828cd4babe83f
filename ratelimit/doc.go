// Package ratelimit holds keyvault's rate limits: token buckets, from
// golang.org/x/time/rate, in front of the vault. They slow a caller down long
// before the durable guess budget of package vault (max_attempts, and the
// escalating delay kept in the record) has to stop it. That budget is the
// guarantee; these limits are a speed bump, kept in memory and per process.
//
// # The limiters
//
// Three limiters are token buckets (Rate: tokens a second, and a burst); a
// rate of 0 turns one off. The defaults are the config package's.
//
//   - guesses_per_user (Config.GuessesPerUser, default 5 a minute, burst 5):
//     PIN guesses, recover and PIN change, of one user, keyed by namespace and
//     user_id (length-prefixed, so no two pairs share a bucket). Whichever
//     client asks, a user has one bucket.
//   - requests_per_client (default 500 a second, burst 1000): every /v1
//     request of one client, keyed by client name.
//   - wrong_guesses_per_client (default 600 a minute, burst 600): the wrong
//     guesses one client may cause across all its users. A token holder can
//     spend any user's guesses knowing only the user_id; spread over many
//     users, the per-user limit does not slow it, this does.
//
// The fourth is a cap on concurrency, not a rate:
//
//   - hsm_share_per_client (Config.HSMSharePerClientPercent, default 50):
//     the percentage of the HSM admission capacity (Options.HSMCapacity, which
//     follows the members in service) that one client's requests may hold
//     at once, rounded down and at least 1. Without it, one client's flood
//     takes every place in the admission and the other clients' requests
//     are shed; with it, they keep the rest. HoldHSM takes a place and
//     returns its release; the API asks it just before the HSM admission,
//     and only when two or more clients are configured.
//
// # Use
//
// Request runs for every /v1 request. ReserveGuess runs before the vault checks a
// PIN: it takes a token from the user's bucket and checks, without taking,
// that the client's wrong-guess bucket holds one. When the vault then has
// checked the PIN and found it wrong (a wrong_pin answer, or the locked
// answer of the guess that used the last attempt, not the locked answers
// after it), the caller calls WrongGuess, which charges the client's bucket:
//
//	undo, err := limits.ReserveGuess(client.Name, client.Namespace, userID)
//	if err != nil {
//		return err // 429 rate_limited, Retry-After: RetryAfterSeconds()
//	}
//	// undo() gives the user's token back if the guess then checks nothing.
//	secret, remaining, err := v.Recover(ctx, client.Namespace, userID, pin)
//	if errors.Is(err, vault.ErrWrongPIN) { // or the guess that locked it
//		limits.WrongGuess(client.Name)
//	}
//
// Guesses admitted together may all pass the check before any is charged,
// so the wrong-guess bucket can go into debt; the debt is real, and the
// client's guesses are refused until the bucket has refilled to a token.
//
// # Refusals
//
// A refusal is an *Error, and errors.Is(err, ErrLimited) holds for it. It
// names the limiter and the wait until a retry can succeed. A refused call
// takes nothing from any bucket: a refused guess is neither checked nor
// counted, and costs the user nothing. The wait is computed in the limiter's
// own arithmetic, so a retry exactly RetryAfter later is admitted (unless
// another request took the token first); RetryAfterSeconds rounds it up to
// whole seconds for the Retry-After header. For ReserveGuess it is the wait until
// both buckets have a token, and Limiter names the one that waits longer.
//
// # Memory
//
// A client's state is two buckets and a count of HSM places, made on first
// use and kept; clients are the configured few, so the name passed to
// Request, ReserveGuess, WrongGuess and HoldHSM must be a configured client's,
// never caller-chosen text.
//
// Per-user states are bounded by Options.MaxKeys (default 65,536). They are
// spread by hash over 16 shards, each with its own lock and two generations,
// current and previous, of at most MaxKeys/32 states each: never more than
// MaxKeys states in all. A lookup checks the current generation, then the
// previous one, moving a state it finds there into the current one. A state
// is made only when a guess takes a token; a user without one has a full
// bucket. A shard rotates (drops the previous generation, and the current
// becomes the previous) when its current generation is full, and when the
// idle period has passed since its last rotation. The idle period is the
// time a bucket takes to refill from empty to full, Burst/PerSecond (at least
// a second; a minute with the defaults). A state dropped because it was idle
// that long was a full bucket, so dropping it loses nothing; a user who
// keeps guessing keeps their state across rotations. Keys (and the gauge
// keyvault_ratelimit_user_states) drops the idle states before counting.
//
// A state costs, measured on amd64 with Go 1.26 (TestBytesPerState,
// TestMemoryBound): about 160 bytes with a typical key (a 9-byte namespace
// and a 36-byte UUID) and 320 with the longest valid key (64 and 128 bytes);
// with the slack of half-full maps under a flood, about 180 and 340. With
// the default MaxKeys that is at most about 12 MB for typical keys and 22 MB
// for the longest, plus the garbage of dropped generations until the
// garbage collector runs.
//
// # Caveats
//
//   - A flood of distinct keys (more than MaxKeys/2 new users within an idle
//     period) fills the current generations early, and a rotation then drops
//     states still in use: those users' buckets are reset to full. The memory
//     bound is worth that. The durable guess budget in the store still holds
//     every guess to max_attempts and the escalating delay; this limiter is
//     a speed bump, not the guarantee.
//   - The buckets live in one process. Several vault processes behind one
//     address each have their own, so a caller spread over n of them gets n
//     times the rates; the durable budget is shared through the store.
//   - Metrics: keyvault_ratelimit_rejections_total{limiter} counts refusals,
//     with limiter one of the names above or escalating_delay (every series
//     exists from the start); keyvault_ratelimit_user_states is the number
//     of per-user states.
//     No label ever holds a user, a namespace or a client.
package ratelimit
