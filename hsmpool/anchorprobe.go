package hsmpool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/anchor"
)

// anchorProbeApplication marks the throwaway object of the anchor probe,
// so that it is never read as an anchor and one left by a killed probe is
// removed by the next.
const anchorProbeApplication = "keyvault-anchor-probe"

// NoAnchorsError: a member's token cannot keep rollback anchor objects.
// It is permanent: the token refused the template or the update, or read
// back something else.
type NoAnchorsError struct {
	Member, Token string
	// Step is what the token refused: create, update, read back, destroy
	// ("": the token has no anchor objects at all).
	Step string
	Err  error
}

func (e *NoAnchorsError) Error() string {
	if e.Step == "" {
		return fmt.Sprintf("member %s: %v", e.Member, e.Err)
	}
	return fmt.Sprintf("member %s: token %q keeps no rollback anchor objects: %s a private token data object: %v", e.Member, e.Token, e.Step, e.Err)
}

func (e *NoAnchorsError) Unwrap() error { return e.Err }

// anchorProber is a token that can say whether it keeps anchor objects.
// Anchor keepers that tests inject need not be one; they are taken as able.
type anchorProber interface {
	ProbeAnchors(ctx context.Context) error
}

func (t *p11Token) ProbeAnchors(ctx context.Context) error {
	err := t.anchorObjs.probe(ctx)
	var na *NoAnchorsError
	if errors.As(err, &na) {
		na.Member, na.Token = t.name, t.label
	}
	return err
}

// probe does on a throwaway object what the anchor writes do: create a
// private token data object with CKA_VALUE, update its label in place
// (where an anchor lives, see anchorObjects), read the label back, and
// destroy the object. It takes the token's write turn, so it is never a
// second write in flight. A permanent refusal is a *NoAnchorsError.
func (a *anchorObjects) probe(ctx context.Context) error {
	select {
	case a.guard.turn <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("anchor probe: waiting for the token's anchor write: %w", ctx.Err())
	}
	defer func() { <-a.guard.turn }()
	refused := func(step string, err error) error {
		if isPermanent(err) {
			return &NoAnchorsError{Step: step, Err: err}
		}
		return fmt.Errorf("anchor probe: %s: %w", step, err)
	}
	return a.with(func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		find := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA),
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
			pkcs11.NewAttribute(pkcs11.CKA_APPLICATION, anchorProbeApplication),
		}
		stale, err := findObjects(p, s, find)
		if err != nil {
			return fmt.Errorf("anchor probe: %w", err)
		}
		for _, o := range stale {
			if err := p.DestroyObject(s, o); err != nil {
				return refused("destroy", err)
			}
		}
		o, err := p.CreateObject(s, append(find,
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
			pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, true),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, anchorSlotValue),
			pkcs11.NewAttribute(pkcs11.CKA_LABEL, "keyvault anchor probe, created"),
		))
		if err != nil {
			return refused("create", err)
		}
		want := []byte("keyvault anchor probe, updated")
		err = p.SetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, want)})
		if err != nil {
			err = refused("update", err)
		} else {
			var got []*pkcs11.Attribute
			got, err = p.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
			switch {
			case err != nil:
				err = refused("read back", err)
			case len(got) != 1 || !bytes.Equal(got[0].Value, want):
				err = &NoAnchorsError{Step: "read back", Err: errors.New("the label read back is not the one written")}
			}
		}
		if derr := p.DestroyObject(s, o); derr != nil && err == nil {
			err = refused("destroy", derr)
		}
		return err
	})
}

// AnchorMembers are the members that keep the rollback anchors: every
// configured member but those whose token cannot keep anchor objects. It
// implements boltstore.Anchors.
type AnchorMembers struct {
	p       *Pool
	members []*member
	// Refused are the members left out, with the reason.
	Refused []*NoAnchorsError
}

// ErrNoAnchorMember: no member's token can keep rollback anchors.
var ErrNoAnchorMember = errors.New("rollback anchoring needs at least one member whose token keeps anchor objects")

// AnchorMembers probes every member's token for anchor objects (see
// anchorObjects.probe) and returns the members that keep the anchors. A
// member whose token refuses them is left out and named in Refused; one
// that does not answer stays in, as a silent member: whether the store
// may be served without it is the rollback check's decision. It fails
// with ErrNoAnchorMember, naming each refusal and the ways out, if every
// member is refused.
func (p *Pool) AnchorMembers(ctx context.Context) (*AnchorMembers, error) {
	refusals := make([]*NoAnchorsError, len(p.members))
	var wg sync.WaitGroup
	for i, m := range p.members {
		wg.Go(func() {
			err := p.onMember(ctx, m, "anchor_probe", func(k anchorKeeper) error {
				if pr, ok := k.(anchorProber); ok {
					return pr.ProbeAnchors(ctx)
				}
				return nil
			})
			var na *NoAnchorsError
			switch {
			case errors.As(err, &na):
				refusals[i] = na
			case errors.Is(err, errNoAnchors):
				refusals[i] = &NoAnchorsError{Member: m.name, Err: errNoAnchors}
			}
		})
	}
	wg.Wait()
	am := &AnchorMembers{p: p}
	var reasons []string
	for i, m := range p.members {
		if refusals[i] != nil {
			am.Refused = append(am.Refused, refusals[i])
			reasons = append(reasons, refusals[i].Error())
			continue
		}
		am.members = append(am.members, m)
	}
	if len(am.members) == 0 {
		return nil, fmt.Errorf("%w, and none does: %s; add a member whose token keeps them (the anchors live on the members that can), or set store.rollback_anchor: false",
			ErrNoAnchorMember, strings.Join(reasons, "; "))
	}
	return am, nil
}

// Members names the members that keep anchors, in config order.
func (a *AnchorMembers) Members() []string { return memberNames(a.members) }

// ReadAnchors reads the anchors of every member that keeps them (see
// Pool.ReadAnchors).
func (a *AnchorMembers) ReadAnchors(ctx context.Context) []anchor.Found {
	return a.p.readAnchors(ctx, a.members)
}

// WriteAnchor writes an anchor to a member that keeps them (see
// Pool.WriteAnchor).
func (a *AnchorMembers) WriteAnchor(ctx context.Context, member string, w uint64, value []byte) error {
	return a.p.writeAnchor(ctx, a.members, member, w, value)
}
