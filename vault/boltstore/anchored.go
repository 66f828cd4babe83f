package boltstore

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/vault"
)

// keyAnchorMeta holds the store's anchor meta (vault ID, epoch, seq) in
// the meta bucket. Like every record, it is part of the digest.
var keyAnchorMeta = []byte("anchor")

// keyAnchorBlock holds the block of anchor write numbers the last start
// took (see writeBlock). It is outside the digest: it only keeps write
// numbers apart, and an edit of it costs liveness, never safety.
var keyAnchorBlock = []byte("anchor-block")

// Anchoring is what rollback anchoring needs (Options.Anchoring).
type Anchoring struct {
	Keys    anchor.Keys
	Members Anchors
	// Log receives the start-up verdict and the members dropped from the
	// live set (nil: slog.Default()).
	Log *slog.Logger
}

// Anchors is where the store's anchors live: one per HSM member (the
// HSM pool implements it).
type Anchors interface {
	// Members names every configured member.
	Members() []string
	// ReadAnchors reads the anchor objects of every configured member.
	ReadAnchors(ctx context.Context) []anchor.Found
	// WriteAnchor replaces the named member's anchor with value, the
	// anchor with write number w; it refuses a w not above the last one
	// written to that member.
	WriteAnchor(ctx context.Context, member string, w uint64, value []byte) error
}

// anchorTimeout bounds one anchor write to the members: answers wait for
// it, so a slow member is dropped from the live set rather than waited on.
const anchorTimeout = 2 * time.Second

// position is a state of the store, as the writer keeps it.
type position struct {
	records anchor.Digest // of its records
	digest  anchor.Digest // of every record and the meta
	meta    anchor.Meta
	metaRaw []byte
}

// anchoring is the committer's rollback-resistance state, and its
// commitHook. It keeps the write order: a batch is written only on a
// position an anchor vouches for, its meta naming that position as its
// parent, and its answers go out only once an anchor vouches for the
// position it made. So the store is never more than one batch past its
// newest anchor, and only by a batch whose answers are still held, but
// for early answers (CompareAndSwapEarly): the vault sends only a write
// that forgives one guess that way, so a store one batch past its anchor
// and the anchored store before it differ, as far as an answered write
// goes, by at most one guess forgiven. Only the committer goroutine
// touches it after Anchor has returned.
type anchoring struct {
	store   *Store // nil in AcceptRestore, which commits nothing
	keys    anchor.Keys
	sealer  *anchor.Sealer // MACs under keys, for each commit
	hasher  *anchor.Hasher
	members Anchors
	log     *slog.Logger
	metrics *anchorMetrics

	position // the committed store's
	// batchRecords is, from beforeCommit on, the digest of the records of the
	// batch in its transaction, as its writes are made (changed).
	batchRecords anchor.Digest
	// next is the position the batch in its transaction makes, adopted
	// once that commits.
	next *position
	// anchored is the seq the members' newest anchor vouches for: the
	// committed one (meta.Seq), or the one before it if the anchor for the
	// last batch failed.
	anchored uint64
	w        uint64 // the last anchor write number tried
	// unsure: a transaction failed, so the store may or may not hold its
	// batch; the state above is read back from the store before the next.
	unsure bool
	// live are the members the last anchor write reached: the next anchor
	// names them. need are sets of members the next write must reach one
	// of each: the set the last anchor named, so that every member holding
	// an older anchor names, in its live set, a member that holds a newer
	// one, and no stale member can stand in for the current ones at start.
	// After a start or an accept there are more (see Anchor, AcceptRestore).
	live []string
	need [][]string
	// retry holds, for members out of the live set, when to try one
	// again and how long the wait after that will be: a member that hangs
	// must not make every batch wait out anchorTimeout.
	retry map[string]backoff
}

type backoff struct {
	at   time.Time
	wait time.Duration
}

// Waits between catch-up attempts on a member out of the live set.
const (
	retryFirst = time.Second
	retryMax   = time.Minute
)

type anchorMetrics struct {
	writes   *prometheus.CounterVec
	duration prometheus.Histogram
	live     prometheus.Gauge
	seq      prometheus.Gauge
}

func newAnchorMetrics(reg prometheus.Registerer) *anchorMetrics {
	m := &anchorMetrics{
		writes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_anchor_writes_total",
			Help: "Rollback-anchor writes to HSM members, by member and result (ok, error).",
		}, []string{"member", "result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "keyvault_anchor_write_duration_seconds",
			Help:    "Duration of one rollback-anchor write to every member (answers wait for it).",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		live: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keyvault_anchor_live_members",
			Help: "HSM members the last rollback-anchor write reached.",
		}),
		seq: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "keyvault_anchor_seq",
			Help: "The store's anchored batch number.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.writes, m.duration, m.live, m.seq)
	}
	return m
}

// Anchor turns rollback resistance on (see package anchor), as
// Options.Anchoring does at Open. It scans the store into its digest,
// reads every member's anchor, and accepts the store only if the newest
// anchor vouches for its state (anchor.Check); otherwise it returns an
// *anchor.RefusedError and the store must not be served. On acceptance
// (or on a fresh store) it writes an anchor for the current state and
// logs the verdict. From then on every commit follows the write order (see
// commitHook): a batch commits only on an anchored position, its meta
// naming that position as its parent, and its answers go out only once an
// anchor vouches for it. Call it once, before any write.
func (s *Store) Anchor(ctx context.Context, keys anchor.Keys, members Anchors, reg prometheus.Registerer, log *slog.Logger) (anchor.Decision, error) {
	if log == nil {
		log = slog.Default()
	}
	a := &anchoring{store: s, keys: keys, sealer: keys.Sealer(), hasher: anchor.NewHasher(keys.Digest), members: members, log: log, metrics: newAnchorMetrics(reg)}
	st, err := s.scan(a.hasher)
	if err != nil {
		return anchor.Decision{}, err
	}
	found := members.ReadAnchors(ctx)
	dec, err := keys.Check(found, st)
	if err != nil {
		return dec, err
	}
	a.records, a.digest, a.metaRaw = st.RecordDigest, st.Digest, st.Meta
	switch {
	case dec.Fresh && st.Meta == nil:
		// A new store (or one kept with anchoring off): its identity and
		// first position. Check found every member answering, with no
		// anchor.
		m := anchor.Meta{Epoch: 1, Records: st.RecordDigest}
		rand.Read(m.VaultID[:])
		raw := keys.MarshalMeta(m)
		if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyAnchorMeta, raw) }); err != nil {
			return dec, fmt.Errorf("write the first anchor meta: %w", err)
		}
		a.meta, a.metaRaw, a.digest = m, raw, a.hasher.AddMeta(st.RecordDigest, raw)
		dec.Meta = m
	case dec.Fresh:
		m, err := keys.ParseMeta(st.Meta)
		if err != nil {
			return dec, err
		}
		a.meta, dec.Meta = m, m
	default:
		a.meta = dec.Meta
	}
	newest, maxW := newestAnchors(keys, found, a.meta)
	if a.w, err = s.takeBlock(maxW); err != nil {
		return dec, err
	}
	if dec.Fresh {
		a.live, a.need = members.Members(), [][]string{members.Members()}
	} else {
		// The start-up write must reach a member the newest anchor names,
		// and, for every member holding an older anchor, that member or
		// one its anchor names: the newest anchor may be a failed write
		// that reached none of the members the anchor before it named,
		// and a member still holding that one must not be left naming
		// only members without a newer anchor.
		a.live, a.need = dec.Holders, [][]string{dec.Anchor.Live}
		for m, an := range newest {
			if dec.Anchor.Outranks(an) {
				if set := slices.Clone(an.Live); !slices.Contains(set, m) {
					a.need = append(a.need, append(set, m))
				} else {
					a.need = append(a.need, set)
				}
			}
		}
	}
	// Vouch for the state just checked; it also catches up members that
	// were behind.
	if err := a.vouch(ctx); err != nil {
		return dec, err
	}
	// The committer reads the hook only for a write it has received, and
	// writes are sent after this returns: the channel orders the two.
	s.hook = a
	if dec.Adopted {
		log.Warn("rollback anchoring: adopting a store kept with anchoring off, as it is; from now on a rollback behind this point is refused",
			"epoch", dec.Meta.Epoch, "seq", dec.Meta.Seq)
	} else {
		log.Info("rollback check passed", "epoch", dec.Meta.Epoch, "seq", dec.Meta.Seq, "fresh", dec.Fresh,
			"one_batch_past_anchor", dec.Past, "ignored_anchor_objects", dec.Ignored)
	}
	return dec, nil
}

// scan computes the digest of the whole store.
func (s *Store) scan(h *anchor.Hasher) (anchor.State, error) {
	var st anchor.State
	err := s.db.View(func(tx *bolt.Tx) error {
		if m := tx.Bucket(bucketMeta).Get(keyAnchorMeta); m != nil {
			st.Meta = bytes.Clone(m)
		}
		return tx.Bucket(bucketData).ForEach(func(k, v []byte) error {
			st.RecordDigest = h.AddRecord(st.RecordDigest, k, v)
			st.Records++
			return nil
		})
	})
	st.Digest = st.RecordDigest
	if st.Meta != nil {
		st.Digest = h.AddMeta(st.Digest, st.Meta)
	}
	if err != nil {
		return st, fmt.Errorf("scan the store for its digest: %w", err)
	}
	return st, nil
}

// newestAnchors returns, for each member that answered, its newest valid
// anchor of the store's vault, and the highest write number among the
// anchors of the store's epoch: write numbers order anchors within an
// epoch only, so an accept starts them over (see takeBlock).
func newestAnchors(keys anchor.Keys, found []anchor.Found, m anchor.Meta) (map[string]anchor.Anchor, uint64) {
	newest := map[string]anchor.Anchor{}
	var maxW uint64
	for _, f := range found {
		for _, v := range f.Values {
			an, err := keys.ParseAnchor(v)
			if err != nil || an.Member != f.Member || an.VaultID != m.VaultID {
				continue
			}
			if an.Epoch == m.Epoch {
				maxW = max(maxW, an.W)
			}
			if cur, ok := newest[f.Member]; !ok || an.Outranks(cur) {
				newest[f.Member] = an
			}
		}
	}
	return newest, maxW
}

// takeBlock returns where a process starts numbering its anchor writes:
// in a block of 2^32 numbers above every number of the epoch it read and
// above the block the last start on this store took, which it records
// first. A member that did not answer may hold a number above those read,
// from a failed write; numbering on from the highest number read would
// reuse it with other content, which the check refuses as tampering once
// that member answers. The member's number comes either
// from a process that wrote an anchor the start-up check read, so its
// block is below the one read, or from one whose writes all failed, whose
// block was recorded here before its first write. The record only keeps write numbers apart: safety does not
// rest on it (see anchor.Outranks and write), so it needs no MAC.
func (s *Store) takeBlock(maxW uint64) (uint64, error) {
	var block uint64
	err := s.db.Update(func(tx *bolt.Tx) error {
		var err error
		if block, err = nextBlock(tx, maxW); err != nil {
			return err
		}
		return tx.Bucket(bucketMeta).Put(keyAnchorBlock, binary.BigEndian.AppendUint64(nil, block))
	})
	if err != nil {
		return 0, fmt.Errorf("record the anchor write block: %w", err)
	}
	return block << 32, nil
}

// errExhausted: the epoch's write numbers are used up; an accept starts a
// new epoch, where they start over.
var errExhausted = errors.New("the anchor write numbers of this epoch are used up; run keyvault anchor accept to start a new epoch")

// nextBlock returns the block takeBlock takes, without recording it.
func nextBlock(tx *bolt.Tx, maxW uint64) (uint64, error) {
	block := maxW >> 32
	// The record has no MAC: a value far above the numbers read is an
	// edit (failed starts move it a block at a time), and is not followed,
	// so that nobody with the file alone can push the numbers to the end
	// of their range at once.
	if v := tx.Bucket(bucketMeta).Get(keyAnchorBlock); len(v) == 8 {
		if rec := binary.BigEndian.Uint64(v); rec > block && rec-block <= maxBlockLead {
			block = rec
		}
	}
	if block >= math.MaxUint32 {
		// Numbers must never wrap: a wrapped number would rank below
		// every older anchor of its position.
		return 0, errExhausted
	}
	return block + 1, nil
}

// maxBlockLead bounds how far the recorded block may lead the numbers read
// and still be followed: one block per start that failed before any of its
// anchors could be read again.
const maxBlockLead = 1 << 16

func (a *anchoring) point(m anchor.Meta, d anchor.Digest) anchor.Point {
	return anchor.Point{Seq: m.Seq, Tag: a.sealer.Tag(m.VaultID, m.Epoch, m.Seq, d)}
}

// write writes the next anchor to the configured members. The anchor
// names as live the members the previous write reached; it must reach at
// least one member of each set in need (at least one member the previous
// anchor named), or a member holding that one could later stand in for
// the ones holding this. The members it reaches are the next live set: a
// member that fails drops out, and one that answers again is caught up by
// this very write.
//
// It goes to the members of the needed sets first, and to the others only
// once it has reached every needed set: a write that fails must not land
// on a member outside them. Such a member would keep an anchor newer than
// the ones the needed sets hold, naming none of the members that hold
// those, and the next start, with that member hidden, could not know of
// its write number and would number its own below it. In steady running every member is in the needed set, so this
// costs a second round only when a member is caught up.
func (a *anchoring) write(ctx context.Context, base anchor.Point) error {
	prev := a.live
	start := time.Now()
	defer func() { a.metrics.duration.Observe(time.Since(start).Seconds()) }()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), anchorTimeout)
	defer cancel()
	// The number is used up even if the write fails: some members may
	// have taken it, and another anchor under the same number would look
	// like tampering.
	a.w++
	w := a.w
	members := a.members.Members()
	ok, tried := make([]bool, len(members)), make([]bool, len(members))
	errs := make([]error, len(members))
	if a.retry == nil {
		a.retry = map[string]backoff{}
	}
	// Members out of the live set wait for their backoff, unless one is
	// in a needed set with no live member.
	unmet := func(set []string) bool {
		return !slices.ContainsFunc(set, func(m string) bool { return slices.Contains(prev, m) })
	}
	inNeed := func(m string) bool {
		return slices.ContainsFunc(a.need, func(set []string) bool { return slices.Contains(set, m) })
	}
	met := func() error {
		for _, set := range a.need {
			if !slices.ContainsFunc(set, func(m string) bool { i := slices.Index(members, m); return i >= 0 && ok[i] }) {
				return fmt.Errorf("rollback anchor: write %d reached no member of %v: %w", w, set, errors.Join(errs...))
			}
		}
		return nil
	}
	round := func(first bool) {
		var wg sync.WaitGroup
		for i, m := range members {
			if inNeed(m) != first {
				continue
			}
			needed := slices.ContainsFunc(a.need, func(set []string) bool { return unmet(set) && slices.Contains(set, m) })
			if b, out := a.retry[m]; out && !slices.Contains(prev, m) && !needed && time.Now().Before(b.at) {
				errs[i] = errors.New("out of the live set; not tried again yet")
				continue
			}
			tried[i] = true
			// Marshalled here: the sealer serves one goroutine.
			raw, err := a.sealer.MarshalAnchor(anchor.Anchor{VaultID: a.meta.VaultID, Member: m, Epoch: a.meta.Epoch, W: w, Live: prev, Base: base})
			if err != nil {
				ok[i], errs[i] = false, err
				continue
			}
			wg.Go(func() {
				err := a.members.WriteAnchor(ctx, m, w, raw)
				ok[i], errs[i] = err == nil, err
			})
		}
		wg.Wait()
	}
	round(true)
	failed := met()
	if failed == nil {
		round(false)
	}
	var live []string
	for i, m := range members {
		if ok[i] {
			live = append(live, m)
			a.metrics.writes.WithLabelValues(m, "ok").Inc()
			delete(a.retry, m)
			continue
		}
		if !tried[i] {
			continue
		}
		b := a.retry[m]
		b.wait = min(max(2*b.wait, retryFirst), retryMax)
		b.at = time.Now().Add(b.wait)
		a.retry[m] = b
		a.metrics.writes.WithLabelValues(m, "error").Inc()
		if slices.Contains(a.live, m) {
			a.log.Warn("rollback anchor: member dropped from the live set", "member", m, "error", errs[i].Error())
		}
	}
	if failed != nil {
		return failed
	}
	a.live, a.need = live, [][]string{prev}
	a.metrics.live.Set(float64(len(live)))
	a.metrics.seq.Set(float64(base.Seq))
	return nil
}

// errNotAnchored: the state a batch would have been written on has no
// anchor, so it was not written; errUnanchored: the batch committed, but
// no anchor could vouch for it, so its outcome is withheld; errUnsure: its
// transaction failed and may have landed all the same. Either way the
// vault must not act on it (vault.ErrWithheld): it answers 503.
var (
	errNotAnchored = fmt.Errorf("%w: not written: the store's position has no anchor", vault.ErrWithheld)
	errUnanchored  = fmt.Errorf("%w: committed but not anchored", vault.ErrWithheld)
	errUnsure      = fmt.Errorf("%w: the transaction failed and may have landed", vault.ErrWithheld)
)

// beforeCommit writes a batch only on a position an anchor vouches for,
// so the store is never more than one batch past its newest anchor.
func (a *anchoring) beforeCommit() error {
	if a.unsure {
		// The last transaction failed, and may have landed all the same:
		// read the store's state back before writing on it.
		if err := a.resync(); err != nil {
			return fmt.Errorf("%w: %w", errNotAnchored, err)
		}
	}
	if a.behind() {
		// The last batch's anchor failed; try again before writing on it.
		if err := a.vouch(context.Background()); err != nil {
			return fmt.Errorf("%w: rollback anchor: %w", errNotAnchored, err)
		}
	}
	a.batchRecords = a.records
	return nil
}

// changed takes a record write of the batch into the digest of its
// records.
func (a *anchoring) changed(key, old, new []byte) {
	if old != nil {
		a.batchRecords = a.hasher.RemoveRecord(a.batchRecords, key, old)
	}
	a.batchRecords = a.hasher.AddRecord(a.batchRecords, key, new)
}

// inCommit extends the batch's transaction with the meta of the state it
// makes: the next seq, the digest of its records, and the tag of the
// position it is written on, which an anchor vouches for.
func (a *anchoring) inCommit(meta *bolt.Bucket) error {
	r := a.batchRecords
	m := a.meta
	m.Seq++
	m.Records = r
	m.Parent = a.point(a.meta, a.digest).Tag
	raw := a.sealer.MarshalMeta(m)
	a.next = &position{records: r, digest: a.hasher.AddMeta(r, raw), meta: m, metaRaw: raw}
	return meta.Put(keyAnchorMeta, raw)
}

// afterCommit adopts the state a committed batch made and holds its
// answers until an anchor vouches for it.
func (a *anchoring) afterCommit(err error) error {
	next := a.next
	a.next = nil
	if err != nil {
		// A commit that reports failure may still have landed (an fsync
		// failing after the meta page was written). Acting on its
		// outcome, as the vault does to resolve a failed write, could
		// release an answer no anchor vouches for.
		a.unsure = true
		return fmt.Errorf("%w: %w", errUnsure, err)
	}
	if next == nil {
		// Nothing changed: these answers reveal no new state, so they
		// need no anchor.
		return nil
	}
	a.position = *next
	if err := a.vouch(context.Background()); err != nil {
		return fmt.Errorf("%w: rollback anchor: %w", errUnanchored, err)
	}
	return nil
}

// vouch writes an anchor for the committed state, so that the answers of
// the batch that made it may go out and the next batch may be written on
// it.
func (a *anchoring) vouch(ctx context.Context) error {
	if err := a.write(ctx, a.point(a.meta, a.digest)); err != nil {
		return err
	}
	a.anchored = a.meta.Seq
	return nil
}

// resync reads the committed state back from the store after a failed
// transaction, which may have landed. A store that moved is then one
// batch past its anchor, and the next batch vouches for it first.
func (a *anchoring) resync() error {
	st, err := a.store.scan(a.hasher)
	if err != nil {
		return err
	}
	m, err := a.keys.ParseMeta(st.Meta)
	if err != nil {
		return fmt.Errorf("read the store's meta back: %w", err)
	}
	if m.VaultID != a.meta.VaultID || m.Epoch != a.meta.Epoch || m.Seq < a.meta.Seq || m.Seq > a.meta.Seq+1 {
		return fmt.Errorf("the store's meta moved from seq %d to %d (epoch %d to %d) under the writer", a.meta.Seq, m.Seq, a.meta.Epoch, m.Epoch)
	}
	a.position = position{records: st.RecordDigest, digest: st.Digest, meta: m, metaRaw: st.Meta}
	a.unsure = false
	return nil
}

// behind reports whether the committed state lacks an anchor (the last
// one failed): a batch written on it now would put the store two batches
// past the anchor, where no start-up check could follow it.
func (a *anchoring) behind() bool { return a.anchored != a.meta.Seq }

// Status is what the store and the members say about rollback resistance.
type Status struct {
	Meta     *anchor.Meta // nil: the store has none
	Records  int
	Found    []anchor.Found
	Anchors  map[string][]anchor.Anchor // valid anchors by member
	Decision anchor.Decision
	Err      error // the check's verdict: nil, or why it refuses

	scanned anchor.State // the store as scanned, for AcceptRestore
}

// AnchorStatus runs the start-up check without changing anything.
func (s *Store) AnchorStatus(ctx context.Context, keys anchor.Keys, members Anchors) (Status, error) {
	st, err := s.scan(anchor.NewHasher(keys.Digest))
	if err != nil {
		return Status{}, err
	}
	out := Status{Records: st.Records, Found: members.ReadAnchors(ctx), Anchors: map[string][]anchor.Anchor{}, scanned: st}
	if st.Meta != nil {
		if m, err := keys.ParseMeta(st.Meta); err == nil {
			out.Meta = &m
		}
	}
	for _, f := range out.Found {
		for _, v := range f.Values {
			if a, err := keys.ParseAnchor(v); err == nil {
				out.Anchors[f.Member] = append(out.Anchors[f.Member], a)
			}
		}
	}
	out.Decision, out.Err = keys.Check(out.Found, st)
	return out, nil
}

// newestOf returns the newest of the anchors (see anchor.Outranks), or
// nil.
func newestOf(byMember map[string][]anchor.Anchor) *anchor.Anchor {
	var best *anchor.Anchor
	for _, as := range byMember {
		for i := range as {
			if a := &as[i]; best == nil || a.Outranks(*best) {
				best = a
			}
		}
	}
	return best
}

// exhausted reports whether a start on the store, as st found it, would
// find its epoch's write numbers used up.
func (s *Store) exhausted(keys anchor.Keys, st Status) (bool, error) {
	if st.Meta == nil {
		return false, nil
	}
	_, maxW := newestAnchors(keys, st.Found, *st.Meta)
	err := s.db.View(func(tx *bolt.Tx) error {
		_, err := nextBlock(tx, maxW)
		return err
	})
	if errors.Is(err, errExhausted) {
		return true, nil
	}
	return false, err
}

// Accepted reports what an accepted restore changed.
type Accepted struct {
	Before      Status
	Epoch       uint64   // the new epoch
	Seq         uint64   // the store's position in it
	BatchesLost uint64   // batches the anchor vouched for beyond the restored store
	Members     []string // members that took the new anchor
}

// AcceptRestore makes the store as it is the vault's new truth, for an
// operator who restored it on purpose: it raises the epoch, in the store
// and then in every member that answers, above any epoch seen, so anchors
// and copies of the store from before stay refused. It refuses when the
// store passes the check (there is nothing to accept). The caller logs the
// result: an accept must always be loud.
func (s *Store) AcceptRestore(ctx context.Context, keys anchor.Keys, members Anchors) (Accepted, error) {
	before, err := s.AnchorStatus(ctx, keys, members)
	if err != nil {
		return Accepted{}, err
	}
	if before.Err == nil {
		// The one accept of a store that passes: its epoch's write numbers
		// are used up (it takes some 65,000 starts on an edited store).
		if exhausted, err := s.exhausted(keys, before); err != nil || !exhausted {
			return Accepted{Before: before}, errors.Join(errors.New("the store passes the rollback check: there is nothing to accept"), err)
		}
	} else if _, ok := anchor.IsRefused(before.Err); !ok {
		return Accepted{Before: before}, before.Err
	}
	// Every member must answer: one that does not may hold the newest
	// anchors, and the new epoch must reach all of them.
	for _, f := range before.Found {
		if f.Err != nil {
			return Accepted{Before: before}, fmt.Errorf("member %s does not answer (%v): an accept needs every member; bring it back, or remove it from the config if it is gone for good", f.Member, f.Err)
		}
	}
	// The new position: above every epoch seen, so that the new anchor
	// wins and nothing older can pass for current.
	var m anchor.Meta
	switch newest := newestOf(before.Anchors); {
	case before.Meta != nil:
		m = *before.Meta
	case newest != nil:
		// A store with no meta takes the identity of the vault whose
		// anchors the members hold: under a new one, those anchors would
		// be another vault's, which the start-up reach rule does not see,
		// and a member the accept missed would keep vouching for the store
		// from before the restore.
		m.VaultID = newest.VaultID
	default:
		rand.Read(m.VaultID[:])
	}
	var top uint64
	for _, as := range before.Anchors {
		for _, a := range as {
			if a.VaultID != m.VaultID {
				continue
			}
			m.Epoch = max(m.Epoch, a.Epoch)
			top = max(top, a.Base.Seq)
		}
	}
	acc := Accepted{Before: before}
	if before.Meta != nil && top > before.Meta.Seq {
		acc.BatchesLost = top - before.Meta.Seq
	}
	// The new epoch starts a history of its own: no parent.
	m.Epoch++
	m.Seq++
	m.Records, m.Parent = before.scanned.RecordDigest, [32]byte{}
	raw := keys.MarshalMeta(m)
	if err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyAnchorMeta, raw) }); err != nil {
		return acc, fmt.Errorf("write the new epoch to the store: %w", err)
	}
	// The digest of the store as it is now: the scanned records with the
	// new meta, not a second scan.
	h := anchor.NewHasher(keys.Digest)
	d := h.AddMeta(before.scanned.RecordDigest, raw)
	// Write numbers start over in the new epoch, which no anchor has
	// yet: this is also the way out when an edited store has pushed them
	// to the end of their range.
	w, err := s.takeBlock(0)
	if err != nil {
		return acc, err
	}
	a := &anchoring{keys: keys, sealer: keys.Sealer(), hasher: h, members: members, log: slog.New(slog.DiscardHandler),
		metrics: newAnchorMetrics(nil), w: w,
		position: position{meta: m, metaRaw: raw, records: before.scanned.RecordDigest, digest: d}}
	// The new epoch must reach every member: one it misses keeps an
	// anchor of the old epoch, which, with the others hidden, would vouch
	// for the store from before the restore.
	a.live = members.Members()
	for _, m := range a.live {
		a.need = append(a.need, []string{m})
	}
	if err := a.vouch(ctx); err != nil {
		return acc, err
	}
	acc.Epoch, acc.Seq, acc.Members = m.Epoch, m.Seq, a.live
	return acc, nil
}
