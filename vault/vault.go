package vault

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
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
	// DefaultMaxAttempts applies when an enrollment names none (default 10).
	DefaultMaxAttempts int
	// MaxAttemptsLimit is the largest max_attempts a client may ask for
	// (default 20).
	MaxAttemptsLimit int
	// Registerer receives the vault's metrics (default: a private registry,
	// i.e. not exported).
	Registerer prometheus.Registerer
	// Logger receives operational events; it never sees secrets, PINs or
	// raw user IDs (default: slog.Default()).
	Logger *slog.Logger
	// Now is the clock (default time.Now).
	Now func() time.Time
	// EscalatingDelay, when Base is non-zero, makes a guess wait after
	// FreeGuesses attempts used in a row: Base * 2^(k-FreeGuesses) after the
	// record's last write, k being the attempts used. It lives in the
	// record, so it holds across processes and restarts. Default off.
	EscalatingDelay EscalatingDelay
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

// EscalatingDelay configures the durable delay between wrong guesses.
type EscalatingDelay struct {
	FreeGuesses int
	Base        time.Duration
}

// maxDelay caps one escalating delay, and keeps its arithmetic from
// overflowing.
const maxDelay = 30 * 24 * time.Hour

// wait returns how long a guess on r must still wait at now: from the
// latest counted guess (a refund or a reset does not restart it).
func (d EscalatingDelay) wait(r *record, now int64) time.Duration {
	k := int(r.used())
	if d.Base <= 0 || k == 0 || k < d.FreeGuesses {
		return 0
	}
	delay := min(d.Base, maxDelay)
	for range min(k-d.FreeGuesses, 32) {
		if delay = 2 * delay; delay >= maxDelay {
			delay = maxDelay
			break
		}
	}
	return time.Duration(max(r.LastGuessAt+int64(delay)-now, 0))
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
	macKeys    map[uint32][]byte // record MAC keys by root key version
	logIDKey   []byte

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
	lastReload string                    // the last reload outcome logged
	forgotten  map[uint32]bool           // retired versions the key ring has let go
}

// New derives the in-memory keys from the HSM's root key and returns a
// Vault. It fails if the HSM does not answer.
func New(ctx context.Context, store Store, hsm HSM, opts Options) (*Vault, error) {
	if opts.DefaultMaxAttempts == 0 {
		opts.DefaultMaxAttempts = 10
	}
	if opts.MaxAttemptsLimit == 0 {
		opts.MaxAttemptsLimit = 20
	}
	if opts.DefaultMaxAttempts < 1 || opts.DefaultMaxAttempts > opts.MaxAttemptsLimit {
		return nil, fmt.Errorf("vault: default max attempts %d outside 1..%d", opts.DefaultMaxAttempts, opts.MaxAttemptsLimit)
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
		macKeys: map[uint32][]byte{},
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
		v.macKeys[version] = k
	}
	var err error
	if v.logIDKey, err = hsm.HMAC(ctx, root, []byte(labelLogIDKey)); err != nil {
		return nil, fmt.Errorf("vault: derive log ID key from %s: %w", root.Label(), err)
	}
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
	m := hmac.New(sha256.New, v.logIDKey)
	m.Write(key)
	return hex.EncodeToString(m.Sum(nil)[:12])
}

// stored is a verified record together with where and at which revision it
// was read.
type stored struct {
	key []byte
	rev uint64
	*record
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
	r, body, mac, err := parseRecord(raw)
	if err == nil {
		k, ok := v.macKeys[r.MACVersion]
		switch {
		case !ok:
			err = fmt.Errorf("unknown MAC key version %d", r.MACVersion)
		case !hmac.Equal(mac, recordMAC(k, key, body)):
			err = errors.New("MAC mismatch")
		default:
			err = r.check()
		}
	}
	if err != nil {
		v.integrityFailure(key, "record", err)
		return nil, fmt.Errorf("%w: %w", ErrIntegrity, err)
	}
	return &stored{key: key, rev: rev, record: r}, nil
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
	if err := r.check(); err != nil {
		return fmt.Errorf("vault: refusing to write an invalid record: %w", err)
	}
	if r.freshWrap || r.freshPIN {
		// Held across the compare-and-swap (and its resolution), so that
		// once a node has marked a version, no new record under it from
		// this node can land unseen.
		v.retireMu.RLock()
		defer v.retireMu.RUnlock()
		if err := v.mayWrite(r); err != nil {
			return err
		}
	}
	r.MACVersion = v.macVersion
	body := r.marshal()
	val := append(body, recordMAC(v.macKeys[v.macVersion], key, body)...)
	ctx = context.WithoutCancel(ctx)
	_, err := v.store.CompareAndSwap(ctx, key, rev, val)
	if err == nil || errors.Is(err, ErrConflict) || errors.Is(err, ErrIntegrity) {
		return err
	}
	if errors.Is(err, ErrWithheld) {
		return fmt.Errorf("%w: write record: %w", ErrUnavailable, err)
	}
	return v.resolve(ctx, key, rev, val, r, err)
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
	var lastID []byte // the operation ID of the attempt that conflicted
	for attempt := 0; ; attempt++ {
		cur, err := v.read(ctx, key)
		if err != nil {
			return err
		}
		// A conflict can hide our own write: the etcd client may re-send
		// a Txn whose first copy landed, and the copy's compare fails. Its
		// ID in the record means it landed: applying fn again would count
		// a guess, or refund one, twice.
		if lastID != nil && cur != nil && cur.hasOp(lastID) {
			return nil
		}
		next, err := fn(cur)
		if err != nil || next == nil {
			return err
		}
		var rev uint64
		var prev record
		if cur != nil {
			rev, prev = cur.rev, *cur.record
		}
		next.OpSeq = prev.OpSeq + 1
		ids := prev.OpIDs[len(prev.OpIDs)-min(len(prev.OpIDs), maxOpIDs-1):]
		id := make([]byte, opIDLen)
		rand.Read(id)
		next.OpIDs = append(append(make([][]byte, 0, maxOpIDs), ids...), id)
		err = v.write(ctx, key, rev, next)
		if errors.Is(err, ErrIntegrity) {
			v.integrityFailure(key, "store value", err)
		}
		if !errors.Is(err, ErrConflict) {
			return err
		}
		lastID = id
		v.metrics.storeConflicts.Inc()
		if attempt >= 1000 {
			return fmt.Errorf("%w: record too contended", ErrUnavailable)
		}
	}
}

// sealBlock hands out GCM seal operations under one wrap key version from a
// block reserved durably in the store, so that the count of seals under a
// version (at most 2^32 with random nonces) is never under-reported, across
// processes and restarts. A crash wastes at most the rest of one block.
type sealBlock struct{ next, end uint64 }

const (
	sealBlockSize = 1 << 12
	maxSealsPerKV = 1 << 32
)

func sealCountKey(version uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte("m\x00seals/wrap/"), version)
}

// sealCount encodes a seal count: the count (8 bytes), the root key
// version of its MAC (4), and the MAC, as a record's, so that nobody who
// can write the store can wind it back.
func (v *Vault) sealCount(key []byte, n uint64) []byte {
	body := binary.BigEndian.AppendUint64(nil, n)
	body = binary.BigEndian.AppendUint32(body, v.macVersion)
	return append(body, recordMAC(v.macKeys[v.macVersion], key, body)...)
}

func (v *Vault) parseSealCount(key, raw []byte) (uint64, error) {
	if raw == nil {
		return 0, nil
	}
	if len(raw) != 12+macLen {
		return 0, errors.New("seal count malformed")
	}
	body, mac := raw[:12], raw[12:]
	k, ok := v.macKeys[binary.BigEndian.Uint32(body[8:])]
	if !ok || !hmac.Equal(mac, recordMAC(k, key, body)) {
		return 0, errors.New("seal count MAC mismatch")
	}
	return binary.BigEndian.Uint64(body), nil
}

// takeSeal reserves one seal under the wrap key version.
func (v *Vault) takeSeal(ctx context.Context, version uint32) error {
	v.sealMu.Lock()
	defer v.sealMu.Unlock()
	b := v.seals[version]
	if b == nil || b.next == b.end {
		key := sealCountKey(version)
		for {
			raw, rev, err := v.store.Get(ctx, key)
			if err != nil {
				return fmt.Errorf("%w: read seal count: %w", ErrUnavailable, err)
			}
			n, err := v.parseSealCount(key, raw)
			if err != nil {
				v.integrityFailure(key, "seal count", err)
				return fmt.Errorf("%w: %w", ErrIntegrity, err)
			}
			if n+sealBlockSize > maxSealsPerKV {
				return fmt.Errorf("%w: wrap key version %d has sealed its limit of 2^32 records; rotate the keys", ErrUnavailable, version)
			}
			_, err = v.store.CompareAndSwap(context.WithoutCancel(ctx), key, rev, v.sealCount(key, n+sealBlockSize))
			if errors.Is(err, ErrConflict) {
				continue
			}
			if err != nil {
				return fmt.Errorf("%w: reserve seals: %w", ErrUnavailable, err)
			}
			b = &sealBlock{next: n, end: n + sealBlockSize}
			v.seals[version] = b
			v.metrics.sealsReserved.WithLabelValues(fmt.Sprint(version)).Set(float64(b.end))
			break
		}
	}
	b.next++
	return nil
}

// verify checks a PIN against a record: one HSM HMAC, then a constant-time
// comparison of the derived verifier. On a match it also returns the inner
// key; the caller wipes it.
func (v *Vault) verify(ctx context.Context, ns, userID string, r *record, pin []byte) (ok bool, inner []byte, err error) {
	msg := pinMACInput(ns, userID, r.Generation, r.Salt, pin)
	defer wipe(msg)
	m, err := v.hsm.HMAC(ctx, KeyID{RolePIN, r.PINVersion}, msg)
	if err != nil {
		return false, nil, fmt.Errorf("%w: PIN check: %w", ErrUnavailable, err)
	}
	defer wipe(m)
	verifier, inner, err := pinKeys(m)
	if err != nil {
		return false, nil, err
	}
	defer wipe(verifier)
	if subtle.ConstantTimeCompare(verifier, r.Verifier) != 1 {
		wipe(inner)
		return false, nil, nil
	}
	return true, inner, nil
}

// openOuter removes the outer layer of a record's sealed secret, as the
// record's sealing profile says, and returns the inner layer; the caller
// wipes it. The profile comes from the record, whose MAC vouches for it,
// and must be the one of the wrap key version it names: a key of another
// kind under that label cannot have sealed it.
func (v *Vault) openOuter(ctx context.Context, ns, userID string, r *record, sealed []byte) ([]byte, error) {
	key := recordKey(ns, userID)
	if p := v.hsm.WrapProfile(r.WrapVersion); p != "" && !SameKeyKind(p, r.Sealing) {
		err := fmt.Errorf("sealed by the %s profile, but wrap key v%d is of the %s profile", r.Sealing, r.WrapVersion, p)
		v.integrityFailure(key, "sealed secret", err)
		return nil, fmt.Errorf("%w: open outer layer: %w", ErrIntegrity, err)
	}
	aad := outerAAD(ns, userID, r.Generation, r.WrapVersion, r.PINVersion)
	pt, err := v.hsm.Open(ctx, KeyID{RoleWrap, r.WrapVersion}, r.Nonce, sealed, aad)
	if err != nil {
		if errors.Is(err, ErrIntegrity) {
			v.integrityFailure(key, "sealed secret", errors.New("outer layer failed authentication"))
			return nil, fmt.Errorf("open outer layer: %w", err)
		}
		return nil, fmt.Errorf("%w: open outer layer: %w", ErrUnavailable, err)
	}
	return pt, nil
}

// sealOuter seals an inner layer under a wrap key version, with a fresh
// nonce (or the HSM's IV, which Seal writes into it), and sets the
// record's outer fields: version, sealing profile, nonce and sealed bytes,
// which always change together.
func (v *Vault) sealOuter(ctx context.Context, ns, userID string, r *record, version uint32, inner []byte) error {
	profile := v.hsm.WrapProfile(version)
	if profile == "" {
		return fmt.Errorf("%w: the HSM holds no wrap key v%d", ErrUnavailable, version)
	}
	if err := v.takeSeal(ctx, version); err != nil {
		return err
	}
	nonce := make([]byte, nonceLen)
	rand.Read(nonce) // never fails (crypto/rand, Go 1.24+)
	sealed, err := v.hsm.Seal(ctx, KeyID{RoleWrap, version}, nonce, inner, outerAAD(ns, userID, r.Generation, version, r.PINVersion))
	if err != nil {
		return fmt.Errorf("%w: seal: %w", ErrUnavailable, err)
	}
	r.WrapVersion, r.Sealing, r.Nonce, r.Sealed = version, profile, nonce, sealed
	return nil
}

// open removes both layers of a record's sealed secret.
func (v *Vault) open(ctx context.Context, ns, userID string, r *record, sealed, inner []byte) ([]byte, error) {
	pt, err := v.openOuter(ctx, ns, userID, r, sealed)
	if err != nil {
		return nil, err
	}
	defer wipe(pt)
	g, err := innerGCM(inner)
	if err != nil {
		return nil, err
	}
	if len(pt) < nonceLen {
		v.integrityFailure(recordKey(ns, userID), "sealed secret", errors.New("inner layer too short"))
		return nil, fmt.Errorf("%w: inner layer too short", ErrIntegrity)
	}
	secret, err := g.Open(nil, pt[:nonceLen], pt[nonceLen:], innerAAD(ns, userID, r.Generation))
	if err != nil {
		v.integrityFailure(recordKey(ns, userID), "sealed secret", errors.New("inner layer failed authentication"))
		return nil, fmt.Errorf("%w: open inner layer", ErrIntegrity)
	}
	return secret, nil
}

// seal builds the PIN check and both layers of a new generation of a backup.
func (v *Vault) seal(ctx context.Context, ns, userID string, gen uint64, secret, pin []byte) (*record, error) {
	wrapVersion := v.hsm.KeyVersion(RoleWrap)
	r := &record{
		Generation: gen,
		PINVersion: v.hsm.KeyVersion(RolePIN),
		Salt:       make([]byte, saltLen),
		freshWrap:  true,
		freshPIN:   true,
	}
	if wrapVersion == 0 || r.PINVersion == 0 {
		return nil, fmt.Errorf("%w: the HSM holds no wrap or PIN key", ErrUnavailable)
	}
	if err := v.mayUse(wrapVersion, r.PINVersion); err != nil {
		return nil, err
	}
	rand.Read(r.Salt) // never fails (crypto/rand, Go 1.24+)

	msg := pinMACInput(ns, userID, gen, r.Salt, pin)
	defer wipe(msg)
	m, err := v.hsm.HMAC(ctx, KeyID{RolePIN, r.PINVersion}, msg)
	if err != nil {
		return nil, fmt.Errorf("%w: PIN MAC: %w", ErrUnavailable, err)
	}
	defer wipe(m)
	verifier, innerKey, err := pinKeys(m)
	if err != nil {
		return nil, err
	}
	defer wipe(innerKey)
	r.Verifier = verifier

	g, err := innerGCM(innerKey)
	if err != nil {
		return nil, err
	}
	inner := make([]byte, nonceLen, nonceLen+len(secret)+g.Overhead())
	rand.Read(inner)
	inner = g.Seal(inner, inner[:nonceLen], secret, innerAAD(ns, userID, gen))
	defer wipe(inner)

	if err := v.sealOuter(ctx, ns, userID, r, wrapVersion, inner); err != nil {
		return nil, err
	}
	return r, nil
}
