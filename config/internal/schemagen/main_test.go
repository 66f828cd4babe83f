package main

import (
	"bytes"
	"os"
	"testing"
)

// TestSchemaCurrent fails when config/keyvault.schema.json is not what the
// Go types of package config generate: run `go generate ./config`.
func TestSchemaCurrent(t *testing.T) {
	t.Parallel()
	want, err := generate("../..")
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("../../keyvault.schema.json")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("config/keyvault.schema.json is out of date with package config; run: go generate ./config")
	}
}
