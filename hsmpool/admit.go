package hsmpool

import (
	"context"
	"fmt"
	"time"
)

// Admit admits one request that will use the HSMs until release is called.
// At most AdmitPerSession times the healthy members' sessions (the sum of
// their session limits: max_sessions, or what the token gives) hold an
// admission; a request waits no longer than QueueTimeout or ctx allows for
// one, and past that it is shed with ErrUnavailable. Admitted requests
// queue for a session no deeper than that bound, so under any load their
// latency stays bounded, and the rest are refused fast, before anything is
// counted, instead of queuing without bound.
//
// Waiters are admitted in arrival order, and a request that arrives while
// others wait queues behind them: a leaving request hands its admission to
// the first waiter. Were a newcomer let in first, a client that loops
// would take every admission that comes free, and waiters would be shed
// after QueueTimeout with the HSMs far from full.
func (p *Pool) Admit(ctx context.Context) (release func(), err error) {
	release = func() {
		p.admitted.Add(-1)
		p.handOff()
	}
	p.admitMu.Lock()
	if len(p.admitQueue) == 0 {
		switch p.tryAdmit() {
		case admitted:
			p.admitMu.Unlock()
			return release, nil
		case noMember:
			p.admitMu.Unlock()
			return nil, fmt.Errorf("%w: no healthy HSM member", ErrUnavailable)
		}
	}
	w := make(chan struct{}, 1)
	p.admitQueue = append(p.admitQueue, w)
	p.admitMu.Unlock()

	var queue <-chan time.Time
	if p.opts.QueueTimeout > 0 {
		t := time.NewTimer(p.opts.QueueTimeout)
		defer t.Stop()
		queue = t.C
	}
	// Capacity also grows when a member comes back, and goes when the
	// last one leaves: look again now and then, not only when a request
	// leaves.
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		var refusal error
		select {
		case <-w:
			return release, nil
		case <-tick.C:
			if p.Healthy() > 0 {
				p.handOff()
				continue
			}
			refusal = fmt.Errorf("%w: no healthy HSM member", ErrUnavailable)
		case <-queue:
			p.metrics.shed.WithLabelValues("admission").Inc()
			refusal = fmt.Errorf("%w: the HSMs are busy: no session within %v", ErrUnavailable, p.opts.QueueTimeout)
		case <-ctx.Done():
			p.metrics.shed.WithLabelValues("admission").Inc()
			refusal = fmt.Errorf("%w: waiting for the HSMs: %w", ErrUnavailable, ctx.Err())
		}
		if p.leaveQueue(w) {
			return nil, refusal
		}
		// Handed an admission while giving up: pass it on.
		release()
		return nil, refusal
	}
}

// handOff admits waiters, first come first, while there is room.
func (p *Pool) handOff() {
	p.admitMu.Lock()
	defer p.admitMu.Unlock()
	for len(p.admitQueue) > 0 && p.tryAdmit() == admitted {
		p.admitQueue[0] <- struct{}{}
		p.admitQueue = p.admitQueue[1:]
	}
}

// leaveQueue takes w out of the queue; false if it was handed an
// admission first.
func (p *Pool) leaveQueue(w chan struct{}) bool {
	p.admitMu.Lock()
	defer p.admitMu.Unlock()
	for i, q := range p.admitQueue {
		if q == w {
			p.admitQueue = append(p.admitQueue[:i], p.admitQueue[i+1:]...)
			return true
		}
	}
	return false
}

type admission int

const (
	admitted admission = iota
	full               // every session of the healthy members is held
	noMember           // no member is healthy: waiting would not help
)

// tryAdmit takes an admission if fewer requests hold one than the healthy
// members have sessions.
func (p *Pool) tryAdmit() admission {
	capacity := int64(0)
	for _, m := range p.members {
		if m.healthy.Load() {
			capacity += m.limit.Load()
		}
	}
	if capacity == 0 {
		return noMember
	}
	capacity *= int64(max(1, p.opts.AdmitPerSession))
	for {
		n := p.admitted.Load()
		if n >= capacity {
			return full
		}
		if p.admitted.CompareAndSwap(n, n+1) {
			return admitted
		}
	}
}

// sessionLimiter is a token that reports the most sessions it has given
// (0: it never refused one).
type sessionLimiter interface{ sessionLimit() int }

// limitSessions lowers the member's share of the pool to n sessions, the
// most its token gave before it answered CKR_SESSION_COUNT: requests then
// wait for one of those n in acquire, within QueueTimeout and their
// context, instead of failing at the token, and Admit counts n. The
// member's slots beyond n are held for good by a goroutine that takes
// each as it comes free. The limit stays for the life of the pool, across
// re-opens: a token's limit is a property of the HSM.
func (p *Pool) limitSessions(m *member, n int) {
	for {
		cur := m.limit.Load()
		if int64(n) >= cur {
			return
		}
		if m.limit.CompareAndSwap(cur, int64(n)) {
			p.metrics.sessionsMax.WithLabelValues(m.name).Set(float64(n))
			if m.limitLogged.CompareAndSwap(false, true) {
				p.log.Warn("HSM member's token refused a session (CKR_SESSION_COUNT): serving with the sessions it gives; raise its limit or lower max_sessions",
					"member", m.name, "sessions", n, "max_sessions", cap(m.sessions))
			}
			p.holdSlots(m, int(cur)-n)
			return
		}
	}
}

// holdSlots takes k of the member's session slots and never gives them
// back, unless the pool closes first.
func (p *Pool) holdSlots(m *member, k int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for range k {
			select {
			case m.sessions <- struct{}{}:
			case <-p.stop:
				return
			}
		}
	}()
}
