package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/internal/adminconn"
	"github.com/keyvault/keyvault/internal/devsetup"
)

func cmdDev(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("dev", stderr)
	dir := fs.String("dir", ".keyvault-dev", "the `directory` holding the dev token, keys, store, config and bearer token")
	listen := fs.String("listen", config.DefaultListen, "the API `address` (port 0: one the kernel picks); written into DIR/keyvault.yaml")
	admin := fs.String("admin-listen", config.DefaultAdminListen, "the admin `address` (/metrics, /healthz, /readyz); written into DIR/keyvault.yaml")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	abs, err := filepath.Abs(*dir)
	if err != nil {
		return err
	}
	cfgPath := filepath.Join(abs, devsetup.ConfigFile)
	if _, err := os.Stat(cfgPath); errors.Is(err, os.ErrNotExist) {
		if err := devsetup.Setup(abs, *listen, *admin, stdout); err != nil {
			return fmt.Errorf("set up %s: %w", abs, err)
		}
	}
	cfg, err := loadConfig(cfgPath)
	if err != nil {
		return err
	}
	// Flags given on this run override the addresses in the config; once
	// bound, the config is updated to match.
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "listen":
			cfg.Listen = *listen
		case "admin-listen":
			cfg.AdminListen = *admin
		}
	})
	if err := cfg.Validate(); err != nil {
		return usageError{err}
	}
	tokenPath := filepath.Join(abs, devsetup.TokenFile)
	token, err := os.ReadFile(tokenPath)
	if err != nil {
		return fmt.Errorf("read the bearer token: %w", err)
	}
	return serve(cfg, stderr, func(apiAddr, adminAddr string) error {
		// The file must name the ports served on: keys admin commands and
		// serve --config read it.
		listenAt, adminAt := devsetup.BoundAddr(cfg.Listen, apiAddr), devsetup.BoundAddr(cfg.AdminListen, adminAddr)
		if err := devsetup.SetListenAddrs(cfgPath, listenAt, adminAt); err != nil {
			return fmt.Errorf("write the bound addresses into %s: %w", cfgPath, err)
		}
		fmt.Fprintf(stdout, "keyvault dev: serving %s\n  API    http://%s\n  admin  http://%s\n  bearer token (also in %s): %s\n",
			abs, adminconn.Dialable(listenAt), adminconn.Dialable(adminAt), tokenPath, strings.TrimSpace(string(token)))
		return nil
	})
}

const devHelp = `Sets up, once, in DIR: a SoftHSM config and token of its own, the keys, a
bbolt store, a bearer token (DIR/token) and DIR/keyvault.yaml, usable with
"keyvault serve --config". Then serves DIR. Run again on the same DIR, it
serves the same data. --listen and --admin-listen are written into
DIR/keyvault.yaml, as the addresses actually bound where port 0 was asked,
and later runs without them serve there again.`
