package hsmpool

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/keyvault/keyvault/anchor"
)

// anchorKeeper is a token that can keep anchor objects. Tokens that tests
// inject need not be one.
type anchorKeeper interface {
	// ReadAnchors returns every anchor the token holds.
	ReadAnchors() ([][]byte, error)
	// WriteAnchor stores value, the anchor with write number w, so that
	// it and at least the anchor written before it can be read back, even
	// if the process dies during the write. It refuses a w not above the
	// last one it wrote: a write abandoned after its timeout may still run
	// later, and must not take the member's anchor backwards.
	WriteAnchor(ctx context.Context, w uint64, value []byte) error
}

// errNoAnchors: the member's token cannot keep anchor objects.
var errNoAnchors = errors.New("this member's token keeps no anchor objects")

// Members names the configured members, in config order.
func (p *Pool) Members() []string { return memberNames(p.members) }

func memberNames(ms []*member) []string {
	names := make([]string, len(ms))
	for i, m := range ms {
		names[i] = m.name
	}
	return names
}

// ReadAnchors reads the anchor objects of every configured member, healthy
// or not: a member that does not answer is reported with its error, never
// left out, so that the start-up check knows who was silent.
func (p *Pool) ReadAnchors(ctx context.Context) []anchor.Found { return p.readAnchors(ctx, p.members) }

func (p *Pool) readAnchors(ctx context.Context, members []*member) []anchor.Found {
	found := make([]anchor.Found, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		wg.Go(func() {
			found[i] = anchor.Found{Member: m.name}
			err := p.onMember(ctx, m, "anchor_read", func(k anchorKeeper) error {
				var err error
				found[i].Values, err = k.ReadAnchors()
				return err
			})
			if err != nil {
				found[i] = anchor.Found{Member: m.name, Err: err}
			}
		})
	}
	wg.Wait()
	return found
}

// WriteAnchor writes value, the anchor with write number w, as the anchor
// of the named member.
func (p *Pool) WriteAnchor(ctx context.Context, member string, w uint64, value []byte) error {
	return p.writeAnchor(ctx, p.members, member, w, value)
}

func (p *Pool) writeAnchor(ctx context.Context, members []*member, member string, w uint64, value []byte) error {
	for _, m := range members {
		if m.name == member {
			return p.onMember(ctx, m, "anchor_write", func(k anchorKeeper) error { return k.WriteAnchor(ctx, w, value) })
		}
	}
	return fmt.Errorf("write anchor: no anchor-keeping member named %q", member)
}

// onMember runs an anchor call on one member with a session slot, the
// operation timeout and the pool's metrics. A failed call does not fail
// the member: whether a silent member is dropped from the live set is the
// anchor writer's decision, and its keys judge its health. So a failed
// call asks the token's keys, which key operations served from session
// copies no longer touch: if they do not answer either (the token is
// gone), the member is taken out, as a key operation would have taken it
// out.
//
// It waits for a session as long as ctx allows, not QueueTimeout: shedding
// is for requests, and an anchor write that lost its place to them would
// hold back every answer of its batch, or drop a healthy member from the
// live set.
func (p *Pool) onMember(ctx context.Context, m *member, op string, fn func(anchorKeeper) error) error {
	select {
	case m.sessions <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("member %s: %s: waiting for a session: %w", m.name, op, ctx.Err())
	}
	_, err := p.run(ctx, m, op, func(_ *member, st *tokenState) ([]byte, error) {
		if st == nil || st.tok == nil {
			return nil, errNoToken
		}
		if b, ok := st.tok.(brokenToken); ok {
			// Not open: a silent member, whose anchors are unknown.
			return nil, b.err()
		}
		k, ok := st.tok.(anchorKeeper)
		if !ok {
			return nil, errNoAnchors
		}
		err := fn(k)
		if c, ok := st.tok.(tokenKeyChecker); ok && err != nil {
			if kerr := c.checkTokenKeys(); kerr != nil {
				return nil, &tokenKeysLost{anchor: err, keys: kerr}
			}
		}
		return nil, err
	})
	if lost := (*tokenKeysLost)(nil); errors.As(err, &lost) {
		p.fail(m, op, lost.keys)
		err = lost.anchor
	}
	if err != nil {
		return fmt.Errorf("member %s: %s: %w", m.name, op, err)
	}
	return nil
}

// tokenKeysLost: an anchor call failed, and the token's keys do not
// answer either.
type tokenKeysLost struct{ anchor, keys error }

func (e *tokenKeysLost) Error() string {
	return fmt.Sprintf("%v (and the token keys: %v)", e.anchor, e.keys)
}

// anchorProber is a token that can say whether it keeps anchor objects.
// Anchor keepers that tests inject need not be one; they are taken as able.
type anchorProber interface {
	ProbeAnchors(ctx context.Context) error
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
// may be served without it is the rollback check's decision. A member
// whose token is not open (it failed to open or to be admitted) is such a
// silent member. It fails with ErrNoAnchorMember, naming each refusal and
// the ways out, if every member is refused, or if every member it would
// keep is one that is not open: then no member can answer the rollback
// check, and the refusal names why each is not open.
func (p *Pool) AnchorMembers(ctx context.Context) (*AnchorMembers, error) {
	refusals := make([]*NoAnchorsError, len(p.members))
	notOpen := make([]error, len(p.members))
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
			case errors.Is(err, errNoToken):
				notOpen[i] = err
			}
		})
	}
	wg.Wait()
	am := &AnchorMembers{p: p}
	var reasons, silent []string
	for i, m := range p.members {
		if refusals[i] != nil {
			am.Refused = append(am.Refused, refusals[i])
			reasons = append(reasons, refusals[i].Error())
			continue
		}
		if notOpen[i] != nil {
			// err names the member already.
			reasons = append(reasons, fmt.Sprintf("%v, so whether its token keeps them is unknown", notOpen[i]))
			silent = append(silent, m.name)
		}
		am.members = append(am.members, m)
	}
	switch {
	case len(am.members) == 0:
		return nil, fmt.Errorf("%w, and none does: %s; add a member whose token keeps them (the anchors live on the members that can), or set store.rollback_anchor: false",
			ErrNoAnchorMember, strings.Join(reasons, "; "))
	case len(silent) == len(am.members):
		return nil, fmt.Errorf("%w, and none that is open does: %s; bring member %s back, add a member whose token keeps them, or set store.rollback_anchor: false",
			ErrNoAnchorMember, strings.Join(reasons, "; "), strings.Join(silent, ", member "))
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
