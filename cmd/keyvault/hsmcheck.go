package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/server"
	"github.com/keyvault/keyvault/vault"
)

func cmdHSM(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("hsm check", stderr)
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
	members, err := server.MemberConfigs(cfg)
	if err != nil {
		return err
	}
	mods := hsmpool.NewModules()
	defer mods.Close()
	checks := mods.Check(members, vault.Profile(cfg.HSM.Profile))
	failed := printChecks(stdout, checks)
	anchors := anchorVerdict(stdout, cfg.Store.Anchored(), checks)
	if failed > 0 {
		return usageError{errors.Join(fmt.Errorf("%d of %d members cannot serve", failed, len(members)), anchors)}
	}
	if anchors != nil {
		return usageError{anchors}
	}
	return nil
}

// printChecks prints each member's capabilities and verdict and returns
// how many cannot serve.
func printChecks(w io.Writer, checks []hsmpool.MemberCheck) (failed int) {
	for _, c := range checks {
		fmt.Fprintf(w, "member %s\n", c.Member)
		if c.Caps != nil {
			c.Caps.Write(w)
		}
		fmt.Fprintf(w, "  anchors: %s\n", c.AnchorLine())
		if c.Err != nil {
			failed++
			fmt.Fprintf(w, "  verdict: cannot serve: %v\n", c.Err)
		} else {
			fmt.Fprintf(w, "  verdict: can serve (profile %s)\n", c.Caps.Profile)
		}
	}
	return failed
}

// anchorVerdict prints where the rollback anchors live and returns an
// error if anchoring is on and no member can keep them.
func anchorVerdict(w io.Writer, anchored bool, checks []hsmpool.MemberCheck) error {
	if !anchored {
		fmt.Fprintln(w, "rollback anchors: off (store.rollback_anchor: false, or the etcd store)")
		return nil
	}
	if err := hsmpool.CheckAnchors(checks); err != nil {
		fmt.Fprintf(w, "rollback anchors: cannot be kept: %v\n", err)
		return err
	}
	var on []string
	for _, c := range checks {
		if c.Anchors == nil {
			on = append(on, c.Member)
		}
	}
	fmt.Fprintf(w, "rollback anchors: on members %s\n", strings.Join(on, ", "))
	return nil
}
