package vault

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/anchor"
)

// Options configure a Vault. The zero value of each field has the documented
// default.
type Options struct {
	// Budget is the guess budget of every backup (see Budget for its
	// defaults).
	Budget Budget
	// Registerer receives the vault's metrics (default: a private registry,
	// i.e. not exported).
	Registerer prometheus.Registerer
	// Logger receives operational events; it never sees secrets, PINs or
	// raw user IDs (default: slog.Default()).
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
	// ResolveWindow bounds how long a write whose outcome the store left
	// unknown is resolved before the request answers ErrUnavailable
	// (default 10s: an etcd leader election with room to spare).
	ResolveWindow time.Duration
	// Keys reloads and lets go of HSM key versions when the nodes sharing
	// the store move (see keystate.go). Default none: the vault never
	// reloads on its own.
	Keys KeyRing
	// Cluster configures the key lifecycle across nodes sharing the store.
	Cluster ClusterOptions
}

// Vault implements the backup operations on a Store and an HSM. It is safe
// for concurrent use, by any number of goroutines and of processes sharing
// the store.
type Vault struct {
	store   Store
	hsm     HSM
	opts    Options
	log     *slog.Logger
	metrics *metrics

	macVersion uint32
	macKeys    map[uint32]*keyedHMAC // record MAC keys by root key version; not changed after New
	logIDKey   *keyedHMAC

	sealMu sync.Mutex
	seals  map[uint32]*sealBlock // per wrap key version

	// retireMu guards retired, the key versions being retired or retired
	// across the nodes: a freshly sealed record under one of them is
	// never written.
	retireMu sync.RWMutex
	retired  map[uint32]bool
	rewrap   rewrapper

	keys       KeyRing
	syncMu     sync.Mutex                // one key sync round at a time; guards lastReload, forgotten
	syncedAt   atomic.Pointer[time.Time] // when the last successful round began
	fenceShown atomic.Bool               // the fence is up and has been logged
	lastReload string                    // the last reload outcome logged
	forgotten  map[uint32]bool           // retired versions the key ring has let go
}

// New derives the in-memory keys from the HSM's root key and returns a
// Vault. It fails if the HSM does not answer.
func New(ctx context.Context, store Store, hsm HSM, opts Options) (*Vault, error) {
	var err error
	if opts.Budget, err = opts.Budget.withDefaults(); err != nil {
		return nil, fmt.Errorf("vault: %w", err)
	}
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.ResolveWindow == 0 {
		opts.ResolveWindow = 10 * time.Second
	}
	opts.Cluster.setDefaults()
	v := &Vault{
		store:   store,
		hsm:     hsm,
		opts:    opts,
		log:     opts.Logger,
		metrics: newMetrics(opts.Registerer),
		macKeys: map[uint32]*keyedHMAC{},
		seals:   map[uint32]*sealBlock{},
		retired: map[uint32]bool{},

		keys:      opts.Keys,
		forgotten: map[uint32]bool{},
	}
	// Records name the root key version of their MAC key, so every version
	// is derived: records MAC'd under an older root still verify.
	root := KeyID{RoleRoot, hsm.KeyVersion(RoleRoot)}
	if root.Version == 0 {
		return nil, errors.New("vault: the HSM holds no root key (run keyvault keys init)")
	}
	for version := uint32(1); version <= root.Version; version++ {
		id := KeyID{RoleRoot, version}
		k, err := hsm.HMAC(ctx, id, []byte(labelRecordKey))
		if err != nil {
			return nil, fmt.Errorf("vault: derive record MAC key from %s: %w", id.Label(), err)
		}
		v.macKeys[version] = newKeyedHMAC(k)
	}
	logIDKey, err := hsm.HMAC(ctx, root, []byte(labelLogIDKey))
	if err != nil {
		return nil, fmt.Errorf("vault: derive log ID key from %s: %w", root.Label(), err)
	}
	v.logIDKey = newKeyedHMAC(logIDKey)
	v.macVersion = root.Version
	return v, nil
}

// DeriveAnchorKeys derives, from the newest HSM root key, the keys of
// rollback resistance (package anchor): the anchor MAC key and the digest
// key under labels of their own, and the meta MAC key, which is the record
// MAC key. None of them is the root key or ever stored.
func DeriveAnchorKeys(ctx context.Context, hsm HSM) (anchor.Keys, error) {
	root := KeyID{RoleRoot, hsm.KeyVersion(RoleRoot)}
	if root.Version == 0 {
		return anchor.Keys{}, errors.New("vault: the HSM holds no root key (run keyvault keys init)")
	}
	var k anchor.Keys
	for _, d := range []struct {
		label string
		out   *[]byte
	}{{labelAnchorKey, &k.Anchor}, {labelDigestKey, &k.Digest}, {labelRecordKey, &k.Meta}} {
		var err error
		if *d.out, err = hsm.HMAC(ctx, root, []byte(d.label)); err != nil {
			return anchor.Keys{}, fmt.Errorf("vault: derive %s from %s: %w", d.label, root.Label(), err)
		}
	}
	return k, nil
}

// LogID is a keyed hash of (namespace, user_id) for logs: stable within a
// deployment, useless for finding the raw ID without the HSM.
func (v *Vault) LogID(ns, userID string) string { return v.logID(recordKey(ns, userID)) }

func (v *Vault) logID(key []byte) string {
	s := v.logIDKey.get()
	defer v.logIDKey.put(s)
	s.h.Write(key)
	return hex.EncodeToString(s.sum()[:12])
}

func (v *Vault) now() int64 { return v.opts.Now().UnixNano() }
