package vault

import (
	"errors"
	"time"
)

// Outcome is what an error from the vault means. Callers read it instead
// of testing errors themselves, so that the answer, the metric, the audit
// event and the limits agree on every error.
type Outcome struct {
	// Result names the outcome as the metrics and audit events do:
	// success, wrong_pin, locked, not_found, invalid, precondition_failed,
	// rate_limited, integrity_error, unavailable, or error.
	Result string
	// Checked: the PIN was checked in the HSM (a success, a wrong PIN, the
	// lock this request's wrong PIN caused, or damage found after the
	// check). A guess that checked nothing costs the user no rate-limit
	// token.
	Checked bool
	// Wrong: the PIN was checked and was wrong, this request's lockout
	// included; it counts against the client's wrong-guess limit.
	Wrong bool
	// Lockout: this request's wrong PIN used the last attempt.
	Lockout bool
	// Delayed: the escalating delay refused the guess (Result
	// rate_limited, as the API's rate limits); nothing was checked or
	// counted.
	Delayed bool
	// Remaining is the attempts left after a wrong_pin.
	Remaining int
	// RetryAfter is when a Delayed guess can succeed.
	RetryAfter time.Duration
}

// Classify says what err, returned by the vault and possibly wrapped or
// joined, means. A nil error is a success; an error the vault does not
// define is "error". The first matching case wins, so a joined error
// (a failure and its failed refund, say) is told by its first cause in
// this order.
func Classify(err error) Outcome {
	var o Outcome
	locked, isLocked := errors.AsType[*LockedError](err)
	wrong, isWrong := errors.AsType[*WrongPINError](err)
	o.Lockout = isLocked && locked.Checked
	o.Wrong = errors.Is(err, ErrWrongPIN) || o.Lockout
	o.Checked = err == nil || o.Wrong || errors.Is(err, ErrIntegrity)
	switch {
	case err == nil:
		o.Result = "success"
	case isWrong:
		o.Result, o.Remaining = "wrong_pin", wrong.Remaining
	case errors.Is(err, ErrLocked):
		o.Result = "locked"
	case errors.Is(err, ErrDelayed):
		o.Result, o.Delayed = "rate_limited", true
		if delayed, ok := errors.AsType[*DelayedError](err); ok {
			o.RetryAfter = delayed.RetryAfter
		}
	case errors.Is(err, ErrNotFound):
		o.Result = "not_found"
	case errors.Is(err, ErrInvalid):
		o.Result = "invalid"
	case errors.Is(err, ErrPrecondition):
		o.Result = "precondition_failed"
	case errors.Is(err, ErrIntegrity):
		o.Result = "integrity_error"
	case errors.Is(err, ErrUnavailable):
		o.Result = "unavailable"
	default:
		o.Result = "error"
	}
	return o
}
