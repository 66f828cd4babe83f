// Package boltstore is the embedded vault.Store: one bbolt file, every
// write a durable (fsynced) transaction.
//
// # Basics
//
// All keys live in one bucket. Each value is stored behind an 8-byte
// revision taken from a store-wide counter, as etcd's mod revisions are,
// so that compare-and-swap means the same thing on every store driver.
//
// # Caveats
//
// bbolt allows one writer at a time: writes are serialised, and each costs
// one or two fsyncs. Freed pages keep old values until reused, so deleted or
// replaced records may still be readable in the file (see the README's
// threat model).
package boltstore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
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

// Store is a vault.Store on a bbolt file.
type Store struct {
	db      *bolt.DB
	txTimes *prometheus.HistogramVec
}

var _ vault.Store = (*Store)(nil)

// Open opens or creates the store file. It fails rather than wait if
// another process holds the file. reg receives the store's metrics (nil: none).
func Open(path string, reg prometheus.Registerer) (*Store, error) {
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
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	return &Store{
		db: db,
		txTimes: promauto.With(reg).NewHistogramVec(prometheus.HistogramOpts{
			Name:    "keyvault_store_transaction_duration_seconds",
			Help:    "Duration of store transactions, by operation.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}, []string{"op"}),
	}, nil
}

// Close closes the file.
func (s *Store) Close() error { return s.db.Close() }

// Ping reports whether the store answers a read transaction.
func (s *Store) Ping() error {
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

// CompareAndSwap implements vault.Store. The transaction commits with an
// fsync before it returns.
func (s *Store) CompareAndSwap(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	defer s.observe("cas", time.Now())
	var newRev uint64
	err := s.db.Update(func(tx *bolt.Tx) error {
		data, meta := tx.Bucket(bucketData), tx.Bucket(bucketMeta)
		var cur uint64
		if v := data.Get(key); v != nil {
			if len(v) < revLen {
				return errTruncated
			}
			cur = binary.BigEndian.Uint64(v)
		}
		if cur != rev {
			return vault.ErrConflict
		}
		if v := meta.Get(keyRev); v != nil {
			newRev = binary.BigEndian.Uint64(v)
		}
		newRev++
		if err := meta.Put(keyRev, binary.BigEndian.AppendUint64(nil, newRev)); err != nil {
			return err
		}
		buf := make([]byte, revLen, revLen+len(value))
		binary.BigEndian.PutUint64(buf, newRev)
		return data.Put(key, append(buf, value...))
	})
	if err != nil && !errors.Is(err, vault.ErrConflict) {
		return 0, fmt.Errorf("store compare-and-swap: %w", err)
	}
	return newRev, err
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
