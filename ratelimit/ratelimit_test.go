package ratelimit_test

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/ratelimit"
)

// clock is a fake clock, safe for concurrent use.
type clock struct{ ns atomic.Int64 }

var epoch = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func (c *clock) Now() time.Time          { return epoch.Add(time.Duration(c.ns.Load())) }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }
func (c *clock) Elapsed() time.Duration  { return time.Duration(c.ns.Load()) }
func newLimits(cfg ratelimit.Config) (*ratelimit.Limits, *clock) {
	c := new(clock)
	return ratelimit.New(cfg, ratelimit.Options{Now: c.Now}), c
}

// limited returns the *Error in err, failing the test if err is not one.
func limited(t *testing.T, err error) *ratelimit.Error {
	t.Helper()
	var e *ratelimit.Error
	if !errors.As(err, &e) || !errors.Is(err, ratelimit.ErrLimited) {
		t.Fatalf("got %v, want a *ratelimit.Error matching ErrLimited", err)
	}
	return e
}

// wrongGuess is a guess that turns out wrong: admitted guesses charge the
// client's wrong-guess bucket.
func wrongGuess(l *ratelimit.Limits, client, ns, user string) error {
	err := guess(l, client, ns, user)
	if err == nil {
		l.WrongGuess(client)
	}
	return err
}

func TestEachLimiter(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     ratelimit.Config
		call    func(l *ratelimit.Limits, i int) error // the i-th call
		limiter string
		burst   int
		perSec  float64
	}{
		{
			name:    "guesses per user, default",
			cfg:     ratelimit.Config{GuessesPerUser: perMinute(5, 5)},
			call:    func(l *ratelimit.Limits, _ int) error { return guess(l, "messenger", "messenger", "alice") },
			limiter: ratelimit.LimiterGuessesPerUser, burst: 5, perSec: 5.0 / 60,
		},
		{
			name:    "guesses per user, 7 a minute",
			cfg:     ratelimit.Config{GuessesPerUser: perMinute(7, 3)},
			call:    func(l *ratelimit.Limits, _ int) error { return guess(l, "messenger", "messenger", "alice") },
			limiter: ratelimit.LimiterGuessesPerUser, burst: 3, perSec: 7.0 / 60,
		},
		{
			name:    "requests per client, default",
			cfg:     ratelimit.Config{RequestsPerClient: perSecond(500, 1000)},
			call:    func(l *ratelimit.Limits, _ int) error { return l.Request("messenger") },
			limiter: ratelimit.LimiterRequestsPerClient, burst: 1000, perSec: 500,
		},
		{
			name:    "requests per client, 3 a second",
			cfg:     ratelimit.Config{RequestsPerClient: perSecond(3, 2)},
			call:    func(l *ratelimit.Limits, _ int) error { return l.Request("messenger") },
			limiter: ratelimit.LimiterRequestsPerClient, burst: 2, perSec: 3,
		},
		{
			name: "wrong guesses per client, default",
			cfg:  ratelimit.Config{WrongGuessesPerClient: perMinute(600, 600)},
			call: func(l *ratelimit.Limits, i int) error {
				return wrongGuess(l, "messenger", "messenger", fmt.Sprint("user", i))
			},
			limiter: ratelimit.LimiterWrongGuessesPerClient, burst: 600, perSec: 10,
		},
		{
			name: "wrong guesses per client, with user limits on",
			cfg: ratelimit.Config{
				GuessesPerUser:        perMinute(5, 5),
				WrongGuessesPerClient: perMinute(11, 4),
			},
			call: func(l *ratelimit.Limits, i int) error {
				return wrongGuess(l, "messenger", "messenger", fmt.Sprint("user", i))
			},
			limiter: ratelimit.LimiterWrongGuessesPerClient, burst: 4, perSec: 11.0 / 60,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l, clk := newLimits(tt.cfg)
			i := 0
			for ; i < tt.burst; i++ {
				if err := tt.call(l, i); err != nil {
					t.Fatalf("call %d of the burst of %d: %v", i+1, tt.burst, err)
				}
			}
			e := limited(t, tt.call(l, i))
			if e.Limiter != tt.limiter {
				t.Errorf("Limiter = %q, want %q", e.Limiter, tt.limiter)
			}
			want := time.Duration(float64(time.Second) / tt.perSec) // one token
			if diff := (e.RetryAfter - want).Abs(); diff > time.Millisecond {
				t.Errorf("RetryAfter = %v, want %v to the millisecond", e.RetryAfter, want)
			}
			wantSecs := int(math.Max(1, math.Ceil(e.RetryAfter.Seconds())))
			if got := e.RetryAfterSeconds(); got != wantSecs {
				t.Errorf("RetryAfterSeconds = %d, want %d (RetryAfter %v)", got, wantSecs, e.RetryAfter)
			}

			// A millisecond early is still refused, and takes nothing...
			retry := e.RetryAfter
			clk.Advance(retry - time.Millisecond)
			e = limited(t, tt.call(l, i))
			if d := (e.RetryAfter - time.Millisecond).Abs(); d > time.Microsecond {
				t.Errorf("a millisecond early: RetryAfter = %v, want 1ms", e.RetryAfter)
			}
			// ...so exactly at RetryAfter the call is admitted, once.
			clk.Advance(time.Millisecond)
			if err := tt.call(l, i); err != nil {
				t.Fatalf("after exactly RetryAfter (%v): %v", retry, err)
			}
			i++
			if e := limited(t, tt.call(l, i)); e.RetryAfter < retry-time.Millisecond {
				t.Errorf("the next call: RetryAfter = %v, want about %v", e.RetryAfter, retry)
			}
		})
	}
}

func TestRetryAfterSeconds(t *testing.T) {
	t.Parallel()
	tests := []struct {
		d    time.Duration
		want int
	}{
		{0, 1},
		{time.Nanosecond, 1},
		{2 * time.Millisecond, 1},
		{time.Second, 1},
		{time.Second + time.Nanosecond, 2},
		{8571428571 * time.Nanosecond, 9},
		{12 * time.Second, 12},
		{time.Hour, 3600},
		{math.MaxInt64, int(math.MaxInt64 / time.Second)},
	}
	for _, tt := range tests {
		e := &ratelimit.Error{Limiter: ratelimit.LimiterGuessesPerUser, RetryAfter: tt.d}
		if got := e.RetryAfterSeconds(); got != tt.want {
			t.Errorf("RetryAfterSeconds(%v) = %d, want %d", tt.d, got, tt.want)
		}
	}
	e := &ratelimit.Error{Limiter: ratelimit.LimiterRequestsPerClient, RetryAfter: 2 * time.Millisecond}
	if got, want := e.Error(), "rate limited by requests_per_client: retry after 2ms"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
	if !errors.Is(fmt.Errorf("recover: %w", e), ratelimit.ErrLimited) {
		t.Error("a wrapped *Error does not match ErrLimited")
	}
}

func TestOff(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		r    ratelimit.Rate
	}{
		{"zero", ratelimit.Rate{}},
		{"zero rate with a burst", ratelimit.Rate{Burst: 5}},
		{"negative", perSecond(-1, 5)},
		{"NaN", perSecond(math.NaN(), 5)},
		{"infinite", perSecond(math.Inf(1), 5)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l, _ := newLimits(ratelimit.Config{GuessesPerUser: tt.r, RequestsPerClient: tt.r, WrongGuessesPerClient: tt.r})
			for i := range 10000 {
				if err := l.Request("messenger"); err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				if err := wrongGuess(l, "messenger", "messenger", "alice"); err != nil {
					t.Fatalf("guess %d: %v", i, err)
				}
			}
			if n := l.Keys(); n != 0 {
				t.Errorf("Keys() = %d with the user limit off, want 0", n)
			}
		})
	}
}

// A refused guess takes no token from the user's bucket and none from the
// client's wrong-guess bucket.
func TestRefusedGuessTakesNothing(t *testing.T) {
	t.Parallel()
	l, clk := newLimits(ratelimit.Config{
		GuessesPerUser:        perMinute(5, 5),
		WrongGuessesPerClient: perMinute(1, 1),
	})
	for i := range 5 {
		if err := guess(l, "messenger", "messenger", "alice"); err != nil {
			t.Fatalf("guess %d: %v", i+1, err)
		}
	}
	// Refused many times over 11.9 seconds: each says when, none takes.
	for step := range 119 {
		e := limited(t, guess(l, "messenger", "messenger", "alice"))
		want := 12*time.Second - time.Duration(step)*100*time.Millisecond
		if e.Limiter != ratelimit.LimiterGuessesPerUser || (e.RetryAfter-want).Abs() > time.Microsecond {
			t.Fatalf("at %v: %s after %v, want guesses_per_user after %v", clk.Elapsed(), e.Limiter, e.RetryAfter, want)
		}
		clk.Advance(100 * time.Millisecond)
	}
	clk.Advance(100 * time.Millisecond) // exactly 12s after the fifth guess
	if err := guess(l, "messenger", "messenger", "alice"); err != nil {
		t.Fatalf("at 12s: %v", err)
	}
	// The client's one wrong-guess token is untouched by all that.
	if err := wrongGuess(l, "messenger", "messenger", "bob"); err != nil {
		t.Fatalf("another user of the client: %v", err)
	}
	if e := limited(t, guess(l, "messenger", "messenger", "carol")); e.Limiter != ratelimit.LimiterWrongGuessesPerClient {
		t.Fatalf("after the client's wrong guess: refused by %s, want wrong_guesses_per_client", e.Limiter)
	}
}

// Wrong guesses admitted together drive the client's bucket into debt, and
// the client's guesses on any user are refused until it has refilled; those
// refusals take nothing from the users' buckets either.
func TestWrongGuessDebt(t *testing.T) {
	t.Parallel()
	l, clk := newLimits(ratelimit.Config{
		GuessesPerUser:        perMinute(5, 1),
		WrongGuessesPerClient: perSecond(1, 2),
	})
	// Four guesses checked while the bucket held 2 tokens (in flight together)...
	for i := range 4 {
		if err := guess(l, "messenger", "messenger", fmt.Sprint("user", i)); err != nil {
			t.Fatalf("guess %d: %v", i, err)
		}
	}
	// ...all wrong: the bucket is at -2, and needs 3s to hold a token.
	for range 4 {
		l.WrongGuess("messenger")
	}
	for i := range 10 {
		e := limited(t, guess(l, "messenger", "messenger", fmt.Sprint("other", i)))
		if e.Limiter != ratelimit.LimiterWrongGuessesPerClient || e.RetryAfter != 3*time.Second {
			t.Fatalf("user other%d: %s after %v, want wrong_guesses_per_client after 3s", i, e.Limiter, e.RetryAfter)
		}
	}
	// The debt is the client's: another client guesses on.
	if err := guess(l, "other-client", "messenger", "other0"); err != nil {
		t.Fatalf("another client: %v", err)
	}
	// Both limits refuse: the Retry-After is the longer wait.
	clk.Advance(2 * time.Second)
	e := limited(t, guess(l, "messenger", "messenger", "other0")) // its token was taken above
	if e.Limiter != ratelimit.LimiterGuessesPerUser || e.RetryAfter != 10*time.Second {
		t.Fatalf("both limits refuse: %s after %v, want guesses_per_user after 10s", e.Limiter, e.RetryAfter)
	}
	clk.Advance(time.Second)
	for i := range 10 {
		if i == 0 {
			continue // other0 waits for its own bucket
		}
		if err := guess(l, "messenger", "messenger", fmt.Sprint("other", i)); err != nil {
			t.Fatalf("after the refill, user other%d: %v", i, err) // the refusals took nothing
		}
	}
}

func TestIndependentKeys(t *testing.T) {
	t.Parallel()
	type key struct{ client, ns, user string }
	tests := []struct {
		name         string
		spent, other key
	}{
		{"users", key{"messenger", "messenger", "alice"}, key{"messenger", "messenger", "bob"}},
		{"namespaces", key{"messenger", "ns-one", "alice"}, key{"messenger", "ns-two", "alice"}},
		{"length prefix", key{"messenger", "a", "bc"}, key{"messenger", "ab", "c"}},
		{"length prefix, empty", key{"messenger", "", "abc"}, key{"messenger", "a", "bc"}},
		{"length prefix, long", key{"messenger", string(make([]byte, 200)), "x"}, key{"messenger", string(make([]byte, 199)), "\x00x"}},
		{"client does not matter", key{"messenger", "ns", "alice"}, key{"messenger", "ns", "bob"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			l, _ := newLimits(ratelimit.Config{GuessesPerUser: perMinute(5, 2)})
			for range 2 {
				if err := guess(l, tt.spent.client, tt.spent.ns, tt.spent.user); err != nil {
					t.Fatal(err)
				}
			}
			limited(t, guess(l, tt.spent.client, tt.spent.ns, tt.spent.user))
			for i := range 2 {
				if err := guess(l, tt.other.client, tt.other.ns, tt.other.user); err != nil {
					t.Fatalf("guess %d of the other key: %v", i+1, err)
				}
			}
		})
	}
	t.Run("same user, other client", func(t *testing.T) {
		t.Parallel()
		// The user's bucket is the user's, whichever client asks.
		l, _ := newLimits(ratelimit.Config{GuessesPerUser: perMinute(5, 1)})
		if err := guess(l, "one", "shared", "alice"); err != nil {
			t.Fatal(err)
		}
		limited(t, guess(l, "two", "shared", "alice"))
	})
	t.Run("clients", func(t *testing.T) {
		t.Parallel()
		l, _ := newLimits(ratelimit.Config{RequestsPerClient: perSecond(1, 3)})
		for range 3 {
			if err := l.Request("one"); err != nil {
				t.Fatal(err)
			}
		}
		limited(t, l.Request("one"))
		for range 3 {
			if err := l.Request("two"); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// An idle user's state is dropped after the idle period (Burst/PerSecond),
// and an active user's survives the rotations.
func TestIdleStatesDropped(t *testing.T) {
	t.Parallel()
	l, clk := newLimits(ratelimit.Config{GuessesPerUser: perMinute(5, 5)}) // idle period 60s
	for i := range 1000 {
		if err := guess(l, "messenger", "messenger", fmt.Sprint("user", i)); err != nil {
			t.Fatal(err)
		}
	}
	if n := l.Keys(); n != 1000 {
		t.Fatalf("Keys() = %d, want 1000", n)
	}
	clk.Advance(60*time.Second - time.Nanosecond)
	if n := l.Keys(); n != 1000 {
		t.Fatalf("just before the idle period: Keys() = %d, want 1000", n)
	}
	clk.Advance(time.Nanosecond)
	if n := l.Keys(); n != 0 {
		t.Fatalf("after the idle period: Keys() = %d, want 0", n)
	}
}

func TestActiveStateSurvivesRotations(t *testing.T) {
	t.Parallel()
	l, clk := newLimits(ratelimit.Config{GuessesPerUser: perMinute(5, 5)}) // a token per 12s
	for range 5 {
		if err := guess(l, "messenger", "messenger", "alice"); err != nil {
			t.Fatal(err)
		}
	}
	// For an hour, alice guesses as soon as she may (every 12s), and others
	// come and go. Were her empty bucket dropped, she would get a new burst.
	for step := range 300 {
		for i := range 20 {
			if err := guess(l, "messenger", "messenger", fmt.Sprintf("passer-by-%d-%d", step, i)); err != nil {
				t.Fatal(err)
			}
		}
		clk.Advance(12 * time.Second)
		if err := guess(l, "messenger", "messenger", "alice"); err != nil {
			t.Fatalf("at %v: %v", clk.Elapsed(), err)
		}
		if e := limited(t, guess(l, "messenger", "messenger", "alice")); e.RetryAfter != 12*time.Second {
			t.Fatalf("at %v: RetryAfter = %v, want 12s", clk.Elapsed(), e.RetryAfter)
		}
	}
	// The passers-by of the last minute or two are held, not those of the hour.
	if n := l.Keys(); n < 20 || n > 10*20+1 {
		t.Errorf("Keys() = %d, want the recent passers-by only", n)
	}
}

// Under concurrent use, one key's bucket never admits more than
// burst + rate*window, and the race detector finds nothing.
func TestConcurrent(t *testing.T) {
	t.Parallel()
	cfg := ratelimit.Config{
		GuessesPerUser:        perSecond(1000, 10),
		RequestsPerClient:     perSecond(2000, 50),
		WrongGuessesPerClient: perSecond(1e6, 1e6), // on, but out of the way
	}
	l, clk := newLimits(cfg)
	const goroutines, rounds = 8, 2000
	var hot, requests atomic.Int64
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range rounds {
				clk.Advance(10 * time.Microsecond)
				if guess(l, "messenger", "messenger", "hot") == nil {
					hot.Add(1)
					l.WrongGuess("messenger")
				}
				if l.Request("messenger") == nil {
					requests.Add(1)
				}
				_ = guess(l, "messenger", "messenger", fmt.Sprint("cold", g, i%100))
				_ = l.Keys()
			}
		})
	}
	wg.Wait()
	window := clk.Elapsed().Seconds()
	check := func(name string, admitted int64, r ratelimit.Rate) {
		bound := int64(math.Floor(float64(r.Burst) + r.PerSecond*window + 1e-6))
		t.Logf("%s: %d admitted in %.3fs, bound %d", name, admitted, window, bound)
		if admitted > bound {
			t.Errorf("%s: %d admitted in %.3fs, more than burst + rate*window = %d", name, admitted, window, bound)
		}
		if admitted < bound/2 {
			t.Errorf("%s: only %d admitted, the bound is %d: is the test testing?", name, admitted, bound)
		}
	}
	check("guesses of one user", hot.Load(), cfg.GuessesPerUser)
	check("requests of one client", requests.Load(), cfg.RequestsPerClient)
}

// The wrong-guess bound under concurrency: guesses in flight together may
// overdraw the bucket, but the debt holds back what follows.
func TestConcurrentWrongGuesses(t *testing.T) {
	t.Parallel()
	r := perSecond(100, 20)
	l, clk := newLimits(ratelimit.Config{WrongGuessesPerClient: r})
	const goroutines, rounds = 8, 2000
	var admitted atomic.Int64
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range rounds {
				clk.Advance(10 * time.Microsecond)
				if wrongGuess(l, "messenger", "messenger", fmt.Sprint(g, "-", i)) == nil {
					admitted.Add(1)
				}
			}
		})
	}
	wg.Wait()
	window := clk.Elapsed().Seconds()
	// Each admitted guess was checked against a bucket holding a token; at
	// most goroutines-1 others can be checked before it is charged.
	bound := int64(float64(r.Burst)+r.PerSecond*window) + goroutines
	t.Logf("%d wrong guesses admitted in %.3fs, bound %d", admitted.Load(), window, bound)
	if admitted.Load() > bound {
		t.Errorf("%d wrong guesses admitted in %.3fs, want at most %d", admitted.Load(), window, bound)
	}
}

// Whatever the rate and the history, a retry exactly RetryAfter later is
// admitted, and a retry a microsecond earlier is not: the Retry-After is
// truthful and tight, in spite of floating-point rounding.
func TestRetryAfterTruthful(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(1, 2))
	for _, perSec := range []float64{1.0 / 7, 5.0 / 60, 0.3, 1, 13.7, 997, 1e5 / 3} {
		for burst := 1; burst <= 3; burst++ {
			l, clk := newLimits(ratelimit.Config{RequestsPerClient: perSecond(perSec, burst)})
			for i := range 300 {
				err := l.Request("messenger")
				if err == nil {
					clk.Advance(time.Duration(rng.Float64() / perSec * float64(time.Second)))
					continue
				}
				retry := limited(t, err).RetryAfter
				if retry > time.Microsecond {
					clk.Advance(retry - time.Microsecond)
					if err := l.Request("messenger"); err == nil {
						t.Fatalf("rate %v burst %d, call %d: admitted a microsecond before RetryAfter %v", perSec, burst, i, retry)
					}
					clk.Advance(time.Microsecond)
				} else {
					clk.Advance(retry)
				}
				if err := l.Request("messenger"); err != nil {
					t.Fatalf("rate %v burst %d, call %d: refused exactly RetryAfter %v later: %v", perSec, burst, i, retry, err)
				}
			}
		}
	}
}

// ReserveGuess's undo gives the user's token back, so a guess that checked
// nothing costs nothing; a refused reservation has nothing to undo.
func TestReserveGuessUndo(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	l := ratelimit.New(ratelimit.Config{GuessesPerUser: perMinute(1, 1)}, ratelimit.Options{Now: func() time.Time { return now }})
	undo, err := l.ReserveGuess("c", "ns", "u")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.ReserveGuess("c", "ns", "u"); err == nil {
		t.Fatal("a second guess within the minute was admitted")
	}
	undo()
	undo2, err := l.ReserveGuess("c", "ns", "u")
	if err != nil {
		t.Fatalf("after undo, the token is back: %v", err)
	}
	_ = undo2
	if _, err := l.ReserveGuess("c", "ns", "u"); err == nil {
		t.Fatal("the token was given back twice")
	}
}

// HoldHSM holds each client to its share of the HSM admission capacity,
// rounded down and at least 1, as the capacity is now: a refusal holds
// nothing, says hsm_share_per_client with a Retry-After of a second, and
// is counted; a release gives the place back once, however often called;
// one client's places are not another's.
func TestHoldHSM(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	var capacity atomic.Int64
	capacity.Store(10)
	l := ratelimit.New(ratelimit.Config{HSMSharePerClientPercent: 50}, ratelimit.Options{
		Registerer: reg, HSMCapacity: func() int { return int(capacity.Load()) },
	})
	hold := func(client string, want bool) func() {
		t.Helper()
		release, err := l.HoldHSM(client)
		if (err == nil) != want {
			t.Fatalf("HoldHSM(%s) = %v, want admitted %v", client, err, want)
		}
		if err != nil {
			if e := limited(t, err); e.Limiter != ratelimit.LimiterHSMSharePerClient || e.RetryAfter != time.Second {
				t.Fatalf("refusal %+v, want hsm_share_per_client after 1s", e)
			}
		}
		return release
	}
	var held []func()
	for range 5 {
		held = append(held, hold("a", true))
	}
	hold("a", false)
	other := hold("b", true) // b has its own five
	held[0]()
	held[0]() // a second release gives nothing more back
	held = append(held[1:], hold("a", true))
	hold("a", false)
	// Members down: the share shrinks with the capacity, so a client
	// holding five of what is now 4 waits until it holds fewer than 2.
	capacity.Store(4)
	for range 3 {
		held[0]()
		held = held[1:]
		hold("a", false)
	}
	held[0]()
	held = append(held[1:], hold("a", true))
	// The least share is one place, even of a capacity of 1 or 0.
	capacity.Store(1)
	other()
	release := hold("b", true)
	hold("b", false)
	release()
	if got := rejectionsOf(t, reg, ratelimit.LimiterHSMSharePerClient); got != 6 {
		t.Errorf("rejections{limiter=hsm_share_per_client} = %v, want 6", got)
	}

	// Off: a share of 0 or 100%, or no capacity function.
	for _, c := range []struct {
		share    int
		capacity func() int
	}{{0, func() int { return 1 }}, {100, func() int { return 1 }}, {50, nil}} {
		l := ratelimit.New(ratelimit.Config{HSMSharePerClientPercent: c.share}, ratelimit.Options{HSMCapacity: c.capacity})
		for range 100 {
			if _, err := l.HoldHSM("a"); err != nil {
				t.Fatalf("share %v: %v, want the cap off", c.share, err)
			}
		}
	}
}

// rejectionsOf reads keyvault_ratelimit_rejections_total of one limiter.
func rejectionsOf(t *testing.T, reg *prometheus.Registry, limiter string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			if mf.GetName() == "keyvault_ratelimit_rejections_total" && m.GetLabel()[0].GetValue() == limiter {
				return m.GetCounter().GetValue()
			}
		}
	}
	t.Fatalf("no rejections series for %s", limiter)
	return 0
}

// undo gives the token back however much later it runs: the guess it
// belongs to may wait for the HSMs for a while before it is shed. Tokens
// taken by other guesses meanwhile stay taken, and the bucket's refill
// over that time is neither lost nor counted twice.
func TestReserveGuessUndoLater(t *testing.T) {
	t.Parallel()
	l, clk := newLimits(ratelimit.Config{GuessesPerUser: perMinute(2, 2)})
	undo, err := l.ReserveGuess("c", "ns", "u")
	if err != nil {
		t.Fatal(err)
	}
	clk.Advance(10 * time.Second)
	if _, err := l.ReserveGuess("c", "ns", "u"); err != nil {
		t.Fatalf("second guess of a burst of 2: %v", err)
	}
	clk.Advance(50 * time.Millisecond)
	undo()
	// Given back as of the time it was taken, net of the second guess.
	if _, err := l.ReserveGuess("c", "ns", "u"); err != nil {
		t.Fatalf("after undo, 50ms later: %v (the token was not given back)", err)
	}
	e := limited(t, func() error { _, err := l.ReserveGuess("c", "ns", "u"); return err }())
	// The bucket held one token after the undo; 10.05 s of refill at 2 a
	// minute, counted once, and the third guess leave 0.335 of a token, so
	// the next is 19.95 s away, to the nanosecond.
	if want := 30*time.Second - 10050*time.Millisecond; e.RetryAfter != want {
		t.Fatalf("RetryAfter %v, want %v", e.RetryAfter, want)
	}
}

// perMinute is a Rate of n tokens a minute, with the given burst.
func perMinute(n float64, burst int) ratelimit.Rate {
	return ratelimit.Rate{PerSecond: n / 60, Burst: burst}
}

// perSecond is a Rate of n tokens a second, with the given burst.
func perSecond(n float64, burst int) ratelimit.Rate {
	return ratelimit.Rate{PerSecond: n, Burst: burst}
}

// guess admits one guess and keeps its token, as a guess the vault checks.
func guess(l *ratelimit.Limits, client, ns, userID string) error {
	_, err := l.ReserveGuess(client, ns, userID)
	return err
}
