package vault

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// foreignLimit is an error of another package that looks like a rate
// limit; the vault does not know it.
type foreignLimit struct{}

func (foreignLimit) Error() string          { return "too many requests" }
func (foreignLimit) RetryAfterSeconds() int { return 1 }

func TestClassify(t *testing.T) {
	t.Parallel()
	wrap := func(err error) error { return fmt.Errorf("recover: %w", err) }
	refundFailed := fmt.Errorf("refund: %w", ErrUnavailable)
	cases := []struct {
		name string
		err  error
		want Outcome
	}{
		{"nil", nil, Outcome{Result: "success", Checked: true}},
		{"wrong PIN", wrap(&WrongPINError{Remaining: 3}), Outcome{Result: "wrong_pin", Checked: true, Wrong: true, Remaining: 3}},
		{"own lockout", wrap(errCheckedLock), Outcome{Result: "locked", Checked: true, Wrong: true, Lockout: true}},
		{"found locked", wrap(&LockedError{}), Outcome{Result: "locked"}},
		{"bare locked", ErrLocked, Outcome{Result: "locked"}},
		{"escalating delay", wrap(&DelayedError{RetryAfter: 1500 * time.Millisecond}), Outcome{Result: "rate_limited", Delayed: true, RetryAfter: 1500 * time.Millisecond}},
		{"not found", wrap(ErrNotFound), Outcome{Result: "not_found"}},
		{"invalid", invalid("pin", "must be 4 to 64 bytes"), Outcome{Result: "invalid"}},
		{"precondition", wrap(fmt.Errorf("%w: generation does not match", ErrPrecondition)), Outcome{Result: "precondition_failed"}},
		{"integrity", wrap(ErrIntegrity), Outcome{Result: "integrity_error", Checked: true}},
		{"unavailable", wrap(fmt.Errorf("%w: no healthy HSM member", ErrUnavailable)), Outcome{Result: "unavailable"}},
		{"withheld write", wrap(errors.Join(ErrUnavailable, ErrWithheld)), Outcome{Result: "unavailable"}},
		// A failure joined with its failed refund is told by the failure.
		{"integrity, refund failed", wrap(errors.Join(ErrIntegrity, refundFailed)), Outcome{Result: "integrity_error", Checked: true}},
		{"lockout, refund failed", errors.Join(refundFailed, errCheckedLock), Outcome{Result: "locked", Checked: true, Wrong: true, Lockout: true}},
		{"unknown", errors.New("disk on fire"), Outcome{Result: "error"}},
		{"context", wrap(context.DeadlineExceeded), Outcome{Result: "error"}},
		{"conflict", ErrConflict, Outcome{Result: "error"}},
		{"another package's rate limit", wrap(foreignLimit{}), Outcome{Result: "error"}},
	}
	for _, c := range cases {
		if got := Classify(c.err); got != c.want {
			t.Errorf("%s: Classify(%v) = %+v, want %+v", c.name, c.err, got, c.want)
		}
	}
}
