// Package ratelimit will hold keyvault's per-user, per-client and global
// limits and the admission control in front of the HSMs (SPEC.md layout).
// Until then every guess is still bounded by the durable guess budget in
// package vault.
package ratelimit
