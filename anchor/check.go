package anchor

import (
	"errors"
	"fmt"
	"slices"
)

// Reason names why a start was refused. It is the value of a metric label
// and the first word /readyz gives, so it never changes once released.
type Reason string

const (
	// ReasonNoAnchor: the store holds data but no member holds an anchor
	// of its vault.
	ReasonNoAnchor Reason = "no_anchor"
	// ReasonMemberMissing: a member that was live at the newest anchor did
	// not answer, so a newer anchor may exist there.
	ReasonMemberMissing Reason = "member_missing"
	// ReasonRollback: the store is older than the anchor vouches for.
	ReasonRollback Reason = "rollback"
	// ReasonAhead: the store is newer than any anchor written (for example
	// after a power loss lost the HSM's last object write).
	ReasonAhead Reason = "db_ahead"
	// ReasonTamper: the store is at the anchored position but its digest
	// differs (a record rolled back, revived, edited or spliced), or its
	// meta fails its MAC.
	ReasonTamper Reason = "tamper"
	// ReasonEpoch: the store and the anchor belong to different epochs
	// (a store from before an accepted restore, or one never accepted).
	ReasonEpoch Reason = "epoch"
)

// Reasons lists every Reason.
var Reasons = []Reason{ReasonNoAnchor, ReasonMemberMissing, ReasonRollback, ReasonAhead, ReasonTamper, ReasonEpoch}

// RefusedError is a start-up refusal: the store must not be served.
type RefusedError struct {
	Reason Reason
	Detail string
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("rollback check refused the store (%s): %s", e.Reason, e.Detail)
}

func refuse(r Reason, format string, args ...any) error {
	return &RefusedError{Reason: r, Detail: fmt.Sprintf(format, args...)}
}

// Found is what start-up read from one configured member: the values of
// every anchor object on it, or the error that kept it from answering.
type Found struct {
	Member string
	Values [][]byte
	Err    error
}

// State is the store as scanned at start.
type State struct {
	Meta         []byte // the stored meta; nil when the store has none
	Digest       Digest // over every record and the meta
	RecordDigest Digest // over every record alone
	Records      int
}

// Decision is an accepted start.
type Decision struct {
	// Fresh: neither store nor members hold anything yet; the caller
	// creates the vault ID, meta and first anchor.
	Fresh bool
	// Adopted: Fresh, but the store already holds records: it was kept
	// with anchoring off (it has no meta, which every anchored store
	// has) and no member holds an anchor. Anchoring starts from it as it
	// is; the caller should say so loudly.
	Adopted bool
	// Past: the store is one batch past the anchor (the process stopped
	// between a commit and the anchor that vouches for it).
	Past bool
	Meta Meta
	// Anchor is the newest valid anchor (zero when Fresh), and Holders
	// the members that hold it.
	Anchor  Anchor
	Holders []string
	// Ignored counts anchor objects that failed their MAC, were found on
	// another member than the one they name, or belong to another vault.
	Ignored int
}

// Check decides whether the store may be served. It accepts the store at
// the newest anchor's base (the last position whose answers may have been
// released) with the digest the anchor tags, or one batch beyond it (the
// process stopped after a commit, before the anchor that vouches for it)
// if the store's meta proves that batch was written on that very base: its
// MAC covers the records' digest, which must match the store, and the
// tag of its parent position, which must be the anchor's base tag. Such a
// batch's answers were never released, so accepting it gives nothing
// back. Every member live at that anchor must have answered, so
// that a stale member cannot stand in for a current one that is hidden.
func (k Keys) Check(found []Found, st State) (Decision, error) {
	var meta *Meta
	if st.Meta != nil {
		m, err := k.ParseMeta(st.Meta)
		if err != nil {
			return Decision{}, refuse(ReasonTamper, "%v", err)
		}
		meta = &m
	}
	var d Decision
	var best *Anchor
	answered := map[string]bool{}
	for _, f := range found {
		if f.Err != nil {
			continue
		}
		answered[f.Member] = true
		for _, v := range f.Values {
			a, err := k.ParseAnchor(v)
			if err != nil || a.Member != f.Member || (meta != nil && a.VaultID != meta.VaultID) {
				d.Ignored++
				continue
			}
			// Newest is the highest epoch (an accept raises it on every
			// member, and must outrank anchors of the old epoch), then
			// the highest seq, then write number: see Outranks.
			if best != nil && sameRank(a, *best) && !sameAnchor(a, *best) {
				return Decision{}, refuse(ReasonTamper, "members %s and %s hold different anchors with write number %d", best.Member, a.Member, a.W)
			}
			if best == nil || a.Outranks(*best) {
				best = &a
			}
		}
	}
	if best == nil {
		// Fresh: an empty store (with or without the meta a first start
		// that never reached a member wrote) and members that all answered
		// with no anchor at all. A silent member may hold anchors, and an
		// empty store where anchors exist is the oldest state of all.
		//
		// A store with records but no meta was kept with anchoring off
		// (an anchored store gets its meta at its first start, before any
		// write): with every member answering and holding nothing, it is
		// adopted as it is. So is one whose meta is the first one, at seq
		// 0 over the records it holds: that first start stopped before its
		// first anchor landed. Any other store with a meta and no anchor
		// anywhere had its anchors removed, and is refused.
		silent := len(answered) < len(found)
		first := meta != nil && meta.Epoch == 1 && meta.Seq == 0 && meta.Parent == [macLen]byte{} && meta.Records == st.RecordDigest
		adoptable := st.Records == 0 || meta == nil || first
		switch {
		case adoptable && d.Ignored == 0 && !silent:
			d.Fresh, d.Adopted = true, st.Records > 0
			return d, nil
		case st.Records == 0 && d.Ignored > 0:
			return Decision{}, refuse(ReasonRollback, "the store is empty but the members hold anchors")
		case adoptable && silent:
			return Decision{}, refuse(ReasonMemberMissing, "no member answered with an anchor, and not every member answered: a silent one may hold the store's anchors")
		case adoptable:
			return Decision{}, refuse(ReasonTamper, "no member holds a valid anchor of the store, but %d anchor objects fail their check", d.Ignored)
		}
		return Decision{}, refuse(ReasonNoAnchor, "the store holds %d records and its anchor meta, but no member answered with an anchor of its vault", st.Records)
	}
	for _, m := range best.Live {
		if !answered[m] {
			return Decision{}, refuse(ReasonMemberMissing, "member %s was live at anchor write %d and did not answer", m, best.W)
		}
	}
	if meta == nil {
		return Decision{}, refuse(ReasonRollback, "the store has no meta but the members hold anchors (at seq %d)", best.Base.Seq)
	}
	d.Meta, d.Anchor = *meta, *best
	for _, f := range found {
		for _, v := range f.Values {
			if a, err := k.ParseAnchor(v); err == nil && a.Member == f.Member && a.VaultID == best.VaultID && sameRank(a, *best) {
				d.Holders = append(d.Holders, f.Member)
				break
			}
		}
	}
	if meta.Epoch != best.Epoch {
		return Decision{}, refuse(ReasonEpoch, "the store is at epoch %d, the anchor at epoch %d", meta.Epoch, best.Epoch)
	}
	tag := k.Tag(meta.VaultID, meta.Epoch, meta.Seq, st.Digest)
	switch {
	case meta.Seq < best.Base.Seq:
		return Decision{}, refuse(ReasonRollback, "the store is at seq %d, the anchor vouches for %d", meta.Seq, best.Base.Seq)
	case meta.Seq == best.Base.Seq:
		if tag != best.Base.Tag {
			return Decision{}, refuse(ReasonTamper, "the store is at the anchored seq %d but its records do not match the anchored digest", meta.Seq)
		}
		return d, nil
	case meta.Seq > best.Base.Seq+1:
		return Decision{}, refuse(ReasonAhead, "the store is at seq %d, beyond the anchor's %d", meta.Seq, best.Base.Seq)
	case meta.Records != st.RecordDigest:
		return Decision{}, refuse(ReasonTamper, "the store is one batch past the anchor (seq %d) but its records do not match its meta", meta.Seq)
	case meta.Parent != best.Base.Tag:
		return Decision{}, refuse(ReasonTamper, "the store is one batch past the anchor (seq %d) but was not written on the anchored position", meta.Seq)
	}
	d.Past = true
	return d, nil
}

func sameAnchor(a, b Anchor) bool {
	return a.VaultID == b.VaultID && a.Epoch == b.Epoch && a.Base == b.Base && slices.Equal(a.Live, b.Live)
}

// IsRefused reports whether err is a start-up refusal, and its reason.
func IsRefused(err error) (Reason, bool) {
	var r *RefusedError
	if errors.As(err, &r) {
		return r.Reason, true
	}
	return "", false
}
