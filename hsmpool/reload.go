package hsmpool

import (
	"errors"
	"fmt"
	"maps"

	"github.com/keyvault/keyvault/vault"
)

// refresher is a token that can look its keys up again (p11Token).
type refresher interface {
	refreshed() (t token, copyLeft bool, err error)
	recopied() (token, error)
	without(ids ...vault.KeyID) token
	destroy(id vault.KeyID) (bool, error)
}

// dropper is a view of a token that holds something of its own (the
// session copies of its keys) until the pool lets go of it: after
// another view took its place, or when it never took one. drop reports
// what it could not let go of; if operations on the view outlast its
// wait, late, if not nil, gets what letting go met once they end.
type dropper interface {
	drop(late func(error)) error
}

// dropStates lets go of the views of states (nil ones skipped) that the
// pool never put in use.
func dropStates(states ...*tokenState) error {
	var errs []error
	for _, st := range states {
		if st == nil {
			continue
		}
		if d, ok := st.tok.(dropper); ok {
			errs = append(errs, d.drop(nil))
		}
	}
	return errors.Join(errs...)
}

// dropServed lets go of old, a view of m that served until another took
// its place. Should its operations outlast drop's wait, and letting go
// of its copies then leave one the token would not destroy, m's view is
// renewed then (renewLate), as letGo renews it.
func (p *Pool) dropServed(m *member, old *tokenState) error {
	if d, ok := old.tok.(dropper); ok {
		return d.drop(func(err error) { p.renewLate(m, err) })
	}
	return nil
}

// letGo drops the old state of a member after Reload, Retire or Forget
// put st in its place. If a copy of the old state's keys could not be
// destroyed, the member's view is made again (renew), so that no view
// holds a copy on the session that keeps it any longer and that session
// is closed: the error says what happened.
func (p *Pool) letGo(m *member, old, st *tokenState) error {
	err := p.dropServed(m, old)
	if err == nil {
		return nil
	}
	if !errors.Is(err, errCopyLeft) {
		return fmt.Errorf("member %s: %w", m.name, err)
	}
	if rerr := p.renew(m, st); rerr != nil {
		return fmt.Errorf("member %s: %w (and making its copies again on a new session: %w)", m.name, err, rerr)
	}
	return fmt.Errorf("member %s: %w (then its copies were made again on a new session, and closing the old one destroyed them)", m.name, err)
}

// renewLate is letGo for a view whose copies were let go after drop
// stopped waiting for its operations, err what that met: it logs it,
// and renews the member's current view if a copy the token would not
// destroy is left. A member out of service is left to its re-open,
// which closes the token's sessions, and a closed pool to its Close.
func (p *Pool) renewLate(m *member, err error) {
	if err == nil {
		return
	}
	const msg = "HSM session copies of a dropped view were not all destroyed after its last operation"
	if !errors.Is(err, errCopyLeft) {
		p.log.Warn(msg, "member", m.name, "error", err.Error())
		return
	}
	p.rotateMu.Lock()
	defer p.rotateMu.Unlock()
	p.mu.Lock()
	closed := p.closed
	p.mu.Unlock()
	if closed || !m.healthy.Load() {
		p.log.Warn(msg, "member", m.name, "error", err.Error())
		return
	}
	if rerr := p.renew(m, m.state()); rerr != nil {
		p.log.Warn(msg, "member", m.name, "error", fmt.Errorf("%w (and making its copies again on a new session: %w)", err, rerr).Error())
		return
	}
	p.noteCopies(m, m.state().tok)
	p.log.Warn(msg+"; its copies were made again on a new session, and closing the old one destroyed them", "member", m.name, "error", err.Error())
}

// renew puts a view of the member's token over st's keys, with copies
// made on a session without undestroyed objects, in place of st, and
// drops st. The caller holds rotateMu, and has stored the pool's keys.
func (p *Pool) renew(m *member, st *tokenState) error {
	r, ok := st.tok.(refresher)
	if !ok {
		return nil
	}
	t, err := r.recopied()
	if err != nil {
		return err
	}
	n, err := admit(t, p.ref())
	if err == nil && !m.st.CompareAndSwap(st, n) {
		err = errors.New("the member changed state meanwhile")
	}
	if err != nil {
		if d, ok := t.(dropper); ok {
			err = errors.Join(err, d.drop(nil))
		}
		return err
	}
	return p.dropServed(m, st)
}

// Reload looks every member's keys up again and starts using the key
// versions found, for new records, once every member holds them with the
// same check values. It refuses, changing nothing, if a member is out of
// service (its keys cannot be checked), if the members differ, or if a key
// the pool uses is gone or changed, except a wrap or PIN version that
// every member has lost while holding a newer one: another node sharing
// the members retired it, and the pool lets it go. Requests in flight keep
// their member state; new ones see the new keys. It returns the newest
// versions.
func (p *Pool) Reload() (map[vault.KeyRole]uint32, error) {
	p.rotateMu.Lock()
	defer p.rotateMu.Unlock()
	return p.reload(nil, nil)
}

// reload is Reload; probing, if not nil, is a member out of service whose
// freshly opened token fresh takes part in place of a look-up, so that a
// member that lost a retired version comes back with the newer one
// instead of staying out for a key mismatch. The caller holds rotateMu.
func (p *Pool) reload(probing *member, fresh token) (_ map[vault.KeyRole]uint32, err error) {
	cur := p.keys.Load()
	olds := make([]*tokenState, len(p.members))
	news := make([]*tokenState, len(p.members))
	// The views looked up here hold copies of their keys: those that do
	// not take their member's place are dropped. fresh is the caller's to
	// close.
	var refreshed []token
	defer func() {
		if err != nil {
			for _, t := range refreshed {
				if d, ok := t.(dropper); ok {
					if derr := d.drop(nil); derr != nil {
						err = fmt.Errorf("%w (and %w)", err, derr)
					}
				}
			}
		}
	}()
	for i, m := range p.members {
		olds[i] = m.state()
		t := fresh
		if m != probing {
			if !m.healthy.Load() {
				return nil, fmt.Errorf("reload: member %s is out of service, and every member must hold a key version before it is used", m.name)
			}
			r, ok := olds[i].tok.(refresher)
			if !ok {
				return nil, fmt.Errorf("reload: member %s cannot look its keys up again", m.name)
			}
			var copyLeft bool
			var err error
			if t, copyLeft, err = r.refreshed(); err != nil {
				return nil, fmt.Errorf("reload: member %s: %w", m.name, err)
			}
			refreshed = append(refreshed, t)
			if copyLeft {
				// A refused copy stays, readable perhaps, on a session
				// the member's view holds copies on. Copies are off on
				// the token now: the member serves with its token keys
				// from here, whatever becomes of this reload, and
				// dropping its view closes that session.
				if err := p.renew(m, olds[i]); err != nil {
					p.log.Warn("HSM reload: a refused session copy is left on the token until the member's view is dropped", "member", m.name, "error", err.Error())
				}
				olds[i] = m.state()
				p.noteCopies(m, olds[i].tok)
			}
		}
		st, err := admit(t, nil)
		if err != nil {
			return nil, fmt.Errorf("reload: member %s: %w", m.name, err)
		}
		news[i] = st
	}
	for id, want := range cur.ref {
		held := 0
		for i, st := range news {
			got, ok := st.kcvs[id]
			if ok && string(got) != string(want) {
				return nil, fmt.Errorf("reload: member %s: %w: %s changed", p.members[i].name, errKeyMismatch, id.Label())
			}
			if ok {
				held++
			}
		}
		if held == len(news) || held == 0 && retiredElsewhere(id, news) {
			continue
		}
		return nil, fmt.Errorf("reload: %w: %s is gone from %d of %d members (retire versions with keys retire)", errKeyMismatch, id.Label(), len(news)-held, len(news))
	}
	ref := news[0].kcvs
	for i, st := range news[1:] {
		if err := sameKeys(ref, st.kcvs); err != nil {
			return nil, fmt.Errorf("reload: member %s: %w", p.members[i+1].name, err)
		}
	}
	ks := newKeySet(ref, wrapProfiles(news[0].tok))
	if err := checkProfile(p.opts.Profile, ks); err != nil {
		return nil, fmt.Errorf("reload: %w", err)
	}
	if err := p.install(olds, news); err != nil {
		return nil, fmt.Errorf("reload: %w", err)
	}
	// Members first, then the versions: by the time a request seals under
	// a new version, every member's state holds it.
	p.keys.Store(ks)
	for i, m := range p.members {
		if err := p.letGo(m, olds[i], news[i]); err != nil {
			// The new keys serve.
			p.log.Warn("HSM reload: session copies of the keys no longer used were not all destroyed", "error", err.Error())
		}
		p.noteCopies(m, m.state().tok)
	}
	for id := range ref {
		if _, ok := cur.ref[id]; !ok {
			p.log.Info("HSM key version in use on every member", "key", id.Label())
		}
	}
	for id := range cur.ref {
		if _, ok := ref[id]; !ok {
			p.log.Info("HSM key version gone from every member, retired by another node: no longer used", "key", id.Label())
		}
	}
	return maps.Clone(ks.versions), nil
}

// retiredElsewhere reports whether id, gone from every member, may be let
// go: a wrap or PIN key of which every member holds a newer version. A
// root key, or the only version of a role, is never let go.
func retiredElsewhere(id vault.KeyID, states []*tokenState) bool {
	if id.Role != vault.RoleWrap && id.Role != vault.RolePIN {
		return false
	}
	for _, st := range states {
		newer := false
		for got := range st.kcvs {
			newer = newer || got.Role == id.Role && got.Version > id.Version
		}
		if !newer {
			return false
		}
	}
	return true
}

// install swaps each member's state from olds to news. If a member changed
// meanwhile (it failed and a probe took it), the swaps done are undone.
func (p *Pool) install(olds, news []*tokenState) error {
	for i, m := range p.members {
		if !m.st.CompareAndSwap(olds[i], news[i]) {
			for j := range i {
				p.members[j].st.CompareAndSwap(news[j], olds[j])
			}
			return fmt.Errorf("member %s changed state meanwhile; try again", m.name)
		}
	}
	return nil
}

// ErrNewest: Retire was asked to destroy the version new records use.
var ErrNewest = errors.New("the newest key version cannot be retired")

// Retire stops using version of the wrap and PIN keys and destroys both
// key objects on every member, then looks them up afresh to make sure they
// are gone. The caller must have made sure that no record uses the version
// (vault.RetireKeys does). It refuses the newest version, and refuses if a
// member is out of service: a member that came back still holding the
// version would differ from the others. Retiring a version already gone
// destroys whatever copies remain. It returns the labels destroyed, by
// member.
func (p *Pool) Retire(version uint32) (map[string][]string, error) {
	p.rotateMu.Lock()
	defer p.rotateMu.Unlock()
	cur := p.keys.Load()
	ids := retireIDs(version)
	if err := cur.refuseNewest("retire", ids); err != nil {
		return nil, err
	}
	olds := make([]*tokenState, len(p.members))
	news := make([]*tokenState, len(p.members))
	for i, m := range p.members {
		if !m.healthy.Load() {
			return nil, errors.Join(fmt.Errorf("retire: member %s is out of service; the version must go from every member at once", m.name), dropStates(news...))
		}
		olds[i] = m.state()
		if _, ok := olds[i].tok.(refresher); !ok {
			return nil, errors.Join(fmt.Errorf("retire: member %s cannot destroy keys", m.name), dropStates(news...))
		}
		news[i] = olds[i].without(version)
	}
	ref := maps.Clone(cur.ref)
	for _, id := range ids {
		delete(ref, id)
	}
	if err := p.install(olds, news); err != nil {
		return nil, errors.Join(fmt.Errorf("retire: %w", err), dropStates(news...))
	}
	p.keys.Store(newKeySet(ref, cur.profiles))
	// No view that serves the version is left: its copies are destroyed
	// now, before the token keys.
	var errs []error
	for i, m := range p.members {
		if err := p.letGo(m, olds[i], news[i]); err != nil {
			errs = append(errs, err)
		}
	}

	destroyed := map[string][]string{}
	for i, m := range p.members {
		r := olds[i].tok.(refresher)
		for _, id := range ids {
			found, err := r.destroy(id)
			if err != nil {
				errs = append(errs, fmt.Errorf("member %s: %w", m.name, err))
				continue
			}
			if found {
				destroyed[m.name] = append(destroyed[m.name], id.Label())
			}
			// A fresh look-up must not find it any more.
			if again, err := r.destroy(id); err != nil || again {
				errs = append(errs, fmt.Errorf("member %s: %s still found after destroying it (%v)", m.name, id.Label(), err))
			}
		}
		p.log.Info("HSM key version destroyed", "member", m.name, "version", version)
	}
	if err := errors.Join(errs...); err != nil {
		return destroyed, fmt.Errorf("retire version %d: %w", version, err)
	}
	return destroyed, nil
}

// Forget stops using version of the wrap and PIN keys, without destroying
// them: another node sharing the members is retiring it. A member out of
// service is left as it is; it comes back against the pool's keys, which
// lack the version. It refuses the newest version.
func (p *Pool) Forget(version uint32) error {
	p.rotateMu.Lock()
	defer p.rotateMu.Unlock()
	cur := p.keys.Load()
	ids := retireIDs(version)
	if err := cur.refuseNewest("forget", ids); err != nil {
		return err
	}
	ref := maps.Clone(cur.ref)
	for _, id := range ids {
		delete(ref, id)
	}
	// The version is not the newest, so no new record needs it: the
	// pool lets go of it before the members do.
	p.keys.Store(newKeySet(ref, cur.profiles))
	var errs []error
	for _, m := range p.members {
		for {
			old := m.state()
			if _, ok := old.tok.(refresher); !ok {
				break
			}
			n := old.without(version)
			if m.st.CompareAndSwap(old, n) {
				if err := p.letGo(m, old, n); err != nil {
					errs = append(errs, err)
				}
				break
			}
			if err := dropStates(n); err != nil {
				errs = append(errs, fmt.Errorf("member %s: %w", m.name, err))
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("forget version %d: %w", version, err)
	}
	return nil
}

func retireIDs(version uint32) []vault.KeyID {
	return []vault.KeyID{{Role: vault.RoleWrap, Version: version}, {Role: vault.RolePIN, Version: version}}
}

// without returns the state with the wrap and PIN keys of version out of
// use: its token a view without them, sharing the context.
func (st *tokenState) without(version uint32) *tokenState {
	ids := retireIDs(version)
	n := &tokenState{tok: st.tok.(refresher).without(ids...), kcvs: maps.Clone(st.kcvs), selfTests: maps.Clone(st.selfTests)}
	for _, id := range ids {
		delete(n.kcvs, id)
	}
	delete(n.selfTests, version)
	return n
}

// refuseNewest refuses, for op, to let go of ids when one of them is of
// version 0 or of the newest version of its role (ErrNewest).
func (ks *keySet) refuseNewest(op string, ids []vault.KeyID) error {
	for _, id := range ids {
		if id.Version == 0 || id.Version >= ks.versions[id.Role] {
			return fmt.Errorf("%s %s: %w", op, id.Label(), ErrNewest)
		}
	}
	return nil
}
