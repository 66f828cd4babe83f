package main

import (
	"errors"
	"fmt"
	"io"
)

// cmdConfig is `keyvault config check`: the same validation serve does at
// start (strict keys, types, paths, addresses), every problem by its key
// path, exit status 2 on any.
func cmdConfig(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("config check", stderr)
	path := fs.String("config", "", "the YAML config `file` (required)")
	if err := parseFlags(fs, args); err != nil {
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
