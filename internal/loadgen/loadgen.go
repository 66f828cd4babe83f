// Package loadgen runs an operation from many goroutines for a fixed time
// and summarises what happened: throughput, latency percentiles and errors
// by code. It is the engine of "keyvault bench".
//
// Two ways to load: closed (Rate 0: each of Concurrency workers starts its
// next operation as soon as the last one ends, which finds the ceiling) and
// open (Rate > 0: operations are scheduled at a fixed rate and each one's
// latency is measured from its scheduled start, so a stalled server shows
// up as latency instead of hiding as fewer requests — no coordinated
// omission).
package loadgen

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"
)

// Op performs one operation for worker w (0 <= w < Concurrency). A nil
// error is a success; any other is counted under Code(err).
type Op func(ctx context.Context, w int) error

// Coded is an error that names its kind, such as an API problem code.
type Coded interface{ Code() string }

// Code is the error's code: Coded's, or "error".
func Code(err error) string {
	for e := err; e != nil; {
		if c, ok := e.(Coded); ok && c.Code() != "" {
			return c.Code()
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			break
		}
		e = u.Unwrap()
	}
	return "error"
}

// Outcome, returned by Before, is the operation's answer given early: the
// operation is not run, and Err (never nil) counts as its result, timed
// from the operation's start with Before included. A set-up request the server
// refused under load is one.
type Outcome struct{ Err error }

func (o *Outcome) Error() string { return o.Err.Error() }
func (o *Outcome) Unwrap() error { return o.Err }

// Options shape a run.
type Options struct {
	Name        string        // the operation's name in the result
	Concurrency int           // workers (at least 1)
	Duration    time.Duration // the measured window
	Rate        float64       // operations per second; 0: as fast as the workers go
	// Before, if set, runs before each operation, outside its timing in a
	// closed run (an open run's latency starts at the scheduled time, so
	// there it counts). Its error ends the run: it is set-up, not load;
	// an *Outcome is the exception.
	Before Op
	// Progress, if set, is called once a second while the run lasts, from
	// a goroutine of its own.
	Progress func(Progress)
	// CPU, if set, reads the CPU time the measured process (the server)
	// has used so far. Run reads it as the window opens and once the
	// last operation has ended, and reports the difference per successful
	// operation. An error either time ends the run.
	CPU func() (time.Duration, error)
}

// Progress is a running count, for a progress line.
type Progress struct {
	Elapsed   time.Duration
	Requests  int64 // answered so far
	Succeeded int64
}

// Result is one run's summary. The JSON names are the bench command's
// output format.
type Result struct {
	Op          string  `json:"op"`
	Concurrency int     `json:"concurrency"`
	Rate        float64 `json:"rate,omitempty"`
	DurationS   float64 `json:"duration_s"`
	Requests    int64   `json:"requests"`
	PerSecond   float64 `json:"requests_per_second"`
	// Succeeded and SucceededPerSecond leave out errors: a shed request
	// (503) is answered fast and must not pass for capacity.
	Succeeded          int64            `json:"succeeded"`
	SucceededPerSecond float64          `json:"succeeded_per_second"`
	P50                float64          `json:"p50_ms"`
	P90                float64          `json:"p90_ms"`
	P99                float64          `json:"p99_ms"`
	Max                float64          `json:"max_ms"`
	Errors             map[string]int64 `json:"errors"`
	// FirstErrors holds the text of the first error of each code, so that
	// a rare failure in a long run can be told apart from the rest.
	FirstErrors map[string]string `json:"first_errors,omitempty"`
	// CPUPerOp is the measured process's CPU time (Options.CPU) over the
	// window per successful operation, in microseconds, and CPUCores the
	// cores it kept busy on average; both 0 (left out) when it was not
	// read or nothing succeeded.
	CPUPerOp float64 `json:"cpu_us_per_op,omitempty"`
	CPUCores float64 `json:"cpu_cores,omitempty"`
	// LoadgenCPUPerRequest is this process's own CPU time over the window
	// per request, in microseconds, and LoadgenCPUCores the cores it kept
	// busy: the cost of generating the load, which on a shared machine
	// the server does not get.
	LoadgenCPUPerRequest float64 `json:"loadgen_cpu_us_per_request,omitempty"`
	LoadgenCPUCores      float64 `json:"loadgen_cpu_cores,omitempty"`
}

// Run calls op until o.Duration has passed and summarises every call that
// started in that window. Latencies include errors: a fast failure is
// still an answer the caller waited for.
func Run(ctx context.Context, o Options, op Op) (Result, error) {
	if o.Concurrency < 1 {
		return Result{}, fmt.Errorf("concurrency %d: must be at least 1", o.Concurrency)
	}
	if o.Duration <= 0 {
		return Result{}, fmt.Errorf("duration %v: must be positive", o.Duration)
	}
	if o.Rate < 0 {
		return Result{}, fmt.Errorf("rate %v: must not be negative", o.Rate)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var serverCPU0 time.Duration
	if o.CPU != nil {
		var err error
		if serverCPU0, err = o.CPU(); err != nil {
			return Result{}, fmt.Errorf("%s: read the server's CPU time: %w", o.Name, err)
		}
	}
	selfCPU0 := SelfCPU()
	start := time.Now()
	end := start.Add(o.Duration)

	// An open run's operations have fixed start times, start + n*interval,
	// and each worker takes the next one not yet taken: no goroutine or
	// channel between the schedule and the workers. A worker that takes
	// a start time already past starts at once, and its wait counts in
	// its latency.
	var interval time.Duration
	var nextSlot atomic.Int64
	if o.Rate > 0 {
		interval = max(1, time.Duration(float64(time.Second)/o.Rate))
	}
	done := ctx.Done()

	type tally struct {
		lat   []time.Duration
		errs  map[string]int64
		first map[string]string
	}
	tallies := make([]tally, o.Concurrency)
	var failOnce sync.Once
	var failed error
	fail := func(err error) {
		failOnce.Do(func() { failed = err; cancel() })
	}
	// Progress stops before Run returns, so no report follows the result.
	var requests, succeeded atomic.Int64
	stopProgress, progressDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(progressDone)
		if o.Progress == nil {
			return
		}
		tick := time.NewTicker(time.Second)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				o.Progress(Progress{Elapsed: time.Since(start), Requests: requests.Load(), Succeeded: succeeded.Load()})
			case <-stopProgress:
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for w := range o.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := &tallies[w]
			t.errs, t.first = map[string]int64{}, map[string]string{}
			var timer *time.Timer
			if interval > 0 {
				timer = time.NewTimer(time.Hour)
				defer timer.Stop()
			}
			for {
				var began time.Time
				if interval > 0 {
					began = start.Add(time.Duration(nextSlot.Add(1)-1) * interval)
					if !began.Before(end) {
						return
					}
					if d := time.Until(began); d > 0 {
						timer.Reset(d)
						select {
						case <-timer.C:
						case <-done:
							return
						}
					}
				} else {
					began = time.Now()
					if !began.Before(end) {
						return
					}
				}
				select {
				case <-done:
					return
				default:
				}
				var err error
				answered := false
				if o.Before != nil {
					if err = o.Before(ctx, w); err != nil {
						var out *Outcome
						if !errors.As(err, &out) {
							fail(err)
							return
						}
						err, answered = out.Err, true
					} else if interval == 0 {
						began = time.Now()
					}
				}
				if !answered {
					err = op(ctx, w)
				}
				t.lat = append(t.lat, time.Since(began))
				requests.Add(1)
				if err == nil {
					succeeded.Add(1)
				} else {
					c := Code(err)
					if t.errs[c]++; t.errs[c] == 1 {
						t.first[c] = err.Error()
					}
				}
			}
		}()
	}
	wg.Wait()
	// An open run whose workers fell behind ends late: every scheduled
	// operation is sent, and its wait counts in its latency.
	elapsed := time.Since(start)
	selfCPU := SelfCPU() - selfCPU0
	var serverCPU time.Duration
	if o.CPU != nil && failed == nil {
		cpu, err := o.CPU()
		if err != nil {
			fail(fmt.Errorf("read the server's CPU time: %w", err))
		}
		serverCPU = cpu - serverCPU0
	}
	close(stopProgress)
	<-progressDone
	if failed != nil {
		return Result{}, fmt.Errorf("%s: %w", o.Name, failed)
	}

	var all []time.Duration
	errs := map[string]int64{}
	first := map[string]string{} // empty: left out of the JSON
	var failures int64
	for _, t := range tallies {
		all = append(all, t.lat...)
		for c, n := range t.errs {
			errs[c] += n
			failures += n
		}
		for c, text := range t.first {
			if _, ok := first[c]; !ok {
				first[c] = text
			}
		}
	}
	slices.Sort(all)
	ms := func(q float64) float64 {
		if len(all) == 0 {
			return 0
		}
		i := int(q*float64(len(all))+0.5) - 1
		i = max(0, min(i, len(all)-1))
		return float64(all[i].Microseconds()) / 1000
	}
	// Throughput is over the window in which requests were started, plus
	// the tail of the last ones to finish.
	res := Result{
		Op:                 o.Name,
		Concurrency:        o.Concurrency,
		Rate:               o.Rate,
		DurationS:          round(elapsed.Seconds(), 3),
		Requests:           int64(len(all)),
		PerSecond:          round(float64(len(all))/elapsed.Seconds(), 1),
		Succeeded:          int64(len(all)) - failures,
		SucceededPerSecond: round(float64(int64(len(all))-failures)/elapsed.Seconds(), 1),
		P50:                ms(0.50),
		P90:                ms(0.90),
		P99:                ms(0.99),
		Max:                ms(1),
		Errors:             errs,
		FirstErrors:        first,
	}
	if ok := res.Succeeded; o.CPU != nil && ok > 0 {
		res.CPUPerOp = round(float64(serverCPU.Microseconds())/float64(ok), 1)
		res.CPUCores = round(serverCPU.Seconds()/elapsed.Seconds(), 2)
	}
	if res.Requests > 0 {
		res.LoadgenCPUPerRequest = round(float64(selfCPU.Microseconds())/float64(res.Requests), 1)
		res.LoadgenCPUCores = round(selfCPU.Seconds()/elapsed.Seconds(), 2)
	}
	return res, nil
}

// SelfCPU is the CPU time (user and system) this process has used so
// far, to the microsecond; 0 where the system does not say.
func SelfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func round(x float64, digits int) float64 {
	p := 1.0
	for range digits {
		p *= 10
	}
	return float64(int64(x*p+0.5)) / p
}

// WriteTable prints results as an aligned table. req/s counts every
// answer, succeeded/s only the successes: a refused or shed request is
// answered fast and must not pass for capacity. cpu_us/op is the measured
// process's CPU per success, gen_us/req this process's per request ("-"
// when not measured).
func WriteTable(w io.Writer, rs ...Result) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "op\tconcurrency\trate\tduration_s\trequests\treq/s\tsucceeded/s\tp50_ms\tp90_ms\tp99_ms\tmax_ms\tcpu_us/op\tgen_us/req\terrors\t")
	for _, r := range rs {
		rate := "max"
		if r.Rate > 0 {
			rate = fmt.Sprintf("%.0f/s", r.Rate)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%.1f\t%d\t%.0f\t%.0f\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t%s\t\n",
			r.Op, r.Concurrency, rate, r.DurationS, r.Requests, r.PerSecond, r.SucceededPerSecond, r.P50, r.P90, r.P99, r.Max,
			orDash(r.CPUPerOp), orDash(r.LoadgenCPUPerRequest), errorList(r))
	}
	return tw.Flush()
}

// orDash prints a measured cost, or "-" when it was not measured.
func orDash(us float64) string {
	if us == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", us)
}

func errorList(r Result) string {
	if len(r.Errors) == 0 {
		return "-"
	}
	codes := slices.Collect(maps.Keys(r.Errors))
	sort.Strings(codes)
	var parts []string
	for _, c := range codes {
		parts = append(parts, fmt.Sprintf("%s=%d", c, r.Errors[c]))
	}
	return strings.Join(parts, ",")
}
