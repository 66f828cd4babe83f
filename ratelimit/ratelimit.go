package ratelimit

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
)

// The names of the limiters, as they appear in Error.Limiter and in the
// limiter label of keyvault_ratelimit_rejections_total.
const (
	LimiterGuessesPerUser        = "guesses_per_user"
	LimiterRequestsPerClient     = "requests_per_client"
	LimiterWrongGuessesPerClient = "wrong_guesses_per_client"
	// LimiterEscalatingDelay is the vault's durable delay between wrong
	// guesses, counted here through EscalatingDelayRejected.
	LimiterEscalatingDelay = "escalating_delay"
	// LimiterHSMSharePerClient caps the requests one client has in the
	// vault's HSM admission at once (HoldHSM).
	LimiterHSMSharePerClient = "hsm_share_per_client"
)

// DefaultHSMSharePerClientPercent is the default
// Config.HSMSharePerClientPercent.
const DefaultHSMSharePerClientPercent = 50

// hsmShareRetryAfter is the Retry-After of a refusal by the HSM share: a
// place frees as soon as one of the client's own requests in the vault
// ends, normally within milliseconds, and a Retry-After is whole seconds.
const hsmShareRetryAfter = time.Second

// DefaultMaxKeys is the default bound on the number of per-user states
// (Options.MaxKeys).
const DefaultMaxKeys = 65536

// ErrLimited is what every refusal matches: errors.Is(err, ErrLimited)
// holds for each *Error that Request and ReserveGuess return.
var ErrLimited = errors.New("rate limited")

// Rate is a token bucket: PerSecond tokens are added every second, up to
// Burst. A PerSecond of 0 (the zero Rate), a negative one, NaN or +Inf turns
// the limiter off. With the limiter on, a Burst below 1 counts as 1 (the
// config package refuses such a value before it gets here).
type Rate struct {
	PerSecond float64 // tokens added per second; 0 turns the limiter off
	Burst     int     // the bucket's size: the most admitted at once
}

// bucket returns the limit and burst of r, or nil when r is off.
func (r Rate) bucket() *bucket {
	if !(r.PerSecond > 0) || math.IsInf(r.PerSecond, 1) {
		return nil
	}
	return &bucket{limit: rate.Limit(r.PerSecond), burst: max(r.Burst, 1)}
}

// Config holds the limits. The zero Config limits nothing; the defaults
// are the config package's.
type Config struct {
	// GuessesPerUser limits PIN guesses (recover and PIN change) per user,
	// keyed by namespace and user_id. Default 5 per minute, burst 5.
	GuessesPerUser Rate
	// RequestsPerClient limits every /v1 request, keyed by client name.
	// Default 500 per second, burst 1000.
	RequestsPerClient Rate
	// WrongGuessesPerClient limits the wrong guesses a client may cause
	// across all its users, keyed by client name. Default 600 per minute,
	// burst 600.
	WrongGuessesPerClient Rate
	// HSMSharePerClientPercent is the percentage of the HSM admission
	// capacity (Options.HSMCapacity) that one client may hold at once, so
	// that a client flooding the vault leaves the rest to the others. Keyed
	// by client name. Default 50; 0, 100 or more turns the cap off.
	HSMSharePerClientPercent int
}

// Options are the dependencies of Limits; the zero Options is usable.
type Options struct {
	// Now is the clock. Default time.Now, whose monotonic reading keeps the
	// buckets right across wall-clock steps. It is called under the locks,
	// so that each bucket sees its times in order: it must be cheap, safe for
	// concurrent use, and never go back.
	Now func() time.Time
	// Registerer receives the metrics. Default: a private registry, so that
	// nothing is exported.
	Registerer prometheus.Registerer
	// MaxKeys bounds the per-user states held in memory (see the package
	// doc). Default DefaultMaxKeys; values from 1 to 31 are raised to 32 so
	// that each shard's generation holds at least one state.
	MaxKeys int
	// HSMCapacity reports how many requests the HSM admission lets into
	// the vault at once now (it shrinks while members are down), for
	// Config.HSMSharePerClientPercent. It is called on every HoldHSM, so it must
	// be cheap and safe for concurrent use. Default nil: no cap.
	HSMCapacity func() int
}

// Error is a refusal: which limiter refused, and how long until a retry can
// succeed. A refused call took nothing from any bucket.
type Error struct {
	Limiter    string        // one of the Limiter* constants
	RetryAfter time.Duration // until the refusing bucket (all of them, for ReserveGuess) has a token
}

func (e *Error) Error() string {
	return fmt.Sprintf("rate limited by %s: retry after %s", e.Limiter, e.RetryAfter)
}

// Is makes errors.Is(err, ErrLimited) hold for every *Error.
func (e *Error) Is(target error) bool { return target == ErrLimited }

// RetryAfterSeconds returns the integer number of seconds for a Retry-After
// header: the ceiling of RetryAfter, at least 1. Rounding up keeps the header
// truthful: a retry after that many seconds finds a token (unless someone
// else took it first).
func (e *Error) RetryAfterSeconds() int {
	if e.RetryAfter > math.MaxInt64-time.Second {
		return int(math.MaxInt64 / time.Second)
	}
	return int(max((e.RetryAfter+time.Second-1)/time.Second, 1))
}

// Limits holds the limiters. It is safe for concurrent use.
type Limits struct {
	now     func() time.Time
	metrics *metrics

	hsmShare    int        // percent; 0: no cap
	hsmCapacity func() int // nil: no cap

	users    *keyed  // per-user guess buckets; nil when GuessesPerUser is off
	requests *bucket // nil when RequestsPerClient is off
	wrong    *bucket // nil when WrongGuessesPerClient is off

	mu      sync.RWMutex
	clients map[string]*clientLimits
}

// clientLimits are the buckets of one client. Its mutex is held across
// reading the clock and using a bucket, so a bucket sees its times in order
// (rate.Limiter refills twice over an interval when it is handed an earlier
// time after a later one).
type clientLimits struct {
	mu       sync.Mutex
	requests *rate.Limiter // nil when off
	wrong    *rate.Limiter // nil when off
	hsm      int           // requests holding an HSM place (HoldHSM)
}

// New returns the limits of cfg and registers their metrics with
// opts.Registerer (once: a second New on the same registerer panics, as
// promauto does).
func New(cfg Config, opts Options) *Limits {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	switch {
	case opts.MaxKeys <= 0:
		opts.MaxKeys = DefaultMaxKeys
	case opts.MaxKeys < 2*shardCount:
		opts.MaxKeys = 2 * shardCount
	}
	l := &Limits{
		now:         opts.Now,
		hsmCapacity: opts.HSMCapacity,
		requests:    cfg.RequestsPerClient.bucket(),
		wrong:       cfg.WrongGuessesPerClient.bucket(),
		clients:     make(map[string]*clientLimits),
	}
	if b := cfg.GuessesPerUser.bucket(); b != nil {
		l.users = newKeyed(b, opts.MaxKeys, opts.Now())
	}
	if cfg.HSMSharePerClientPercent > 0 && cfg.HSMSharePerClientPercent < 100 {
		l.hsmShare = cfg.HSMSharePerClientPercent
	}
	l.metrics = newMetrics(opts.Registerer, func() float64 { return float64(l.Keys()) })
	return l
}

// Request admits one API request of a client (the per-client request
// limiter). It returns nil or an *Error. client is a configured client's
// name, never caller-chosen text: each name seen keeps its buckets for the
// life of the process.
func (l *Limits) Request(client string) error {
	if l.requests == nil {
		return nil
	}
	c := l.client(client)
	c.mu.Lock()
	wait := l.requests.take(c.requests, l.now())
	c.mu.Unlock()
	if wait > 0 {
		return l.refuse(LimiterRequestsPerClient, wait)
	}
	return nil
}

// ReserveGuess admits one PIN guess (recover or PIN change) for the user
// userID in namespace ns, by the client named client. It takes a token from
// the user's bucket, and checks, without taking, that the client's
// wrong-guess bucket has one (WrongGuess charges it once the guess turns out
// wrong). A refused guess takes nothing from any bucket, and its RetryAfter
// is the wait until both buckets have a token; Limiter names the one with
// the longer wait.
//
// On success it also returns undo, which gives the user's token back: for a
// guess that then checked nothing (the backup was missing, locked or
// delayed, or the HSMs shed it), so that it costs the user nothing and later
// Retry-After values stay true. undo is safe to call once, from any
// goroutine.
func (l *Limits) ReserveGuess(client, ns, userID string) (undo func(), err error) {
	undo = func() {}
	var clientWait time.Duration
	if l.wrong != nil {
		c := l.client(client)
		c.mu.Lock()
		clientWait = l.wrong.wait(c.wrong, l.now())
		c.mu.Unlock()
	}
	var userWait time.Duration
	if l.users != nil {
		var buf [256]byte // a valid key has at most 1+64+128 bytes
		var give func()
		userWait, give = l.users.take(appendKey(buf[:0], ns, userID), l.now, clientWait == 0)
		if give != nil {
			undo = give
		}
	}
	switch {
	case clientWait == 0 && userWait == 0:
		return undo, nil // the user's token is taken
	case clientWait > userWait:
		return nil, l.refuse(LimiterWrongGuessesPerClient, clientWait)
	default:
		return nil, l.refuse(LimiterGuessesPerUser, userWait)
	}
}

// WrongGuess charges the client's wrong-guess bucket for a guess that
// ReserveGuess admitted and the vault then checked and found wrong: a wrong_pin answer,
// or the locked answer of the guess that used the last attempt. Guesses
// admitted together may drive the bucket below zero; that debt is real, and
// ReserveGuess refuses the client until the bucket has refilled to one token.
func (l *Limits) WrongGuess(client string) {
	if l.wrong == nil {
		return
	}
	c := l.client(client)
	c.mu.Lock()
	c.wrong.ReserveN(l.now(), 1) // always OK: 1 <= burst, and no limit on the wait
	c.mu.Unlock()
}

// HoldHSM admits one request of the client that will use the HSMs, if the
// client holds fewer than its share of the HSM admission capacity:
// Config.HSMSharePerClientPercent of Options.HSMCapacity(), rounded down, and
// at least 1. release gives the place back; it is safe to call once, from
// any goroutine. A refusal is an *Error with a RetryAfter of a second and
// holds nothing. The caller asks before the HSM admission itself, so that
// a client at its cap never queues there, ahead of other clients.
func (l *Limits) HoldHSM(client string) (release func(), err error) {
	if l.hsmShare == 0 || l.hsmCapacity == nil {
		return func() {}, nil
	}
	limit := max(1, l.hsmCapacity()*l.hsmShare/100)
	c := l.client(client)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.hsm >= limit {
		return nil, l.refuse(LimiterHSMSharePerClient, hsmShareRetryAfter)
	}
	c.hsm++
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			c.hsm--
			c.mu.Unlock()
		})
	}, nil
}

// EscalatingDelayRejected counts a guess that the vault's durable
// escalating delay refused, so that every 429 shows in one metric.
func (l *Limits) EscalatingDelayRejected() { l.metrics.rejected(LimiterEscalatingDelay) }

// Keys reports how many per-user states are held. It first drops the states
// that have been idle for the idle period, so the gauge reads true.
func (l *Limits) Keys() int {
	if l.users == nil {
		return 0
	}
	return l.users.sweep(l.now)
}

// client returns the buckets of the named client, made on first use.
func (l *Limits) client(name string) *clientLimits {
	l.mu.RLock()
	c := l.clients[name]
	l.mu.RUnlock()
	if c != nil {
		return c
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if c = l.clients[name]; c == nil {
		c = &clientLimits{requests: l.requests.newLimiter(), wrong: l.wrong.newLimiter()}
		l.clients[name] = c
	}
	return c
}

func (l *Limits) refuse(limiter string, wait time.Duration) *Error {
	l.metrics.rejected(limiter)
	return &Error{Limiter: limiter, RetryAfter: wait}
}

// bucket is a limit that is on: the parameters of its rate.Limiters.
type bucket struct {
	limit rate.Limit
	burst int
}

// newLimiter returns a full bucket, or nil when b is nil (off).
func (b *bucket) newLimiter() *rate.Limiter {
	if b == nil {
		return nil
	}
	return rate.NewLimiter(b.limit, b.burst)
}

// take takes one token from lim at t if it has one and returns 0; else it
// takes nothing and returns the wait until it has one. The caller serialises
// the calls on lim, so the wait is exact.
func (b *bucket) take(lim *rate.Limiter, t time.Time) time.Duration {
	if lim.AllowN(t, 1) {
		return 0
	}
	return b.wait(lim, t)
}

// maxExactWait is the longest wait that wait checks against the limiter; the
// waits of any sane configuration are far shorter.
const maxExactWait = 1 << 50 // about 13 days

// wait returns how long after t lim will have one token: 0 when AllowN(t, 1)
// would succeed now, else the delay ReserveN(t, 1) would report, computed in
// the limiter's own arithmetic and checked against it, so that asking again
// exactly that much later is admitted (a truthful Retry-After).
func (b *bucket) wait(lim *rate.Limiter, t time.Time) time.Duration {
	d := b.deficit(lim, t)
	for i := 0; i < 4 && d > 0 && d < maxExactWait; i++ {
		extra := b.deficit(lim, t.Add(d))
		if extra == 0 {
			break
		}
		d += extra // floating-point rounding left a nanosecond or so short
	}
	return d
}

// deficit is rate.Limiter's own reserveN arithmetic for one token at t,
// without the reservation: the missing fraction of a token, as a duration
// truncated to the nanosecond (so 0 exactly when AllowN(t, 1) succeeds).
func (b *bucket) deficit(lim *rate.Limiter, t time.Time) time.Duration {
	missing := 1 - lim.TokensAt(t)
	if missing <= 0 {
		return 0
	}
	d := missing / float64(b.limit) * float64(time.Second)
	if d > float64(math.MaxInt64) {
		return rate.InfDuration
	}
	return time.Duration(d)
}

// idle is how long an untouched bucket takes to refill from empty to full
// (Burst/PerSecond, to the nanosecond), at least a second: a per-user state
// idle for that long is a full bucket and can be forgotten.
func (b *bucket) idle() time.Duration {
	s := math.Round(float64(b.burst) / float64(b.limit) * float64(time.Second))
	if s >= float64(math.MaxInt64) {
		return rate.InfDuration
	}
	return max(time.Duration(s), time.Second)
}
