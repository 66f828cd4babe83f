package anchor

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"slices"
)

// Keys are the three keys of rollback resistance, each derived at start
// from the HSM root key under its own label; none is ever stored.
type Keys struct {
	Anchor []byte // MACs anchors and their tags (kA)
	Digest []byte // keys the digest's elements (kD)
	Meta   []byte // MACs the store's meta (kR, the record MAC key)
}

// VaultIDLen is the length of the random ID that ties a store to its anchors.
const VaultIDLen = 16

const (
	metaMagic   = "kvmeta\x02"
	anchorMagic = "kvanchor\x01"
	labelMeta   = "keyvault/v1/meta"
	labelTag    = "keyvault/v1/anchor-tag"
	labelAnchor = "keyvault/v1/anchor"
	macLen      = sha256.Size
	// maxMembers and maxNameLen bound what an anchor may list: it must
	// fit a small HSM data object.
	maxMembers = 32
	maxNameLen = 64
)

// Meta is the store's own position: which vault, which epoch (raised by
// every accepted restore), and which batch of writes (seq) it holds. It is
// written in the same transaction as each batch, so no two states of the
// store share a digest.
//
// It also vouches, under its MAC, for the batch's records and for its
// place in the store's history: Records is the digest of the records
// alone, and Parent the tag of the position the batch was written on. So a
// store one batch ahead of its newest anchor (killed after the commit,
// before the anchor) can prove at start that it is a state the vault wrote
// on the anchored position (see Check).
type Meta struct {
	VaultID [VaultIDLen]byte
	Epoch   uint64
	Seq     uint64
	Records Digest
	Parent  [macLen]byte
}

// metaBodyLen is the length of a meta's bytes before its MAC.
const metaBodyLen = len(metaMagic) + VaultIDLen + 16 + digestLen + macLen

// MarshalMeta encodes m with its MAC.
func (k Keys) MarshalMeta(m Meta) []byte {
	return marshalMeta(hmac.New(sha256.New, k.Meta), m)
}

// marshalMeta encodes m with its MAC under h, a fresh or reset HMAC
// keyed with the meta key.
func marshalMeta(h hash.Hash, m Meta) []byte {
	b := make([]byte, 0, metaBodyLen+macLen)
	b = append(b, metaMagic...)
	b = append(b, m.VaultID[:]...)
	b = binary.BigEndian.AppendUint64(b, m.Epoch)
	b = binary.BigEndian.AppendUint64(b, m.Seq)
	b = m.Records.appendTo(b)
	b = append(b, m.Parent[:]...)
	return appendMAC(b, h, domainMeta, b)
}

// ErrTampered: a meta or anchor object whose bytes or MAC are wrong.
var ErrTampered = errors.New("failed its integrity check")

// ParseMeta decodes and authenticates the store's meta.
func (k Keys) ParseMeta(raw []byte) (Meta, error) {
	n := metaBodyLen
	if !bytes.HasPrefix(raw, []byte(metaMagic)) || len(raw) != n+macLen {
		return Meta{}, fmt.Errorf("store meta: malformed: %w", ErrTampered)
	}
	if !hmac.Equal(raw[n:], mac(k.Meta, domainMeta, raw[:n])) {
		return Meta{}, fmt.Errorf("store meta: MAC mismatch: %w", ErrTampered)
	}
	var m Meta
	b := raw[len(metaMagic):n]
	copy(m.VaultID[:], b)
	m.Epoch = binary.BigEndian.Uint64(b[VaultIDLen:])
	m.Seq = binary.BigEndian.Uint64(b[VaultIDLen+8:])
	b = b[VaultIDLen+16:]
	m.Records = limbs(b)
	copy(m.Parent[:], b[digestLen:])
	return m, nil
}

// Point is a store position an anchor vouches for: a seq and the tag of
// the digest the store had there.
type Point struct {
	Seq uint64
	Tag [macLen]byte
}

// Anchor is what one HSM member keeps: the newest anchor write (W) it took,
// the members that were live when it was written, and the last position
// whose answers may have been released (Base). A batch committed past Base
// is vouched for by the store's meta, which names its parent (see Check).
type Anchor struct {
	VaultID [VaultIDLen]byte
	Member  string
	Epoch   uint64
	W       uint64
	Live    []string // sorted
	Base    Point
}

// Outranks reports whether a is newer than b: a higher epoch, then a
// higher base seq, then a higher write number. The base seq comes before
// the write number because write numbers are only as ordered as the
// anchors each process could read at its start: a process that started
// with a member hidden may number its writes below an anchor that member
// holds from a start that failed. Such an anchor must not outrank the
// positions written since, whose answers went out; the write number
// orders anchors of one position.
func (a Anchor) Outranks(b Anchor) bool {
	if a.Epoch != b.Epoch {
		return a.Epoch > b.Epoch
	}
	if a.Base.Seq != b.Base.Seq {
		return a.Base.Seq > b.Base.Seq
	}
	return a.W > b.W
}

// sameRank reports whether neither of a and b outranks the other.
func sameRank(a, b Anchor) bool {
	return a.Epoch == b.Epoch && a.Base.Seq == b.Base.Seq && a.W == b.W
}

// Tag binds a digest to its vault, epoch and seq under the anchor key, so
// that neither the digest nor a difference of digests leaves the process.
func (k Keys) Tag(vaultID [VaultIDLen]byte, epoch, seq uint64, d Digest) [macLen]byte {
	var body [tagBodyLen]byte
	return [macLen]byte(mac(k.Anchor, domainTag, appendTagBody(body[:0], vaultID, epoch, seq, d)))
}

// tagBodyLen is the length of what a tag MACs.
const tagBodyLen = VaultIDLen + 16 + digestLen

func appendTagBody(b []byte, vaultID [VaultIDLen]byte, epoch, seq uint64, d Digest) []byte {
	b = append(b, vaultID[:]...)
	b = binary.BigEndian.AppendUint64(b, epoch)
	b = binary.BigEndian.AppendUint64(b, seq)
	return d.appendTo(b)
}

// MarshalAnchor encodes a with its MAC.
func (k Keys) MarshalAnchor(a Anchor) ([]byte, error) {
	return marshalAnchor(hmac.New(sha256.New, k.Anchor), a)
}

// marshalAnchor encodes a with its MAC under h, a fresh or reset HMAC
// keyed with the anchor key.
func marshalAnchor(h hash.Hash, a Anchor) ([]byte, error) {
	if len(a.Live) == 0 || len(a.Live) > maxMembers {
		return nil, fmt.Errorf("anchor: %d live members, want 1 to %d", len(a.Live), maxMembers)
	}
	live := a.Live
	if !slices.IsSorted(live) {
		live = slices.Sorted(slices.Values(live))
	}
	n := len(anchorMagic) + VaultIDLen + 1 + len(a.Member) + 16 + 1 + 8 + macLen + macLen
	for _, m := range live {
		n += 1 + len(m)
	}
	b := make([]byte, 0, n)
	b = append(b, anchorMagic...)
	b = append(b, a.VaultID[:]...)
	var err error
	if b, err = appendName(b, a.Member); err != nil {
		return nil, err
	}
	b = binary.BigEndian.AppendUint64(b, a.Epoch)
	b = binary.BigEndian.AppendUint64(b, a.W)
	b = append(b, byte(len(live)))
	for _, m := range live {
		if b, err = appendName(b, m); err != nil {
			return nil, err
		}
	}
	b = binary.BigEndian.AppendUint64(b, a.Base.Seq)
	b = append(b, a.Base.Tag[:]...)
	return appendMAC(b, h, domainAnchor, b), nil
}

func appendName(b []byte, name string) ([]byte, error) {
	if name == "" || len(name) > maxNameLen {
		return nil, fmt.Errorf("anchor: member name of %d bytes, want 1 to %d", len(name), maxNameLen)
	}
	b = append(b, byte(len(name)))
	return append(b, name...), nil
}

// ParseAnchor decodes and authenticates an anchor object's value.
func (k Keys) ParseAnchor(raw []byte) (Anchor, error) {
	if len(raw) < len(anchorMagic)+macLen || !bytes.HasPrefix(raw, []byte(anchorMagic)) {
		return Anchor{}, fmt.Errorf("anchor: malformed: %w", ErrTampered)
	}
	body, sum := raw[:len(raw)-macLen], raw[len(raw)-macLen:]
	if !hmac.Equal(sum, mac(k.Anchor, domainAnchor, body)) {
		return Anchor{}, fmt.Errorf("anchor: MAC mismatch: %w", ErrTampered)
	}
	// The MAC holds, so the bytes are ours; the checks below guard
	// against our own bugs, not an attacker.
	r := reader{b: body[len(anchorMagic):]}
	var a Anchor
	copy(a.VaultID[:], r.next(VaultIDLen))
	a.Member = r.name()
	a.Epoch = r.uint64()
	a.W = r.uint64()
	n := int(r.byte())
	for range n {
		a.Live = append(a.Live, r.name())
	}
	a.Base.Seq = r.uint64()
	copy(a.Base.Tag[:], r.next(macLen))
	if r.bad || len(r.b) != 0 {
		return Anchor{}, fmt.Errorf("anchor: malformed body: %w", ErrTampered)
	}
	return a, nil
}

type reader struct {
	b   []byte
	bad bool
}

func (r *reader) next(n int) []byte {
	if r.bad || len(r.b) < n {
		r.bad = true
		return make([]byte, n)
	}
	out := r.b[:n]
	r.b = r.b[n:]
	return out
}

func (r *reader) byte() byte     { return r.next(1)[0] }
func (r *reader) uint64() uint64 { return binary.BigEndian.Uint64(r.next(8)) }
func (r *reader) name() string   { return string(r.next(int(r.byte()))) }

// The MACs' domains: each label with the NUL that ends it.
var (
	domainMeta   = []byte(labelMeta + "\x00")
	domainTag    = []byte(labelTag + "\x00")
	domainAnchor = []byte(labelAnchor + "\x00")
)

// mac returns the MAC of b in domain under key.
func mac(key, domain, b []byte) []byte {
	return appendMAC(nil, hmac.New(sha256.New, key), domain, b)
}

// appendMAC appends to out the MAC of b in domain under h, a fresh or
// reset HMAC.
func appendMAC(out []byte, h hash.Hash, domain, b []byte) []byte {
	h.Write(domain)
	h.Write(b)
	return h.Sum(out)
}

// Sealer MACs what the store's one writer writes (metas, tags and
// anchors) under the Keys it was made from. It keeps one keyed HMAC state
// per key, reset for each MAC, rather than key a new one each time: so it
// holds the meta and anchor keys, as keyed states, for as long as it
// lives, as the writer holds the Keys themselves. It is not safe for
// concurrent use.
type Sealer struct {
	meta, anchor hash.Hash
	body         [tagBodyLen]byte
	sum          [macLen]byte
}

// Sealer returns a Sealer under k.
func (k Keys) Sealer() *Sealer {
	return &Sealer{meta: hmac.New(sha256.New, k.Meta), anchor: hmac.New(sha256.New, k.Anchor)}
}

// MarshalMeta is Keys.MarshalMeta.
func (s *Sealer) MarshalMeta(m Meta) []byte {
	s.meta.Reset()
	return marshalMeta(s.meta, m)
}

// Tag is Keys.Tag.
func (s *Sealer) Tag(vaultID [VaultIDLen]byte, epoch, seq uint64, d Digest) [macLen]byte {
	s.anchor.Reset()
	return [macLen]byte(appendMAC(s.sum[:0], s.anchor, domainTag, appendTagBody(s.body[:0], vaultID, epoch, seq, d)))
}

// MarshalAnchor is Keys.MarshalAnchor.
func (s *Sealer) MarshalAnchor(a Anchor) ([]byte, error) {
	s.anchor.Reset()
	return marshalAnchor(s.anchor, a)
}
