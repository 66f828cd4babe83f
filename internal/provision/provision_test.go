package provision_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/devsetup"
	"github.com/keyvault/keyvault/internal/provision"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// On members that hold key version 1 (as keyvault dev leaves them), Init
// refuses and names the key, and Rotate creates version 2. One test: the
// process loads SoftHSM once, with the first token directory it is given.
func TestInitRefusesAndRotateCreatesTheNext(t *testing.T) {
	softhsmtest.Module(t)
	dir := t.TempDir()
	if err := devsetup.Setup(dir, "127.0.0.1:0", "127.0.0.1:0", &strings.Builder{}); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(filepath.Join(dir, devsetup.ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	mods := hsmpool.NewModules()
	defer mods.Close()
	var out strings.Builder
	err = provision.Init(cfg, mods, &out)
	if err == nil || !strings.Contains(err.Error(), "keyvault-wrap-v1: keys of this version already exist") {
		t.Fatalf("a second Init: %v", err)
	}
	if strings.Contains(out.String(), "Created") {
		t.Errorf("a refused Init printed:\n%s", out.String())
	}

	version, err := provision.Rotate(cfg, mods, &out)
	if err != nil {
		t.Fatal(err)
	}
	if version != 2 || !strings.Contains(out.String(), "Created version 2 of the wrap and PIN keys") {
		t.Errorf("Rotate: version %d, printed:\n%s", version, out.String())
	}
}
