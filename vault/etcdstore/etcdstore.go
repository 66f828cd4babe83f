// Package etcdstore is the vault.Store on an etcd v3 cluster, so that
// several keyvault processes share one store and one guess budget.
//
// # Basics
//
// Each key lives under a configured prefix. A record's revision is its etcd
// ModRevision. CompareAndSwap is one Txn: If ModRevision(key) == rev (for a
// new key: CreateRevision == 0) Then Put; never a blind put. Reads are
// linearizable (etcd's default), so a read never shows a revision older
// than a write already answered.
//
// # Caveats
//
// A write that returns an error other than a failed comparison may still
// have been applied, sometimes after the error was returned: a deadline,
// "request timed out" or a lost leader says nothing about the outcome. The
// store never turns such an error into vault.ErrConflict; it reports it as
// it is, and the vault resolves the outcome (see vault's operation IDs).
// Every write keeps an old revision until etcd compacts it: run etcd with
// auto-compaction, and defragment, or the quota fills (docs/etcd.md,
// "Sizing"). Rollback anchoring (boltstore's Anchor) is not available here.
package etcdstore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/keyvault/keyvault/vault"
)

// Options configure a Store. The zero value of each field has the
// documented default.
type Options struct {
	// Endpoints are the etcd client URLs. Required.
	Endpoints []string
	// KeyPrefix is put in front of every key (default "/keyvault/").
	KeyPrefix string
	// TLS, when set, is used for the connections (client certificates
	// included).
	TLS *tls.Config
	// DialTimeout bounds establishing the first connection (default 5s).
	DialTimeout time.Duration
	// RequestTimeout bounds each request to etcd (default 5s).
	RequestTimeout time.Duration
	// Registerer receives the metrics (nil: not exported).
	Registerer prometheus.Registerer
	// WrapKV, for tests only, wraps the KV client the store calls, so that
	// a test can inject faults such as a Txn applied but answered with an
	// error. Nil in production.
	WrapKV func(clientv3.KV) clientv3.KV
}

// Store is a vault.Store on etcd.
type Store struct {
	cli     *clientv3.Client
	kv      clientv3.KV
	prefix  string
	timeout time.Duration
	m       *metrics
}

var _ vault.Store = (*Store)(nil)

// ErrNoSpace: etcd raised its NOSPACE alarm and refuses writes until an
// operator compacts, defragments and disarms it.
var ErrNoSpace = errors.New("etcd NOSPACE alarm raised (database quota full): compact, defragment and disarm")

// Open connects to etcd. It does not fail when etcd is unreachable (the
// client keeps dialling); Ping tells.
func Open(opts Options) (*Store, error) {
	if len(opts.Endpoints) == 0 {
		return nil, errors.New("etcd store: no endpoints")
	}
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = "/keyvault/"
	}
	if opts.DialTimeout == 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   opts.Endpoints,
		DialTimeout: opts.DialTimeout,
		TLS:         opts.TLS,
		// The client's own logs would hold keys (which hold user IDs) on
		// some errors; the store reports errors through its callers.
		Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd store: connect to %v: %w", opts.Endpoints, err)
	}
	kv := clientv3.KV(cli.KV)
	if opts.WrapKV != nil {
		kv = opts.WrapKV(kv)
	}
	reg := opts.Registerer
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	return &Store{cli: cli, kv: kv, prefix: opts.KeyPrefix, timeout: opts.RequestTimeout, m: newMetrics(reg)}, nil
}

// Close closes the client.
func (s *Store) Close() error { return s.cli.Close() }

// Ping reports whether etcd answers a linearizable read (so a quorum is
// up) and has no NOSPACE alarm raised.
func (s *Store) Ping(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	if _, err := s.kv.Get(ctx, s.prefix+"\x00ping", clientv3.WithCountOnly()); err != nil {
		return fmt.Errorf("etcd read: %w", err)
	}
	alarms, err := s.cli.AlarmList(ctx)
	if err != nil {
		return fmt.Errorf("etcd alarm list: %w", err)
	}
	for _, a := range alarms.Alarms {
		if a.Alarm == etcdserverpb.AlarmType_NOSPACE {
			return ErrNoSpace
		}
	}
	return nil
}

// Get implements vault.Store.
func (s *Store) Get(ctx context.Context, key []byte) ([]byte, uint64, error) {
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	resp, err := s.kv.Get(ctx, s.prefix+string(key))
	s.m.observe("get", start, err)
	if err != nil {
		return nil, 0, fmt.Errorf("etcd get: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, nil
	}
	kv := resp.Kvs[0]
	v := kv.Value
	if v == nil {
		v = []byte{}
	}
	return v, uint64(kv.ModRevision), nil
}

// CompareAndSwap implements vault.Store. An error other than
// vault.ErrConflict leaves the outcome unknown: the write may have been
// applied, or may still be.
func (s *Store) CompareAndSwap(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err // not sent: surely not applied
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	k := s.prefix + string(key)
	cmp := clientv3.Compare(clientv3.ModRevision(k), "=", int64(rev))
	if rev == 0 {
		cmp = clientv3.Compare(clientv3.CreateRevision(k), "=", 0)
	}
	resp, err := s.kv.Txn(ctx).If(cmp).Then(clientv3.OpPut(k, string(value))).Commit()
	s.m.observe("cas", start, err)
	if err != nil {
		// Even a deadline may hit after the Txn was sent: unknown.
		return 0, fmt.Errorf("etcd compare-and-swap (outcome unknown): %w", err)
	}
	if !resp.Succeeded {
		s.m.conflicts.Inc()
		return 0, vault.ErrConflict
	}
	return uint64(resp.Header.Revision), nil
}

// Scan implements vault.Store: pages of keys under the prefix, all read at
// the revision of the first page, so the scan is one consistent view.
func (s *Store) Scan(ctx context.Context, prefix []byte, fn func(key, value []byte, rev uint64) error) error {
	start := time.Now()
	defer func() { s.m.observe("scan", start, nil) }()
	full := s.prefix + string(prefix)
	end := clientv3.GetPrefixRangeEnd(full)
	from := full
	var atRev int64
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(scanPage),
			clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend)}
		if atRev != 0 {
			opts = append(opts, clientv3.WithRev(atRev))
		}
		rctx, cancel := context.WithTimeout(ctx, s.timeout)
		resp, err := s.kv.Get(rctx, from, opts...)
		cancel()
		if err != nil {
			return fmt.Errorf("etcd scan: %w", err)
		}
		if atRev == 0 {
			atRev = resp.Header.Revision
		}
		for _, kv := range resp.Kvs {
			if err := fn(kv.Key[len(s.prefix):], kv.Value, uint64(kv.ModRevision)); err != nil {
				return err
			}
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

const scanPage = 500
