package server

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/keyvault/keyvault/config"
)

// A driver name the code does not know is refused before anything is
// opened: no bbolt file appears at store.path.
func TestOpenStoreRefusesUnknownDriver(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keyvault.db")
	cfg := &config.Config{Store: config.Store{Driver: "postgres", Path: path}}
	st, err := openStore(cfg, nil, nil)
	if err == nil {
		st.Close()
		t.Fatal("store.driver postgres opened a store")
	}
	if !errors.Is(err, ErrConfig) {
		t.Errorf("error %v is not a config error", err)
	}
	if _, serr := os.Stat(path); !errors.Is(serr, os.ErrNotExist) {
		t.Errorf("a file was created at store.path: %v", serr)
	}
}
