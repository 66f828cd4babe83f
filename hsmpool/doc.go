// Package hsmpool holds keyvault's PKCS#11 HSM members and the pool that
// routes every HSM operation to one of them. It is the only package that
// imports crypto11 and miekg/pkcs11.
//
// # Basics
//
// Each member is one PKCS#11 module and token, opened through crypto11 with
// its own session limit. At start the pool finds every version of every key
// role by label (keyvault-wrap-v1, keyvault-pin-v1, keyvault-root-v1, ...),
// caches the handles, copies each key into a session object to serve
// with where the token allows it (copies.go: a copy is bound to its key
// by the key's check value, and checked against its token key while it
// serves; otherwise the member serves with the token keys, each checked
// against the check value it gave when found), and computes
// a key check value (KCV) for each; a member
// whose KCVs differ from the first member's is not used. Every operation goes
// through Pool.do, which picks the least-loaded healthy member, waits for one
// of its sessions no longer than the context allows, records metrics, turns
// crypto11's panics into errors, and retries on another member when one
// fails.
//
// # Key versions
//
// Versions are found by listing a token's secret keys and parsing their
// labels, so a retired version leaves a gap and nothing else. Rotate
// creates the next wrap and PIN version on every member (from a separate
// process, like Provision); Reload, in the serving process, looks every
// member's keys up again and publishes the new versions only once every
// member holds them with the same check values; Retire stops using an old
// version and destroys it on every member; Forget stops using one that
// another process sharing the members is destroying. A member may hold a
// version newer than the pool's (between Rotate and Reload), or an older
// one the pool has let go, and still be admitted. A wrap or PIN version
// gone from every member that holds a newer one was retired elsewhere:
// Reload, and the probe of a failed member, move to the newer one rather
// than refuse the member.
//
// # Telling a bad record from a bad HSM
//
// SoftHSM reports a GCM authentication failure as CKR_GENERAL_ERROR, the same
// code as a device fault. When an Open fails, the pool re-runs a known-answer
// open under the same wrap key version on the same member: if that fails,
// the member is at fault, is taken out, and another member tries. If it
// passes, the open is tried on the other healthy members too: failing on
// every one of them, the record is damaged (vault.ErrIntegrity) and every
// member stays in; opening on another, the first member is taken out.
// Under the hmac profile the open runs on the host under a key the member
// derived, and the member's check value of the wrap key stands in for the
// known answer.
//
// # Profiles
//
// A wrap key's type is its profile: an AES key seals with GCM in the token
// (gcm), a generic secret key derives a key per record by HMAC, under
// which GCM runs in this package (hmac, derive.go). Seal and Open pick the
// way by the key, so a pool may hold versions of both while a store moves
// from one to the other; Options.Profile is the one new records must be
// sealed under.
//
// # Failures and probes
//
// Each operation has a deadline (Options.OpTimeout): a member that does not
// answer in time is taken out, and the operation moves to another member.
// A member taken out is probed with exponential backoff and jitter: the
// self-tests and every key's check value, on its token as it is and, if
// that fails, on a token configured again from scratch (stale key handles
// after a token was restored need that). A probe that meets a refused PIN
// stops, so that repeated logins cannot lock the token.
//
// A token that refuses a session (CKR_SESSION_COUNT) is not a failure: the
// member's session pool remembers how many sessions the token gave and
// waits for one of them, and the pool serves the member with that many
// (Pool.limitSessions), so that requests queue for them, within
// QueueTimeout, instead of failing at the token.
//
// # Layout
//
// One file, or a few, per job; where one job calls another, it does so
// through an interface declared in the caller's file.
//
// The serving pool: pool.go (Pool, Open, Close, the do path, and token,
// the swap point at the PKCS#11 edge), admit.go (Admit, and the members'
// session limits), member.go (admitting a member: check values and
// self-tests), health.go (taking a member out, probing it, re-opening it),
// keyset.go (the keys every member must hold, and the profile check),
// reload.go (Reload, Retire and Forget), derive.go (the hmac profile) and
// metrics.go.
//
// The tokens: token.go (p11Token, a member's token through crypto11 and
// package p11raw, and what it offers the other jobs), copies.go (the
// session copies of its keys that it serves with), sessions.go (its
// bounded pool of raw sessions) and modules.go (Modules).
//
// Provisioning and rotation, run by the key commands before or beside
// the serving process: provision.go (Modules.Provision, key version 1)
// and rotate.go (Modules.Rotate, the next wrap and PIN version).
//
// Rollback anchors: anchorobj.go (the slot objects on a token and its
// write guard), anchorprobe.go (whether a token can keep them) and
// anchors.go (the pool's anchor reads and writes, AnchorMembers).
//
// The capability probe: capability.go (what a token can do: its
// mechanisms and known answers), refusal.go (the pool refusing a member
// whose token lacks what the vault needs) and check.go (Modules.Check,
// for keyvault hsm check and keys init).
//
// # State
//
// The package keeps no mutable state of its own at package level. What
// the tokens of a process share belongs to a Modules, which the caller
// creates and passes: each module kept initialised across the passes of
// a command, and each token's anchor write guard. A pool takes the
// command's through Options.Modules or makes its own, so two independent
// pools in one process (two tests) share none of it. crypto11 keeps one
// library instance per module path for the whole process (see Caveats).
//
// # Caveats
//
// crypto11 cannot import, copy or wrap keys; provisioning several members
// with identical material uses miekg/pkcs11 directly (see Provision). A
// PKCS#11 call that hangs cannot be interrupted: the pool stops waiting for
// it at OpTimeout or the caller's deadline, but its session slot stays busy
// until it returns. Several members on one module share one library instance
// (crypto11 counts its users per path), so re-opening one does not
// re-initialise the module while another is open: a SoftHSM token restored
// under a running process stays out until restart, unless each member loads
// the module from its own path.
package hsmpool
