// Package stress attacks the real keyvault binary the way the world will:
// SIGKILL loops under mixed load, storms of concurrent wrong guesses, an HSM
// member that keeps failing and coming back, records edited in the bbolt
// file, and a vault with many backups. Each scenario is a Go test that
// builds the binary, drives it over HTTP on real SoftHSM tokens and a real
// bbolt file, and checks the guess-budget invariants of docs/api.md from
// the outside.
//
// # Sizes
//
// Every scenario reads its size from the environment (STRESS_CYCLES,
// STRESS_STORMS, STRESS_DURATION, STRESS_TAMPER_ROUNDS, STRESS_BACKUPS).
// Unset, each runs a short version, so `make test` keeps every scenario
// alive; `make stress` sets the full sizes and adds the fuzz targets.
//
// # Output
//
// Each scenario ends with one summary line, "stress <scenario>: runs=R
// operations=O violations=V", in the test log and, when STRESS_SUMMARY
// names a file, appended to that file. A violation also fails the test.
package stress
