package vault

import (
	"context"
	"fmt"
)

// Store is the durable, shared home of records. Every key carries a
// revision that changes on every write, so that several vault processes can
// share one store and never overwrite each other unseen.
//
// Implementations are safe for concurrent use. Calls block on I/O; they
// honour ctx only before they start a write, so that a counted guess is never
// half-written because a client hung up (the vault also passes
// context.WithoutCancel for those writes).
type Store interface {
	// Get returns the value stored under key and its revision. A missing
	// key returns a nil value, revision 0 and no error.
	Get(ctx context.Context, key []byte) (value []byte, rev uint64, err error)
	// CompareAndSwap stores value under key if the key's current revision
	// is rev (0: the key must not exist), durably, and returns the new
	// revision. Otherwise it writes nothing and returns ErrConflict.
	//
	// ErrConflict is the only error that says nothing was written. Any
	// other error leaves the outcome unknown: the write may have landed,
	// or may land after the error is returned (a timeout, a lost leader).
	// A driver must never turn such an error into ErrConflict, nor retry a
	// write it cannot tell landed; the vault resolves the outcome itself
	// (its operation IDs).
	CompareAndSwap(ctx context.Context, key []byte, rev uint64, value []byte) (uint64, error)
	// Scan calls fn for each key starting with prefix, in key order. The
	// slices are only valid during the call.
	Scan(ctx context.Context, prefix []byte, fn func(key, value []byte, rev uint64) error) error
}

// KeyRole names what an HSM key is for.
type KeyRole string

const (
	// RoleWrap is the key that seals the outer layer of secrets: an AES-256
	// key the HSM seals with in AES-GCM (profiles gcm and gcm-hsm-iv), or a
	// 256-bit generic secret from which the HSM derives each record's
	// sealing key by HMAC-SHA256 (profile hmac).
	RoleWrap KeyRole = "wrap"
	// RolePIN is the 256-bit HMAC-SHA256 key of the PIN check.
	RolePIN KeyRole = "pin"
	// RoleRoot is the 256-bit HMAC-SHA256 key from which the process
	// derives, at start, the keys it holds in memory (record MACs, log IDs).
	RoleRoot KeyRole = "root"
)

// Roles lists every key role, in provisioning order.
var Roles = []KeyRole{RoleWrap, RolePIN, RoleRoot}

// KeyID names one version of one HSM key.
type KeyID struct {
	Role    KeyRole
	Version uint32
}

// Label is the PKCS#11 CKA_LABEL of the key object, e.g. "keyvault-wrap-v1".
func (k KeyID) Label() string { return fmt.Sprintf("keyvault-%s-v%d", k.Role, k.Version) }

// Profile names how records are sealed under a wrap key version. The kind
// of the wrap key decides it, so every version has exactly one, and a
// record says in its own bytes which one sealed it.
type Profile string

const (
	// ProfileGCM: the wrap key is an AES-256 key, and the HSM seals and
	// opens with AES-256-GCM under it, with the vault's nonce.
	ProfileGCM Profile = "gcm"
	// ProfileHMAC: the wrap key is a 256-bit generic secret key, used only
	// for HMAC-SHA256: the HSM derives a key for each record from the
	// record's nonce and associated data (SealKeyInput), and AES-256-GCM
	// runs on the host under that key, which is wiped after use.
	ProfileHMAC Profile = "hmac"
	// ProfileGCMHSMIV: the wrap key is an AES-256 key, as under gcm, for
	// HSMs that choose the GCM IV themselves (AWS CloudHSM, Thales Luna in
	// FIPS mode): such a member seals with an IV of its own choosing, which
	// Seal hands back in its nonce argument and the record stores. Opening
	// is GCM in the HSM with the stored nonce, as under gcm, so records of
	// either profile open under a key of either.
	ProfileGCMHSMIV Profile = "gcm-hsm-iv"
)

// SameKeyKind reports whether wrap keys of profiles a and b are of one
// kind, so that a record sealed under one opens under the other: gcm and
// gcm-hsm-iv are both AES keys used for GCM in the HSM.
func SameKeyKind(a, b Profile) bool {
	aes := func(p Profile) bool { return p == ProfileGCM || p == ProfileGCMHSMIV }
	return a == b || aes(a) && aes(b)
}

// HSM performs the key operations that must never happen outside the
// hardware. Implementations are safe for concurrent use and block until a
// session is free or ctx ends.
//
// An error that wraps ErrUnavailable means no result was obtained; an Open
// error that wraps ErrIntegrity means the ciphertext failed authentication on
// a healthy HSM. Any other error is treated as ErrUnavailable.
type HSM interface {
	// HMAC returns HMAC-SHA256(key, msg) computed in the HSM.
	HMAC(ctx context.Context, key KeyID, msg []byte) ([]byte, error)
	// Seal encrypts with AES-256-GCM under a wrap key version, as its
	// profile says (WrapProfile); nonce is 12 bytes. Under gcm-hsm-iv the
	// HSM may choose the IV: Seal then writes the IV it used into nonce,
	// so after a successful call nonce is always the one to store.
	Seal(ctx context.Context, key KeyID, nonce, plaintext, aad []byte) ([]byte, error)
	// Open decrypts and authenticates what Seal made.
	Open(ctx context.Context, key KeyID, nonce, ciphertext, aad []byte) ([]byte, error)
	// WrapProfile is the profile of a wrap key version: how Seal and Open
	// work under it. It is "" for a version the HSM does not hold.
	WrapProfile(version uint32) Profile
	// KeyVersion is the newest version of role present on every member,
	// the one used for new records.
	KeyVersion(role KeyRole) uint32
}
