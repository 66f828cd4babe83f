package vault

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Backup is what the vault tells about a backup; never its secret.
type Backup struct {
	UserID            string
	Generation        uint64
	MaxAttempts       int
	AttemptsRemaining int
	Locked            bool
	KeyVersion        uint32 // of the wrap key that seals the record
	PINKeyVersion     uint32 // of the PIN key that checks it
	CreatedAt         time.Time
	UpdatedAt         time.Time
}

func backupOf(userID string, r *record) Backup {
	return Backup{
		UserID:            userID,
		Generation:        r.Generation,
		MaxAttempts:       int(r.MaxAttempts),
		AttemptsRemaining: r.remaining(),
		Locked:            r.Locked,
		KeyVersion:        r.WrapVersion,
		PINKeyVersion:     r.PINVersion,
		CreatedAt:         time.Unix(0, r.CreatedAt).UTC(),
		UpdatedAt:         time.Unix(0, r.UpdatedAt).UTC(),
	}
}

// Precondition is an HTTP-style condition on the backup's generation. The
// zero value imposes none.
type Precondition struct {
	// IfMatch, when non-zero, requires a live backup of this generation.
	IfMatch uint64
	// IfNoneMatch requires that no live backup exists (PUT only).
	IfNoneMatch bool
}

func (p Precondition) check(cur *stored) error {
	live := cur != nil && !cur.Tombstone
	if p.IfNoneMatch && live {
		return fmt.Errorf("%w: a backup exists", ErrPrecondition)
	}
	if p.IfMatch != 0 && (!live || cur.Generation != p.IfMatch) {
		return fmt.Errorf("%w: generation does not match", ErrPrecondition)
	}
	return nil
}

// Enroll stores secret under pin as a new generation of the backup,
// replacing any previous one (locked or not) and starting a fresh counter.
// maxAttempts 0 means the configured default. created reports whether no
// live backup existed before.
func (v *Vault) Enroll(ctx context.Context, ns, userID string, secret, pin []byte, maxAttempts int, pre Precondition) (b Backup, created bool, err error) {
	defer func() { v.metrics.enrollments.WithLabelValues(enrollResult(created, err)).Inc() }()
	if err := checkTarget(ns, userID); err != nil {
		return Backup{}, false, err
	}
	if err := checkSecret(secret); err != nil {
		return Backup{}, false, err
	}
	if err := checkPIN("pin", pin); err != nil {
		return Backup{}, false, err
	}
	if maxAttempts, err = v.opts.Budget.maxAttempts(maxAttempts); err != nil {
		return Backup{}, false, err
	}

	key := recordKey(ns, userID)
	var next *record
	// A record sealed before this node took its version out of use (a
	// retirement) is refused at the write: seal again, once, under the
	// newest.
	for try := 0; try < 2; try++ {
		next = nil
		err = v.update(ctx, key, func(cur *stored) (*record, error) {
			if err := pre.check(cur); err != nil {
				return nil, err
			}
			gen := uint64(1)
			if cur != nil {
				gen = cur.Generation + 1
			}
			created = cur == nil || cur.Tombstone
			// The AAD and PIN MAC bind the generation, so a conflict that
			// changed it means sealing again.
			if next == nil || next.Generation != gen {
				r, err := v.seal(ctx, ns, userID, gen, secret, pin)
				if err != nil {
					return nil, err
				}
				next = r
			}
			now := v.now()
			next.MaxAttempts = uint32(maxAttempts)
			next.CreatedAt, next.UpdatedAt = now, now
			return next, nil
		})
		if !errors.Is(err, errRetiring) {
			break
		}
	}
	if err != nil {
		return Backup{}, false, fmt.Errorf("enroll: %w", err)
	}
	return backupOf(userID, next), created, nil
}

func enrollResult(created bool, err error) string {
	switch {
	case err != nil:
		return "error"
	case created:
		return "created"
	default:
		return "replaced"
	}
}

// Status describes a backup, locked or not.
func (v *Vault) Status(ctx context.Context, ns, userID string) (Backup, error) {
	if err := checkTarget(ns, userID); err != nil {
		return Backup{}, err
	}
	cur, err := v.read(ctx, recordKey(ns, userID))
	if err != nil {
		return Backup{}, fmt.Errorf("status: %w", err)
	}
	if cur == nil || cur.Tombstone {
		return Backup{}, ErrNotFound
	}
	return backupOf(userID, &cur.record), nil
}

// Delete replaces a backup with a tombstone that keeps its generation, so
// that generations only increase for the life of the store.
func (v *Vault) Delete(ctx context.Context, ns, userID string, pre Precondition) error {
	if err := checkTarget(ns, userID); err != nil {
		return err
	}
	err := v.update(ctx, recordKey(ns, userID), func(cur *stored) (*record, error) {
		if cur == nil || cur.Tombstone {
			return nil, ErrNotFound
		}
		if err := pre.check(cur); err != nil {
			return nil, err
		}
		return &record{Generation: cur.Generation, Tombstone: true, UpdatedAt: v.now()}, nil
	})
	if err != nil {
		return fmt.Errorf("delete: %w", err)
	}
	v.metrics.deletes.Inc()
	return nil
}

// Recover returns the secret of a backup for the right PIN.
//
// The order is what keeps the guess budget: (1) count the guess durably,
// removing the secret from the store if it uses the last attempt; (2) check
// the PIN in the HSM; (3) on a right PIN forgive the guesses up to this one,
// or, if the HSM gave no result, refund this guess. A crash after (1) leaves
// the guess counted as wrong. No outcome leaves the process before (1) is
// durable. The answer is decided by how (3) applied to the record as it
// then was; where (3) forgives this guess alone, it may go out before (3)
// is durable (see forgive), so a crash then costs the user this one
// attempt, never more and never one given.
func (v *Vault) Recover(ctx context.Context, ns, userID string, pin []byte) (secret []byte, remaining int, err error) {
	defer func() { v.metrics.recoveries.WithLabelValues(Classify(err).Result).Inc() }()
	if err := checkTarget(ns, userID); err != nil {
		return nil, 0, err
	}
	if err := checkPIN("pin", pin); err != nil {
		return nil, 0, err
	}
	g, inner, err := v.attempt(ctx, ns, userID, pin, Precondition{})
	if err != nil {
		return nil, 0, fmt.Errorf("recover: %w", err)
	}
	defer wipe(inner)
	if v.stale(&g.before) {
		return v.recoverResealing(ctx, ns, userID, g, inner, pin)
	}
	// The guess was right, so it is forgiven whatever happens next: the
	// caller has not learnt that, but a damaged record should not burn the
	// user's attempts either.
	remaining, ferr := v.forgive(ctx, g)
	if errors.Is(ferr, errUntold) {
		return nil, 0, fmt.Errorf("recover: %w", ferr)
	}
	secret, err = v.open(ctx, ns, userID, &g.before, g.before.Sealed, inner)
	if err != nil {
		return nil, 0, fmt.Errorf("recover: %w", err)
	}
	if ferr != nil {
		// The guess is durably counted, so its outcome may be told; not
		// telling it would leave the user with neither the key nor, if this
		// guess locked the backup, a backup.
		v.log.Error("recovered, but the counter reset failed", "record", v.LogID(ns, userID), "error", ferr.Error())
		remaining = g.before.remaining() - 1
	}
	return secret, remaining, nil
}

// ChangePIN re-seals a backup under a new PIN as a new generation with a
// fresh salt and counter, keeping its secret and max_attempts. It is a guess
// with the old PIN and is counted like a recovery.
func (v *Vault) ChangePIN(ctx context.Context, ns, userID string, pin, newPIN []byte, pre Precondition) (b Backup, err error) {
	defer func() { v.metrics.pinChanges.WithLabelValues(Classify(err).Result).Inc() }()
	if err := checkTarget(ns, userID); err != nil {
		return Backup{}, err
	}
	if err := checkPIN("pin", pin); err != nil {
		return Backup{}, err
	}
	if err := checkPIN("new_pin", newPIN); err != nil {
		return Backup{}, err
	}
	g, inner, err := v.attempt(ctx, ns, userID, pin, pre)
	if err != nil {
		return Backup{}, fmt.Errorf("change PIN: %w", err)
	}
	defer wipe(inner)
	// A guess that locked the backup settles while it may still undo its
	// lock: its HSM work ends in time.
	hctx, cancel := g.hsmContext(ctx)
	defer cancel()
	secret, err := v.open(hctx, ns, userID, &g.before, g.before.Sealed, inner)
	if err != nil {
		if errors.Is(err, ErrIntegrity) {
			// The PIN was right; keep the budget as a recovery would.
			if _, ferr := v.forgive(ctx, g); errors.Is(ferr, errUntold) {
				err = ferr
			}
		} else if rerr := v.refund(ctx, g); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return Backup{}, fmt.Errorf("change PIN: %w", err)
	}
	defer wipe(secret)
	next, err := v.seal(hctx, ns, userID, g.before.Generation+1, secret, newPIN)
	if err != nil {
		if rerr := v.refund(ctx, g); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return Backup{}, fmt.Errorf("change PIN: %w", err)
	}
	forgiven := false // this guess, by a write of its own below
	err = v.waitSettled(ctx, func() error {
		forgave := false
		err := v.update(context.WithoutCancel(ctx), g.key, func(cur *stored) (*record, error) {
			forgave = false
			if !g.sameGeneration(cur) {
				return nil, errUntold // replaced or deleted during the PIN change
			}
			switch {
			case cur.Locked && cur.Guesses == g.index && !g.mayUnlock(cur):
				return nil, ErrLocked // this guess locked it, too long ago to undo
			case cur.Locked && cur.Guesses != g.index && g.erased(cur) && !forgiven:
				// Locked by guesses after a later success that forgave this
				// one: told only if that lock is undone (see forgiveResealed).
				if err := v.lockedOrPending(cur); errors.Is(err, errPendingLock) {
					return nil, err
				}
				return nil, errUntold
			case cur.Locked && cur.Guesses != g.index:
				// A later guess locked it. While that lock is pending,
				// this right guess is forgiven first, as a recovery's is,
				// so that the later guess settles with it forgiven; then
				// the change waits for it. A final lock answers 410.
				err := v.lockedOrPending(cur)
				if !errors.Is(err, errPendingLock) || g.erased(cur) {
					return nil, err
				}
				var remaining int
				f, err := v.forgiveNext(g, cur, nil, &remaining)
				if err == nil && f == nil {
					return nil, ErrLocked // final since lockedOrPending read the clock
				}
				forgave = err == nil
				return f, err
			}
			next.undoBy = time.Time{}
			if cur.Locked {
				next.undoBy = g.undoBy() // it replaces this guess's own pending lock
			}
			now := v.now()
			next.MaxAttempts = cur.MaxAttempts
			// Wrong guesses counted on the old generation after this one
			// began stay counted on the new one.
			next.Guesses = g.countedSince(cur)
			if next.Guesses > 0 {
				// They keep the escalating delay they started, too.
				next.LastGuessAt = cur.LastGuessAt
			}
			next.CreatedAt, next.UpdatedAt = now, now
			return next, nil
		})
		if err == nil && forgave {
			forgiven = true
			return errPendingLock // the new generation is written once the lock settles
		}
		return err
	})
	if errors.Is(err, errUntold) {
		v.metrics.untold.Inc()
	}
	if err != nil {
		if !errors.Is(err, errUntold) && !errors.Is(err, ErrLocked) {
			// No answer was given: put back what this guess took.
			if rerr := v.refund(ctx, g); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}
		return Backup{}, fmt.Errorf("change PIN: %w", err)
	}
	return backupOf(userID, next), nil
}

// Operations a caller may refuse before the vault sees them (CountRefused).
const (
	OpRecover   = "recover"
	OpChangePIN = "change_pin"
)

// CountRefused counts, under result (a Classify result), a recovery or PIN
// change that the caller refused before calling the vault, so that the
// vault's metrics by result see every request. Why the caller refused is
// the caller's business.
func (v *Vault) CountRefused(op, result string) {
	switch op {
	case OpRecover:
		v.metrics.recoveries.WithLabelValues(result).Inc()
	case OpChangePIN:
		v.metrics.pinChanges.WithLabelValues(result).Inc()
	}
}
