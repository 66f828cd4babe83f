package p11test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The opencryptoki soft token: slot 3 of a stock opencryptoki.conf, one
// token per machine, kept in swtokDir. Its factory SO PIN is fixed by
// opencryptoki; the other PINs are the tests' own.
const (
	ocSlot       = "3"
	ocFactorySO  = "87654321"
	ocSOPIN      = "76543210"
	ocInitialPIN = "12345678"
	ocUserPIN    = "1234" // opencryptoki takes user PINs of 4 to 8 characters
	// OpencryptokiLabel is the label the token gets.
	OpencryptokiLabel = "keyvault-oc"
	swtokDir          = "/var/lib/opencryptoki/swtok"
	// swtokShm is the token's shared memory, a mirror of its files that
	// outlives the processes using it: removed with them for a reset.
	swtokShm = "/dev/shm/var.lib.opencryptoki.swtok"
	ocLock   = "/tmp/keyvault-opencryptoki-test.lock"
)

// Opencryptoki returns opencryptoki's soft token, wiped and initialised
// afresh for this test, with the slot daemon started if it is not
// running. The token is the machine's only one: the test holds a lock on
// it (across processes, so packages tested in parallel take turns) until
// it ends, and must close its sessions by then. It needs root, as
// pkcsslotd and the token directory do.
//
// By hand, as root:
//
//	pkcsslotd
//	printf 'keyvault-oc\n' | pkcsconf -c 3 -I -S 87654321   # label from stdin
//	pkcsconf -c 3 -P -S 87654321 -n 76543210              # the SO PIN
//	pkcsconf -c 3 -u -S 76543210 -n 12345678              # the user PIN
//	pkcsconf -c 3 -p -U 12345678 -n 1234                  # changed once, as it must be
func Opencryptoki(tb testing.TB) Token {
	tb.Helper()
	module, err := findLib("pkcs11/libopencryptoki.so", "opencryptoki/libopencryptoki.so")
	if err != nil {
		unavailable(tb, "opencryptoki", err)
	}
	slotd, err := findCmd("pkcsslotd")
	if err != nil {
		unavailable(tb, "opencryptoki", err)
	}
	conf, err := findCmd("pkcsconf")
	if err != nil {
		unavailable(tb, "opencryptoki", err)
	}
	if os.Geteuid() != 0 {
		unavailable(tb, "opencryptoki", fmt.Errorf("its soft token needs root (pkcsslotd, %s)", swtokDir))
	}
	lock, err := os.OpenFile(ocLock, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		tb.Fatal(err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		lock.Close()
		tb.Fatalf("lock the opencryptoki token: %v", err)
	}
	tb.Cleanup(func() { lock.Close() }) // closing releases the lock
	if err := startSlotd(slotd); err != nil {
		tb.Fatal(err)
	}
	if err := resetSwtok(conf); err != nil {
		tb.Fatal(err)
	}
	return Token{Module: module, Label: OpencryptokiLabel, PIN: ocUserPIN}
}

// startSlotd starts pkcsslotd unless it runs; it puts itself in the
// background and stays up after the tests, like the service it is.
func startSlotd(slotd string) error {
	if running("pkcsslotd") {
		return nil
	}
	if err := run("", nil, slotd); err != nil {
		return fmt.Errorf("start the opencryptoki slot daemon: %w", err)
	}
	for range 50 {
		if running("pkcsslotd") {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("pkcsslotd did not come up")
}

// running reports whether a process with the command name runs.
func running(name string) bool {
	comms, _ := filepath.Glob("/proc/[0-9]*/comm")
	for _, c := range comms {
		if b, err := os.ReadFile(c); err == nil && strings.TrimSpace(string(b)) == name {
			return true
		}
	}
	return false
}

// resetSwtok wipes the soft token back to its factory state, then
// initialises it. C_InitToken alone is not enough: on opencryptoki 3.8 a
// token initialised twice refuses its SO PIN afterwards
// (CKR_FUNCTION_FAILED), so the files and their shared-memory mirror go.
func resetSwtok(conf string) error {
	objs, _ := filepath.Glob(filepath.Join(swtokDir, "TOK_OBJ", "*"))
	for _, f := range append(objs, filepath.Join(swtokDir, "NVTOK.DAT"), filepath.Join(swtokDir, "MK_SO"), filepath.Join(swtokDir, "MK_USER"), swtokShm) {
		if err := os.Remove(f); err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("reset the opencryptoki soft token: %w", err)
		}
	}
	secrets := []string{ocSOPIN, ocFactorySO, ocInitialPIN, ocUserPIN}
	steps := []struct {
		stdin string
		args  []string
	}{
		{OpencryptokiLabel + "\n", []string{"-c", ocSlot, "-I", "-S", ocFactorySO}},
		{"", []string{"-c", ocSlot, "-P", "-S", ocFactorySO, "-n", ocSOPIN}},
		{"", []string{"-c", ocSlot, "-u", "-S", ocSOPIN, "-n", ocInitialPIN}},
		{"", []string{"-c", ocSlot, "-p", "-U", ocInitialPIN, "-n", ocUserPIN}},
	}
	for _, s := range steps {
		if err := run(s.stdin, secrets, conf, s.args...); err != nil {
			return fmt.Errorf("initialise the opencryptoki soft token: %w", err)
		}
	}
	return nil
}
