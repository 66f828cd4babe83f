package hsmpool

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/keyvault/keyvault/vault"
)

// capabilityProber is a token that can say what it can do. Tokens a test
// injects need not be one; they are taken as capable.
type capabilityProber interface {
	probeCapabilities(profile vault.Profile) (*Capabilities, error)
}

func (t *p11Token) probeCapabilities(profile vault.Profile) (*Capabilities, error) {
	return probeCapabilities(t.raw, t.name, t.label, profile, t.profiles)
}

// checkCapabilities probes t before the member serves from it, for
// profile (the pool's: see profileOf). A refusal is kept on the member,
// shown in the refused metric and logged when it starts or its reason
// changes, not on every probe: a refused member is probed again only
// every RefusedProbeInterval.
func (p *Pool) checkCapabilities(m *member, t token, profile vault.Profile) error {
	cp, ok := t.(capabilityProber)
	if !ok {
		return nil
	}
	p.metrics.capProbes.WithLabelValues(m.name).Inc()
	_, err := cp.probeCapabilities(profile)
	var refusal *RefusedError
	if err == nil {
		if old := m.refusal.Swap(nil); old != nil {
			p.metrics.refused.WithLabelValues(m.name, old.Reason).Set(0)
			p.log.Info("HSM member's token now has what the vault needs", "member", m.name)
		}
		return nil
	}
	if !errors.As(err, &refusal) {
		return err // a failure of the moment: the member's refusal, if any, stands
	}
	old := m.refusal.Swap(refusal)
	if old == nil || old.Reason != refusal.Reason {
		if old != nil {
			p.metrics.refused.WithLabelValues(m.name, old.Reason).Set(0)
		}
		p.metrics.refused.WithLabelValues(m.name, refusal.Reason).Set(1)
		p.log.Error("HSM member refused: its token lacks what the vault needs; probing it again only every "+p.opts.RefusedProbeInterval.String(),
			"member", m.name, "reason", refusal.Reason, "error", refusal.Detail)
	}
	return refusal
}

// profileOf is the profile a member must serve: the configured one, or,
// if none is, the one of the newest wrap key of ks, the pool's keys (nil
// before any member is admitted: then each token's own keys decide).
func (p *Pool) profileOf(ks *keySet) vault.Profile {
	if p.opts.Profile != "" || ks == nil {
		return p.opts.Profile
	}
	return ks.profiles[ks.versions[vault.RoleWrap]]
}

// Refused lists the members refused for their token's capabilities, in
// config order.
func (p *Pool) Refused() []*RefusedError {
	var out []*RefusedError
	for _, m := range p.members {
		if r := m.refusal.Load(); r != nil {
			out = append(out, r)
		}
	}
	return out
}

// DegradedError is what Ready returns while the pool serves but some
// members are refused: ready, with the reasons to show (see
// api.AdminOptions).
type DegradedError struct{ Refused []*RefusedError }

func (e *DegradedError) Error() string {
	parts := make([]string, len(e.Refused))
	for i, r := range e.Refused {
		parts[i] = r.Error()
	}
	return strings.Join(parts, "; ")
}

// Degraded marks the error as one that leaves the service ready.
func (e *DegradedError) Degraded() bool { return true }

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
