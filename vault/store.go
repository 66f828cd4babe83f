package vault

// Reading and writing records through the Store: every record is
// authenticated when read and MAC'd when written, every write is a
// compare-and-swap, and a write whose outcome the store left unknown is
// resolved before anything is acted on.

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"time"
)

// EarlyStore is a Store that can tell that a compare-and-swap applied
// before the write is durable. The vault sends through it only the write
// that forgives a right guess when that write forgives this one guess and
// changes nothing else (see forgivesOnlyItself): losing it in a crash
// leaves that guess counted, one attempt, and can never give one. Every
// other write waits for CompareAndSwap.
type EarlyStore interface {
	Store
	// CompareAndSwapEarly is CompareAndSwap, except that it may return
	// once the write has applied in the store's order (its compare held
	// against the current revision), before it is durable: then err is
	// nil and durable waits until it is, returning nil, or an error that
	// leaves its outcome unknown, as CompareAndSwap's would. Otherwise it
	// returns what CompareAndSwap would have, and a nil durable. Until
	// durable would return, a Get of the key waits, so that no read shows
	// the store as it was before a write that was answered.
	CompareAndSwapEarly(ctx context.Context, key []byte, rev uint64, value []byte) (newRev uint64, durable func() error, err error)
}

// stored is a verified record together with where and at which revision it
// was read.
type stored struct {
	key []byte
	rev uint64
	record
}

// read fetches and authenticates a record. A missing key gives (nil, nil).
// An edited, moved or malformed record is ErrIntegrity, counted in a metric.
func (v *Vault) read(ctx context.Context, key []byte) (*stored, error) {
	raw, rev, err := v.store.Get(ctx, key)
	if errors.Is(err, ErrIntegrity) {
		v.integrityFailure(key, "store value", err)
		return nil, fmt.Errorf("read record: %w", err)
	}
	if err != nil {
		return nil, fmt.Errorf("%w: read record: %w", ErrUnavailable, err)
	}
	if raw == nil {
		return nil, nil
	}
	s := &stored{key: key, rev: rev}
	body, mac, err := s.parse(raw)
	if err == nil {
		k, ok := v.macKeys[s.MACVersion]
		switch {
		case !ok:
			err = fmt.Errorf("unknown MAC key version %d", s.MACVersion)
		case !verifyRecordMAC(k, mac, key, body):
			err = errors.New("MAC mismatch")
		default:
			err = s.check()
		}
	}
	if err != nil {
		v.integrityFailure(key, "record", err)
		return nil, fmt.Errorf("%w: %w", ErrIntegrity, err)
	}
	return s, nil
}

func (v *Vault) integrityFailure(key []byte, what string, err error) {
	v.metrics.integrityFailures.Inc()
	// The reason is ours (never record bytes); the key only as a keyed hash.
	v.log.Warn("integrity check failed", "record", v.logID(key), "object", what, "reason", err.Error())
}

// write is the one function through which every record reaches the store:
// it MACs the record under its store key and compare-and-swaps it against
// the revision it was read at (0 for a new key). Counting writes run under
// context.WithoutCancel so a client hanging up cannot skip them. A store
// error that is neither a conflict nor damage leaves the outcome unknown;
// write resolves it (see resolve) and returns nil only if the record
// surely landed, ErrConflict only if it surely never will.
func (v *Vault) write(ctx context.Context, key []byte, rev uint64, r *record) error {
	_, err := v.writeEarly(ctx, key, rev, r, false)
	return err
}

// writeEarly is write, which, with early set and an EarlyStore, may return
// once the write has applied, before it is durable: durable, non-nil then,
// waits for that (see EarlyStore).
func (v *Vault) writeEarly(ctx context.Context, key []byte, rev uint64, r *record, early bool) (durable func() error, err error) {
	if err := r.check(); err != nil {
		return nil, fmt.Errorf("vault: refusing to write an invalid record: %w", err)
	}
	if r.freshWrap || r.freshPIN {
		// Held across the compare-and-swap (and its resolution), so that
		// once a node has marked a version, no new record under it from
		// this node can land unseen.
		v.retireMu.RLock()
		defer v.retireMu.RUnlock()
		if err := v.mayWrite(r); err != nil {
			return nil, err
		}
	}
	r.MACVersion = v.macVersion
	body := r.marshal()
	val := appendRecordMAC(body, v.macKeys[v.macVersion], key, body)
	ctx = detached(ctx)
	if r.undoExpired() {
		// Decided in time, but held up since (behind a retirement on
		// retireMu, say): decide again on the current record.
		return nil, ErrConflict
	}
	es, ok := v.store.(EarlyStore)
	if early && ok && !r.freshWrap && !r.freshPIN {
		_, durable, err = es.CompareAndSwapEarly(ctx, key, rev, val)
	} else {
		_, err = v.store.CompareAndSwap(ctx, key, rev, val)
	}
	if err == nil || errors.Is(err, ErrConflict) || errors.Is(err, ErrIntegrity) {
		return durable, err
	}
	if errors.Is(err, ErrWithheld) {
		return nil, fmt.Errorf("%w: write record: %w", ErrUnavailable, err)
	}
	return nil, v.resolve(ctx, key, rev, val, r, err)
}

// detached is context.WithoutCancel(ctx), or ctx itself where that can
// never be canceled and has no deadline (as the writes that settle a
// guess, which run detached already).
func detached(ctx context.Context) context.Context {
	if _, ok := ctx.Deadline(); !ok && ctx.Done() == nil {
		return ctx
	}
	return context.WithoutCancel(ctx)
}

// Resolutions of a write whose outcome the store left unknown (metric
// keyvault_store_ambiguous_writes_total).
const (
	resApplied    = "applied"
	resResent     = "resent"
	resNotApplied = "not_applied"
	resUnresolved = "unresolved"
)

// resolve finds out whether a write whose store call failed (casErr) was
// applied. Any write error may hide an applied write, or one that applies
// later, so nothing is assumed: the record is read again until one of
//
//   - it holds r's operation ID: applied (whatever came after);
//   - its revision is still rev: nothing was written since, so the
//     identical write is sent again (at most one of the copies can land,
//     both being compare-and-swaps on rev);
//   - its revision moved and its window of operation IDs reaches back to
//     the write r would have been, without r's ID: another write took that
//     place, and r's compare-and-swap can never land: ErrConflict, so the
//     caller runs its change again on the new record.
//
// Otherwise (the store does not answer, or r's place fell out of the
// window) the outcome stays unknown: ErrUnavailable. For a guess that
// means 503 and no PIN check, so an unknown outcome can over-count a
// guess, never under-count one.
func (v *Vault) resolve(ctx context.Context, key []byte, rev uint64, val []byte, r *record, casErr error) error {
	id := r.OpIDs[len(r.OpIDs)-1]
	deadline := time.Now().Add(v.opts.ResolveWindow)
	delay := 10 * time.Millisecond
	lastErr := casErr
	for {
		cur, err := v.read(ctx, key)
		switch {
		case errors.Is(err, ErrIntegrity):
			return err
		case err != nil:
			lastErr = err
		case cur != nil && cur.hasOp(id):
			v.metrics.ambiguous.WithLabelValues(resApplied).Inc()
			return nil
		case cur == nil && rev == 0 || cur != nil && cur.rev == rev:
			if r.undoExpired() {
				// It undoes a lock that others may take for final by now.
				v.metrics.ambiguous.WithLabelValues(resUnresolved).Inc()
				return fmt.Errorf("%w: write outcome unknown, and too late to send again: %w", ErrUnavailable, lastErr)
			}
			if r.freshWrap || r.freshPIN {
				// A resend is a new write: past the fence, it could land
				// after a retirement counted this node's writes.
				if err := v.fenced(); err != nil {
					v.metrics.ambiguous.WithLabelValues(resUnresolved).Inc()
					return fmt.Errorf("%w: write outcome unknown, and not sent again: %w", ErrUnavailable, err)
				}
			}
			_, err = v.store.CompareAndSwap(ctx, key, rev, val)
			if err == nil {
				v.metrics.ambiguous.WithLabelValues(resResent).Inc()
				return nil
			}
			if errors.Is(err, ErrConflict) {
				continue // something landed meanwhile, maybe the first copy: look again
			}
			if errors.Is(err, ErrIntegrity) {
				return err
			}
			lastErr = err
		case cur == nil:
			lastErr = errors.New("record vanished") // no store deletes: treat as unknown
		case cur.OpSeq-uint64(len(cur.OpIDs)) < r.OpSeq:
			// The record moved (so r, a compare-and-swap on rev, can never
			// land) and either never reached r's place or shows who took
			// it (an older writer without IDs counts as another writer).
			v.metrics.ambiguous.WithLabelValues(resNotApplied).Inc()
			return ErrConflict
		default:
			v.metrics.ambiguous.WithLabelValues(resUnresolved).Inc()
			return fmt.Errorf("%w: write outcome unknown (its ID left the record's window): %w", ErrUnavailable, casErr)
		}
		if time.Now().After(deadline) {
			v.metrics.ambiguous.WithLabelValues(resUnresolved).Inc()
			return fmt.Errorf("%w: write outcome unknown after %v: %w", ErrUnavailable, v.opts.ResolveWindow, lastErr)
		}
		time.Sleep(delay)
		delay = min(2*delay, 250*time.Millisecond)
	}
}

// update runs a read-modify-write of one record until it lands without a
// conflict. fn gets the current verified record (nil if none) and returns
// the record to write, or nil to write nothing. Every write gets a fresh
// random operation ID, kept in the record with those of the last few
// writes, so that a write whose answer was lost can be found (resolve).
// The IDs are random rather than the request ID: a caller chooses its
// X-Request-Id, and a repeated one would pass for a write that never landed.
func (v *Vault) update(ctx context.Context, key []byte, fn func(cur *stored) (*record, error)) error {
	_, err := v.updateEarly(ctx, key, func(cur *stored) (*record, bool, error) {
		next, err := fn(cur)
		return next, false, err
	})
	return err
}

// updateEarly is update for a change that may be answered before it is
// durable: where fn says so (early) of the record it returns, and the
// store is an EarlyStore, updateEarly returns once the write has applied
// against the record fn was given, with durable (non-nil then) to wait
// for it to be durable. The write that applied is the one fn decided on,
// so whatever fn decided holds, durable or not.
func (v *Vault) updateEarly(ctx context.Context, key []byte, fn func(cur *stored) (next *record, early bool, err error)) (durable func() error, err error) {
	var lastID []byte // the operation ID of the attempt that conflicted
	for attempt := 0; ; attempt++ {
		cur, err := v.read(ctx, key)
		if err != nil {
			return nil, err
		}
		// A conflict can hide our own write: the etcd client may re-send
		// a Txn whose first copy landed, and the copy's compare fails. Its
		// ID in the record means it landed: applying fn again would count
		// a guess, or refund one, twice.
		if lastID != nil && cur != nil && cur.hasOp(lastID) {
			return nil, nil
		}
		next, early, err := fn(cur)
		if err != nil || next == nil {
			return nil, err
		}
		var rev uint64
		var prev record
		if cur != nil {
			rev, prev = cur.rev, cur.record
		}
		next.OpSeq = prev.OpSeq + 1
		ids := prev.OpIDs[len(prev.OpIDs)-min(len(prev.OpIDs), maxOpIDs-1):]
		id := make([]byte, opIDLen)
		rand.Read(id)
		next.OpIDs = append(append(make([][]byte, 0, maxOpIDs), ids...), id)
		durable, err := v.writeEarly(ctx, key, rev, next, early)
		if errors.Is(err, ErrIntegrity) {
			v.integrityFailure(key, "store value", err)
		}
		if !errors.Is(err, ErrConflict) {
			return durable, err
		}
		lastID = id
		v.metrics.storeConflicts.Inc()
		if attempt >= 1000 {
			return nil, fmt.Errorf("%w: record too contended", ErrUnavailable)
		}
	}
}
