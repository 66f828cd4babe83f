// Package softhsmtest gives tests a SoftHSM2 token directory of their own.
//
// Setting one up by hand:
//
//	export SOFTHSM2_CONF=$PWD/softhsm2.conf
//	mkdir -p tokens && printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\n' "$PWD" > softhsm2.conf
//	softhsm2-util --init-token --free --label keyvault-a --pin 1234 --so-pin 5678
package softhsmtest

import (
	"os"
	"sync"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm"
)

// Module returns the SoftHSM2 library path. Without SoftHSM the test is
// skipped, except under CI=true, where it fails: CI must never pass by
// skipping the HSM tier.
func Module(tb testing.TB) string {
	tb.Helper()
	m, err := softhsm.Module()
	if err != nil {
		if os.Getenv("CI") == "true" {
			tb.Fatalf("CI=true and %v: make test installs it", err)
		}
		tb.Skipf("skipping the SoftHSM tier outside CI: %v (make test installs it)", err)
	}
	return m
}

// Setup writes a SoftHSM config in dir and points this process's
// SOFTHSM2_CONF at it. SoftHSM reads the variable once per process, at the
// module's first initialisation, so a test binary calls Setup once (from
// TestMain or a sync.Once) and initialises every token it needs in dir.
func Setup(tb testing.TB, dir string) (module, conf string) {
	tb.Helper()
	module = Module(tb)
	conf, err := softhsm.WriteConfig(dir)
	if err != nil {
		tb.Fatal(err)
	}
	os.Setenv("SOFTHSM2_CONF", conf)
	return module, conf
}

// shared is the token directory of Shared.
var shared struct {
	once         sync.Once
	dir          string
	module, conf string
}

// Shared is Setup, once per process, in a temporary directory of its own,
// for test binaries that need SoftHSM in a few tests only; RemoveShared,
// from TestMain after the tests, removes the directory. A failed setup
// fails every caller.
func Shared(tb testing.TB) (module, conf string) {
	tb.Helper()
	Module(tb) // skips, or fails in CI, without SoftHSM
	shared.once.Do(func() {
		dir, err := os.MkdirTemp("", "softhsmtest-")
		if err != nil {
			tb.Fatal(err)
		}
		shared.dir = dir
		shared.module, shared.conf = Setup(tb, dir)
	})
	if shared.conf == "" {
		tb.Fatal("the shared SoftHSM token directory could not be set up (see the first test that asked for it)")
	}
	return shared.module, shared.conf
}

// RemoveShared removes Shared's directory, if it made one.
func RemoveShared() {
	if shared.dir != "" {
		os.RemoveAll(shared.dir)
	}
}

// Token initialises a token with the label and user PIN in conf.
func Token(tb testing.TB, conf, label, pin string) {
	tb.Helper()
	if err := softhsm.InitToken(conf, label, "so-"+pin, pin); err != nil {
		tb.Fatal(err)
	}
}
