package hsmpool

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/hsmpool/internal/p11raw"
	"github.com/keyvault/keyvault/vault"
)

// Tokens differ in what they can do, so the pool asks each one before it
// serves instead of finding out from failed requests: first the mechanism
// list, then known-answer operations under session keys (destroyed with
// the session), compared with Go's own HMAC and GCM.

// MechanismCheck is one mechanism the vault uses and what the token says
// of it.
type MechanismCheck struct {
	Name  string
	Code  uint
	Needs uint // the CKF_ flags the vault uses it with
	// Present: the token lists the mechanism; Flags: what it says the
	// mechanism does.
	Present bool
	Flags   uint
}

// lacks says what the token lacks of the mechanism, for a refusal.
func (m MechanismCheck) lacks() string {
	if !m.Present {
		return fmt.Sprintf("lacks %s (%#x)", m.Name, m.Code)
	}
	return fmt.Sprintf("offers %s (%#x) but not for %s", m.Name, m.Code, flagNames(m.Needs&^m.Flags))
}

// OK reports whether the token lists the mechanism with every flag needed.
func (m MechanismCheck) OK() bool { return m.Present && m.Flags&m.Needs == m.Needs }

func (m MechanismCheck) String() string {
	switch {
	case !m.Present:
		return fmt.Sprintf("%s (%#x): absent", m.Name, m.Code)
	case !m.OK():
		return fmt.Sprintf("%s (%#x): present, but not for %s", m.Name, m.Code, flagNames(m.Needs&^m.Flags))
	}
	return fmt.Sprintf("%s (%#x): %s", m.Name, m.Code, flagNames(m.Needs))
}

func flagNames(f uint) string {
	var out []string
	for _, n := range []struct {
		f    uint
		name string
	}{{pkcs11.CKF_ENCRYPT, "encrypt"}, {pkcs11.CKF_DECRYPT, "decrypt"}, {pkcs11.CKF_SIGN, "sign"}, {pkcs11.CKF_GENERATE, "generate"}} {
		if f&n.f != 0 {
			out = append(out, n.name)
		}
	}
	return strings.Join(out, ", ")
}

// DefaultProfile is the profile keys init makes keys for when the config
// names none: hmac needs only HMAC-SHA256 under a generic secret key,
// which every HSM keyvault fronts has, so a pool may later take any of
// them as a member without moving its records (docs/hsm.md argues it).
const DefaultProfile = vault.ProfileHMAC

// Capabilities is what a token can do of what the vault needs.
type Capabilities struct {
	Member, Token       string
	Manufacturer, Model string
	// Profile is the profile the verdict is for: the configured one, or
	// the newest wrap key's, or DefaultProfile on a token without keys.
	Profile vault.Profile
	// GCMFor names the wrap keys of the gcm profile the token holds,
	// whose records need its GCM whatever the profile.
	GCMFor               []string
	GCM, HMAC            MechanismCheck // serving: seal and open, PIN checks
	AESKeyGen, SecretGen MechanismCheck // keys init with one member
	// Import is "yes" when the token took key material as a sensitive
	// session key (keys init with several members imports), else why not.
	Import string
	// KnownAnswerHMAC and KnownAnswerGCM say how the known-answer tests
	// went: "matches Go's crypto", or what failed, or why none ran.
	KnownAnswerHMAC, KnownAnswerGCM string
	// SessionCopies says whether the token serves its keys from session
	// copies: "yes", "no (why)", or "not tried (why)". Either way it
	// can serve; copies are faster on some tokens.
	SessionCopies string
}

// Write prints the capabilities, one per line, indented.
func (c *Capabilities) Write(w io.Writer) {
	fmt.Fprintf(w, "  token %q (%s, %s)\n", c.Token, c.Manufacturer, c.Model)
	for _, m := range []MechanismCheck{c.GCM, c.HMAC, c.AESKeyGen, c.SecretGen} {
		fmt.Fprintf(w, "  %s\n", m)
	}
	fmt.Fprintf(w, "  key import: %s\n", c.Import)
	fmt.Fprintf(w, "  known answer, HMAC-SHA256: %s\n", c.KnownAnswerHMAC)
	fmt.Fprintf(w, "  known answer, AES-256-GCM: %s\n", c.KnownAnswerGCM)
	if c.SessionCopies != "" {
		fmt.Fprintf(w, "  session key copies: %s\n", c.SessionCopies)
	}
	if len(c.GCMFor) > 0 {
		fmt.Fprintf(w, "  wrap keys of the gcm profile held: %s\n", strings.Join(c.GCMFor, ", "))
	}
}

// CanProvision says whether keys init can create the keys of profile on
// the token: with one member it generates them inside it, with several it
// imports them.
func (c *Capabilities) CanProvision(members int, profile vault.Profile) error {
	if members == 1 {
		gens := []MechanismCheck{c.SecretGen}
		if profile == vault.ProfileGCM || profile == vault.ProfileGCMHSMIV {
			gens = append(gens, c.AESKeyGen)
		}
		for _, m := range gens {
			if !m.OK() {
				return fmt.Errorf("member %s: token %q cannot generate the keys: %s", c.Member, c.Token, m)
			}
		}
		return nil
	}
	if c.Import != "yes" {
		return fmt.Errorf("member %s: token %q cannot import key material, which keys init needs with several members: %s (use the vendor's key cloning, or one member)", c.Member, c.Token, c.Import)
	}
	return nil
}

// RefusedError: a member's token lacks what the vault needs. It is
// permanent: probing again soon would find the same.
type RefusedError struct {
	Member string
	// Reason is a short, fixed name of the first thing missing: a
	// mechanism (CKM_AES_GCM) or a failed test (known_answer_gcm). It
	// labels the refused metric.
	Reason string
	// Detail says what is missing and what would work.
	Detail string
	Caps   *Capabilities
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("member %s refused: %s", e.Member, e.Detail)
}

// isPermanent reports PKCS#11 answers that mean the token cannot do what
// was asked, rather than that it failed this time.
func isPermanent(err error) bool {
	var code pkcs11.Error
	if !errors.As(err, &code) {
		return false
	}
	switch code {
	case pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_MECHANISM_PARAM_INVALID, pkcs11.CKR_FUNCTION_NOT_SUPPORTED,
		pkcs11.CKR_TEMPLATE_INCONSISTENT, pkcs11.CKR_TEMPLATE_INCOMPLETE, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID,
		pkcs11.CKR_ATTRIBUTE_VALUE_INVALID, pkcs11.CKR_ATTRIBUTE_READ_ONLY, pkcs11.CKR_KEY_TYPE_INCONSISTENT,
		pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED, pkcs11.CKR_KEY_SIZE_RANGE, pkcs11.CKR_BUFFER_TOO_SMALL:
		return true
	}
	return false
}

// The known answers: fixed keys and inputs, never used for anything else.
var (
	katKey   = bytes.Repeat([]byte{0x4b}, 32)
	katMsg   = []byte("keyvault/v1/capability-probe")
	katNonce = bytes.Repeat([]byte{0x6e}, gcmNonceSize)
	katPT    = bytes.Repeat([]byte{0x70}, 32)
)

// probeCapabilities asks the token behind r what it can do and refuses it
// (*RefusedError) if the vault cannot serve from it under profile, or
// cannot open the records of every wrap key it holds (held: their versions
// and profiles). An empty profile is that of the newest wrap key in held,
// or DefaultProfile on a token without keys. Other errors are failures of
// the moment.
func probeCapabilities(r *rawSessions, member, label string, profile vault.Profile, held map[uint32]vault.Profile) (*Capabilities, error) {
	c := &Capabilities{
		Member: member, Token: label, Profile: profile,
		GCM:       MechanismCheck{Name: "CKM_AES_GCM", Code: pkcs11.CKM_AES_GCM, Needs: pkcs11.CKF_ENCRYPT | pkcs11.CKF_DECRYPT},
		HMAC:      MechanismCheck{Name: "CKM_SHA256_HMAC", Code: pkcs11.CKM_SHA256_HMAC, Needs: pkcs11.CKF_SIGN},
		AESKeyGen: MechanismCheck{Name: "CKM_AES_KEY_GEN", Code: pkcs11.CKM_AES_KEY_GEN, Needs: pkcs11.CKF_GENERATE},
		SecretGen: MechanismCheck{Name: "CKM_GENERIC_SECRET_KEY_GEN", Code: pkcs11.CKM_GENERIC_SECRET_KEY_GEN, Needs: pkcs11.CKF_GENERATE},
		Import:    "not tried", KnownAnswerHMAC: "not run", KnownAnswerGCM: "not run",
	}
	if ti, err := r.p.GetTokenInfo(r.slot); err == nil {
		c.Manufacturer, c.Model = strings.TrimSpace(ti.ManufacturerID), strings.TrimSpace(ti.Model)
	}
	mechs, err := r.p.GetMechanismList(r.slot)
	if err != nil {
		return c, fmt.Errorf("member %s: list mechanisms: %w", member, err)
	}
	for _, mc := range []*MechanismCheck{&c.GCM, &c.HMAC, &c.AESKeyGen, &c.SecretGen} {
		for _, m := range mechs {
			if m.Mechanism == mc.Code {
				mc.Present = true
			}
		}
		if mc.Present {
			info, err := r.p.GetMechanismInfo(r.slot, []*pkcs11.Mechanism{pkcs11.NewMechanism(mc.Code, nil)})
			if err != nil {
				return c, fmt.Errorf("member %s: mechanism info of %s: %w", member, mc.Name, err)
			}
			mc.Flags = info.Flags
		}
	}
	if c.Profile == "" {
		c.Profile = DefaultProfile
		if len(held) > 0 {
			c.Profile = held[slices.Max(slices.Collect(maps.Keys(held)))]
		}
	}
	for _, v := range slices.Sorted(maps.Keys(held)) {
		if held[v] == vault.ProfileGCM || held[v] == vault.ProfileGCMHSMIV {
			c.GCMFor = append(c.GCMFor, vault.KeyID{Role: vault.RoleWrap, Version: v}.Label())
		}
	}
	if err := knownAnswers(r, c); err != nil {
		return c, fmt.Errorf("member %s: %w", member, err)
	}
	return c, c.verdict()
}

// verdict refuses the token if the vault cannot serve from it under
// c.Profile: HMAC-SHA256 always, and AES-GCM for the gcm profile or for
// the records of a gcm wrap key the token holds.
func (c *Capabilities) verdict() error {
	refuse := func(reason, detail string) error {
		return &RefusedError{Member: c.Member, Reason: reason, Detail: detail, Caps: c}
	}
	aesProfile := c.Profile == vault.ProfileGCM || c.Profile == vault.ProfileGCMHSMIV
	needGCM := aesProfile || len(c.GCMFor) > 0
	switch {
	case !c.HMAC.OK():
		return refuse(c.HMAC.Name, fmt.Sprintf("token %q %s, which every keyvault profile needs (HMAC-SHA256 sign)", c.Token, c.HMAC.lacks()))
	case !passed(c.KnownAnswerHMAC):
		return refuse("known_answer_hmac", fmt.Sprintf("token %q: HMAC-SHA256 known answer: %s", c.Token, c.KnownAnswerHMAC))
	case needGCM && !c.GCM.OK() && aesProfile:
		return refuse(c.GCM.Name, fmt.Sprintf("token %q %s, which the %s profile needs (encrypt and decrypt); "+
			"it has HMAC-SHA256, all the hmac profile needs: set hsm.profile: hmac, with keys made for it (keys init on new tokens, keys rotate on a store in use)",
			c.Token, c.GCM.lacks(), c.Profile))
	case needGCM && !c.GCM.OK():
		return refuse(c.GCM.Name, fmt.Sprintf("token %q %s, which the gcm profile's wrap keys it holds (%s) need to open the records sealed under them; "+
			"move those records to a wrap key of the hmac profile (keys rewrap) and retire those versions (keys retire) before this token serves",
			c.Token, c.GCM.lacks(), strings.Join(c.GCMFor, ", ")))
	case needGCM && !passed(c.KnownAnswerGCM):
		return refuse("known_answer_gcm", fmt.Sprintf("token %q: AES-256-GCM known answer: %s", c.Token, c.KnownAnswerGCM))
	}
	return nil
}

const katOK = "matches Go's crypto"

// passed reports a known-answer outcome that lets the token serve.
func passed(outcome string) bool {
	return outcome != "not run" && !strings.HasPrefix(outcome, "failed")
}

// knownAnswers runs the known-answer tests of the mechanisms the token
// lists, on a session of their own, and records how each went. A failure
// of the moment (not isPermanent) is returned, not recorded.
func knownAnswers(r *rawSessions, c *Capabilities) error {
	s, err := r.p.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("open session: %w", err)
	}
	// Session objects go with the session.
	defer r.p.CloseSession(s)
	if c.HMAC.OK() {
		c.KnownAnswerHMAC, err = katHMAC(r, s, c)
		if err != nil {
			return err
		}
	}
	if c.GCM.OK() {
		c.KnownAnswerGCM, err = katGCM(r, s, c)
		if err != nil {
			return err
		}
	}
	return nil
}

// sessionKey imports katKey as a sensitive session key, or, if the token
// refuses key import, generates one with gen (known: false).
func sessionKey(r *rawSessions, s pkcs11.SessionHandle, c *Capabilities, keyType uint, usage []*pkcs11.Attribute, gen MechanismCheck) (h pkcs11.ObjectHandle, known bool, err error) {
	base := append([]*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, keyType),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
	}, usage...)
	h, err = r.p.CreateObject(s, append(base, pkcs11.NewAttribute(pkcs11.CKA_VALUE, katKey)))
	if err == nil {
		c.Import = "yes"
		return h, true, nil
	}
	if !isPermanent(err) {
		return 0, false, fmt.Errorf("import a session key: %w", err)
	}
	c.Import = "refused: " + err.Error()
	if !gen.OK() {
		return 0, false, fmt.Errorf("import refused (%w) and %s", err, gen)
	}
	h, err = r.p.GenerateKey(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(gen.Code, nil)},
		append(base[1:], pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32)))
	if err != nil {
		return 0, false, fmt.Errorf("generate a session key: %w", err)
	}
	return h, false, nil
}

// katResult turns an operation's error into a recorded outcome
// (permanent) or a returned error (of the moment).
func katResult(what string, err error) (string, error) {
	if isPermanent(err) {
		return "failed: " + what + ": " + err.Error(), nil
	}
	return "", fmt.Errorf("known answer: %s: %w", what, err)
}

func katHMAC(r *rawSessions, s pkcs11.SessionHandle, c *Capabilities) (string, error) {
	h, known, err := sessionKey(r, s, c, pkcs11.CKK_GENERIC_SECRET, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
	}, c.SecretGen)
	if err != nil {
		return katResult("HMAC key", err)
	}
	got, err := r.mod.Sign(s, h, pkcs11.CKM_SHA256_HMAC, katMsg, sha256.Size)
	if err != nil {
		return katResult("C_Sign", err)
	}
	if !known {
		// A generated key's MAC cannot be compared; it must at least repeat.
		again, err := r.mod.Sign(s, h, pkcs11.CKM_SHA256_HMAC, katMsg, sha256.Size)
		if err != nil {
			return katResult("C_Sign", err)
		}
		if len(got) != sha256.Size || !bytes.Equal(got, again) {
			return "failed: two MACs of one message under one key differ", nil
		}
		return "repeatable (key import refused, so not compared with Go's)", nil
	}
	m := hmac.New(sha256.New, katKey)
	m.Write(katMsg)
	if !hmac.Equal(got, m.Sum(nil)) {
		return fmt.Sprintf("failed: MAC of %d bytes differs from Go's", len(got)), nil
	}
	return katOK, nil
}

func katGCM(r *rawSessions, s pkcs11.SessionHandle, c *Capabilities) (string, error) {
	h, known, err := sessionKey(r, s, c, pkcs11.CKK_AES, []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, true), pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, true),
	}, c.AESKeyGen)
	if err != nil {
		return katResult("AES key", err)
	}
	nonce := katNonce
	var ct []byte
	if c.Profile == vault.ProfileGCMHSMIV {
		// The token may choose the IV: a zeroed buffer in, its IV out. One
		// that keeps the zeroed buffer takes the caller's IV, and is
		// tried as under gcm.
		var iv []byte
		iv, ct, err = r.mod.SealGCMTokenIV(s, h, gcmNonceSize, katPT, katMsg)
		switch {
		case err == nil:
			nonce = iv
		case !errors.Is(err, p11raw.ErrTokenKeptIV):
			return katResult("C_Encrypt with the token's IV", err)
		}
		if outcome, err := katECB(r, s, h, known); outcome != "" || err != nil {
			return outcome, err
		}
	}
	if ct == nil {
		ct, err = r.mod.SealGCM(s, h, nonce, katPT, katMsg)
	}
	if errors.Is(err, p11raw.ErrTokenChoseIV) {
		return "failed: C_Encrypt: " + err.Error() + "; the gcm profile seals under the vault's nonce: set hsm.profile: gcm-hsm-iv, which stores the token's IV, or hsm.profile: hmac", nil
	}
	if err != nil && isPermanent(err) && c.Profile != vault.ProfileGCMHSMIV {
		// A token that takes only a zeroed IV buffer (CloudHSM's library)
		// refuses the vault's nonce: say so if a zeroed one passes.
		if _, _, e := r.mod.SealGCMTokenIV(s, h, gcmNonceSize, katPT, katMsg); e == nil {
			return "failed: C_Encrypt: " + err.Error() + ", and with a zeroed IV buffer the token wrote an IV of its own choosing; " +
				"the gcm profile seals under the vault's nonce: set hsm.profile: gcm-hsm-iv, which stores the token's IV, or hsm.profile: hmac", nil
		}
	}
	if err != nil {
		return katResult("C_Encrypt", err)
	}
	if known {
		block, _ := aes.NewCipher(katKey)
		g, _ := cipher.NewGCM(block)
		if want := g.Seal(nil, nonce, katPT, katMsg); !bytes.Equal(ct, want) {
			return fmt.Sprintf("failed: sealed %d bytes that differ from Go's %d", len(ct), len(want)), nil
		}
	} else if len(ct) != len(katPT)+p11raw.TagSize {
		return fmt.Sprintf("failed: sealed %d bytes, want %d", len(ct), len(katPT)+p11raw.TagSize), nil
	}
	pt, err := r.mod.OpenGCM(s, h, nonce, ct, katMsg)
	if err != nil {
		return katResult("C_Decrypt", err)
	}
	if !bytes.Equal(pt, katPT) {
		return "failed: opened to other bytes than were sealed", nil
	}
	// A tampered ciphertext must fail to open, whatever code says so.
	ct[0] ^= 1
	if _, err := r.mod.OpenGCM(s, h, nonce, ct, katMsg); err == nil {
		return "failed: a tampered ciphertext opened", nil
	}
	if !known {
		return "round trip passes (key import refused, so not compared with Go's)", nil
	}
	return katOK, nil
}

// katECB checks AES-ECB of a zero block, the check value of gcm-hsm-iv
// wrap keys: "" when it passes.
func katECB(r *rawSessions, s pkcs11.SessionHandle, h pkcs11.ObjectHandle, known bool) (string, error) {
	zero := make([]byte, aes.BlockSize)
	if err := r.p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)}, h); err != nil {
		return katResult("C_EncryptInit of CKM_AES_ECB (the check value of gcm-hsm-iv wrap keys)", err)
	}
	got, err := r.p.Encrypt(s, zero)
	if err != nil {
		return katResult("C_Encrypt of CKM_AES_ECB (the check value of gcm-hsm-iv wrap keys)", err)
	}
	if !known {
		if len(got) != aes.BlockSize {
			return fmt.Sprintf("failed: AES-ECB gave %d bytes, want %d", len(got), aes.BlockSize), nil
		}
		return "", nil
	}
	block, _ := aes.NewCipher(katKey)
	want := make([]byte, aes.BlockSize)
	block.Encrypt(want, zero)
	if !bytes.Equal(got, want) {
		return "failed: AES-ECB of a zero block differs from Go's", nil
	}
	return "", nil
}
