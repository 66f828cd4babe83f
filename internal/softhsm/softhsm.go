// Package softhsm sets up SoftHSM2 tokens in a directory of their own, for
// `keyvault dev` and for tests. It never touches the system's token
// directory: SoftHSM reads the file named by SOFTHSM2_CONF when a process
// first initialises the module, and every config written here points at a
// token directory inside the caller's directory.
package softhsm

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ModulePaths are where Debian and Ubuntu's softhsm2 package installs the
// PKCS#11 library.
var ModulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// ErrNotInstalled: the SoftHSM2 library or its softhsm2-util is missing.
var ErrNotInstalled = errors.New("SoftHSM2 is not installed (apt-get install softhsm2)")

// Module returns the path of the SoftHSM2 PKCS#11 library.
func Module() (string, error) {
	for _, p := range ModulePaths {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", ErrNotInstalled
}

// WriteConfig creates dir/tokens and dir/softhsm2.conf pointing at it, and
// returns the config's path. An existing config is kept.
func WriteConfig(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return "", fmt.Errorf("softhsm token directory: %w", err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	if _, err := os.Stat(conf); err == nil {
		return conf, nil
	}
	body := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		return "", fmt.Errorf("softhsm config: %w", err)
	}
	return conf, nil
}

// InitToken initialises a new token with the label in the first free slot
// of the SoftHSM config conf. The PINs pass through softhsm2-util's
// arguments, visible to local users in the process list for its lifetime:
// acceptable for development tokens only.
func InitToken(conf, label, soPIN, userPIN string) error {
	util, err := exec.LookPath("softhsm2-util")
	if err != nil {
		return ErrNotInstalled
	}
	cmd := exec.Command(util, "--init-token", "--free", "--label", label, "--so-pin", soPIN, "--pin", userPIN)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
	out, err := cmd.CombinedOutput()
	if err != nil {
		msg := strings.ReplaceAll(strings.ReplaceAll(string(out), userPIN, "***"), soPIN, "***")
		return fmt.Errorf("softhsm2-util --init-token %s: %w: %s", label, err, strings.TrimSpace(msg))
	}
	return nil
}
