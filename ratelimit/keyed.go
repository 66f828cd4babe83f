package ratelimit

import (
	"encoding/binary"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// shardCount is the number of independently locked shards of the per-user
// states. Each holds at most MaxKeys/shardCount states.
const shardCount = 16

// appendKey appends the map key of (ns, userID) to b: the length of ns as a
// uvarint, ns, then userID. The length prefix makes the encoding injective:
// ("a", "bc") and ("ab", "c") are different keys.
func appendKey(b []byte, ns, userID string) []byte {
	b = binary.AppendUvarint(b, uint64(len(ns)))
	b = append(b, ns...)
	return append(b, userID...)
}

// keyed holds one token bucket per key in bounded memory: shardCount shards,
// each with two generations of at most genCap states (see the package doc).
type keyed struct {
	bucket *bucket
	idle   time.Duration // a state untouched this long is a full bucket
	seed   maphash.Seed
	shards [shardCount]shard
	states atomic.Int64 // the states held in all shards
	// due is no later than the first time a shard's generations can expire
	// (the earliest rotation plus idle); sweep does nothing before it.
	due atomic.Pointer[time.Time]
}

type shard struct {
	mu     sync.Mutex
	genCap int                      // the most states in one generation
	cur    map[string]*rate.Limiter // nil when empty
	prev   map[string]*rate.Limiter // nil when empty
	// Every state in prev was last touched at or before rotated, and every
	// state in cur at or before lastUse.
	rotated time.Time
	lastUse time.Time
}

func newKeyed(b *bucket, maxKeys int, now time.Time) *keyed {
	k := &keyed{bucket: b, idle: b.idle(), seed: maphash.MakeSeed()}
	for i := range k.shards {
		k.shards[i].genCap = maxKeys / (2 * shardCount)
		k.shards[i].rotated = now
		k.shards[i].lastUse = now
	}
	due := now.Add(k.idle)
	k.due.Store(&due)
	return k
}

// take takes one token from key's bucket if mayTake and the bucket has one,
// and returns 0 and a function that gives the token back; else it takes
// nothing and returns the wait until the bucket has a token (0 if it has one
// now). A key without a state has a full bucket; a state is made only when a
// token is taken. now is read under the shard's lock, so each bucket sees its
// times in order.
func (k *keyed) take(key []byte, now func() time.Time, mayTake bool) (time.Duration, func()) {
	s := &k.shards[maphash.Bytes(k.seed, key)%shardCount]
	s.mu.Lock()
	defer s.mu.Unlock()
	t := now()
	before := len(s.cur) + len(s.prev)
	defer func() { k.states.Add(int64(len(s.cur) + len(s.prev) - before)) }()

	s.expire(t, k.idle)
	lim := s.cur[string(key)]
	if lim == nil {
		if lim = s.prev[string(key)]; lim != nil {
			delete(s.prev, string(key))
			s.insert(string(key), lim, t) // moved: its holder is active
		}
	}
	if lim == nil {
		if !mayTake {
			return 0, nil
		}
		lim = k.bucket.newLimiter()
		s.insert(string(key), lim, t)
	} else if t.After(s.lastUse) {
		s.lastUse = t
	}
	if !mayTake {
		return k.bucket.wait(lim, t), nil
	}
	if wait := k.bucket.wait(lim, t); wait > 0 {
		return wait, nil
	}
	r := lim.ReserveN(t, 1)
	if d := r.DelayFrom(t); d > 0 { // rounding: not quite a token after all
		r.CancelAt(t)
		return d, nil
	}
	// Cancelled at the time it was taken: rate gives nothing back once that
	// time has passed, and at t it restores the token net of those taken
	// since, so the refill since t is counted once.
	return 0, func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		r.CancelAt(t)
	}
}

// sweep drops the idle states of every shard and returns the number of
// states held. Before the first shard is due it only reads the count, so
// that calling it often is cheap.
func (k *keyed) sweep(now func() time.Time) int {
	if now().Before(*k.due.Load()) {
		return int(k.states.Load())
	}
	var due time.Time
	for i := range k.shards {
		s := &k.shards[i]
		s.mu.Lock()
		before := len(s.cur) + len(s.prev)
		s.expire(now(), k.idle)
		k.states.Add(int64(len(s.cur) + len(s.prev) - before))
		if i == 0 || s.rotated.Before(due) {
			due = s.rotated // rotated only grows, so due stays a lower bound
		}
		s.mu.Unlock()
	}
	due = due.Add(k.idle)
	k.due.Store(&due)
	return int(k.states.Load())
}

// insert puts a state into the current generation, first rotating the
// generations when it is full: then prev, possibly holding states still in
// use, is dropped. That is the price of the memory bound under a flood of
// distinct keys.
func (s *shard) insert(key string, lim *rate.Limiter, t time.Time) {
	if len(s.cur) >= s.genCap {
		s.prev, s.cur = s.cur, nil
		s.rotated = t
	}
	if s.cur == nil {
		s.cur = make(map[string]*rate.Limiter)
	}
	s.cur[key] = lim
	if t.After(s.lastUse) {
		s.lastUse = t
	}
}

// expire rotates the generations once the idle period has passed since the
// last rotation: prev, untouched since then, holds only full buckets and is
// dropped, and cur becomes prev. When cur too is untouched for the idle
// period, both are dropped.
func (s *shard) expire(t time.Time, idle time.Duration) {
	if t.Sub(s.rotated) < idle {
		return
	}
	if t.Sub(s.lastUse) >= idle {
		s.prev, s.cur = nil, nil
	} else {
		s.prev, s.cur = s.cur, nil
	}
	s.rotated = t
}
