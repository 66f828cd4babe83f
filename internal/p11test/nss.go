package p11test

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// NSSLabel is the label of the NSS softoken's key store token.
const NSSLabel = "NSS Certificate DB"

// moduleDir is where p11-kit reads module files as root: as root it
// ignores ~/.config/pkcs11/modules.
const moduleDir = "/etc/pkcs11/modules"

// NSS returns NSS's softoken as a token of p11-kit-proxy for the test
// process itself: a new database in dir (a directory that lives as long
// as the test process uses the module), protected by the returned PIN.
// NSS needs an init string that PKCS#11 can pass only in C_Initialize's
// reserved argument, which crypto11 cannot set; p11-kit passes it from a
// module file (x-init-reserved).
//
// As root, the module file goes to /etc/pkcs11/modules, enabled only in
// programs named as this test binary (enable-in), and is removed when the
// test ends; an abandoned one from a killed run is removed on the next.
// Otherwise it goes to the user's module directory under a HOME of the
// test's own (set with tb.Setenv, so the test cannot be parallel).
// p11-kit-proxy also loads the system's other modules (SoftHSM's among
// them): the token is found by its label. NSS can be initialised once per
// process, so a test binary calls this once.
func NSS(tb testing.TB, dir string) Token {
	tb.Helper()
	tok, body := nssDatabase(tb, dir)
	if os.Geteuid() == 0 {
		writeModule(tb, body, filepath.Base(os.Args[0]))
		return tok
	}
	home := filepath.Join(dir, "home")
	if err := os.MkdirAll(filepath.Join(home, ".config", "pkcs11", "modules"), 0o700); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(home, ".config", "pkcs11", "modules", "keyvault-nss.module"), []byte(body), 0o600); err != nil {
		tb.Fatal(err)
	}
	tb.Setenv("HOME", home)
	return tok
}

// NSSForProgram returns NSS's softoken as a token of p11-kit-proxy for a
// program the test runs, bin, rather than for the test process: as NSS,
// a new database in dir, but with the module file enabled only in the
// program the returned path starts. That path is a symbolic link to bin,
// in dir, under a name of its own; p11-kit compares enable-in with the
// program's name (the base name of its argv[0]), so no other process
// loads the module: not the test binary, not the links of other tests,
// not bin started under its own name. Each process the link starts
// initialises NSS once, on its own.
//
// It needs root: as another user p11-kit would read the module file from
// the user's HOME, which the program would have to share.
func NSSForProgram(tb testing.TB, dir, bin string) (tok Token, program string) {
	tb.Helper()
	if os.Geteuid() != 0 {
		unavailable(tb, "NSS through p11-kit for a program", fmt.Errorf("its module file goes to %s, which needs root", moduleDir))
	}
	tok, body := nssDatabase(tb, dir)
	program = filepath.Join(dir, filepath.Base(bin)+"-nss-"+strings.ToLower(rand.Text()[:10]))
	if err := os.Symlink(bin, program); err != nil {
		tb.Fatal(err)
	}
	writeModule(tb, body, filepath.Base(program))
	return tok, program
}

// nssDatabase creates NSS's database in dir and returns the token and the
// body of its module file, without enable-in.
func nssDatabase(tb testing.TB, dir string) (Token, string) {
	tb.Helper()
	proxy, err := findLib("p11-kit-proxy.so", "pkcs11/p11-kit-proxy.so")
	if err != nil {
		unavailable(tb, "NSS through p11-kit", err)
	}
	softokn, err := findLib("libsoftokn3.so", "nss/libsoftokn3.so")
	if err != nil {
		unavailable(tb, "NSS through p11-kit", err)
	}
	certutil, err := findCmd("certutil")
	if err != nil {
		unavailable(tb, "NSS through p11-kit", err)
	}
	db := filepath.Join(dir, "nssdb")
	if err := os.MkdirAll(db, 0o700); err != nil {
		tb.Fatal(err)
	}
	pin := "nss-" + rand.Text()[:12]
	pwfile := filepath.Join(dir, "nss-password")
	if err := os.WriteFile(pwfile, []byte(pin+"\n"), 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := run("", []string{pin}, certutil, "-N", "-d", "sql:"+db, "-f", pwfile); err != nil {
		tb.Fatalf("create the NSS database: %v", err)
	}
	os.Remove(pwfile)
	body := fmt.Sprintf("module: %s\nx-init-reserved: configdir='sql:%s' certPrefix='' keyPrefix='' secmod='secmod.db' flags=\n", softokn, db)
	return Token{Module: proxy, Label: NSSLabel, PIN: pin}, body
}

// writeModule writes a module file of body to /etc/pkcs11/modules,
// enabled only in program, and removes it when the test ends.
func writeModule(tb testing.TB, body, program string) {
	tb.Helper()
	if err := os.MkdirAll(moduleDir, 0o755); err != nil {
		tb.Fatal(err)
	}
	removeAbandoned()
	file := filepath.Join(moduleDir, "keyvault-test-"+strings.ToLower(rand.Text()[:10])+".module")
	if err := os.WriteFile(file, []byte(body+"enable-in: "+program+"\n"), 0o644); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.Remove(file) })
}

// removeAbandoned removes test module files whose database is gone: a
// test killed before its cleanup left them.
func removeAbandoned() {
	files, _ := filepath.Glob(filepath.Join(moduleDir, "keyvault-test-*.module"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		_, rest, ok := strings.Cut(string(b), "configdir='sql:")
		db, _, ok2 := strings.Cut(rest, "'")
		if ok && ok2 && !exists(db) {
			os.Remove(f)
		}
	}
}
