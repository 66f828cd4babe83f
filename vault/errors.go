package vault

import (
	"errors"
	"fmt"
	"time"
)

// Sentinel errors. Callers test them with errors.Is; the api package maps
// each to one problem document.
var (
	// ErrInvalid: the request is malformed. The error text names the field
	// and never holds its value.
	ErrInvalid = errors.New("invalid request")
	// ErrNotFound: no backup for this namespace and user_id (or it was deleted).
	ErrNotFound = errors.New("backup not found")
	// ErrWrongPIN: the guess was counted and was wrong; at least one attempt
	// is left. The error is a *WrongPINError carrying how many.
	ErrWrongPIN = errors.New("wrong PIN")
	// ErrLocked: the backup's attempts are used up and its secret is gone.
	ErrLocked = errors.New("backup locked")
	// ErrPrecondition: an If-Match or If-None-Match precondition failed;
	// nothing was counted or written.
	ErrPrecondition = errors.New("precondition failed")
	// ErrUnavailable: a dependency (HSM or store) gave no result; any guess
	// counted for the request has been refunded where that was possible.
	// HSM implementations wrap it when no member could answer.
	ErrUnavailable = errors.New("unavailable")
	// ErrIntegrity: a stored record failed authentication (edited, moved, or
	// damaged). Nothing is served from it. HSM implementations wrap it when a
	// GCM open fails authentication on a healthy member.
	ErrIntegrity = errors.New("record integrity check failed")
	// ErrDelayed: the guess came too soon after the last wrong ones (the
	// escalating delay of the guess budget); it was neither checked nor
	// counted. The error is a *DelayedError saying when a retry can
	// succeed.
	ErrDelayed = errors.New("guess delayed")
	// ErrConflict is returned by a Store's CompareAndSwap when the key's
	// revision is not the expected one. The vault retries; it never escapes.
	ErrConflict = errors.New("store: revision conflict")
	// ErrWithheld, from a Store, means a write's outcome must not be acted
	// on: it may have landed, but nothing vouches for it (rollback
	// anchoring found no HSM member to take the anchor). The vault answers
	// ErrUnavailable at once and never resolves or resends it: resolving
	// would find it landed and act on it unanchored.
	ErrWithheld = errors.New("store: write outcome withheld")
)

// WrongPINError is the error of a wrong guess that left attempts.
type WrongPINError struct {
	Remaining int
}

func (e *WrongPINError) Error() string {
	return fmt.Sprintf("wrong PIN: %d attempts remaining", e.Remaining)
}

// Is makes errors.Is(err, ErrWrongPIN) true.
func (e *WrongPINError) Is(target error) bool { return target == ErrWrongPIN }

// invalid builds an ErrInvalid that names the field. The message must be a
// constant description: never include the offending value.
func invalid(field, msg string) error {
	return fmt.Errorf("%w: %s: %s", ErrInvalid, field, msg)
}

// DelayedError is a guess refused by the escalating delay.
type DelayedError struct {
	RetryAfter time.Duration
}

func (e *DelayedError) Error() string {
	return fmt.Sprintf("guess delayed: too many wrong guesses in a row; retry in %v", e.RetryAfter.Round(time.Second))
}

// Is makes errors.Is(err, ErrDelayed) true.
func (e *DelayedError) Is(target error) bool { return target == ErrDelayed }

// LockedError is ErrLocked. Checked says that this request's own wrong
// PIN was checked and used the last attempt (so it counts as a wrong
// guess, for a per-client limit say), rather than that the request found
// the backup locked and checked nothing.
type LockedError struct{ Checked bool }

func (e *LockedError) Error() string {
	if e.Checked {
		return "backup locked: this wrong PIN used the last attempt"
	}
	return ErrLocked.Error()
}

// Is makes errors.Is(err, ErrLocked) true.
func (e *LockedError) Is(target error) bool { return target == ErrLocked }

// errCheckedLock answers the wrong guess that used the last attempt.
var errCheckedLock error = &LockedError{Checked: true}
