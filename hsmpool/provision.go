package hsmpool

import (
	"crypto/rand"
	"errors"
	"fmt"
	"maps"
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
//
// It is all or nothing: if creating the keys fails on one member, what it
// created on every member is destroyed again (see ProvisionError), so a
// run after the fault is mended starts from empty tokens.
func (m *Modules) Provision(cfgs []MemberConfig, profile vault.Profile) (inHSM bool, err error) {
	if profile == "" {
		profile = DefaultProfile
	}
	return m.provisionKeys(cfgs, keyVersion1(), profile)
}

// Provision is Modules.Provision on modules of its own.
func Provision(cfgs []MemberConfig, profile vault.Profile) (inHSM bool, err error) {
	m := NewModules()
	defer m.Close()
	return m.Provision(cfgs, profile)
}

// ProvisionError: creating keys failed on a member, and what this run had
// created was destroyed again (Left is empty), or not all of it could be
// (Left names what remains, by member).
type ProvisionError struct {
	Err  error
	Left map[string][]string
}

func (e *ProvisionError) Error() string {
	if len(e.Left) == 0 {
		return fmt.Sprintf("%v; every key this run created was destroyed again, so no member holds any of them: mend the fault and run it again", e.Err)
	}
	var left []string
	for _, name := range slices.Sorted(maps.Keys(e.Left)) {
		left = append(left, fmt.Sprintf("member %s holds %s", name, strings.Join(e.Left[name], ", ")))
	}
	return fmt.Sprintf("%v; some keys this run created could not be destroyed (%s): destroy them with the HSM's tools before running it again", e.Err, strings.Join(left, "; "))
}

func (e *ProvisionError) Unwrap() error { return e.Err }

// provisionKeys creates the key objects ids on every member, identical on
// all, as Provision describes; it refuses, creating nothing, if any member
// holds any of them.
func (m *Modules) provisionKeys(cfgs []MemberConfig, ids []vault.KeyID, profile vault.Profile) (inHSM bool, err error) {
	if len(cfgs) == 0 {
		return false, errors.New("provision: no members")
	}
	if profile == vault.ProfileGCMHSMIV {
		profile = vault.ProfileGCM // one kind of key: AES
	}
	if profile != vault.ProfileGCM && profile != vault.ProfileHMAC {
		return false, fmt.Errorf("provision: unknown profile %q", profile)
	}
	checkAbsent := absent(ids)
	if len(cfgs) == 1 {
		if _, err := m.use(cfgs[0]); err != nil {
			return true, err
		}
		return true, generateInHSM(cfgs[0], ids, profile)
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
	// Every member's session stays open, and logged in, until the run
	// ends: a failed import destroys what the run created, by handle, on
	// every member, and a private object's handle lasts only as long as
	// the login (SoftHSM drops them at logout). No member is written
	// before every member is found free of the keys.
	opens := make([]*provisionSession, 0, len(cfgs))
	defer func() {
		for _, o := range opens {
			o.end()
		}
	}()
	for _, c := range cfgs {
		p, s, end, err := m.session(c)
		if err != nil {
			return false, err
		}
		opens = append(opens, &provisionSession{member: c.Name, p: p, s: s, end: end})
		if err := checkAbsent(p, s, c.Name); err != nil {
			return false, err
		}
	}
	for i, c := range cfgs {
		o := opens[i]
		for _, id := range ids {
			if m.failImport != nil {
				if err := m.failImport(c.Name, id); err != nil {
					return false, undo(ids, opens, fmt.Errorf("member %s: import %s: %w", c.Name, id.Label(), err))
				}
			}
			h, err := o.p.CreateObject(o.s, keyTemplate(id, material[id], profile))
			if err != nil {
				return false, undo(ids, opens, fmt.Errorf("member %s: import %s: %w", c.Name, id.Label(), err))
			}
			o.created = append(o.created, h)
		}
	}
	return false, nil
}

// provisionSession is one member's logged-in session during a
// provisioning run, with the objects the run created there, in the order
// of the run's key IDs.
type provisionSession struct {
	member  string
	p       *pkcs11.Ctx
	s       pkcs11.SessionHandle
	end     func()
	created []pkcs11.ObjectHandle
}

// undo destroys the objects created on each member's still open session
// after err stopped a provisioning run, and says what is left.
func undo(ids []vault.KeyID, opens []*provisionSession, err error) error {
	pe := &ProvisionError{Err: err, Left: map[string][]string{}}
	for _, o := range opens {
		for i, h := range o.created {
			if derr := o.p.DestroyObject(o.s, h); derr != nil {
				pe.Left[o.member] = append(pe.Left[o.member], ids[i].Label())
			}
		}
	}
	return pe
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
		ks, err := tokenKeysLabelled(ctx, id)
		if err != nil {
			return fmt.Errorf("member %s: %w", c.Name, err)
		}
		if len(ks) > 0 {
			return fmt.Errorf("member %s holds %s: %w", c.Name, id.Label(), ErrKeysExist)
		}
	}
	// All or nothing, as with several members: a failure destroys the
	// keys generated before it.
	var made []*crypto11.SecretKey
	fail := func(err error) error {
		pe := &ProvisionError{Err: err, Left: map[string][]string{}}
		for i, k := range made {
			if derr := k.Delete(); derr != nil {
				pe.Left[c.Name] = append(pe.Left[c.Name], ids[i].Label())
			}
		}
		return pe
	}
	for _, id := range ids {
		attrs, err := crypto11.NewAttributeSetWithIDAndLabel([]byte(id.Label()), []byte(id.Label()))
		if err != nil {
			return fail(err)
		}
		attrs.AddIfNotPresent(keyTemplate(id, nil, profile))
		cipher := crypto11.CipherGeneric
		if id.Role == vault.RoleWrap && profile == vault.ProfileGCM {
			cipher = crypto11.CipherAES
		}
		k, err := ctx.GenerateSecretKeyWithAttributes(attrs, 256, cipher)
		if err != nil {
			return fail(fmt.Errorf("member %s: generate %s: %w", c.Name, id.Label(), err))
		}
		made = append(made, k)
	}
	return nil
}

// absent returns a check that fails if the session's token holds any of ids.
func absent(ids []vault.KeyID) func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error {
	return func(p *pkcs11.Ctx, s pkcs11.SessionHandle, member string) error {
		return checkAbsentOf(p, s, member, ids)
	}
}

func checkAbsentOf(p *pkcs11.Ctx, s pkcs11.SessionHandle, member string, ids []vault.KeyID) error {
	for _, id := range ids {
		if err := p.FindObjectsInit(s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_LABEL, id.Label())}); err != nil {
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
