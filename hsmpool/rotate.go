package hsmpool

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/vault"
)

// Rotate creates the next version of the wrap and PIN keys (one number for
// both: the newest of either plus one) on every member, with identical
// material, as Provision does for version 1, the wrap key of the kind
// profile needs ("": the kind of the newest wrap key). It refuses if the
// members do not hold the same key labels (a rotation that failed
// half-way: fix that first), and creates nothing then. The root key is not
// rotated. Like Provision it is all or nothing.
func (m *Modules) Rotate(cfgs []MemberConfig, profile vault.Profile) (version uint32, inHSM bool, err error) {
	if len(cfgs) == 0 {
		return 0, false, errors.New("rotate: no members")
	}
	var first []vault.KeyID
	var newest vault.Profile // the newest wrap key's, on the first member
	for i, c := range cfgs {
		var ids []vault.KeyID
		err := m.withSession(c, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
			var err error
			if ids, err = keyIDsOn(p, s); err != nil || i > 0 {
				return err
			}
			newest, err = newestWrapProfile(p, s, ids)
			return err
		}, func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error { return nil })
		if err != nil {
			return 0, false, err
		}
		if i == 0 {
			first = ids
		} else if !slices.Equal(first, ids) {
			return 0, false, fmt.Errorf("rotate: member %s holds %s but member %s holds %s; every member must hold the same keys first",
				cfgs[0].Name, labels(first), c.Name, labels(ids))
		}
	}
	for _, id := range first {
		if id.Role != vault.RoleRoot {
			version = max(version, id.Version)
		}
	}
	if version == 0 {
		return 0, false, errors.New("rotate: no wrap or PIN key yet (run keyvault keys init)")
	}
	version++
	if profile == "" {
		profile = newest
	}
	ids := []vault.KeyID{{Role: vault.RoleWrap, Version: version}, {Role: vault.RolePIN, Version: version}}
	inHSM, err = m.provisionKeys(cfgs, ids, profile)
	return version, inHSM, err
}

// Rotate is Modules.Rotate on modules of its own.
func Rotate(cfgs []MemberConfig, profile vault.Profile) (version uint32, inHSM bool, err error) {
	m := NewModules()
	defer m.Close()
	return m.Rotate(cfgs, profile)
}

// newestWrapProfile reads the profile of the newest wrap key among ids
// from its key type ("" if there is none).
func newestWrapProfile(p *pkcs11.Ctx, s pkcs11.SessionHandle, ids []vault.KeyID) (vault.Profile, error) {
	var id vault.KeyID
	for _, k := range ids {
		if k.Role == vault.RoleWrap && k.Version > id.Version {
			id = k
		}
	}
	if id.Version == 0 {
		return "", nil
	}
	objs, err := findObjects(p, s, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.Label()),
	})
	if err != nil || len(objs) != 1 {
		return "", fmt.Errorf("find %s: %d objects (%v)", id.Label(), len(objs), err)
	}
	a, err := p.GetAttributeValue(s, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, nil)})
	if err != nil || len(a) != 1 {
		return "", fmt.Errorf("key type of %s: %v", id.Label(), err)
	}
	kt, ok := ulongOf(a[0].Value)
	if !ok {
		return "", fmt.Errorf("key type of %s: %d bytes", id.Label(), len(a[0].Value))
	}
	return wrapProfileOf(id, kt)
}

// keyIDsOn lists the keyvault keys on a token by their labels, sorted:
// token objects, not the session copies a pool in this process serves
// with.
func keyIDsOn(p *pkcs11.Ctx, s pkcs11.SessionHandle) ([]vault.KeyID, error) {
	if err := p.FindObjectsInit(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true)}); err != nil {
		return nil, fmt.Errorf("list keys: %w", err)
	}
	var objs []pkcs11.ObjectHandle
	for {
		batch, _, err := p.FindObjects(s, 100)
		if err != nil {
			_ = p.FindObjectsFinal(s)
			return nil, fmt.Errorf("list keys: %w", err)
		}
		if len(batch) == 0 {
			break
		}
		objs = append(objs, batch...)
	}
	if err := p.FindObjectsFinal(s); err != nil {
		return nil, fmt.Errorf("list keys: %w", err)
	}
	var ids []vault.KeyID
	for _, o := range objs {
		a, err := p.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
		if err != nil || len(a) == 0 {
			continue
		}
		if id, ok := parseLabel(string(a[0].Value)); ok {
			ids = append(ids, id)
		}
	}
	slices.SortFunc(ids, func(a, b vault.KeyID) int {
		return cmp.Or(cmp.Compare(a.Role, b.Role), cmp.Compare(a.Version, b.Version))
	})
	return ids, nil
}

func labels(ids []vault.KeyID) string {
	out := make([]string, len(ids))
	for i, id := range ids {
		out[i] = id.Label()
	}
	return "[" + strings.Join(out, " ") + "]"
}
