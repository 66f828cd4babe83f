package main

import (
	"os"
	"runtime/debug"
	"testing"
)

// TestTuneGC: serving raises the garbage collector's target unless GOGC
// is set, and a GOGC of the environment is left as the runtime read it.
func TestTuneGC(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	t.Setenv("GOGC", "")
	if got := tuneGC(); got != 100 {
		t.Errorf("with GOGC set: target %d, want the runtime's 100 left alone", got)
	}
	// t.Setenv above restores GOGC at the end, unset or not.
	os.Unsetenv("GOGC")
	if got := tuneGC(); got != serveGCPercent {
		t.Errorf("without GOGC: target %d, want %d", got, serveGCPercent)
	}
}
