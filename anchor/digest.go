// Package anchor holds the pieces of rollback resistance (see
// docs/rollback.md): a keyed digest of every record in
// the store, the anchor that each HSM member keeps of it, and the start-up
// decision that compares the two.
//
// The digest is a keyed incremental multiset hash (MSet-Add-Hash, Clarke
// et al. 2003): the sum, mod 2^256, of HMAC-SHA256 under a secret key of
// every (key, stored value) pair, plus the store's meta. A write changes it
// by subtracting the old pair's hash and adding the new one's, so it costs
// one HMAC per changed record and never needs a scan after start-up. With
// the key secret (it is derived from the HSM root key and lives only in the
// serving process), nobody can find two different stores with one digest;
// without a key, sums like this fall to generalised birthday attacks
// (Wagner 2002), which is why the record MACs stored in the database must
// never serve as the elements.
package anchor

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"hash"
	"math/bits"
)

// Domain separation of the digest's elements: a record and the meta can
// never hash alike.
const (
	elemRecord = 'r'
	elemMeta   = 'm'
)

// Digest is a 256-bit sum, held as four big-endian 64-bit limbs. The zero
// value is the digest of nothing.
type Digest [4]uint64

// digestLen is the length of a Digest's bytes.
const digestLen = 32

// Bytes is the digest's big-endian encoding.
func (d Digest) Bytes() []byte {
	return d.appendTo(make([]byte, 0, digestLen))
}

func (d Digest) appendTo(b []byte) []byte {
	for _, l := range d {
		b = binary.BigEndian.AppendUint64(b, l)
	}
	return b
}

func limbs(h []byte) (x Digest) {
	for i := range x {
		x[i] = binary.BigEndian.Uint64(h[8*i:])
	}
	return x
}

// add returns d + x mod 2^256.
func (d Digest) add(x Digest) Digest {
	var carry uint64
	for i := 3; i >= 0; i-- {
		d[i], carry = bits.Add64(d[i], x[i], carry)
	}
	return d
}

// sub returns d - x mod 2^256.
func (d Digest) sub(x Digest) Digest {
	var borrow uint64
	for i := 3; i >= 0; i-- {
		d[i], borrow = bits.Sub64(d[i], x[i], borrow)
	}
	return d
}

// Hasher computes the digest's elements under the digest key. It is not
// safe for concurrent use: the store's one writer owns one.
type Hasher struct {
	mac hash.Hash
	buf []byte
	sum [sha256.Size]byte
}

// NewHasher returns a Hasher under key (32 bytes, secret).
func NewHasher(key []byte) *Hasher {
	return &Hasher{mac: hmac.New(sha256.New, key)}
}

func (h *Hasher) elem(kind byte, key, value []byte) Digest {
	h.buf = append(h.buf[:0], kind)
	h.buf = binary.BigEndian.AppendUint32(h.buf, uint32(len(key)))
	h.buf = append(h.buf, key...)
	h.mac.Reset()
	h.mac.Write(h.buf)
	h.mac.Write(value)
	return limbs(h.mac.Sum(h.sum[:0]))
}

// AddRecord returns d with the record stored under key as value added.
// value is the whole stored value, its revision included, so that an old
// value put back under a new revision is a different element.
func (h *Hasher) AddRecord(d Digest, key, value []byte) Digest {
	return d.add(h.elem(elemRecord, key, value))
}

// RemoveRecord returns d with the record (key, value) taken out.
func (h *Hasher) RemoveRecord(d Digest, key, value []byte) Digest {
	return d.sub(h.elem(elemRecord, key, value))
}

// AddMeta returns d with the store's meta added.
func (h *Hasher) AddMeta(d Digest, meta []byte) Digest {
	return d.add(h.elem(elemMeta, nil, meta))
}

// RemoveMeta returns d with the store's meta taken out.
func (h *Hasher) RemoveMeta(d Digest, meta []byte) Digest {
	return d.sub(h.elem(elemMeta, nil, meta))
}
