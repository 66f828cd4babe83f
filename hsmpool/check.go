package hsmpool

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/keyvault/keyvault/vault"
)

// MemberCheck is the capability verdict on one member.
type MemberCheck struct {
	Member string
	Caps   *Capabilities // nil if the token could not be opened
	Err    error         // nil: the member can serve
	// Anchors is nil if the token keeps rollback anchor objects, a
	// *NoAnchorsError if it cannot, another error if the probe failed.
	Anchors error
}

// AnchorLine says whether the member keeps rollback anchors, for one line
// of output: "yes", or "no (why)", or "unknown (why)".
func (c MemberCheck) AnchorLine() string {
	var na *NoAnchorsError
	switch {
	case c.Anchors == nil:
		return "yes"
	case errors.As(c.Anchors, &na) && na.Step == "":
		return fmt.Sprintf("no (%v)", na.Err)
	case errors.As(c.Anchors, &na):
		return fmt.Sprintf("no (%s a private token data object: %v)", na.Step, na.Err)
	}
	return fmt.Sprintf("unknown (%v)", c.Anchors)
}

// CheckAnchors says whether the members checked can keep the rollback
// anchors: nil if at least one can, else ErrNoAnchorMember naming each
// member's reason and the ways out.
func CheckAnchors(checks []MemberCheck) error {
	var reasons []string
	for _, c := range checks {
		if c.Anchors == nil {
			return nil
		}
		reasons = append(reasons, "member "+c.Member+": "+c.AnchorLine())
	}
	return fmt.Errorf("%w, and none does: %s; add a member whose token keeps them (the anchors live on the members that can), or set store.rollback_anchor: false",
		ErrNoAnchorMember, strings.Join(reasons, "; "))
}

// Check opens each member's token, probes what it can do for profile (""
// as Options.Profile) and whether it keeps rollback anchor objects (a
// throwaway data object is created and destroyed), and closes it, one
// member at a time, for `keyvault hsm check` and `keys init`. The modules
// stay initialised for the command's next pass.
func (m *Modules) Check(cfgs []MemberConfig, profile vault.Profile) []MemberCheck {
	out := make([]MemberCheck, len(cfgs))
	for i, c := range cfgs {
		out[i].Member = c.Name
		var t *p11Token
		_, err := m.use(c) // names the member
		if err == nil {
			if t, err = m.openToken(forProfile([]MemberConfig{c}, profile)[0]); err != nil {
				err = fmt.Errorf("member %s: %w", c.Name, err)
			}
		}
		if err != nil {
			out[i].Err, out[i].Anchors = err, err
			continue
		}
		out[i].Caps, out[i].Err = t.probeCapabilities(profile)
		out[i].Anchors = t.ProbeAnchors(context.Background())
		if err := t.Close(); err != nil && out[i].Err == nil {
			out[i].Err = fmt.Errorf("member %s: close: %w", c.Name, err)
		}
	}
	return out
}

// Check is Modules.Check on modules of its own.
func Check(cfgs []MemberConfig, profile vault.Profile) []MemberCheck {
	m := NewModules()
	defer m.Close()
	return m.Check(cfgs, profile)
}
