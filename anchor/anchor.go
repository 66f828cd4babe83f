package anchor

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
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

// MarshalMeta encodes m with its MAC.
func (k Keys) MarshalMeta(m Meta) []byte {
	b := append([]byte(metaMagic), m.VaultID[:]...)
	b = binary.BigEndian.AppendUint64(b, m.Epoch)
	b = binary.BigEndian.AppendUint64(b, m.Seq)
	b = append(b, m.Records.Bytes()...)
	b = append(b, m.Parent[:]...)
	return append(b, mac(k.Meta, labelMeta, b)...)
}

// ErrTampered: a meta or anchor object whose bytes or MAC are wrong.
var ErrTampered = errors.New("failed its integrity check")

// ParseMeta decodes and authenticates the store's meta.
func (k Keys) ParseMeta(raw []byte) (Meta, error) {
	n := len(metaMagic) + VaultIDLen + 16 + digestLen + macLen
	if !bytes.HasPrefix(raw, []byte(metaMagic)) || len(raw) != n+macLen {
		return Meta{}, fmt.Errorf("store meta: malformed: %w", ErrTampered)
	}
	if !hmac.Equal(raw[n:], mac(k.Meta, labelMeta, raw[:n])) {
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
	b := append([]byte(nil), vaultID[:]...)
	b = binary.BigEndian.AppendUint64(b, epoch)
	b = binary.BigEndian.AppendUint64(b, seq)
	b = append(b, d.Bytes()...)
	return [macLen]byte(mac(k.Anchor, labelTag, b))
}

// MarshalAnchor encodes a with its MAC.
func (k Keys) MarshalAnchor(a Anchor) ([]byte, error) {
	if len(a.Live) == 0 || len(a.Live) > maxMembers {
		return nil, fmt.Errorf("anchor: %d live members, want 1 to %d", len(a.Live), maxMembers)
	}
	live := slices.Clone(a.Live)
	slices.Sort(live)
	b := append([]byte(anchorMagic), a.VaultID[:]...)
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
	return append(b, mac(k.Anchor, labelAnchor, b)...), nil
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
	if !hmac.Equal(sum, mac(k.Anchor, labelAnchor, body)) {
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
func mac(key []byte, label string, b []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(label))
	m.Write([]byte{0})
	m.Write(b)
	return m.Sum(nil)
}
