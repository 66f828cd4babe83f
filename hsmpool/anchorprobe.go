package hsmpool

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"
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
