package vault

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"sync"
)

// Domain-separation labels. Each names exactly one use; they are part of the
// stored format (docs/format.md) and never change within v1.
const (
	labelPINMAC     = "keyvault/v1/pin-mac"
	labelOuterAAD   = "keyvault/v1/outer"
	labelInnerAAD   = "keyvault/v1/inner-aad"
	infoVerifier    = "keyvault/v1/verifier"
	infoInner       = "keyvault/v1/inner"
	labelRecordKey  = "keyvault/v1/derive/record-mac"
	labelLogIDKey   = "keyvault/v1/derive/log-id"
	labelAnchorKey  = "keyvault/v1/derive/anchor-mac"
	labelDigestKey  = "keyvault/v1/derive/digest"
	labelSealKey    = "keyvault/v1/seal-key"
	derivedKeyBytes = 32
)

// lp appends a length-prefixed field: a 4-byte big-endian length, then the
// bytes. Every variable field of an HMAC input or AAD is length-prefixed so
// that no two different tuples encode to the same bytes.
func lp(b []byte, field []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(field)))
	return append(b, field...)
}

// pinMACInput is the message the HSM MACs under the PIN key. It binds the
// PIN to its namespace, user, generation and a fresh salt, so that a
// verifier computed for one backup is worthless for any other.
func pinMACInput(ns, userID string, gen uint64, salt, pin []byte) []byte {
	b := make([]byte, 0, len(labelPINMAC)+1+4*4+8+len(ns)+len(userID)+len(salt)+len(pin))
	b = append(b, labelPINMAC...)
	b = append(b, 0)
	b = lp(b, []byte(ns))
	b = lp(b, []byte(userID))
	b = binary.BigEndian.AppendUint64(b, gen)
	b = lp(b, salt)
	return lp(b, pin)
}

// outerAAD binds the HSM-sealed layer to where it is stored and to the key
// versions in the record, so a sealed secret moved onto another user, another
// generation or other key versions fails to open.
func outerAAD(ns, userID string, gen uint64, wrapVersion, pinVersion uint32) []byte {
	b := make([]byte, 0, len(labelOuterAAD)+1+4+len(ns)+4+len(userID)+8+4+4)
	b = append(b, labelOuterAAD...)
	b = append(b, 0)
	b = lp(b, []byte(ns))
	b = lp(b, []byte(userID))
	b = binary.BigEndian.AppendUint64(b, gen)
	b = binary.BigEndian.AppendUint32(b, wrapVersion)
	return binary.BigEndian.AppendUint32(b, pinVersion)
}

// SealKeyInput is the message the HSM MACs under a wrap key of the hmac
// profile to derive the AES-256 key that seals one record's outer layer:
// its own label, then the record's 12-byte nonce and its outer associated
// data, each length-prefixed. The associated data binds namespace,
// user_id, generation and key versions, and the nonce is fresh for every
// seal (a re-wrap included), so no two seals share a key; the label keeps
// these MACs apart from the wrap key's check value.
func SealKeyInput(nonce, aad []byte) []byte {
	b := make([]byte, 0, len(labelSealKey)+1+8+len(nonce)+len(aad))
	b = append(b, labelSealKey...)
	b = append(b, 0)
	b = lp(b, nonce)
	return lp(b, aad)
}

func innerAAD(ns, userID string, gen uint64) []byte {
	b := make([]byte, 0, len(labelInnerAAD)+1+4+len(ns)+4+len(userID)+8)
	b = append(b, labelInnerAAD...)
	b = append(b, 0)
	b = lp(b, []byte(ns))
	b = lp(b, []byte(userID))
	return binary.BigEndian.AppendUint64(b, gen)
}

// pinKeys derives the verifier and the inner-layer key from M, the HSM's
// PIN MAC, by HKDF-SHA256 (RFC 5869) without salt. Distinct HKDF labels
// keep them independent: the verifier is stored, the inner key never is.
func pinKeys(m []byte) (verifier, inner []byte, err error) {
	// One extraction for both keys: hkdf.Key would extract for each.
	prk, err := hkdf.Extract(sha256.New, m, nil)
	if err != nil {
		return nil, nil, fmt.Errorf("derive PIN keys: %w", err)
	}
	defer wipe(prk)
	if verifier, err = hkdf.Expand(sha256.New, prk, infoVerifier, derivedKeyBytes); err != nil {
		return nil, nil, fmt.Errorf("derive verifier: %w", err)
	}
	if inner, err = hkdf.Expand(sha256.New, prk, infoInner, derivedKeyBytes); err != nil {
		wipe(verifier)
		return nil, nil, fmt.Errorf("derive inner key: %w", err)
	}
	return verifier, inner, nil
}

// keyedHMAC is an HMAC-SHA256 key with a pool of states keyed with it, so
// that a MAC does not key a new state each time. A pooled state holds the
// key's inner and outer pads, secret material equivalent to the key, which
// the vault holds in memory for its whole life anyway, and the inner hash
// of the last input it MAC'd; so only inputs that are no secret go through
// one (store keys and values as the store holds them). Each key has a pool
// of its own, so a state keyed with one key never serves another.
type keyedHMAC struct {
	states sync.Pool // of *hmacState keyed with the key, reset
}

type hmacState struct {
	h hash.Hash
	// buf holds a sum, or a length prefix: passed through the hash.Hash
	// interface, a local array would move to the heap.
	buf [sha256.Size]byte
}

func newKeyedHMAC(key []byte) *keyedHMAC {
	k := new(keyedHMAC)
	k.states.New = func() any { return &hmacState{h: hmac.New(sha256.New, key)} }
	return k
}

// get takes a state keyed with k, with nothing written to it.
func (k *keyedHMAC) get() *hmacState { return k.states.Get().(*hmacState) }

// put resets s and returns it to k's pool.
func (k *keyedHMAC) put(s *hmacState) {
	s.h.Reset()
	k.states.Put(s)
}

// sum is the MAC of what was written to s, in s's buffer: valid until s
// goes back to its pool.
func (s *hmacState) sum() []byte { return s.h.Sum(s.buf[:0]) }

func innerGCM(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("inner cipher: %w", err)
	}
	return cipher.NewGCM(block)
}

// wipe overwrites a secret in memory. Go may have copied it elsewhere
// (the garbage collector moves nothing, but strings and appends copy); this
// shortens the life of the copies we own.
func wipe(bs ...[]byte) {
	for _, b := range bs {
		clear(b)
	}
}
