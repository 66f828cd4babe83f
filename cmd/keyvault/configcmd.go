package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
)

const configUsage = "config check --config FILE   validate a config file without starting"

// cmdConfig is `keyvault config check`: the same validation serve does at
// start (strict keys, types, paths, addresses), every problem by its key
// path, exit status 2 on any.
func cmdConfig(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(stdout, "Usage: keyvault %s\n", configUsage)
		if len(args) == 0 {
			return usageError{errors.New("config needs a subcommand: check")}
		}
		return flag.ErrHelp
	}
	if args[0] != "check" {
		return usageError{fmt.Errorf("unknown config subcommand %q", args[0])}
	}
	fs := newFlags("config check", stderr, configUsage)
	path := fs.String("config", "", "the YAML config `file` (required)")
	if err := parseFlags(fs, args[1:]); err != nil {
		return err
	}
	if *path == "" {
		return usageError{errors.New("--config is required")}
	}
	if _, err := loadConfig(*path); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: ok\n", *path)
	return nil
}
