// Command gen copies deploy/prometheus/keyvault-rules.yaml into the chart
// and writes deploy/kubernetes from the chart (charttest.RawKit), removing
// the YAML files there that the chart no longer renders. Run it from the
// charttest directory: deploy/helm/generate.sh does.
package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/keyvault/keyvault/deploy/helm/charttest"
)

const (
	chart = "../keyvault"
	rules = "../../prometheus/keyvault-rules.yaml"
	kit   = "../../kubernetes"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "gen:", err)
		os.Exit(1)
	}
}

func run() error {
	b, err := os.ReadFile(rules)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(chart, "files", "keyvault-rules.yaml"), b, 0o644); err != nil {
		return err
	}
	files, err := charttest.RawKit(chart)
	if err != nil {
		return err
	}
	old, _ := filepath.Glob(filepath.Join(kit, "*.yaml"))
	oldSetup, _ := filepath.Glob(filepath.Join(kit, "setup", "*.yaml"))
	for _, f := range append(old, oldSetup...) {
		rel, _ := filepath.Rel(kit, f)
		if _, ok := files[filepath.ToSlash(rel)]; !ok {
			if err := os.Remove(f); err != nil {
				return err
			}
		}
	}
	for rel, text := range files {
		p := filepath.Join(kit, filepath.FromSlash(rel))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			return err
		}
	}
	fmt.Printf("wrote %d files to deploy/kubernetes from the chart\n", len(files))
	return nil
}
