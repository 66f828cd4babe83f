// Package provision creates key versions on the HSM members of a config:
// version 1 ("keyvault keys init", and the keys of "keyvault dev") and the
// next one ("keyvault keys rotate"). Taking a new version into use is the
// running vault's (its admin listener's keys reload).
package provision

import (
	"errors"
	"fmt"
	"io"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/server"
	"github.com/keyvault/keyvault/vault"
)

// Init creates key version 1 on every member of cfg's HSM, in the
// profile cfg asks for, and says on stdout where the material was made. It
// creates nothing unless every member can serve and take the keys (and,
// with rollback anchoring, keep the anchors): a refusal after the first
// member would leave keys on it alone. Each module in mods is loaded and
// initialised once for all of it.
func Init(cfg *config.Config, mods *hsmpool.Modules, stdout io.Writer) error {
	members, err := server.MemberConfigs(cfg)
	if err != nil {
		return err
	}
	// Every member must be able to serve and to take the keys before any
	// is created: a refusal after the first member would leave keys on it
	// alone.
	profile := vault.Profile(cfg.HSM.Profile)
	if profile == "" {
		profile = hsmpool.DefaultProfile
	}
	var refusals []error
	checks := mods.Check(members, profile)
	for _, c := range checks {
		if c.Err == nil {
			c.Err = c.Caps.CanProvision(len(members), profile)
		}
		if c.Err != nil {
			refusals = append(refusals, c.Err)
		}
	}
	if cfg.Store.Anchored() {
		// The vault would refuse to start on these members.
		if err := hsmpool.CheckAnchors(checks); err != nil {
			refusals = append(refusals, err)
		}
		for _, c := range checks {
			if c.Anchors != nil && c.Err == nil && len(refusals) == 0 {
				fmt.Fprintf(stdout, "Member %s keeps no rollback anchors: %s; they live on the other members.\n", c.Member, c.AnchorLine())
			}
		}
	}
	if len(refusals) > 0 {
		return fmt.Errorf("keys init: created nothing: %w (keyvault hsm check --config FILE shows each token's capabilities)", errors.Join(refusals...))
	}
	inHSM, err := mods.Provision(members, profile)
	if err != nil {
		return fmt.Errorf("keys init: %w", err)
	}
	if inHSM {
		fmt.Fprintf(stdout, "Created key version 1 for the %s profile inside the HSM; the key material never left it.\n", profile)
	} else {
		fmt.Fprintf(stdout, "Created key version 1 for the %s profile on %d members. Generic PKCS#11 cannot clone keys, so the\n"+
			"material was generated in this process's memory, imported into each member as\n"+
			"sensitive, non-extractable token objects, and wiped. With an HSM cluster that\n"+
			"clones keys itself, provision one member and use the vendor's cloning instead.\n", profile, len(members))
	}
	fmt.Fprintln(stdout, "Back up the HSM keys with the HSM's own means: losing every copy of a key\nversion loses every backup sealed under it.")
	return nil
}

// Rotate creates the next version of the wrap and PIN keys on every
// member of cfg's HSM, all or nothing, through the modules in mods, and
// says on stdout where the material was made. It returns the version
// created.
func Rotate(cfg *config.Config, mods *hsmpool.Modules, stdout io.Writer) (uint32, error) {
	members, err := server.MemberConfigs(cfg)
	if err != nil {
		return 0, err
	}
	version, inHSM, err := mods.Rotate(members, vault.Profile(cfg.HSM.Profile))
	if err != nil {
		return 0, fmt.Errorf("keys rotate: %w", err)
	}
	if inHSM {
		fmt.Fprintf(stdout, "Created version %d of the wrap and PIN keys inside the HSM; the material never left it.\n", version)
	} else {
		fmt.Fprintf(stdout, "Created version %d of the wrap and PIN keys on %d members: the material was generated\n"+
			"in this process's memory, imported into each member as sensitive, non-extractable\ntoken objects, and wiped.\n", version, len(members))
	}
	return version, nil
}
