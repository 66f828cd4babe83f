package loadgen

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type coded string

func (c coded) Error() string { return string(c) }
func (c coded) Code() string  { return string(c) }

func TestClosedRunCountsEveryCall(t *testing.T) {
	var calls atomic.Int64
	res, err := Run(context.Background(), Options{Name: "x", Concurrency: 4, Duration: 200 * time.Millisecond}, func(ctx context.Context, w int) error {
		if w < 0 || w >= 4 {
			t.Errorf("worker %d out of range", w)
		}
		n := calls.Add(1)
		time.Sleep(time.Millisecond)
		if n%10 == 0 {
			return fmt.Errorf("wrapped: %w", coded("wrong_pin"))
		}
		if n%10 == 5 {
			return errors.New("plain")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != calls.Load() || res.Requests < 40 {
		t.Fatalf("requests %d, calls %d", res.Requests, calls.Load())
	}
	if res.Errors["wrong_pin"] != calls.Load()/10 || res.Errors["error"] == 0 {
		t.Fatalf("errors %v after %d calls", res.Errors, calls.Load())
	}
	if want := map[string]string{"wrong_pin": "wrapped: wrong_pin", "error": "plain"}; !maps.Equal(res.FirstErrors, want) {
		t.Fatalf("first errors %q, want %q", res.FirstErrors, want)
	}
	if res.Succeeded != res.Requests-res.Errors["wrong_pin"]-res.Errors["error"] || res.SucceededPerSecond >= res.PerSecond {
		t.Fatalf("succeeded %d (%v/s) of %d (%v/s)", res.Succeeded, res.SucceededPerSecond, res.Requests, res.PerSecond)
	}
	if res.P50 < 1 || res.P50 > res.P90 || res.P90 > res.P99 || res.P99 > res.Max {
		t.Fatalf("percentiles out of order or below the 1 ms sleep: %+v", res)
	}
	if res.PerSecond <= 0 || res.Op != "x" || res.Concurrency != 4 {
		t.Fatalf("result %+v", res)
	}
}

// An open run sends what it schedules, and a stalled operation shows up
// as latency of the ones scheduled behind it, not as fewer requests.
func TestOpenRunMeasuresFromTheSchedule(t *testing.T) {
	var calls atomic.Int64
	res, err := Run(context.Background(), Options{Concurrency: 1, Duration: 300 * time.Millisecond, Rate: 100}, func(context.Context, int) error {
		if calls.Add(1) == 1 {
			time.Sleep(100 * time.Millisecond) // the server stalls once
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != 30 {
		t.Fatalf("%d requests at 100/s for 0.3 s", res.Requests)
	}
	// About ten requests were scheduled during the stall; the first of
	// them waited close to its whole length.
	if res.Max < 90 || res.P90 < 20 {
		t.Fatalf("the stall is hidden: %+v", res)
	}
}

func TestBeforeFailureEndsTheRun(t *testing.T) {
	var n atomic.Int64
	_, err := Run(context.Background(), Options{Name: "y", Concurrency: 2, Duration: 10 * time.Second,
		Before: func(context.Context, int) error {
			if n.Add(1) > 5 {
				return errors.New("set-up broke")
			}
			return nil
		}}, func(context.Context, int) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "set-up broke") {
		t.Fatalf("err %v", err)
	}
}

// An Outcome from Before is its turn's answer: the operation is not run,
// and the error counts, timed with Before's own time.
func TestBeforeOutcomeIsTheAnswer(t *testing.T) {
	var turns, ops, early atomic.Int64
	res, err := Run(context.Background(), Options{Name: "z", Concurrency: 2, Duration: 300 * time.Millisecond,
		Before: func(context.Context, int) error {
			if turns.Add(1)%3 == 0 {
				early.Add(1)
				time.Sleep(20 * time.Millisecond)
				return &Outcome{Err: fmt.Errorf("reset: %w", coded("rate_limited"))}
			}
			return nil
		}}, func(context.Context, int) error {
		ops.Add(1)
		time.Sleep(time.Millisecond)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if early.Load() == 0 || res.Errors["rate_limited"] != early.Load() || len(res.Errors) != 1 {
		t.Errorf("errors %v, want rate_limited=%d alone", res.Errors, early.Load())
	}
	if res.Requests != turns.Load() || res.Succeeded != ops.Load() || ops.Load()+early.Load() != turns.Load() {
		t.Errorf("%d requests, %d succeeded: want %d turns, %d operations run and %d answered early", res.Requests, res.Succeeded, turns.Load(), ops.Load(), early.Load())
	}
	if res.Max < 20 || res.FirstErrors["rate_limited"] != "reset: rate_limited" {
		t.Errorf("max %.1f ms (want the 20 ms of an early answer), first errors %q", res.Max, res.FirstErrors)
	}
}

func TestOptionsAreChecked(t *testing.T) {
	op := func(context.Context, int) error { return nil }
	for _, o := range []Options{{Concurrency: 0, Duration: time.Second}, {Concurrency: 1}, {Concurrency: 1, Duration: time.Second, Rate: -1}} {
		if _, err := Run(context.Background(), o, op); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
}

func TestWriteTable(t *testing.T) {
	var b bytes.Buffer
	err := WriteTable(&b, Result{Op: "recover", Concurrency: 32, Requests: 10, PerSecond: 5, Succeeded: 7, SucceededPerSecond: 3.5,
		Errors: map[string]int64{"unavailable": 2, "locked": 1}, CPUPerOp: 412.4, LoadgenCPUPerRequest: 31.6},
		Result{Op: "enroll", Rate: 50, Errors: map[string]int64{}})
	if err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{"recover", "locked=1,unavailable=2", "50/s", "max"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	// succeeded/s stands beside req/s, in the header and in the row.
	lines := strings.Split(out, "\n")
	head, row := strings.Fields(lines[0]), strings.Fields(lines[1])
	i := slices.Index(head, "req/s")
	if i < 0 || i+1 >= len(head) || head[i+1] != "succeeded/s" || len(row) != len(head) || row[i] != "5" || row[i+1] != "4" {
		t.Errorf("want req/s 5 then succeeded/s 4 (3.5 rounded):\n%s", out)
	}
	// The costs, where measured, and "-" where not.
	c := slices.Index(head, "cpu_us/op")
	if c < 0 || c+1 >= len(head) || head[c+1] != "gen_us/req" || row[c] != "412" || row[c+1] != "32" {
		t.Errorf("want cpu_us/op 412 then gen_us/req 32:\n%s", out)
	}
	if other := strings.Fields(lines[2]); len(other) != len(head) || other[c] != "-" || other[c+1] != "-" {
		t.Errorf("want - for costs not measured:\n%s", out)
	}
}

// Progress is reported about once a second with running counts.
func TestProgress(t *testing.T) {
	var mu sync.Mutex
	var seen []Progress
	res, err := Run(context.Background(), Options{Concurrency: 2, Duration: 2500 * time.Millisecond,
		Progress: func(p Progress) { mu.Lock(); seen = append(seen, p); mu.Unlock() }}, everyOtherFails())
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 {
		t.Fatalf("%d progress reports in 2.5 s, want 2: %+v", len(seen), seen)
	}
	for i, p := range seen {
		if p.Requests == 0 || p.Requests > res.Requests || p.Succeeded > p.Requests || p.Succeeded < p.Requests/2-1 ||
			p.Elapsed < time.Duration(i+1)*time.Second || (i > 0 && p.Requests <= seen[i-1].Requests) {
			t.Errorf("report %d: %+v (run: %d requests)", i, p, res.Requests)
		}
	}
}

// The server's CPU time is read as the window opens and once it has
// closed, and divided by the successes; the generator's own by the
// requests.
func TestCPUPerOperation(t *testing.T) {
	var reads atomic.Int64
	cpu := func() (time.Duration, error) {
		if reads.Add(1) == 1 {
			return 5 * time.Second, nil
		}
		return 6 * time.Second, nil // one second over the window
	}
	res, err := Run(context.Background(), Options{Concurrency: 2, Duration: 100 * time.Millisecond, CPU: cpu}, everyOtherFails())
	if err != nil {
		t.Fatal(err)
	}
	if reads.Load() != 2 {
		t.Fatalf("the CPU was read %d times, want 2", reads.Load())
	}
	if want := round(1e6/float64(res.Succeeded), 1); res.CPUPerOp != want || res.CPUCores <= 0 {
		t.Fatalf("cpu_us_per_op %v (cores %v), want %v: 1 s over %d successes", res.CPUPerOp, res.CPUCores, want, res.Succeeded)
	}
	if res.LoadgenCPUPerRequest < 0 || res.LoadgenCPUCores < 0 {
		t.Fatalf("the generator's own CPU: %+v", res)
	}

	// A server whose CPU cannot be read ends the run.
	_, err = Run(context.Background(), Options{Concurrency: 1, Duration: 10 * time.Millisecond,
		CPU: func() (time.Duration, error) { return 0, errors.New("the vault is gone") }},
		func(context.Context, int) error { return nil })
	if err == nil || !strings.Contains(err.Error(), "the vault is gone") {
		t.Fatalf("err %v", err)
	}
}

func TestSelfCPU(t *testing.T) {
	before := SelfCPU()
	for x := 0; SelfCPU() == before; x++ {
		_ = fmt.Sprint(x) // spin until the clock moves
	}
	if SelfCPU() < before {
		t.Fatal("the process's CPU time went back")
	}
}

// everyOtherFails is an operation that takes a millisecond and fails every
// other time it runs.
func everyOtherFails() func(context.Context, int) error {
	var n atomic.Int64
	return func(context.Context, int) error {
		time.Sleep(time.Millisecond)
		if n.Add(1)%2 == 0 {
			return errors.New("every other one fails")
		}
		return nil
	}
}
