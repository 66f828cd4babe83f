// Package hsmpool holds keyvault's PKCS#11 HSM members and the pool that
// routes every HSM operation to one of them. It is the only package that
// imports crypto11 and miekg/pkcs11.
//
// # Basics
//
// Each member is one PKCS#11 module and token, opened through crypto11 with
// its own session limit. At start the pool finds every version of every key
// role by label (keyvault-wrap-v1, keyvault-pin-v1, keyvault-root-v1, ...),
// caches the handles, and computes a key check value (KCV) for each; a member
// whose KCVs differ from the first member's is not used. Every operation goes
// through Pool.do, which picks the least-loaded healthy member, waits for one
// of its sessions no longer than the context allows, records metrics, turns
// crypto11's panics into errors, and retries on another member when one
// fails.
//
// # Telling a bad record from a bad HSM
//
// SoftHSM reports a GCM authentication failure as CKR_GENERAL_ERROR, the same
// code as a device fault. When an Open fails, the pool re-runs a known-answer
// open on the same member: if that succeeds the member is fine and the record
// is damaged (vault.ErrIntegrity, and the member stays in); if it fails the
// member is taken out and the open is retried elsewhere.
//
// # Caveats
//
// crypto11 cannot import, copy or wrap keys; provisioning several members
// with identical material uses miekg/pkcs11 directly (see Provision). A
// PKCS#11 call that hangs cannot be interrupted: the pool stops waiting for
// it at the context's deadline, but its session stays busy until it returns.
package hsmpool
