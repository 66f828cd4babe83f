package boltstore_test

import (
	"testing"

	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/storetest"
)

// TestConformance runs the store contract shared with every driver.
func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) vault.Store {
		s, _ := tempStore(t)
		return s
	})
}
