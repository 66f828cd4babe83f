package hsmpool

import (
	"cmp"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/vault"
)

// ErrKeysExist: Provision found key objects of the version it was asked
// to create; it created nothing.
var ErrKeysExist = errors.New("keys of this version already exist")

// keyVersion1 lists the objects `keys init` creates.
func keyVersion1() []vault.KeyID {
	ids := make([]vault.KeyID, 0, len(vault.Roles))
	for _, r := range vault.Roles {
		ids = append(ids, vault.KeyID{Role: r, Version: 1})
	}
	return ids
}

// Provision creates key version 1 of every role on every member, with the
// same material on all of them, the wrap key of the kind profile needs
// (AES for gcm, generic secret for hmac; "" is DefaultProfile). It
// refuses, creating nothing, if any member already holds any of these keys.
//
// With one member the keys are generated inside the HSM and never exist
// outside it (inHSM is true). Generic PKCS#11 cannot clone a key between
// tokens, so with several members the material is drawn from crypto/rand in
// this process, imported into each member as sensitive, non-extractable
// token objects, and wiped.
func Provision(cfgs []MemberConfig, profile vault.Profile) (inHSM bool, err error) {
	if profile == "" {
		profile = DefaultProfile
	}
	return provisionKeys(cfgs, keyVersion1(), profile)
}

// provisionKeys creates the key objects ids on every member, identical on
// all, as Provision describes; it refuses, creating nothing, if any member
// holds any of them.
func provisionKeys(cfgs []MemberConfig, ids []vault.KeyID, profile vault.Profile) (inHSM bool, err error) {
	if len(cfgs) == 0 {
		return false, errors.New("provision: no members")
	}
	if profile != vault.ProfileGCM && profile != vault.ProfileHMAC {
		return false, fmt.Errorf("provision: unknown profile %q", profile)
	}
	checkAbsent := absent(ids)
	if len(cfgs) == 1 {
		return true, generateInHSM(cfgs[0], ids, profile)
	}
	for _, c := range cfgs {
		if err := withSession(c, func(*pkcs11.Ctx, pkcs11.SessionHandle) error { return nil }, checkAbsent); err != nil {
			return false, err
		}
	}
	material := make(map[vault.KeyID][]byte)
	defer func() {
		for _, b := range material {
			clear(b)
		}
	}()
	for _, id := range ids {
		material[id] = make([]byte, 32)
		rand.Read(material[id])
	}
	for _, c := range cfgs {
		err := withSession(c, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
			for _, id := range ids {
				if _, err := p.CreateObject(s, keyTemplate(id, material[id], profile)); err != nil {
					return fmt.Errorf("import %s: %w", id.Label(), err)
				}
			}
			return nil
		}, checkAbsent)
		if err != nil {
			return false, err
		}
	}
	return false, nil
}

// Rotate creates the next version of the wrap and PIN keys (one number for
// both: the newest of either plus one) on every member, with identical
// material, as Provision does for version 1, the wrap key of the kind
// profile needs ("": the kind of the newest wrap key). It refuses if the
// members do not hold the same key labels (a rotation that failed
// half-way: fix that first), and creates nothing then. The root key is not
// rotated.
func Rotate(cfgs []MemberConfig, profile vault.Profile) (version uint32, inHSM bool, err error) {
	if len(cfgs) == 0 {
		return 0, false, errors.New("rotate: no members")
	}
	var first []vault.KeyID
	var newest vault.Profile // the newest wrap key's, on the first member
	for i, c := range cfgs {
		var ids []vault.KeyID
		err := withSession(c, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
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
	inHSM, err = provisionKeys(cfgs, ids, profile)
	return version, inHSM, err
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

// keyIDsOn lists the keyvault keys on a token by their labels, sorted.
func keyIDsOn(p *pkcs11.Ctx, s pkcs11.SessionHandle) ([]vault.KeyID, error) {
	if err := p.FindObjectsInit(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY)}); err != nil {
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

// keyTemplate is the PKCS#11 template of a key object: a token object,
// sensitive, never extractable, usable only for its own role. Every key is
// an HMAC key, except the wrap key of the gcm profile, an AES key for
// encryption only.
func keyTemplate(id vault.KeyID, value []byte, profile vault.Profile) []*pkcs11.Attribute {
	keyType, crypt, mac := uint(pkcs11.CKK_GENERIC_SECRET), false, true
	if id.Role == vault.RoleWrap && profile == vault.ProfileGCM {
		keyType, crypt, mac = pkcs11.CKK_AES, true, false
	}
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.Label()),
		pkcs11.NewAttribute(pkcs11.CKA_ID, []byte(id.Label())),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, crypt),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, crypt),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, mac),
		pkcs11.NewAttribute(pkcs11.CKA_VERIFY, mac),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
		pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
	}
	if value != nil {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_VALUE, value))
	}
	return t
}

// generateInHSM creates the keys inside the member's token.
func generateInHSM(c MemberConfig, ids []vault.KeyID, profile vault.Profile) error {
	ctx, err := crypto11.Configure(&crypto11.Config{Path: c.Module, TokenLabel: c.TokenLabel, Pin: c.PIN, MaxSessions: 2, GCMIVLength: 12})
	if err != nil {
		return fmt.Errorf("member %s: open token %q: %w", c.Name, c.TokenLabel, scrubPIN(err, c.PIN))
	}
	defer ctx.Close()
	for _, id := range ids {
		ks, err := ctx.FindKeys(nil, []byte(id.Label()))
		if err != nil {
			return fmt.Errorf("member %s: find %s: %w", c.Name, id.Label(), err)
		}
		if len(ks) > 0 {
			return fmt.Errorf("member %s holds %s: %w", c.Name, id.Label(), ErrKeysExist)
		}
	}
	for _, id := range ids {
		attrs, err := crypto11.NewAttributeSetWithIDAndLabel([]byte(id.Label()), []byte(id.Label()))
		if err != nil {
			return err
		}
		attrs.AddIfNotPresent(keyTemplate(id, nil, profile))
		cipher := crypto11.CipherGeneric
		if id.Role == vault.RoleWrap && profile == vault.ProfileGCM {
			cipher = crypto11.CipherAES
		}
		if _, err := ctx.GenerateSecretKeyWithAttributes(attrs, 256, cipher); err != nil {
			return fmt.Errorf("member %s: generate %s: %w", c.Name, id.Label(), err)
		}
	}
	return nil
}

// absent returns a check that fails if the session's token holds any of ids.
func absent(ids []vault.KeyID) func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error {
	return func(p *pkcs11.Ctx, s pkcs11.SessionHandle, member string) error {
		return checkAbsentOf(p, s, member, ids)
	}
}

// checkAbsent fails if the session's token holds any version-1 key.
func checkAbsent(p *pkcs11.Ctx, s pkcs11.SessionHandle, member string) error {
	return checkAbsentOf(p, s, member, keyVersion1())
}

func checkAbsentOf(p *pkcs11.Ctx, s pkcs11.SessionHandle, member string, ids []vault.KeyID) error {
	for _, id := range ids {
		if err := p.FindObjectsInit(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.Label())}); err != nil {
			return fmt.Errorf("member %s: find %s: %w", member, id.Label(), err)
		}
		objs, _, err := p.FindObjects(s, 1)
		if ferr := p.FindObjectsFinal(s); err == nil {
			err = ferr
		}
		if err != nil {
			return fmt.Errorf("member %s: find %s: %w", member, id.Label(), err)
		}
		if len(objs) > 0 {
			return fmt.Errorf("member %s holds %s: %w", member, id.Label(), ErrKeysExist)
		}
	}
	return nil
}

// withSession loads the member's module with miekg/pkcs11 (crypto11 has no
// import call), logs in to its token, runs check then fn, and unloads the
// module again so that crypto11 can initialise it afterwards.
func withSession(c MemberConfig, fn func(*pkcs11.Ctx, pkcs11.SessionHandle) error, check func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error) error {
	p := pkcs11.New(c.Module)
	if p == nil {
		return fmt.Errorf("member %s: cannot load PKCS#11 module %s", c.Name, c.Module)
	}
	defer p.Destroy()
	// If crypto11 has the module loaded in this process already, the
	// library is shared: use it, and leave finalising it to its owner.
	switch err := p.Initialize(); {
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)):
	case err != nil:
		return fmt.Errorf("member %s: initialise module: %w", c.Name, err)
	default:
		defer p.Finalize()
	}
	slots, err := p.GetSlotList(true)
	if err != nil {
		return fmt.Errorf("member %s: list slots: %w", c.Name, err)
	}
	slot, found := uint(0), false
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && ti.Label == c.TokenLabel {
			slot, found = s, true
			break
		}
	}
	if !found {
		return fmt.Errorf("member %s: no token labelled %q", c.Name, c.TokenLabel)
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("member %s: open session: %w", c.Name, err)
	}
	defer p.CloseSession(s)
	switch err := p.Login(s, pkcs11.CKU_USER, c.PIN); {
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_USER_ALREADY_LOGGED_IN)):
		// The library is shared with a crypto11 context of this process:
		// logging out would invalidate its key handles, so stay logged in.
	case err != nil:
		return fmt.Errorf("member %s: log in: %w", c.Name, scrubPIN(err, c.PIN))
	default:
		defer p.Logout(s)
	}
	if err := check(p, s, c.Name); err != nil {
		return err
	}
	return fn(p, s)
}
