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
	"sync/atomic"
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

	anc atomic.Pointer[anchoring] // nil: rollback resistance off (see Anchor)

	// afterCommit, set by tests, replaces the result of a commit that
	// succeeded: it stands for one that landed but reported a failure.
	afterCommit func() error

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
}

var _ vault.Store = (*Store)(nil)

// Options configure a Store, as etcdstore.Options do the etcd driver.
type Options struct {
	// Path is the database file, created (mode 0600) if missing. Required.
	Path string
	// Registerer receives the store's metrics (nil: not exported).
	Registerer prometheus.Registerer
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
	select {
	case s.writes <- w:
	case <-s.closing:
		return 0, fmt.Errorf("store compare-and-swap: %w", errClosed)
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	<-w.done
	if w.err != nil && !errors.Is(w.err, vault.ErrConflict) {
		return 0, fmt.Errorf("store compare-and-swap: %w", w.err)
	}
	return w.newRev, w.err
}

// commitLoop is the one writer: it takes a write, adds every other one
// already waiting, applies them in one transaction, and answers them all
// after the commit (and, with rollback resistance on, after the anchor
// that vouches for the batch).
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
		batch = make([]*write, 0, maxBatch)
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

// errUnanchored: the write committed, but no anchor could vouch for it,
// so its outcome is withheld; errNotAnchored: the state it would have been
// written on had no anchor, so it was not written. Either way the vault
// must not act on it (vault.ErrWithheld): it answers 503.
var (
	errUnanchored  = fmt.Errorf("%w: committed but not anchored", vault.ErrWithheld)
	errNotAnchored = fmt.Errorf("%w: not written: the store's position has no anchor", vault.ErrWithheld)
	errUnsure      = fmt.Errorf("%w: the transaction failed and may have landed", vault.ErrWithheld)
)

// commit applies a batch in one transaction and answers its writes. A
// write that conflicts or finds damage fails alone and changes nothing; if
// the transaction itself fails, every write in it fails, and none was
// applied.
//
// With rollback resistance on, it follows the write order (see package
// anchor): the batch is written only on a position an anchor vouches for,
// its meta naming that position as its parent, and its answers go out only
// after an anchor vouches for the position it made. So the store is never
// more than one batch past its newest anchor, and only by a batch whose
// answers are still held.
func (s *Store) commit(batch []*write) {
	defer s.observe("commit", time.Now())
	s.batches.Observe(float64(len(batch)))
	anc := s.anc.Load()
	if anc != nil && anc.unsure {
		// The last transaction failed, and may have landed all the same:
		// read the store's state back before writing on it.
		if err := s.resync(anc); err != nil {
			answer(batch, fmt.Errorf("%w: %w", errNotAnchored, err))
			return
		}
	}
	if anc != nil && anc.behind() {
		// The last batch's anchor failed; try again before writing on it.
		if err := anc.vouch(context.Background()); err != nil {
			answer(batch, fmt.Errorf("%w: rollback anchor: %w", errNotAnchored, err))
			return
		}
	}
	var changes []change
	var next position
	err := s.db.Update(func(tx *bolt.Tx) error {
		data, meta := tx.Bucket(bucketData), tx.Bucket(bucketMeta)
		var rev uint64
		if v := meta.Get(keyRev); v != nil {
			rev = binary.BigEndian.Uint64(v)
		}
		last := rev
		for _, w := range batch {
			w.newRev, w.err = 0, nil
			var cur uint64
			old := data.Get(w.key)
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
			buf := make([]byte, revLen, revLen+len(w.value))
			binary.BigEndian.PutUint64(buf, next)
			buf = append(buf, w.value...)
			if anc != nil {
				// bbolt's slice dies with the write that follows.
				old = bytes.Clone(old)
			}
			// Put checks its arguments before it changes anything, so a
			// refused value fails its own write only.
			if w.err = data.Put(w.key, buf); w.err != nil {
				continue
			}
			last = next
			w.newRev = last
			if anc != nil {
				changes = append(changes, change{key: w.key, old: old, new: buf})
			}
		}
		if last == rev {
			return nil
		}
		if err := meta.Put(keyRev, binary.BigEndian.AppendUint64(nil, last)); err != nil {
			return err
		}
		if anc == nil {
			return nil
		}
		var err error
		next, err = anc.prepare(tx, changes)
		return err
	})
	if err == nil && s.afterCommit != nil {
		err = s.afterCommit()
	}
	if err != nil {
		if anc != nil {
			// A commit that reports failure may still have landed (an
			// fsync failing after the meta page was written). Acting on
			// its outcome, as the vault does to resolve a failed write,
			// could release an answer no anchor vouches for.
			err = fmt.Errorf("%w: %w", errUnsure, err)
			anc.unsure = true
		}
		for _, w := range batch {
			w.newRev, w.err = 0, err
		}
		answer(batch, nil)
		return
	}
	if anc == nil || len(changes) == 0 {
		// Nothing changed (or nothing to anchor): these answers reveal no
		// new state, so they need no anchor.
		answer(batch, nil)
		return
	}
	anc.commit(next)
	if err := anc.vouch(context.Background()); err != nil {
		answer(batch, fmt.Errorf("%w: rollback anchor: %w", errUnanchored, err))
		return
	}
	answer(batch, nil)
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
