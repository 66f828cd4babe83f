// Package server wires one keyvault process from its config: the store
// driver, the HSM pool, the vault, the API and admin listeners, the
// rollback check, the key lifecycle loop and the SIGHUP handlers; and,
// for the anchor commands while the vault is stopped, the store with the
// anchor keys and members (OpenAnchorAdmin). The keyvault command parses
// flags and calls New(...).Run(ctx) or OpenAnchorAdmin; everything a test
// would want to drive lives here.
//
// # Signals
//
// Run reacts to SIGHUP only: it reloads the HSM keys (as POST
// /admin/keys/reload does) and reopens a file audit sink (for logrotate).
// While Run runs, its start-up and its drain included, SIGHUP never ends
// the process. Stopping is the caller's: Run returns when its context
// ends.
//
// # Refused store
//
// With rollback anchoring on, a store the check refuses is never served:
// only the admin listener opens, its /readyz answers 503 with the reason,
// and keyvault_anchor_refused{reason} is 1, until the context ends.
package server
