package hsmpool

import (
	"crypto/cipher"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/vault"
)

// token is the subset of HSM calls the pool makes on one member: the swap
// point where a test can put a member that fails, stalls or answers slowly.
// Implementations are safe for concurrent use.
type token interface {
	HMAC(key vault.KeyID, msg []byte) ([]byte, error)
	Seal(key vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error)
	Open(key vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error)
	// Versions lists the versions of role held by the token, ascending.
	Versions(role vault.KeyRole) []uint32
	Close() error
}

// MemberConfig describes one HSM member.
type MemberConfig struct {
	Name        string
	Module      string // path of the PKCS#11 library
	TokenLabel  string
	PIN         string
	MaxSessions int // concurrent operations allowed on this member
}

// p11Token is a token reached through crypto11. Key handles are looked up
// once, at open: FindKey per request would cost more than the operation.
type p11Token struct {
	ctx  *crypto11.Context
	keys map[vault.KeyID]*crypto11.SecretKey
	gcms map[vault.KeyID]cipher.AEAD
	// anchorObjs keeps rollback anchors as data objects (anchorobj.go).
	// The views of one token that a key reload or retire makes share it:
	// one session, one lock.
	anchorObjs *anchorObjects
}

// openToken configures crypto11 on the member's token and finds its keys.
func openToken(cfg MemberConfig) (*p11Token, error) {
	ctx, err := crypto11.Configure(&crypto11.Config{
		Path:       cfg.Module,
		TokenLabel: cfg.TokenLabel,
		Pin:        cfg.PIN,
		// crypto11 keeps one session for itself and pools the rest.
		MaxSessions: cfg.MaxSessions + 1,
		// The pool's own semaphore keeps callers within MaxSessions, so
		// this wait only guards against a bug; never block forever.
		PoolWaitTimeout: 10 * time.Second,
		// Always 12-byte nonces: crypto11 does not check, and SoftHSM
		// would silently use a zero IV for a nil one.
		GCMIVLength: 12,
	})
	if err != nil {
		return nil, fmt.Errorf("open token %q on %s: %w", cfg.TokenLabel, cfg.Module, scrubPIN(err, cfg.PIN))
	}
	t := &p11Token{ctx: ctx, keys: map[vault.KeyID]*crypto11.SecretKey{}, gcms: map[vault.KeyID]cipher.AEAD{},
		anchorObjs: newAnchorObjects(cfg.Module, cfg.TokenLabel)}
	if err := t.findKeys(); err != nil {
		ctx.Close()
		return nil, err
	}
	return t, nil
}

// findKeys caches every version of every role. Versions are discovered
// from the labels of the token's secret keys rather than by counting up
// from 1, because retiring a version leaves a gap (v1 gone, v2 there). Two
// objects with one label are refused: which one a lookup returns would be
// up to the HSM.
func (t *p11Token) findKeys() error {
	all, err := t.ctx.FindAllKeys()
	if err != nil {
		return fmt.Errorf("list keys: %w", err)
	}
	seen := map[vault.KeyID]bool{}
	for _, k := range all {
		a, err := t.ctx.GetAttribute(k, crypto11.CkaLabel)
		if err != nil || a == nil {
			continue // not ours to judge: keyvault's keys all carry a label
		}
		if id, ok := parseLabel(string(a.Value)); ok {
			seen[id] = true
		}
	}
	for id := range seen {
		ks, err := t.ctx.FindKeys(nil, []byte(id.Label()))
		if err != nil {
			return fmt.Errorf("find key %s: %w", id.Label(), err)
		}
		if len(ks) != 1 {
			return fmt.Errorf("find key %s: %d objects carry this label", id.Label(), len(ks))
		}
		if err := t.checkProtected(ks[0], id); err != nil {
			return err
		}
		t.keys[id] = ks[0]
		if id.Role == vault.RoleWrap {
			g, err := ks[0].NewGCM()
			if err != nil {
				return fmt.Errorf("key %s: %w", id.Label(), err)
			}
			t.gcms[id] = g
		}
	}
	return nil
}

// maxKeyVersion bounds the versions findKeys accepts, so that a stray
// label cannot make the pool seal under version 4 billion.
const maxKeyVersion = 1 << 20

// parseLabel reads a key label of the form keyvault-<role>-v<version>.
func parseLabel(label string) (vault.KeyID, bool) {
	for _, role := range vault.Roles {
		prefix := "keyvault-" + string(role) + "-v"
		rest, ok := strings.CutPrefix(label, prefix)
		if !ok {
			continue
		}
		v, err := strconv.ParseUint(rest, 10, 32)
		if err != nil || v == 0 || v > maxKeyVersion || strconv.FormatUint(v, 10) != rest {
			return vault.KeyID{}, false
		}
		return vault.KeyID{Role: role, Version: uint32(v)}, true
	}
	return vault.KeyID{}, false
}

// refreshed looks the token's keys up again on the same crypto11 context,
// for keys created by another process (keys rotate) or destroyed by this
// one (retire). SoftHSM 2.6 lists objects another process created without
// being re-initialised. The current token stays as it is: requests in
// flight keep using it.
func (t *p11Token) refreshed() (token, error) {
	n := &p11Token{ctx: t.ctx, keys: map[vault.KeyID]*crypto11.SecretKey{}, gcms: map[vault.KeyID]cipher.AEAD{}, anchorObjs: t.anchorObjs}
	if err := n.findKeys(); err != nil {
		return nil, err
	}
	return n, nil
}

// destroy deletes the key object of id from the token, found afresh by
// label, and reports whether there was one.
func (t *p11Token) destroy(id vault.KeyID) (bool, error) {
	ks, err := t.ctx.FindKeys(nil, []byte(id.Label()))
	if err != nil {
		return false, fmt.Errorf("find key %s: %w", id.Label(), err)
	}
	for _, k := range ks {
		if err := k.Delete(); err != nil {
			return false, fmt.Errorf("destroy key %s: %w", id.Label(), err)
		}
	}
	return len(ks) > 0, nil
}

// checkProtected refuses a key the HSM would let out: every keyvault key
// is a sensitive, non-extractable token object, and one that is not was not
// made by keyvault, or has been tampered with.
func (t *p11Token) checkProtected(k *crypto11.SecretKey, id vault.KeyID) error {
	attrs, err := t.ctx.GetAttributes(k, []crypto11.AttributeType{crypto11.CkaSensitive, crypto11.CkaExtractable, crypto11.CkaToken})
	if err != nil {
		return fmt.Errorf("key %s: read attributes: %w", id.Label(), err)
	}
	isTrue := func(a crypto11.AttributeType) bool {
		v := attrs[a]
		return v != nil && len(v.Value) == 1 && v.Value[0] == 1
	}
	if !isTrue(crypto11.CkaSensitive) || isTrue(crypto11.CkaExtractable) || !isTrue(crypto11.CkaToken) {
		return fmt.Errorf("key %s is not a sensitive, non-extractable token object; refusing to use it", id.Label())
	}
	return nil
}

func (t *p11Token) Versions(role vault.KeyRole) []uint32 {
	var vs []uint32
	for id := range t.keys {
		if id.Role == role {
			vs = append(vs, id.Version)
		}
	}
	slices.Sort(vs)
	return vs
}

// errCaller marks errors in the caller's arguments (an unknown key, a bad
// nonce): the member is fine, so the pool neither fails it nor retries.
var errCaller = errors.New("bad HSM request")

var errNoKey = fmt.Errorf("%w: no such key on this member", errCaller)

func (t *p11Token) HMAC(id vault.KeyID, msg []byte) ([]byte, error) {
	k, ok := t.keys[id]
	if !ok || id.Role == vault.RoleWrap {
		return nil, fmt.Errorf("%s: %w", id.Label(), errNoKey)
	}
	h, err := k.NewHMAC(pkcs11.CKM_SHA256_HMAC, 0)
	if err != nil {
		return nil, err
	}
	// An HMAC holds a pooled session until Sum, which always runs here.
	_, err = h.Write(msg)
	sum := h.Sum(nil) // panics on a PKCS#11 error; the pool recovers it
	if err != nil {
		return nil, err
	}
	return sum, nil
}

func (t *p11Token) gcm(id vault.KeyID, nonce []byte) (cipher.AEAD, error) {
	g, ok := t.gcms[id]
	if !ok {
		return nil, fmt.Errorf("%s: %w", id.Label(), errNoKey)
	}
	if len(nonce) != g.NonceSize() {
		return nil, fmt.Errorf("%w: GCM nonce of %d bytes, want %d", errCaller, len(nonce), g.NonceSize())
	}
	return g, nil
}

func (t *p11Token) Seal(id vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error) {
	g, err := t.gcm(id, nonce)
	if err != nil {
		return nil, err
	}
	return g.Seal(nil, nonce, plaintext, aad), nil // panics on error; recovered by the pool
}

func (t *p11Token) Open(id vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	g, err := t.gcm(id, nonce)
	if err != nil {
		return nil, err
	}
	return g.Open(nil, nonce, ciphertext, aad)
}

// Close closes the anchor session first: closing the last crypto11 context
// finalises the library under it.
func (t *p11Token) Close() error {
	t.anchorObjs.close()
	return t.ctx.Close()
}

// scrubPIN removes the PIN from an error's text, in case a library ever
// echoes its arguments.
func scrubPIN(err error, pin string) error {
	if err == nil || pin == "" || !strings.Contains(err.Error(), pin) {
		return err
	}
	return errors.New("error text withheld: it contained the PIN")
}

// kcvInput is the fixed, domain-separated message whose MAC or GCM tag is a
// key's check value. A KCV identifies key material without revealing it.
func kcvInput(id vault.KeyID) []byte {
	return []byte("keyvault/v1/kcv/" + string(id.Role) + "/" + strconv.Itoa(int(id.Version)))
}

// kcvNonce is the fixed nonce of the wrap key's check value. It seals only
// the empty message, always the same one, so it reveals nothing but the tag;
// a random record nonce equals it with probability 2^-96.
var kcvNonce = make([]byte, 12)

// kcv computes the check value of one key on one token.
func kcv(t token, id vault.KeyID) ([]byte, error) {
	var out []byte
	var err error
	if id.Role == vault.RoleWrap {
		out, err = t.Seal(id, kcvNonce, nil, kcvInput(id))
	} else {
		out, err = t.HMAC(id, kcvInput(id))
	}
	if err != nil {
		return nil, err
	}
	return out[:8], nil
}
