package hsmpool

import (
	"errors"
	"fmt"
	"maps"

	"github.com/keyvault/keyvault/vault"
)

// refresher is a token that can look its keys up again (p11Token).
type refresher interface {
	refreshed() (token, error)
	without(ids ...vault.KeyID) token
	destroy(id vault.KeyID) (bool, error)
}

// Reload looks every member's keys up again and starts using the key
// versions found, for new records, once every member holds them with the
// same check values. It refuses, changing nothing, if a member is out of
// service (its keys cannot be checked), if the members differ, or if a key
// the pool uses is gone or changed. Requests in flight keep their member
// state; new ones see the new keys. It returns the newest versions.
func (p *Pool) Reload() (map[vault.KeyRole]uint32, error) {
	p.rotateMu.Lock()
	defer p.rotateMu.Unlock()
	cur := p.keys.Load()
	olds := make([]*tokenState, len(p.members))
	news := make([]*tokenState, len(p.members))
	var ref map[vault.KeyID][]byte
	for i, m := range p.members {
		if !m.healthy.Load() {
			return nil, fmt.Errorf("reload: member %s is out of service, and every member must hold a key version before it is used", m.name)
		}
		olds[i] = m.state()
		r, ok := olds[i].tok.(refresher)
		if !ok {
			return nil, fmt.Errorf("reload: member %s cannot look its keys up again", m.name)
		}
		t, err := r.refreshed()
		if err != nil {
			return nil, fmt.Errorf("reload: member %s: %w", m.name, err)
		}
		st, err := admit(t, nil)
		if err != nil {
			return nil, fmt.Errorf("reload: member %s: %w", m.name, err)
		}
		for id, want := range cur.ref {
			if got, ok := st.kcvs[id]; !ok || string(got) != string(want) {
				return nil, fmt.Errorf("reload: member %s: %w: %s is gone or changed (retire versions with keys retire)", m.name, errKeyMismatch, id.Label())
			}
		}
		if ref == nil {
			ref = st.kcvs
		} else if err := sameKeys(ref, st.kcvs); err != nil {
			return nil, fmt.Errorf("reload: member %s: %w", m.name, err)
		}
		news[i] = st
	}
	if err := p.install(olds, news); err != nil {
		return nil, fmt.Errorf("reload: %w", err)
	}
	// Members first, then the versions: by the time a request seals under
	// a new version, every member's state holds it.
	ks := newKeySet(ref)
	p.keys.Store(ks)
	for id := range ref {
		if _, ok := cur.ref[id]; !ok {
			p.log.Info("HSM key version in use on every member", "key", id.Label())
		}
	}
	return maps.Clone(ks.versions), nil
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
	ids := []vault.KeyID{{Role: vault.RoleWrap, Version: version}, {Role: vault.RolePIN, Version: version}}
	for _, id := range ids {
		if version == 0 || version >= cur.versions[id.Role] {
			return nil, fmt.Errorf("retire %s: %w", id.Label(), ErrNewest)
		}
	}
	olds := make([]*tokenState, len(p.members))
	news := make([]*tokenState, len(p.members))
	for i, m := range p.members {
		if !m.healthy.Load() {
			return nil, fmt.Errorf("retire: member %s is out of service; the version must go from every member at once", m.name)
		}
		olds[i] = m.state()
		r, ok := olds[i].tok.(refresher)
		if !ok {
			return nil, fmt.Errorf("retire: member %s cannot destroy keys", m.name)
		}
		st := &tokenState{tok: r.without(ids...), kcvs: maps.Clone(olds[i].kcvs), selfTests: maps.Clone(olds[i].selfTests)}
		for _, id := range ids {
			delete(st.kcvs, id)
		}
		delete(st.selfTests, version)
		news[i] = st
	}
	ref := maps.Clone(cur.ref)
	for _, id := range ids {
		delete(ref, id)
	}
	if err := p.install(olds, news); err != nil {
		return nil, fmt.Errorf("retire: %w", err)
	}
	p.keys.Store(newKeySet(ref))

	destroyed := map[string][]string{}
	var errs []error
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

// without returns a view of the token without the keys ids, sharing its
// context: Retire stops using them before it destroys them.
func (t *p11Token) without(ids ...vault.KeyID) token {
	n := &p11Token{ctx: t.ctx, raw: t.raw, keys: maps.Clone(t.keys), handles: maps.Clone(t.handles), anchorObjs: t.anchorObjs, name: t.name, label: t.label}
	for _, id := range ids {
		delete(n.keys, id)
		delete(n.handles, id)
	}
	return n
}

var _ refresher = (*p11Token)(nil)
