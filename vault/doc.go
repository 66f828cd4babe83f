// Package vault is keyvault's domain: it enrolls, recovers, reports on,
// deletes and re-PINs backups of users' history keys, and it enforces the
// guess budget.
//
// # Basics
//
// A backup is one record in a Store, keyed by (namespace, user_id). The
// record holds the user's secret sealed twice: an inner AES-256-GCM layer
// under a key derived from the PIN check, and an outer AES-256-GCM layer
// under the current wrap key, as its profile says: inside the HSM (gcm), or
// on the host under a key the HSM derives for the record by HMAC (hmac).
// Each record says which profile sealed it. Checking a PIN needs an
// HMAC computed inside the HSM under the PIN key, so a copy of the store alone
// allows no offline guessing. The byte layouts are a stored format and are
// documented in docs/format.md.
//
// # The guess budget
//
// Every recovery and PIN change is a guess, and it is counted durably before
// the HSM is asked anything (see Vault.Recover for the three steps). The
// guess that uses the last attempt removes the sealed secret in the same
// write that counts it. Counters are authenticated with a record MAC under a
// key derived from the HSM at start, so a record edited in the store is
// refused with ErrIntegrity rather than trusted.
//
// Every write is durable before the answer it decides goes out, with one
// exception: the reset after a right PIN, where it forgives its own guess
// and nothing else, on a store that can tell a compare-and-swap applied
// before it is durable (EarlyStore: bbolt; etcd answers only durable
// writes). The answer is still decided by that compare-and-swap; losing
// the write in a crash leaves the guess counted, which costs the user one
// attempt and never gives one (docs/threat-model.md has the argument).
//
// The budget is in one place, budget.go: its configuration (Budget: the
// attempts and the escalating delay), the refusals a guess gets before it
// is counted (not found, precondition, locked, ErrDelayed), and the steps
// that count, forgive, refund and settle a guess. Classify says what each
// outcome means, wrong guess or not, for callers that keep limits.
//
// A store error other than a conflict leaves a write's outcome unknown (etcd
// may apply a write it answered with an error). The vault resolves it with
// the operation IDs each record keeps of its last writes (Vault.resolve),
// and answers ErrUnavailable, checking no PIN, when it cannot: an unknown
// outcome may over-count a guess, never under-count one.
//
// # Key versions across nodes
//
// Nodes sharing a store agree on key versions through it: a key state entry
// (newest version announced, versions being retired and retired) and one
// heartbeat per node (the versions it seals under and the retirements it
// has acknowledged). SyncKeys runs a node's round; RetireKeys counts records
// only once every live node has acknowledged, and a node that cannot reach
// the store stops sealing (keystate.go has the argument).
//
// # Caveats
//
// The record MAC stops edits, not rollbacks: restoring an older copy of the
// store restores older counters (docs/rollback.md has the anchoring that
// refuses such a store).
// The Store must give compare-and-swap by revision; the HSM must say whether
// an operation produced no result (ErrUnavailable) or an open failed
// authentication (ErrIntegrity).
package vault
