package vault

// The guess budget: its configuration (Budget), the refusals a guess gets
// before anything is counted (refusal, Precheck), and the steps of a
// counted guess (count, then forgive, refund or settle).

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Budget is the guess budget of every backup: the attempts an enrollment
// may give it, and the escalating delay between wrong guesses. The zero
// value of each field has the documented default.
type Budget struct {
	// DefaultMaxAttempts applies when an enrollment names none (default 10).
	DefaultMaxAttempts int
	// MaxAttemptsLimit is the largest max_attempts a client may ask for
	// (default 20).
	MaxAttemptsLimit int
	// EscalatingDelay, when Base is non-zero, makes a guess wait after
	// FreeGuesses attempts used in a row: Base * 2^(k-FreeGuesses) after the
	// record's last write, k being the attempts used. It lives in the
	// record, so it holds across processes and restarts. Default off.
	EscalatingDelay EscalatingDelay
}

// withDefaults returns b with the defaults of its zero fields, or an error
// if its attempts do not fit together.
func (b Budget) withDefaults() (Budget, error) {
	if b.DefaultMaxAttempts == 0 {
		b.DefaultMaxAttempts = 10
	}
	if b.MaxAttemptsLimit == 0 {
		b.MaxAttemptsLimit = 20
	}
	if b.DefaultMaxAttempts < 1 || b.DefaultMaxAttempts > b.MaxAttemptsLimit {
		return b, fmt.Errorf("default max attempts %d outside 1..%d", b.DefaultMaxAttempts, b.MaxAttemptsLimit)
	}
	return b, nil
}

// maxAttempts is the max_attempts of an enrollment that asks for n (0: the
// default), or ErrInvalid.
func (b Budget) maxAttempts(n int) (int, error) {
	if n == 0 {
		n = b.DefaultMaxAttempts
	}
	if n < 1 || n > b.MaxAttemptsLimit {
		return 0, invalid("max_attempts", fmt.Sprintf("must be from 1 to %d", b.MaxAttemptsLimit))
	}
	return n, nil
}

// used is the attempts a record has used in its current period: every
// guess counted, less those a success forgave and those refunded.
func (r *record) used() uint32 { return r.Guesses - r.Forgiven - r.Refunds }

// remaining is the attempts a record has left; none once locked.
func (r *record) remaining() int {
	if r.Locked {
		return 0
	}
	return int(r.MaxAttempts - r.used())
}

// EscalatingDelay configures the durable delay between wrong guesses.
type EscalatingDelay struct {
	FreeGuesses int
	Base        time.Duration
}

// maxDelay caps one escalating delay, and keeps its arithmetic from
// overflowing.
const maxDelay = 30 * 24 * time.Hour

// wait returns how long a guess on r must still wait at now: from the
// latest counted guess (a refund or a reset does not restart it).
func (d EscalatingDelay) wait(r *record, now int64) time.Duration {
	k := int(r.used())
	if d.Base <= 0 || k == 0 || k < d.FreeGuesses {
		return 0
	}
	delay := min(d.Base, maxDelay)
	for range min(k-d.FreeGuesses, 32) {
		if delay = 2 * delay; delay >= maxDelay {
			delay = maxDelay
			break
		}
	}
	return time.Duration(max(r.LastGuessAt+int64(delay)-now, 0))
}

// refusal is the answer a guess on cur gets before anything is counted or
// checked, or nil if it may be counted: ErrNotFound, ErrPrecondition,
// ErrLocked (errPendingLock while the lock settles), or a *DelayedError.
// count decides by it in the write that counts; Precheck ahead of it.
func (v *Vault) refusal(cur *stored, pre Precondition) error {
	if cur == nil || cur.Tombstone {
		return ErrNotFound
	}
	// A failed precondition is decided before anything is counted.
	if err := pre.check(cur); err != nil {
		return err
	}
	if cur.Locked {
		return v.lockedOrPending(cur)
	}
	if wait := v.opts.Budget.EscalatingDelay.wait(&cur.record, v.now()); wait > 0 {
		return &DelayedError{RetryAfter: wait}
	}
	return nil
}

// Precheck tells, without counting or checking anything, whether a guess
// on the backup would be refused now: ErrNotFound, ErrPrecondition,
// ErrLocked, or a *DelayedError for the escalating delay. It first waits
// for a pending lock to settle. Callers use it to refuse cheaply, before
// spending rate-limit tokens or HSM capacity on a guess; the guess itself
// decides again when it is counted.
func (v *Vault) Precheck(ctx context.Context, ns, userID string, pre Precondition) error {
	if err := checkTarget(ns, userID); err != nil {
		return err
	}
	key := recordKey(ns, userID)
	return v.waitSettled(ctx, func() error {
		cur, err := v.read(ctx, key)
		if err != nil {
			return err
		}
		return v.refusal(cur, pre)
	})
}

// lockSettleWindow bounds how long a lock may stay pending. The guess that
// uses the last attempt removes the secret when it is counted, before its
// outcome is known: if it turns out right, or the HSM gives no answer, it
// puts the secret back. Until it settles, the lock is pending, and other
// guesses wait rather than answer 410, so that every 410 stays true. A lock
// still pending after the window (its request died with its process) is
// final. The guess that made it may undo it only within half the window, so
// clocks of processes sharing a store may differ by up to a quarter of it.
const lockSettleWindow = 20 * time.Second

// errPendingLock: another request's last-attempt guess has not settled yet.
var errPendingLock = errors.New("a concurrent last-attempt guess has not settled")

// errUntold answers a guess whose count was taken away before its check
// ended, by a later success that forgave it or by its generation being
// replaced, when it cannot be counted again: the period since that success
// has used every attempt, or the generation is gone. Telling its outcome
// would reveal a PIN check counted nowhere, so neither a right nor a wrong
// outcome is told: the answer is the one of a guess the HSM never answered.
var errUntold = fmt.Errorf("%w: the backup changed while this guess was checked; its outcome is not told", ErrUnavailable)

// erased reports whether a later success has forgiven g on cur: g is no
// longer counted in the current period.
func (g *guess) erased(cur *stored) bool { return g.index <= cur.Forgiven }

// guess is one counted guess: the record as it was before counting (with
// its sealed secret), the guess's index, whether counting it locked the
// backup, and when (monotonic).
type guess struct {
	key       []byte
	before    record
	index     uint32
	locked    bool
	countedAt time.Time
}

// sameGeneration reports whether cur still holds the generation g counted in.
func (g *guess) sameGeneration(cur *stored) bool {
	return cur != nil && !cur.Tombstone && cur.Generation == g.before.Generation
}

// mayUnlock reports whether g, the guess that locked cur, may still put the
// secret back: the lock is still pending, and young enough that nobody has
// taken it for final.
func (g *guess) mayUnlock(cur *stored) bool {
	return cur.Locked && !cur.LockFinal && cur.Guesses == g.index && time.Now().Before(g.undoBy())
}

// undoBy is when g stops being allowed to undo the lock it made.
func (g *guess) undoBy() time.Time { return g.countedAt.Add(lockSettleWindow / 2) }

// unlock puts back on next the secret g removed from cur, within the time
// g may: the write is not sent again once g.undoBy has passed.
func (g *guess) unlock(next *record) {
	next.Locked, next.Sealed, next.undoBy = false, g.before.Sealed, g.undoBy()
}

// undoMargin is kept between the end of a locking guess's HSM work and the
// end of its time to undo the lock (mayUnlock), for the write that undoes it.
const undoMargin = 2 * time.Second

// hsmContext bounds the HSM work g does before it settles. A guess that
// locked the backup can undo its lock only for a while (mayUnlock): its
// work must end before then, so that an HSM that stalls or fails over
// slowly gets the guess refunded (503), not the backup destroyed with its
// PIN unchecked. A guess whose counting write itself took until then can
// undo nothing whatever it does: its work is not bounded, so that a right
// PIN still gets its secret, as when its lock turns final under it.
func (g *guess) hsmContext(ctx context.Context) (context.Context, context.CancelFunc) {
	undo := g.undoBy()
	if !g.locked || !time.Now().Before(undo) {
		return ctx, func() {}
	}
	return context.WithDeadline(ctx, undo.Add(-undoMargin))
}

// countedSince is how many guesses counted on cur after g stay counted, an
// upper bound when refunds blur which guess was refunded.
func (g *guess) countedSince(cur *stored) uint32 {
	if cur.Forgiven >= g.index {
		return cur.used()
	}
	return min(cur.Guesses-g.index, cur.used())
}

// lockedOrPending tells a final lock (ErrLocked) from one whose guess is
// still in flight (errPendingLock).
func (v *Vault) lockedOrPending(cur *stored) error {
	age := time.Duration(v.now() - cur.LastGuessAt) // the lock was made by the latest guess
	if cur.LockFinal || age >= lockSettleWindow {
		return ErrLocked
	}
	return errPendingLock
}

// waitSettled runs fn until it no longer meets a pending lock, polling with
// a short backoff. The wait is bounded: a pending lock turns final after
// lockSettleWindow. Nothing is counted while waiting.
func (v *Vault) waitSettled(ctx context.Context, fn func() error) error {
	delay := time.Millisecond
	for {
		err := fn()
		if !errors.Is(err, errPendingLock) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: waiting for a concurrent guess to settle: %w", ErrUnavailable, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(2*delay, 50*time.Millisecond)
	}
}

// count is step 1 of every guess: durably count it before anything is
// learnt about the PIN. The guess that uses the last attempt removes the
// sealed secret in the same write, leaving a pending lock; the request
// keeps the secret in memory until the guess settles.
func (v *Vault) count(ctx context.Context, ns, userID string, pre Precondition) (*guess, error) {
	g := &guess{key: recordKey(ns, userID)}
	err := v.waitSettled(ctx, func() error {
		return v.update(ctx, g.key, func(cur *stored) (*record, error) {
			if err := v.refusal(cur, pre); err != nil {
				return nil, err
			}
			g.before = cur.record
			next := cur.record
			next.Guesses++
			next.UpdatedAt = v.now()
			next.LastGuessAt = next.UpdatedAt
			g.index = next.Guesses
			g.locked = next.used() == next.MaxAttempts
			if g.locked {
				next.Locked, next.Sealed = true, nil
			}
			g.countedAt = time.Now()
			return &next, nil
		})
	})
	if err != nil {
		return nil, err
	}
	return g, nil
}

// forgive is step 3 after a right PIN: every guess up to this one is
// forgiven, and guesses counted after it began stay counted. If this guess
// locked the backup, its secret goes back. A pending lock by a later guess
// sees the forgiveness when it settles; a final one stands, since its 410
// has been sent. It returns the attempts left.
//
// The write's outcome decides the answer (the attempts left, or
// errUntold), and it is durable before forgive returns, except where the
// write forgives this one guess and changes nothing else
// (forgivesOnlyItself) and the store can tell that it applied before it
// is durable (EarlyStore): then forgive returns once it applied. A crash
// or a failed commit may lose that write, which leaves this guess
// counted: it costs the user one attempt and can never give one, since
// the write only ever takes a count away.
func (v *Vault) forgive(ctx context.Context, g *guess) (int, error) {
	return v.forgiveResealed(ctx, g, nil)
}

// forgiveResealed is forgive that also, if resealed is not nil, puts the
// record's sealed secret and PIN check under the newer key versions of
// resealed, in the same write. It does so only where the record still
// holds what the guess read (no re-wrap, re-seal or lock by another guess
// came between): a pending lock of another guess would put back the
// secret it read, which must match the record's salt and key versions.
//
// A right guess that a later success forgave, or whose generation was
// replaced, while it was in the HSM is told only where a wrong one in its
// place could be counted again (see settleForgiven): otherwise its outcome
// is not told (errUntold), and the caller must not return the secret.
//
// A write that re-seals (resealed not nil) is always durable before
// forgiveResealed returns; one that does not may be answered as forgive's
// is.
func (v *Vault) forgiveResealed(ctx context.Context, g *guess, resealed *record) (int, error) {
	remaining := int(g.before.MaxAttempts)
	untold := false
	var durable func() error
	// Settling a counted guess must not depend on the client still waiting;
	// only waiting for another guess's pending lock does.
	err := v.waitSettled(ctx, func() error {
		var err error
		durable, err = v.updateEarly(context.WithoutCancel(ctx), g.key, func(cur *stored) (*record, bool, error) {
			untold = false
			if !g.sameGeneration(cur) {
				untold = true
				return nil, false, errUntold
			}
			if cur.Locked && g.erased(cur) {
				// Locked by guesses after the success that forgave this
				// one: told only if that lock is undone.
				untold = true
				if err := v.lockedOrPending(cur); errors.Is(err, errPendingLock) {
					return nil, false, err
				}
				return nil, false, errUntold
			}
			next, err := v.forgiveNext(g, cur, resealed, &remaining)
			return next, resealed == nil && g.forgivesOnlyItself(cur), err
		})
		return err
	})
	if durable := durable; durable != nil {
		// Answered before it was durable: the answer stands either way, and
		// a write that never lands leaves this guess counted.
		go func() {
			if err := durable(); err != nil {
				v.metrics.earlyResetsLost.Inc()
				v.log.Error("a counter reset answered before it was durable did not become durable; the guess stays counted",
					"record", v.logID(g.key), "error", err.Error())
			}
		}()
	}
	if err != nil && untold {
		v.metrics.untold.Inc()
		if !errors.Is(err, errUntold) {
			err = errors.Join(errUntold, err) // gave up waiting for a pending lock
		}
		return 0, err
	}
	return remaining, err
}

// forgivesOnlyItself reports whether the write a right guess g leaves on
// cur (forgiveNext, resealing nothing) forgives g and nothing else: cur
// is not locked (no secret goes back, no later guess's lock settles on
// it), every guess before g is forgiven already, and none after it is
// refunded. That write then changes only Forgiven, by one; losing it
// leaves g counted, one attempt.
func (g *guess) forgivesOnlyItself(cur *stored) bool {
	return !cur.Locked && cur.Forgiven+1 == g.index && cur.Refunds == 0
}

// forgiveNext is the record a right guess g leaves on cur (nil: no write),
// setting *remaining to the attempts left.
func (v *Vault) forgiveNext(g *guess, cur *stored, resealed *record, remaining *int) (*record, error) {
	next := cur.record
	switch {
	case g.mayUnlock(cur):
		g.unlock(&next)
	case cur.Locked && (cur.Guesses == g.index || v.lockedOrPending(cur) == ErrLocked):
		*remaining = 0
		return nil, nil // final: its 410 stands
	case g.erased(cur):
		*remaining = cur.remaining()
		return nil, nil // a later success already forgave this guess
	}
	if g.index > next.Forgiven {
		// The refunds are of guesses after Forgiven. At most the
		// g.index-Forgiven-1 guesses before this one (which was
		// answered, so not refunded) are forgiven with it; the other
		// refunds surely are of later guesses and are kept. That can
		// count a guess too many, never too few.
		spent := g.index - next.Forgiven - 1
		next.Forgiven = g.index
		next.Refunds -= min(next.Refunds, spent)
	}
	if resealed != nil && !next.Locked && sameSeal(&cur.record, &g.before) {
		next.Salt, next.Verifier, next.Nonce, next.Sealed = resealed.Salt, resealed.Verifier, resealed.Nonce, resealed.Sealed
		next.WrapVersion, next.PINVersion, next.Sealing = resealed.WrapVersion, resealed.PINVersion, resealed.Sealing
		next.freshWrap, next.freshPIN = true, true
	}
	next.UpdatedAt = v.now()
	*remaining = next.remaining()
	return &next, nil
}

// refund is step 3 when the HSM gave no result: the guess's outcome was
// never learnt, so it is uncounted, and if it locked the backup, the secret
// goes back.
func (v *Vault) refund(ctx context.Context, g *guess) error {
	return v.update(context.WithoutCancel(ctx), g.key, func(cur *stored) (*record, error) {
		if !g.sameGeneration(cur) || g.index <= cur.Forgiven {
			return nil, nil
		}
		next := cur.record
		if cur.Locked {
			if !g.mayUnlock(cur) {
				return nil, nil // locked by a later guess, or final
			}
			g.unlock(&next)
		}
		next.Refunds++
		next.UpdatedAt = v.now()
		if cur.Guesses == g.index {
			// No guess came after this one: the escalating delay runs
			// from the guess before it again, as if it never happened.
			next.LastGuessAt = g.before.LastGuessAt
		}
		return &next, nil
	})
}

// settleWrong is step 3 for a wrong guess that locked the backup. The lock
// turns final, and the guess answers 410, unless right guesses that began
// before it have been forgiven meanwhile and left attempts: then the secret
// goes back and the guess answers 403 like any other wrong one. If its
// generation was replaced or deleted meanwhile, its count went with it and
// its outcome is not told (errUntold), as a right one's would not be.
func (v *Vault) settleWrong(ctx context.Context, g *guess) error {
	var answer error = errCheckedLock
	err := v.update(context.WithoutCancel(ctx), g.key, func(cur *stored) (*record, error) {
		answer = errCheckedLock
		if !g.sameGeneration(cur) {
			answer = errUntold
			return nil, nil
		}
		if !cur.Locked || cur.Guesses != g.index || cur.LockFinal {
			return nil, nil // final already: the lock stands, its 410 is true
		}
		next := cur.record
		switch {
		case cur.used() == cur.MaxAttempts:
			next.LockFinal = true
		case g.mayUnlock(cur):
			g.unlock(&next)
			answer = &WrongPINError{Remaining: int(cur.MaxAttempts - cur.used())}
		default:
			return nil, nil // too late to undo: the pending lock turns final by age
		}
		next.UpdatedAt = v.now()
		return &next, nil
	})
	if err != nil {
		return errors.Join(errCheckedLock, err) // the secret is out of the store either way
	}
	switch answer {
	case errCheckedLock:
		v.metrics.lockouts.Inc()
	case errUntold:
		v.metrics.untold.Inc()
	}
	return answer
}

// attempt runs steps 1 and 2 of a guess and settles wrong and unanswered
// guesses. On a right PIN it returns the counted guess and the inner key
// for the caller to finish.
func (v *Vault) attempt(ctx context.Context, ns, userID string, pin []byte, pre Precondition) (*guess, []byte, error) {
	g, err := v.count(ctx, ns, userID, pre)
	if err != nil {
		return nil, nil, err
	}
	hctx, cancel := g.hsmContext(ctx)
	ok, inner, err := v.verify(hctx, ns, userID, &g.before, pin)
	cancel()
	switch {
	case err != nil:
		if rerr := v.refund(ctx, g); rerr != nil {
			return nil, nil, errors.Join(err, fmt.Errorf("refund: %w", rerr))
		}
		return nil, nil, err
	case !ok && g.locked:
		return nil, nil, v.settleWrong(ctx, g)
	case !ok:
		return nil, nil, v.settleForgiven(ctx, g)
	}
	return g, inner, nil
}

// settleForgiven answers a wrong guess that did not lock: 403, with the
// attempts its count left, even where a later guess has locked the backup
// since (docs/api.md, "Choices"). If a right guess
// counted after it was forgiven before it was checked, its wrong check would
// fall after that success uncounted; so it is counted again, as a new
// guess, before the answer leaves. Where it cannot be (the period since the
// success is used up and the lock is final, or the generation is gone), its
// outcome is not told (errUntold), as a right one's would be.
func (v *Vault) settleForgiven(ctx context.Context, g *guess) error {
	var answer error
	var lockedHere bool
	err := v.waitSettled(ctx, func() error {
		return v.update(context.WithoutCancel(ctx), g.key, func(cur *stored) (*record, error) {
			answer, lockedHere = &WrongPINError{Remaining: g.before.remaining() - 1}, false
			switch {
			case !g.sameGeneration(cur):
				answer = errUntold
				return nil, nil
			case !g.erased(cur):
				return nil, nil // still counted: the usual answer
			case cur.Locked:
				if err := v.lockedOrPending(cur); errors.Is(err, errPendingLock) {
					return nil, err // counted again or left untold once it settles
				}
				answer = errUntold
				return nil, nil
			}
			next := cur.record
			next.Guesses++
			next.UpdatedAt = v.now()
			next.LastGuessAt = next.UpdatedAt
			if next.used() == next.MaxAttempts {
				// Known wrong, so the lock is final at once.
				next.Locked, next.LockFinal, next.Sealed = true, true, nil
				answer, lockedHere = errCheckedLock, true
			} else {
				answer = &WrongPINError{Remaining: next.remaining()}
			}
			return &next, nil
		})
	})
	if err != nil {
		return err // not durably counted again: no answer
	}
	if lockedHere {
		v.metrics.lockouts.Inc()
	}
	if answer == errUntold {
		v.metrics.untold.Inc()
	}
	return answer
}
