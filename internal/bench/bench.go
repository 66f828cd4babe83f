package bench

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"time"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/internal/loadgen"
)

// Workload is one kind of load: its operation, an optional untimed step
// before each one, and what to release afterwards.
type Workload interface {
	Name() string
	Op(ctx context.Context, w int) error
	Before(ctx context.Context, w int) error
	Close()
}

// Options says how Run loads a workload.
type Options struct {
	Concurrency int
	Rate        float64       // requests per second in all; 0: closed loop
	Warmup      time.Duration // unmeasured load before the window; 0: none
	Duration    time.Duration // the measured window
	// CPU, when set, reads the CPU time of the process doing the work (a
	// vault, or this process for the raw ceiling): the result gives it
	// per successful operation over the measured window.
	CPU CPUReader
	// Progress, when set, makes the reporter of a phase (the warm-up,
	// then the workload's name) of the given length.
	Progress func(phase string, total time.Duration) func(loadgen.Progress)
}

// Run loads w for the warm-up, then for the measured window, and returns
// the window's result and its rate_limited answers by the limit that
// refused. A run that ctx interrupts is an error.
func Run(ctx context.Context, w Workload, o Options) (loadgen.Result, map[string]int64, error) {
	var limits *limiterTally
	op := func(ctx context.Context, i int) error {
		err := w.Op(ctx, i)
		limits.add(err)
		return err
	}
	before := func(ctx context.Context, i int) error {
		err := w.Before(ctx, i)
		if out, ok := errors.AsType[*loadgen.Outcome](err); ok {
			limits.add(out.Err)
		}
		return err
	}
	lo := loadgen.Options{Name: w.Name(), Concurrency: o.Concurrency, Rate: o.Rate, Before: before}
	if o.Warmup > 0 {
		wo := lo
		wo.Duration = o.Warmup
		if o.Progress != nil {
			wo.Progress = o.Progress("warm-up", o.Warmup)
		}
		limits = &limiterTally{}
		if _, err := loadgen.Run(ctx, wo, op); err != nil {
			return loadgen.Result{}, nil, fmt.Errorf("warm-up: %w", err)
		}
	}
	lo.Duration = o.Duration
	lo.CPU = o.CPU
	if o.Progress != nil {
		lo.Progress = o.Progress(w.Name(), o.Duration)
	}
	limits = &limiterTally{}
	res, err := loadgen.Run(ctx, lo, op)
	if err != nil {
		return loadgen.Result{}, nil, err
	}
	if err := ctx.Err(); err != nil {
		return loadgen.Result{}, nil, fmt.Errorf("interrupted: %w", err)
	}
	return res, limits.counts(), nil
}

// codedError names a failed request by the vault's problem code (or the
// HTTP status, or "transport" when no answer came) for the error table.
type codedError struct {
	code    string
	err     error
	limiter string // for rate_limited: the limit that refused, if the answer says
}

func (e *codedError) Error() string {
	if e.err == nil {
		return e.code
	}
	return e.code + ": " + e.err.Error()
}
func (e *codedError) Code() string  { return e.code }
func (e *codedError) Unwrap() error { return e.err }

// classify codes err; with a nil err it reports the given code (an answer
// that succeeded but was wrong), or nothing.
func classify(err error, otherwise string) error {
	if err == nil {
		if otherwise == "" {
			return nil
		}
		return &codedError{code: otherwise}
	}
	var ce *client.Error
	switch {
	case errors.As(err, &ce) && ce.Code == client.CodeRateLimited:
		return &codedError{code: ce.Code, err: err, limiter: limiterOf(ce.Detail)}
	case errors.As(err, &ce) && ce.Code != "":
		return &codedError{code: ce.Code, err: err}
	case errors.As(err, &ce) && ce.Status != 0:
		return &codedError{code: fmt.Sprintf("http_%d", ce.Status), err: err}
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return &codedError{code: "timeout", err: err}
	default:
		return &codedError{code: "transport", err: err}
	}
}

// The limits a rate_limited answer can name (ratelimit's limiter names):
// its detail says which one refused.
var limiters = []string{"wrong_guesses_per_client", "guesses_per_user", "requests_per_client"}

// limiterOf reads the limiter from a rate_limited problem's detail; ""
// when it names none the bench knows.
func limiterOf(detail string) string {
	for _, l := range limiters { // wrong_guesses_per_client before its suffix
		if strings.Contains(detail, "("+l+")") {
			return l
		}
	}
	if strings.Contains(detail, "wrong guesses in a row") {
		return "escalating_delay"
	}
	return ""
}

// limiterTally counts rate_limited answers by the limit that refused.
// A nil tally counts nothing.
type limiterTally struct {
	mu sync.Mutex
	m  map[string]int64
}

func (t *limiterTally) add(err error) {
	var ce *codedError
	if t == nil || !errors.As(err, &ce) || ce.code != client.CodeRateLimited {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.m == nil {
		t.m = map[string]int64{}
	}
	t.m[ce.limiter]++
}

func (t *limiterTally) counts() map[string]int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.m)
}
