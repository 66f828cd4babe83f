// Package boltstore is the embedded vault.Store: one bbolt file, every
// write durable (fsynced) before it returns.
//
// # Basics
//
// All keys live in one bucket. Each value is stored behind an 8-byte
// revision taken from a store-wide counter, as etcd's mod revisions are,
// so that compare-and-swap means the same thing on every store driver.
//
// # Group commit
//
// bbolt allows one writer at a time, and each commit costs two fsyncs
// (about 0.3 ms each on the machines we measured). One goroutine therefore
// commits all writes: while one transaction syncs, new compare-and-swaps
// queue, and the next transaction applies every queued one and syncs once.
// A lone write waits for nothing; under load, one commit serves many. Each
// write is still checked against its own revision and answered only after
// its transaction is on disk. bbolt's own DB.Batch is not used: it holds
// each batch open for a timer (MaxBatchDelay), which adds that delay to
// every write at low load.
//
// # Early answers
//
// CompareAndSwapEarly (vault.EarlyStore) is the one exception: a write
// sent through it is answered as applied from inside its batch's
// transaction, once every write of the batch is applied and the batch's
// meta is in place, before the commit, its fsyncs and its anchor; its
// durable function waits for those. Until then a Get of its key waits too,
// so no reader sees the store as it was before a write that was answered.
// The vault sends through it only a write whose loss costs at most one
// guess (see vault.EarlyStore).
//
// # Rollback anchoring
//
// With Options.Anchoring set, the store is checked against the HSM
// members' anchors when it opens, and every group commit calls a
// commitHook (anchored.go) before its transaction, inside it and after
// it; the batch's answers go out only once the hook is done, but for early
// answers, which go out before the commit and so before its anchor. Without
// anchoring the hook is nil and a commit is the transaction alone.
//
// # Caveats
//
// Freed pages keep old values until reused, so deleted or replaced records
// may still be readable in the file (see docs/threat-model.md).
package boltstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/vault"
)

var (
	bucketData = []byte("kv")
	bucketMeta = []byte("meta")
	keyRev     = []byte("revision")
	keyVersion = []byte("layout")
)

// layoutVersion is the version of this package's on-disk layout.
const layoutVersion = 1

const revLen = 8

// errTruncated: a stored value is too short to hold its revision. It is
// damage, not an outage, so it is a vault.ErrIntegrity. The key is not in
// the text: it holds a user ID.
var errTruncated = fmt.Errorf("%w: stored value shorter than its revision", vault.ErrIntegrity)

// maxBatch bounds the writes of one transaction, and so the time the
// first of them waits for the last to be applied.
const maxBatch = 512

// errClosed: the store was closed before the write was taken.
var errClosed = errors.New("store closed")

// Store is a vault.Store on a bbolt file.
type Store struct {
	db      *bolt.DB
	txTimes *prometheus.HistogramVec
	batches prometheus.Histogram

	// hook is nil with rollback anchoring off. It is set before the first
	// write (by Open, or Anchor) and read only by the committer.
	hook commitHook

	// failCommit, set by tests, replaces the result of a transaction that
	// succeeded: it stands for one that landed but reported a failure.
	failCommit func() error
	// onEarly, set by tests, runs in the committer right after a batch's
	// early answers went out, before its commit; an error fails the
	// transaction, as a commit that never landed.
	onEarly func() error

	// pending holds the keys of the batch in commit whose writes were
	// answered early, and pendEnd is closed once that batch is answered.
	// Get waits on it for those keys.
	pendMu  sync.Mutex
	pending map[string]struct{}
	pendEnd chan struct{}

	// revFloor is the highest revision a write has been given, committed
	// or not (an early answer's transaction may fail after it): the
	// committer numbers above it. Only the committer touches it.
	revFloor uint64
	// old holds the stored value a write replaces while the hook is told
	// of it, and keeps the last one: a copy of what the mapped file held.
	// Only the committer touches it.
	old []byte

	writes    chan *write // unbuffered: a write is taken or refused, never stranded
	closing   chan struct{}
	committed chan struct{} // closed when the committer has stopped
	closeOnce sync.Once
}

// write is one compare-and-swap on its way through the committer.
type write struct {
	key, value []byte
	rev        uint64 // expected current revision
	newRev     uint64
	err        error
	done       chan struct{}
	// applied, for a write sent by CompareAndSwapEarly, is closed once the
	// write has applied in its transaction, appliedRev then its revision.
	applied    chan struct{}
	appliedRev uint64
}

var _ vault.EarlyStore = (*Store)(nil)

// commitHook is the part of a group commit that is not the transaction:
// rollback anchoring (anchored.go) when it is on. Only the committer calls
// it, one batch at a time.
type commitHook interface {
	// beforeCommit runs before a batch's transaction. An error refuses
	// the whole batch: nothing of it is written.
	beforeCommit() error
	// changed is told, inside a batch's transaction, of each record
	// write once it is made: its key, and its stored value before (nil:
	// none) and after. It must not keep old, which is valid only during
	// the call.
	changed(key, old, new []byte)
	// inCommit runs inside the transaction of a batch that changed
	// records, after its writes, with the meta bucket; an error fails the
	// transaction.
	inCommit(meta *bolt.Bucket) error
	// afterCommit runs once the transaction has ended with err, before
	// any answer goes out. It returns the error the batch's writes are
	// answered with (nil: each its own result).
	afterCommit(err error) error
}

// Options configure a Store, as etcdstore.Options do the etcd driver.
type Options struct {
	// Path is the database file, created (mode 0600) if missing. Required.
	Path string
	// Registerer receives the store's metrics (nil: not exported).
	Registerer prometheus.Registerer
	// Anchoring turns rollback anchoring on (nil: off). Open then runs
	// the start-up check, and returns its *anchor.RefusedError for a
	// store that must not be served.
	Anchoring *Anchoring
}

// Open opens or creates the store file. bbolt lets one process hold the
// file: Open fails with bbolt's ErrTimeout after a second rather than
// wait for another process.
func Open(opts Options) (*Store, error) {
	path := opts.Path
	if path == "" {
		return nil, errors.New("bolt store: no path")
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bucketData); err != nil {
			return err
		}
		meta, err := tx.CreateBucketIfNotExists(bucketMeta)
		if err != nil {
			return err
		}
		switch v := meta.Get(keyVersion); {
		case v == nil:
			return meta.Put(keyVersion, []byte{layoutVersion})
		case !bytes.Equal(v, []byte{layoutVersion}):
			return fmt.Errorf("store layout %v is not %d", v, layoutVersion)
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	reg := opts.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	s := &Store{
		db: db,
		txTimes: promauto.With(reg).NewHistogramVec(prometheus.HistogramOpts{
			Name: "keyvault_store_transaction_duration_seconds",
			Help: "Duration of store operations as callers see them (get, cas, scan; a cas includes its wait for the commit), " +
				"and of each group commit (commit).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}, []string{"op"}),
		batches: promauto.With(reg).NewHistogram(prometheus.HistogramOpts{
			Name:    "keyvault_store_commit_writes",
			Help:    "Compare-and-swaps applied by one group commit (one fsynced transaction).",
			Buckets: prometheus.ExponentialBuckets(1, 2, 10),
		}),
		writes:    make(chan *write),
		closing:   make(chan struct{}),
		committed: make(chan struct{}),
	}
	if a := opts.Anchoring; a != nil {
		// The check reads and writes the HSM members, each call bounded
		// by the pool's operation timeout or anchorTimeout.
		if _, err := s.Anchor(context.Background(), a.Keys, a.Members, reg, a.Log); err != nil {
			db.Close()
			return nil, err
		}
	}
	go s.commitLoop()
	return s, nil
}

// Close finishes the writes already taken, refuses new ones, and closes
// the file.
func (s *Store) Close() error {
	s.closeOnce.Do(func() { close(s.closing) })
	<-s.committed
	return s.db.Close()
}

// Ping reports whether the store answers a read transaction. ctx is
// checked before it starts; a read transaction on a local file does not
// block on the network.
func (s *Store) Ping(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	return s.db.View(func(*bolt.Tx) error { return nil })
}

// Get implements vault.Store.
func (s *Store) Get(ctx context.Context, key []byte) (value []byte, rev uint64, err error) {
	if err := ctx.Err(); err != nil {
		return nil, 0, err
	}
	defer s.observe("get", time.Now())
	if end := s.pendingEnd(key); end != nil {
		// A write of this key was answered before its commit: the key is
		// read once that commit is done.
		select {
		case <-end:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		}
	}
	err = s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketData).Get(key)
		if v == nil {
			return nil
		}
		if len(v) < revLen {
			return errTruncated
		}
		rev = binary.BigEndian.Uint64(v)
		value = bytes.Clone(v[revLen:]) // bbolt's slice dies with the transaction
		if value == nil {
			value = []byte{}
		}
		return nil
	})
	return value, rev, err
}

// CompareAndSwap implements vault.Store. It returns once the transaction
// that applied it (or found the conflict) has committed with an fsync. A
// done ctx refuses the write only before the committer has taken it.
func (s *Store) CompareAndSwap(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	defer s.observe("cas", time.Now())
	w := &write{key: key, rev: rev, value: value, done: make(chan struct{})}
	if err := s.send(ctx, w); err != nil {
		return 0, err
	}
	<-w.done
	return w.result()
}

// CompareAndSwapEarly implements vault.EarlyStore: it returns as soon as
// the write has applied in its batch's transaction (the batch's other
// writes applied too, its meta written), before the commit, its fsyncs
// and its anchor, which durable waits for. A write that does not apply
// returns when its batch is answered, as CompareAndSwap does.
func (s *Store) CompareAndSwapEarly(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, func() error, error) {
	if err := ctx.Err(); err != nil {
		return 0, nil, err
	}
	defer s.observe("cas", time.Now())
	w := &write{key: key, rev: rev, value: value, done: make(chan struct{}), applied: make(chan struct{})}
	if err := s.send(ctx, w); err != nil {
		return 0, nil, err
	}
	select {
	case <-w.applied:
	case <-w.done:
		select {
		case <-w.applied: // and answered since
		default:
			newRev, err := w.result()
			return newRev, nil, err
		}
	}
	return w.appliedRev, func() error {
		<-w.done
		_, err := w.result()
		return err
	}, nil
}

// send hands w to the committer, unless the store is closing or ctx ends
// first.
func (s *Store) send(ctx context.Context, w *write) error {
	select {
	case s.writes <- w:
		return nil
	case <-s.closing:
		return fmt.Errorf("store compare-and-swap: %w", errClosed)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// result is what an answered write returns.
func (w *write) result() (uint64, error) {
	if w.err != nil && !errors.Is(w.err, vault.ErrConflict) {
		return 0, fmt.Errorf("store compare-and-swap: %w", w.err)
	}
	return w.newRev, w.err
}

// pendingEnd returns, if a write of key was answered early and its batch
// is not answered yet, a channel closed once it is.
func (s *Store) pendingEnd(key []byte) chan struct{} {
	s.pendMu.Lock()
	defer s.pendMu.Unlock()
	if _, ok := s.pending[string(key)]; ok {
		return s.pendEnd
	}
	return nil
}

// answerEarly releases the writes of a batch sent by CompareAndSwapEarly
// that applied, from inside the batch's transaction, and holds reads of
// their keys until the batch is answered (endEarly).
func (s *Store) answerEarly(batch []*write) error {
	early := false
	for _, w := range batch {
		if w.applied == nil || w.err != nil {
			continue
		}
		s.pendMu.Lock()
		if s.pending == nil {
			s.pending, s.pendEnd = map[string]struct{}{}, make(chan struct{})
		}
		s.pending[string(w.key)] = struct{}{}
		s.pendMu.Unlock()
		w.appliedRev = w.newRev
		close(w.applied)
		early = true
	}
	if early && s.onEarly != nil {
		return s.onEarly()
	}
	return nil
}

// endEarly lets reads of the keys answered early go on, once their batch
// is answered.
func (s *Store) endEarly() {
	s.pendMu.Lock()
	defer s.pendMu.Unlock()
	if s.pending != nil {
		close(s.pendEnd)
		s.pending, s.pendEnd = nil, nil
	}
}

// commitLoop is the one writer: it takes a write, adds every other one
// already waiting, and commits them together.
func (s *Store) commitLoop() {
	defer close(s.committed)
	batch := make([]*write, 0, maxBatch)
	for {
		select {
		case w := <-s.writes:
			batch = append(batch, w)
		case <-s.closing:
			return
		}
	more:
		for len(batch) < maxBatch {
			select {
			case w := <-s.writes:
				batch = append(batch, w)
			default:
				break more
			}
		}
		s.commit(batch)
		clear(batch) // keep no answered write
		batch = batch[:0]
	}
}

// answer releases writes: each with its own result, or all with err.
func answer(ws []*write, err error) {
	for _, w := range ws {
		if err != nil && w.err == nil {
			w.newRev, w.err = 0, err
		}
		close(w.done)
	}
}

// commit applies a batch in one transaction and answers its writes once
// the hook, if any, has had its say: see commitHook. Writes sent by
// CompareAndSwapEarly that applied were answered from inside the
// transaction; they learn here whether they became durable.
func (s *Store) commit(batch []*write) {
	defer s.observe("commit", time.Now())
	s.batches.Observe(float64(len(batch)))
	if s.hook != nil {
		if err := s.hook.beforeCommit(); err != nil {
			answer(batch, err)
			return
		}
	}
	err := s.apply(batch)
	if s.hook != nil {
		err = s.hook.afterCommit(err)
	}
	answer(batch, err)
	s.endEarly()
}

// apply runs a batch's transaction. A write that conflicts or finds
// damage fails alone and changes nothing. If the transaction fails, its
// error is returned, for every write of the batch.
func (s *Store) apply(batch []*write) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		data, meta := tx.Bucket(bucketData), tx.Bucket(bucketMeta)
		var rev uint64
		if v := meta.Get(keyRev); v != nil {
			rev = binary.BigEndian.Uint64(v)
		}
		// Number above every revision handed out before, also those of
		// early answers whose transaction failed (revFloor): a revision
		// once given for a write never names other content.
		last, changed := max(rev, s.revFloor), false
		// bbolt keeps each value it is given until the commit: the batch's
		// values, each behind its revision, and the counter share one
		// buffer.
		size := revLen
		for _, w := range batch {
			size += revLen + len(w.value)
		}
		vals := make([]byte, 0, size)
		// One cursor finds every key of the batch.
		c := data.Cursor()
		for _, w := range batch {
			w.newRev, w.err = 0, nil
			var cur uint64
			old := get(c, w.key)
			if old != nil {
				if len(old) < revLen {
					w.err = errTruncated
					continue
				}
				cur = binary.BigEndian.Uint64(old)
			}
			if cur != w.rev {
				w.err = vault.ErrConflict
				continue
			}
			// A key's revision only ever grows, even if the store-wide
			// counter was set back by hand: otherwise a compare-and-swap
			// read before the edit could land over a newer value.
			next := max(last, cur) + 1
			start := len(vals)
			vals = binary.BigEndian.AppendUint64(vals, next)
			vals = append(vals, w.value...)
			buf := vals[start:len(vals):len(vals)]
			if s.hook != nil && old != nil {
				// bbolt's slice dies with the write that follows.
				s.old = append(s.old[:0], old...)
				old = s.old
			}
			// Put checks its arguments before it changes anything, so a
			// refused value fails its own write only.
			if w.err = data.Put(w.key, buf); w.err != nil {
				continue
			}
			last, changed = next, true
			w.newRev = last
			if s.hook != nil {
				s.hook.changed(w.key, old, buf)
			}
		}
		if !changed {
			return nil
		}
		s.revFloor = last
		vals = binary.BigEndian.AppendUint64(vals, last)
		if err := meta.Put(keyRev, vals[len(vals)-revLen:]); err != nil {
			return err
		}
		if s.hook != nil {
			if err := s.hook.inCommit(meta); err != nil {
				return err
			}
		}
		// Every write of the batch is applied and its meta is in place:
		// what is left is the commit itself (and the anchor).
		return s.answerEarly(batch)
	})
	if err == nil && s.failCommit != nil {
		err = s.failCommit()
	}
	if err != nil {
		for _, w := range batch {
			w.newRev, w.err = 0, nil // answered with err
		}
	}
	return err
}

// get is Bucket.Get through c, a cursor on the bucket: one cursor for a
// batch's keys reuses the memory of its search path from key to key.
func get(c *bolt.Cursor, key []byte) []byte {
	if k, v := c.Seek(key); bytes.Equal(k, key) {
		return v
	}
	return nil
}

// Scan implements vault.Store.
func (s *Store) Scan(ctx context.Context, prefix []byte, fn func(key, value []byte, rev uint64) error) error {
	defer s.observe("scan", time.Now())
	return s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketData).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			if err := ctx.Err(); err != nil {
				return err
			}
			if len(v) < revLen {
				return errTruncated
			}
			if err := fn(k, v[revLen:], binary.BigEndian.Uint64(v)); err != nil {
				return err
			}
		}
		return nil
	})
}

func (s *Store) observe(op string, start time.Time) {
	s.txTimes.WithLabelValues(op).Observe(time.Since(start).Seconds())
}
