// Package p11test gives tests PKCS#11 tokens other than SoftHSM2: the
// opencryptoki soft token and NSS's softoken loaded through p11-kit-proxy.
// deploy/pkcs11/install.sh (make test-deps) installs both.
//
// Without them a test is skipped, except under CI=true, where it fails:
// CI must never pass by skipping a token.
package p11test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Token is a token ready for keyvault: its module, label and user PIN.
type Token struct {
	Module, Label, PIN string
}

// libDirs are where Debian and Ubuntu put PKCS#11 libraries.
var libDirs = []string{"/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib"}

// findLib returns the first of the names that exists under one of libDirs.
func findLib(names ...string) (string, error) {
	for _, d := range libDirs {
		for _, n := range names {
			if p := filepath.Join(d, n); exists(p) {
				return p, nil
			}
		}
	}
	return "", fmt.Errorf("%s not found under %v", names[0], libDirs)
}

// findCmd looks name up in PATH and in the sbin directories, which a
// non-root PATH often lacks.
func findCmd(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, d := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		if p := filepath.Join(d, name); exists(p) {
			return p, nil
		}
	}
	return "", fmt.Errorf("command %s not found", name)
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// unavailable skips the test, or fails it under CI=true.
func unavailable(tb testing.TB, what string, err error) {
	tb.Helper()
	if os.Getenv("CI") == "true" {
		tb.Fatalf("CI=true and %s is not usable: %v (make test-deps installs it)", what, err)
	}
	tb.Skipf("skipping the %s tier outside CI: %v (make test-deps installs it)", what, err)
}

// run runs a command with stdin and returns its combined output in the
// error, with secrets masked.
func run(stdin string, secrets []string, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err == nil {
		return nil
	}
	msg := strings.TrimSpace(string(out))
	line := strings.Join(append([]string{filepath.Base(name)}, args...), " ")
	for _, s := range secrets {
		msg, line = strings.ReplaceAll(msg, s, "***"), strings.ReplaceAll(line, s, "***")
	}
	return errors.New(line + ": " + err.Error() + ": " + msg)
}
