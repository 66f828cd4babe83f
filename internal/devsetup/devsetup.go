// Package devsetup holds the directory "keyvault dev" serves: its own
// SoftHSM config and token, the keys, a bbolt store, a bearer token and a
// config file usable with "keyvault serve --config", and the edit that
// writes the addresses actually bound into that config.
package devsetup

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/provision"
	"github.com/keyvault/keyvault/internal/softhsm"
)

// The files of a dev directory that the command reads.
const (
	ConfigFile = "keyvault.yaml"
	TokenFile  = "token" // the bearer token, one line
)

// TokenLabel is the dev SoftHSM token's label.
const TokenLabel = "keyvault-dev"

// BoundAddr is the address to write for a listener asked to listen on
// requested and bound to bound: as asked, with the port the kernel picked
// where port 0 was asked. The host stays as asked: Go reports 0.0.0.0 as
// [::], which would widen what a later run binds.
func BoundAddr(requested, bound string) string {
	host, port, err := net.SplitHostPort(requested)
	if err != nil || port != "0" {
		return requested
	}
	if _, p, err := net.SplitHostPort(bound); err == nil {
		return net.JoinHostPort(host, p)
	}
	return bound
}

// yamlScalar writes an address as a YAML scalar: plain when it is only
// letters, digits and . : - _, else double-quoted (an IPv6 address's "["
// would start a YAML list).
func yamlScalar(v string) string {
	for _, r := range v {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune(".:-_", r)) {
			return strconv.Quote(v)
		}
	}
	return v
}

// SetListenAddrs sets the top-level listen and admin_listen keys of the
// YAML file at path, keeping every other line and each line's comment. The
// file is replaced whole (rename), so a crash leaves the old one or the new.
func SetListenAddrs(path, listen, admin string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	want := map[string]string{"listen": listen, "admin_listen": admin}
	lines := strings.SplitAfter(string(data), "\n")
	for i, l := range lines {
		key, rest, ok := strings.Cut(l, ":")
		v, mine := want[key]
		if !ok || !mine {
			continue
		}
		comment := ""
		if j := strings.Index(rest, " #"); j >= 0 {
			comment = "   " + strings.TrimRight(rest[j+1:], "\n")
		}
		lines[i] = key + ": " + yamlScalar(v) + comment + "\n"
		delete(want, key)
	}
	for _, key := range []string{"listen", "admin_listen"} {
		if v, missing := want[key]; missing {
			if len(lines) > 0 && !strings.HasSuffix(lines[len(lines)-1], "\n") {
				lines = append(lines, "\n")
			}
			lines = append(lines, key+": "+yamlScalar(v)+"\n")
		}
	}
	out := strings.Join(lines, "")
	if out == string(data) {
		return nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".keyvault.yaml.*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(out); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(fi.Mode().Perm()); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// Setup creates, in dir, a SoftHSM config and token of their own, the
// keys, a bearer token (TokenFile) and the config (ConfigFile) that
// serves them on listen and admin. The config is written last, so a
// setup cut short is started over on the next run; a dir holding a store
// but no config is refused. It says on stdout where the keys were made.
func Setup(dir, listen, admin string, stdout io.Writer) error {
	module, err := softhsm.Module()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	// No keyvault.yaml means no data was ever served from here: an earlier
	// setup that stopped half-way leaves only a token to clear.
	if _, err := os.Stat(filepath.Join(dir, "keyvault.db")); err == nil {
		return errors.New("keyvault.db exists but keyvault.yaml does not; refusing to touch it")
	}
	if err := os.RemoveAll(filepath.Join(dir, "tokens")); err != nil {
		return err
	}
	conf, err := softhsm.WriteConfig(dir)
	if err != nil {
		return err
	}
	pin, soPIN := rand.Text(), rand.Text()
	if err := softhsm.InitToken(conf, TokenLabel, soPIN, pin); err != nil {
		return err
	}
	pinFile := filepath.Join(dir, "hsm-pin")
	if err := os.WriteFile(pinFile, []byte(pin+"\n"), 0o600); err != nil {
		return err
	}
	token := "kvdev_" + rand.Text()
	if err := os.WriteFile(filepath.Join(dir, TokenFile), []byte(token+"\n"), 0o600); err != nil {
		return err
	}
	sum := sha256.Sum256([]byte(token))
	yaml := fmt.Sprintf(`# keyvault dev config, written by "keyvault dev". Serve it with:
#   keyvault serve --config %[1]s/keyvault.yaml
listen: %[2]s
admin_listen: %[3]s
admin_pprof: false     # true serves /debug/pprof/ on the admin listener
store:
  path: %[1]s/keyvault.db
  rollback_anchor: true    # refuse a rolled-back store at start (docs/rollback.md)
hsm:
  module_env:
    SOFTHSM2_CONF: %[4]s   # this directory's own SoftHSM token store
  members:
    - name: dev
      module: %[5]s
      token_label: %[6]s
      pin_file: %[7]s
      max_sessions: 8
budget:
  default_max_attempts: 10
  max_attempts_limit: 20
  escalating_delay: {free_guesses: 5, base: 1m}
clients:
  - name: dev
    namespace: dev
    token_sha256: %[8]s   # SHA-256 of the token in %[1]s/token
ratelimit:
  guesses_per_user: {per_minute: 5, burst: 5}
  requests_per_client: {per_second: 500, burst: 1000}
  wrong_guesses_per_client: {per_minute: 600, burst: 600}
  hsm_queue_timeout: 50ms
  admitted_per_hsm_session: 4
  hsm_share_per_client_percent: 50
log:
  level: info
`, dir, yamlScalar(listen), yamlScalar(admin), conf, module, TokenLabel, pinFile, hex.EncodeToString(sum[:]))
	cfg, err := config.Parse([]byte(yaml))
	if err != nil {
		return fmt.Errorf("generated config: %w", err)
	}
	mods := hsmpool.NewModules()
	defer mods.Close()
	if err := provision.Init(cfg, mods, stdout); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, ConfigFile), []byte(yaml), 0o600)
}
