package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/provision"
	"github.com/keyvault/keyvault/internal/server"
)

// cmdKeys runs keys init and keys list.
func cmdKeys(sub string, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("keys "+sub, stderr)
	path := fs.String("config", "", "the YAML config `file` (required)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *path == "" {
		return usageError{errors.New("--config is required")}
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	// Each module is loaded and initialised once for every pass below:
	// some do not survive being finalised and initialised again.
	mods := hsmpool.NewModules()
	defer mods.Close()
	if sub == "init" {
		if err := provision.Init(cfg, mods, stdout); err != nil {
			return err
		}
	}
	return keysList(cfg, stdout)
}

// keysList prints every member's key versions and check values.
func keysList(cfg *config.Config, stdout io.Writer) error {
	pool, err := server.OpenPool(cfg, prometheus.NewRegistry(), slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	defer pool.Close()
	for _, m := range pool.Keys() {
		fmt.Fprintf(stdout, "member %s\n", m.Member)
		for _, k := range m.Keys {
			fmt.Fprintf(stdout, "  %-20s check value %s\n", k.Label, k.KCV)
		}
	}
	for _, r := range pool.Refused() {
		fmt.Fprintf(stdout, "member %s\n  refused (%s): %s\n", r.Member, r.Reason, r.Detail)
	}
	return nil
}
