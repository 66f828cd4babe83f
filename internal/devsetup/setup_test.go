package devsetup

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// Setup leaves a directory whose config loads, names the token it wrote
// by its hash and a SoftHSM token of the directory's own with the keys,
// every secret file readable by the owner alone.
func TestSetupWritesAServableDirectory(t *testing.T) {
	softhsmtest.Module(t)
	dir := t.TempDir()
	var out strings.Builder
	if err := Setup(dir, "127.0.0.1:0", "[::1]:0", &out); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "Created key version 1") {
		t.Errorf("the set-up did not say where the keys were made:\n%s", out.String())
	}
	cfg, err := config.Load(filepath.Join(dir, ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:0" || cfg.AdminListen != "[::1]:0" {
		t.Errorf("listen %q, admin_listen %q", cfg.Listen, cfg.AdminListen)
	}
	if cfg.Store.Path != filepath.Join(dir, "keyvault.db") || cfg.HSM.Members[0].TokenLabel != TokenLabel {
		t.Errorf("store %q, token label %q: not the directory's own", cfg.Store.Path, cfg.HSM.Members[0].TokenLabel)
	}
	token, err := os.ReadFile(filepath.Join(dir, TokenFile))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(string(token))))
	if len(cfg.Clients) != 1 || len(cfg.Clients[0].TokenSHA256) != 1 || cfg.Clients[0].TokenSHA256[0] != hex.EncodeToString(sum[:]) {
		t.Errorf("the config's client does not hold the token's hash: %+v", cfg.Clients)
	}
	for _, name := range []string{ConfigFile, TokenFile, "hsm-pin"} {
		if fi, err := os.Stat(filepath.Join(dir, name)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, %v; want mode 0600", name, fi, err)
		}
	}
}

// A store without a config is data that was served once: Setup leaves it.
func TestSetupRefusesAStoreWithoutConfig(t *testing.T) {
	softhsmtest.Module(t)
	dir := t.TempDir()
	db := filepath.Join(dir, "keyvault.db")
	if err := os.WriteFile(db, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := Setup(dir, "127.0.0.1:0", "127.0.0.1:0", &strings.Builder{})
	if err == nil || !strings.Contains(err.Error(), "refusing to touch it") {
		t.Fatalf("Setup over a store: %v", err)
	}
	if b, err := os.ReadFile(db); err != nil || string(b) != "data" {
		t.Errorf("the store after a refused set-up: %q, %v", b, err)
	}
}
