package hsmpool

import (
	"errors"
	"strings"

	"github.com/keyvault/keyvault/vault"
)

// capabilityProber is a token that can say what it can do. Tokens a test
// injects need not be one; they are taken as capable.
type capabilityProber interface {
	probeCapabilities(profile vault.Profile) (*Capabilities, error)
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
