package vault

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Key rotation, as the vault sees it. New records always take the newest
// wrap and PIN key versions the HSM reports. Older records move in two
// ways: the outer layer moves to the newest wrap key by re-wrapping, which
// needs no PIN (Rewrap); the PIN check and the inner layer can only move
// when the user presents the PIN, so a right recovery re-seals the record
// under the newest versions in the same write that forgives its guess. An
// old version may be destroyed once no record uses it (RetireKeys).

// stale reports whether a record is sealed under older key versions than
// the newest.
func (v *Vault) stale(r *record) bool {
	return r.WrapVersion < v.hsm.KeyVersion(RoleWrap) || r.PINVersion < v.hsm.KeyVersion(RolePIN)
}

// sameSeal reports whether cur still holds the sealing that r was read
// with (salt, outer nonce, key versions); the sealed bytes themselves may
// be absent while a guess holds a pending lock.
func sameSeal(cur, r *record) bool {
	return bytes.Equal(cur.Salt, r.Salt) && bytes.Equal(cur.Nonce, r.Nonce) &&
		cur.WrapVersion == r.WrapVersion && cur.PINVersion == r.PINVersion && cur.Sealing == r.Sealing
}

// recoverResealing finishes a right guess on a record sealed under older
// key versions: it opens the secret, seals it again under the newest
// versions (fresh salt and nonces, same generation), and writes that in
// the compare-and-swap that forgives the guess. Re-sealing is best effort:
// if it fails, the guess is forgiven as usual and the next recovery tries
// again.
func (v *Vault) recoverResealing(ctx context.Context, ns, userID string, g *guess, inner, pin []byte) ([]byte, int, error) {
	// The re-seal comes before the forgive that may undo this guess's lock.
	hctx, cancel := g.hsmContext(ctx)
	defer cancel()
	secret, err := v.open(hctx, ns, userID, &g.before, g.before.Sealed, inner)
	if err != nil {
		// The guess was right: it is forgiven, as on the usual path.
		if _, ferr := v.forgive(ctx, g); errors.Is(ferr, errUntold) {
			return nil, 0, fmt.Errorf("recover: %w", ferr)
		}
		return nil, 0, fmt.Errorf("recover: %w", err)
	}
	next, err := v.seal(hctx, ns, userID, g.before.Generation, secret, pin)
	if err != nil {
		v.log.Warn("could not re-seal a record under the newest keys; it stays on its versions", "record", v.LogID(ns, userID), "error", err.Error())
		next = nil
	}
	remaining, ferr := v.forgiveResealed(ctx, g, next)
	if ferr != nil && next != nil && !errors.Is(ferr, errUntold) {
		remaining, ferr = v.forgive(ctx, g)
	}
	if errors.Is(ferr, errUntold) {
		wipe(secret)
		return nil, 0, fmt.Errorf("recover: %w", ferr)
	}
	if ferr != nil {
		v.log.Error("recovered, but the counter reset failed", "record", v.LogID(ns, userID), "error", ferr.Error())
		remaining = g.before.remaining() - 1
	}
	return secret, remaining, nil
}

// KeyUsage counts the live backups (tombstones aside) by the wrap key and
// the PIN key version they use. It also sets the gauges
// keyvault_records_by_wrap_key_version and _by_pin_key_version.
type KeyUsage struct {
	Wrap map[uint32]int
	PIN  map[uint32]int
}

// KeyUsage scans the store and counts backups by key version. Records are
// parsed, not authenticated: a count, not a decision about their content.
func (v *Vault) KeyUsage(ctx context.Context) (KeyUsage, error) {
	u := KeyUsage{Wrap: map[uint32]int{}, PIN: map[uint32]int{}}
	err := v.store.Scan(ctx, []byte{'r'}, func(_, value []byte, _ uint64) error {
		r, _, _, err := parseRecord(value)
		if err != nil || r.Tombstone {
			return nil
		}
		u.Wrap[r.WrapVersion]++
		u.PIN[r.PINVersion]++
		return nil
	})
	if err != nil {
		return KeyUsage{}, fmt.Errorf("%w: count records by key version: %w", ErrUnavailable, err)
	}
	v.metrics.recordsByWrap.Reset()
	v.metrics.recordsByPIN.Reset()
	for ver, n := range u.Wrap {
		v.metrics.recordsByWrap.WithLabelValues(strconv.FormatUint(uint64(ver), 10)).Set(float64(n))
	}
	for ver, n := range u.PIN {
		v.metrics.recordsByPIN.WithLabelValues(strconv.FormatUint(uint64(ver), 10)).Set(float64(n))
	}
	return u, nil
}

// KeysInUseError: RetireKeys refused, because backups still use the
// version.
type KeysInUseError struct {
	Version     uint32
	WrapRecords int // backups whose outer layer is sealed under it
	PINRecords  int // backups whose PIN check uses it
}

func (e *KeysInUseError) Error() string {
	return fmt.Sprintf("key version %d is still in use: %d backups are sealed under wrap key v%d and %d are checked with PIN key v%d",
		e.Version, e.WrapRecords, e.Version, e.PINRecords, e.Version)
}

// ErrKeysInUse is matched by a *KeysInUseError.
var ErrKeysInUse = errors.New("key version in use")

// Is makes errors.Is(err, ErrKeysInUse) true.
func (e *KeysInUseError) Is(target error) bool { return target == ErrKeysInUse }

// RetireKeys destroys version of the wrap and PIN keys through destroy,
// unless a backup still uses it (a *KeysInUseError saying how many) or a
// live node sharing the store has not moved off it (a
// *LaggingNodesError naming the nodes). It refuses the newest version of
// either key. It marks the version in the cluster's key state, so that
// no node writes a freshly sealed record under it, waits until every
// live node has acknowledged the mark, and only then counts the records:
// the count cannot be outrun by an enrollment or re-wrap in flight on any
// node (see keystate.go). If it refuses, the version is usable again.
func (v *Vault) RetireKeys(ctx context.Context, version uint32, destroy func(version uint32) error) error {
	if version == 0 || version >= v.hsm.KeyVersion(RoleWrap) || version >= v.hsm.KeyVersion(RolePIN) {
		return invalid("version", "must be older than the newest wrap and PIN key version")
	}
	err := v.retireKeys(ctx, version, destroy)
	if err != nil {
		return fmt.Errorf("retire key version %d: %w", version, err)
	}
	v.log.Info("key version retired", "version", version)
	return nil
}

func (v *Vault) retireKeys(ctx context.Context, version uint32, destroy func(version uint32) error) error {
	idBytes := make([]byte, 8)
	rand.Read(idBytes)
	ownID := hex.EncodeToString(idBytes)
	var markID string // the mark this retire relies on: its own, or one it joined
	_, markRev, err := v.changeKeyState(ctx, func(ks *keyState) (bool, error) {
		// Already retired: destroy whatever copies remain. Already being
		// retired (another request, or one that died): join its mark;
		// the mark may be this request's own, whose answer was lost.
		if slices.Contains(ks.Retired, version) || slices.Contains(ks.Retiring, version) {
			markID = ks.MarkIDs[version]
			return false, nil
		}
		ks.Retiring = addVersion(ks.Retiring, version)
		if ks.MarkIDs == nil {
			ks.MarkIDs = map[uint32]string{}
		}
		ks.MarkIDs[version], markID = ownID, ownID
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("mark the version: %w", err)
	}
	marked := markID == ownID
	err = v.SyncKeys(ctx) // this node's own acknowledgement
	if err == nil && v.opts.Cluster.Shared {
		err = v.awaitAcks(ctx, version, markRev)
	}
	var u KeyUsage
	if err == nil {
		// Read after every acknowledgement: every write under the version
		// has landed before it.
		u, err = v.KeyUsage(ctx)
	}
	if err == nil && (u.Wrap[version] > 0 || u.PIN[version] > 0) {
		err = &KeysInUseError{Version: version, WrapRecords: u.Wrap[version], PINRecords: u.PIN[version]}
	}
	if err == nil {
		// Retired before destroying: once destruction begins the version
		// stays out of use, even if it fails half-way (a member may have
		// lost the key already).
		_, _, err = v.changeKeyState(ctx, func(ks *keyState) (bool, error) {
			if slices.Contains(ks.Retired, version) {
				return false, nil
			}
			if !slices.Contains(ks.Retiring, version) || ks.MarkIDs[version] != markID {
				// A retire this one joined failed and cleared the mark
				// (another may have set a new one since): the nodes may
				// have sealed under the version again, after the count.
				return false, errMarkCleared
			}
			ks.Retiring = dropVersion(ks.Retiring, version)
			delete(ks.MarkIDs, version)
			ks.Retired = addVersion(ks.Retired, version)
			return true, nil
		})
		if err != nil {
			err = fmt.Errorf("record the version as retired: %w", err)
		}
	}
	if err != nil {
		if marked {
			_, _, cerr := v.changeKeyState(context.WithoutCancel(ctx), func(ks *keyState) (bool, error) {
				if !slices.Contains(ks.Retiring, version) || ks.MarkIDs[version] != ownID {
					return false, nil // gone, or another retire's mark since
				}
				ks.Retiring = dropVersion(ks.Retiring, version)
				delete(ks.MarkIDs, version)
				return true, nil
			})
			if cerr != nil {
				err = errors.Join(err, fmt.Errorf("clear the mark (the nodes keep refusing the version until a retire succeeds): %w", cerr))
			}
			// Unmark here now; the other nodes do within a heartbeat.
			_ = v.SyncKeys(context.WithoutCancel(ctx))
		}
		return err
	}
	if err := v.SyncKeys(ctx); err != nil {
		v.log.Warn("key sync after marking a version retired", "version", version, "error", err.Error())
	}
	return destroy(version)
}

// errMarkCleared: the retirement mark was cleared while a retire that
// joined it counted.
var errMarkCleared = fmt.Errorf("%w: another retire of this version failed and cleared its mark meanwhile; run the retire again", ErrUnavailable)

// RewrapStatus describes the re-wrap job, running or last run.
type RewrapStatus struct {
	Running    bool
	Target     uint32 // the wrap key version records move to
	Total      int    // records that were on older versions when the run began
	Done       int    // records moved
	Skipped    int    // records left for a later run: changed meanwhile to a newer version, deleted, or with a pending lock
	Errors     int    // records that failed (damaged, or the HSM or store gave no answer); a later run retries them
	LastError  string // the latest error's text (no record contents)
	StartedAt  time.Time
	FinishedAt time.Time
}

type rewrapper struct {
	mu     sync.Mutex
	status RewrapStatus
}

// RewrapStatus returns the re-wrap job's progress.
func (v *Vault) RewrapStatus() RewrapStatus {
	v.rewrap.mu.Lock()
	defer v.rewrap.mu.Unlock()
	return v.rewrap.status
}

// StartRewrap starts the re-wrap job in the background, unless it runs
// already (started false): every backup sealed under an older wrap key
// version gets its outer layer opened in the HSM and sealed again under
// the newest, at most perSecond records a second (0: no limit), each by a
// compare-and-swap of its own that leaves every other field as it is, so
// that it never races a guess or an enrollment and holds no lock. The job
// keeps no state: after a crash, the next run finds what is left. ctx ends
// the job (the process's lifetime).
func (v *Vault) StartRewrap(ctx context.Context, perSecond float64) (status RewrapStatus, started bool) {
	v.rewrap.mu.Lock()
	defer v.rewrap.mu.Unlock()
	if v.rewrap.status.Running {
		return v.rewrap.status, false
	}
	v.rewrap.status = RewrapStatus{Running: true, Target: v.hsm.KeyVersion(RoleWrap), StartedAt: v.opts.Now().UTC()}
	v.metrics.rewrapRunning.Set(1)
	go v.runRewrap(ctx, perSecond, v.rewrap.status.Target)
	return v.rewrap.status, true
}

func (v *Vault) rewrapUpdate(f func(*RewrapStatus)) {
	v.rewrap.mu.Lock()
	defer v.rewrap.mu.Unlock()
	f(&v.rewrap.status)
}

func (v *Vault) runRewrap(ctx context.Context, perSecond float64, target uint32) {
	defer func() {
		// The gauges first, so that whoever sees the run finished also
		// sees its final counts, however slow the store is to count.
		if _, err := v.KeyUsage(context.WithoutCancel(ctx)); err != nil {
			v.log.Warn("counting records by key version", "error", err.Error())
		}
		v.rewrapUpdate(func(s *RewrapStatus) { s.Running, s.FinishedAt = false, v.opts.Now().UTC() })
		v.metrics.rewrapRunning.Set(0)
		v.metrics.rewrapPending.Set(0)
	}()
	// Collect the keys first, so that no read transaction stays open
	// while records are re-wrapped.
	var keys [][]byte
	err := v.store.Scan(ctx, []byte{'r'}, func(key, value []byte, _ uint64) error {
		if r, _, _, err := parseRecord(value); err == nil && !r.Tombstone && r.WrapVersion < target {
			keys = append(keys, bytes.Clone(key))
		}
		return nil
	})
	if err != nil {
		v.rewrapFailed(fmt.Errorf("scan: %w", err))
		return
	}
	v.rewrapUpdate(func(s *RewrapStatus) { s.Total = len(keys) })
	v.log.Info("re-wrap started", "target_version", target, "records", len(keys), "per_second", perSecond)
	limit := rate.Inf
	if perSecond > 0 {
		limit = rate.Limit(perSecond)
	}
	lim := rate.NewLimiter(limit, 1)
	for i, key := range keys {
		v.metrics.rewrapPending.Set(float64(len(keys) - i))
		if err := lim.Wait(ctx); err != nil {
			v.rewrapFailed(fmt.Errorf("stopped: %w", err))
			return
		}
		moved, err := v.rewrapOne(ctx, key, target)
		switch {
		case err != nil:
			v.metrics.rewrapErrors.Inc()
			v.log.Warn("re-wrap of a record failed; a later run retries it", "record", v.logID(key), "error", err.Error())
			v.rewrapUpdate(func(s *RewrapStatus) { s.Errors++; s.LastError = err.Error() })
		case moved:
			v.metrics.rewrapped.Inc()
			v.rewrapUpdate(func(s *RewrapStatus) { s.Done++ })
		default:
			v.rewrapUpdate(func(s *RewrapStatus) { s.Skipped++ })
		}
	}
	st := v.RewrapStatus()
	v.log.Info("re-wrap finished", "target_version", target, "moved", st.Done, "skipped", st.Skipped, "errors", st.Errors)
}

func (v *Vault) rewrapFailed(err error) {
	v.metrics.rewrapErrors.Inc()
	v.log.Error("re-wrap job ended early; run it again", "error", err.Error())
	v.rewrapUpdate(func(s *RewrapStatus) { s.Errors++; s.LastError = err.Error() })
}

// rewrapOne moves one record's outer layer to the target wrap key version.
// A record whose lock is final (by its flag, or because its guess's
// request died: older than lockSettleWindow) holds no secret and its PIN
// can never be checked again, so its key versions simply move to the
// newest; one with a pending lock is left for a later run (its guess may
// put back the secret it read, sealed under the old version).
func (v *Vault) rewrapOne(ctx context.Context, key []byte, target uint32) (moved bool, err error) {
	ns, userID, ok := splitRecordKey(key)
	if !ok {
		return false, fmt.Errorf("%w: malformed store key", ErrIntegrity)
	}
	err = v.update(ctx, key, func(cur *stored) (*record, error) {
		moved = false
		if cur == nil || cur.Tombstone || cur.WrapVersion >= target {
			return nil, nil
		}
		next := cur.record
		next.freshWrap = true
		next.UpdatedAt = v.now()
		if cur.Locked {
			if v.lockedOrPending(cur) != ErrLocked {
				return nil, nil
			}
			// Final, by its flag or by age (its request died). The flag
			// says so where the counter does: a success that forgave
			// guesses before the lock's can leave attempts on a lock
			// whose request died, and that lock stays final by its age.
			next.LockFinal, next.freshPIN = cur.used() == cur.MaxAttempts, true
			next.WrapVersion, next.PINVersion = target, max(cur.PINVersion, v.hsm.KeyVersion(RolePIN))
			if p := v.hsm.WrapProfile(target); p != "" {
				next.Sealing = p // nothing is sealed; the mark follows the version
			}
			moved = true
			return &next, nil
		}
		// Opened as the record says it was sealed, sealed as the target
		// version's profile says.
		inner, err := v.openOuter(ctx, ns, userID, &cur.record, cur.Sealed)
		if err != nil {
			return nil, err
		}
		defer wipe(inner)
		if err := v.sealOuter(ctx, ns, userID, &next, target, inner); err != nil {
			return nil, err
		}
		moved = true
		return &next, nil
	})
	return moved, err
}

// splitRecordKey is the inverse of recordKey.
func splitRecordKey(k []byte) (ns, userID string, ok bool) {
	if len(k) < 3 || k[0] != 'r' {
		return "", "", false
	}
	n := int(k[1])
	if len(k) < 2+n+1 {
		return "", "", false
	}
	ns = string(k[2 : 2+n])
	rest := k[2+n:]
	if int(rest[0]) != len(rest)-1 {
		return "", "", false
	}
	return ns, string(rest[1:]), true
}
