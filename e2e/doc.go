// Package e2e is keyvault's end-to-end test tier: its tests build the real
// binary once, start it with `keyvault dev` or `keyvault serve` in a
// directory of their own (SoftHSM token, bbolt file, config, bearer token),
// and speak HTTP to it; some kill it, edit its database, or restart it.
//
// The tests need SoftHSM2. Outside CI they skip without it; under CI=true
// its absence fails them. Run them with:
//
//	go test -race -count=1 ./e2e/
//
// The package holds no product code; this file only documents it.
package e2e
