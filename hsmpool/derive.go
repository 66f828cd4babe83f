package hsmpool

import (
	"crypto/aes"
	"crypto/cipher"
	"fmt"

	"github.com/keyvault/keyvault/vault"
)

// The hmac profile, for tokens without a usable AES-GCM: the wrap key is a
// generic secret key that the token uses only for HMAC-SHA256. Each seal
// and open asks the token for the record's own key, HMAC-SHA256(wrap key,
// vault.SealKeyInput(nonce, aad)), in one C_Sign, and runs AES-256-GCM
// under it here. The bytes are as a token's GCM would make them under that
// key; what differs is where the key lives for the microseconds of the
// operation (docs/hsm.md has the security argument).

// derives reports whether key is a wrap key of the hmac profile on t.
func derives(t token, key vault.KeyID) bool {
	return key.Role == vault.RoleWrap && t.WrapProfile(key.Version) == vault.ProfileHMAC
}

// derivedGCM derives the record key on t and returns AES-256-GCM under it.
// The derived key is wiped before it returns; the cipher keeps only its
// expanded key schedule, which Go offers no way to clear, and which goes
// with the caller's last reference to it.
func derivedGCM(t token, key vault.KeyID, nonce, aad []byte) (cipher.AEAD, error) {
	if len(nonce) != gcmNonceSize {
		return nil, fmt.Errorf("%w: GCM nonce of %d bytes, want %d", errCaller, len(nonce), gcmNonceSize)
	}
	k, err := t.HMAC(key, vault.SealKeyInput(nonce, aad))
	if err != nil {
		return nil, fmt.Errorf("derive the record key under %s: %w", key.Label(), err)
	}
	defer clear(k)
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, fmt.Errorf("derive the record key under %s: %w", key.Label(), err)
	}
	return cipher.NewGCM(block)
}

// sealDerived seals under the record key derived on t.
func sealDerived(t token, key vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error) {
	return appendSealDerived(nil, t, key, nonce, plaintext, aad)
}

// appendSealDerived is sealDerived appending the ciphertext to dst, as
// cipher.AEAD's Seal does.
func appendSealDerived(dst []byte, t token, key vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error) {
	g, err := derivedGCM(t, key, nonce, aad)
	if err != nil {
		return nil, err
	}
	return g.Seal(dst, nonce, plaintext, aad), nil
}

// openDerived opens under the record key derived on the member. A failed
// authentication is the ciphertext's fault (ErrIntegrity, which the pool
// confirms on every other healthy member) unless the member's check value
// of the wrap key has changed: then the member computed a wrong key, and
// is at fault.
func openDerived(m *member, st *tokenState, key vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	g, err := derivedGCM(st.tok, key, nonce, aad)
	if err != nil {
		return nil, err
	}
	pt, err := g.Open(nil, nonce, ciphertext, aad)
	if err == nil {
		return pt, nil
	}
	if kerr := st.checkKCV(key); kerr != nil {
		return nil, fmt.Errorf("GCM open under a key derived on member %s failed (and %w)", m.name, kerr)
	}
	return nil, fmt.Errorf("%w: GCM open under a key derived on member %s failed, and its check value of %s holds", ErrIntegrity, m.name, key.Label())
}
