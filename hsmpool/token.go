package hsmpool

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/hsmpool/internal/p11raw"
	"github.com/keyvault/keyvault/vault"
)

// MemberConfig describes one HSM member.
type MemberConfig struct {
	Name        string
	Module      string // path of the PKCS#11 library
	TokenLabel  string
	PIN         string
	MaxSessions int // concurrent operations allowed on this member

	// aesProfile is the profile the member's AES wrap keys serve: gcm, or
	// gcm-hsm-iv when the pool is configured for it ("" is gcm).
	aesProfile vault.Profile
}

// forProfile returns cfgs with their AES wrap keys serving profile: both
// AES profiles use one kind of key, so the configured profile says which.
func forProfile(cfgs []MemberConfig, profile vault.Profile) []MemberConfig {
	out := slices.Clone(cfgs)
	for i := range out {
		if profile == vault.ProfileGCMHSMIV {
			out[i].aesProfile = profile
		}
	}
	return out
}

// p11Token is a token reached through crypto11, for finding and creating
// keys, and through p11raw for the operations that serve requests, each
// one call with a buffer sized here (see package p11raw). Key handles are
// looked up once, at open: a lookup per request would cost more than the
// operation.
type p11Token struct {
	ctx  *crypto11.Context
	raw  *rawSessions
	keys map[vault.KeyID]*crypto11.SecretKey
	// tokenKeys are the keys' object handles, for raw's sessions; handles
	// are what the view serves with: the session copies of those keys
	// (copies), or the token keys themselves where the token refuses
	// copies.
	tokenKeys, handles map[vault.KeyID]pkcs11.ObjectHandle
	// copies are the token's session copies, shared by its views. held
	// are the copies this view serves with, by key, released when the
	// pool has dropped the view (drop) for another and the last operation
	// on it has ended (use).
	copies *keyCopies
	held   map[vault.KeyID]*keyCopy
	// checked is what each key's token key is checked against while the
	// view serves (checkTokenKey): its copy in held, or, for a key served
	// with its token key, a record of that key (tokenKeyRecords).
	checked map[vault.KeyID]*keyCopy
	// copyLeft: making this view's copies was refused, and the refused
	// copy stays on a session the token's other views hold copies on
	// (acquire), until they are dropped.
	copyLeft bool
	use      viewUse
	// profiles are the wrap key versions' profiles, by key type (and, for
	// AES keys, aesProfile).
	profiles   map[uint32]vault.Profile
	aesProfile vault.Profile
	// ivMode is how the token takes a GCM IV under gcm-hsm-iv: ivUnknown
	// until its first seal there finds out, then ivToken (it writes its own
	// into the buffer) or ivCaller (it uses the one it is given).
	ivMode atomic.Int32
	// anchorObjs keeps rollback anchors as data objects (anchorObjects).
	// The views of one token that a key reload or retire makes share it:
	// one session, one lock.
	anchorObjs anchorStore
	// name and label name the member and token in a capability verdict.
	name, label string
	// dropWait bounds how long drop waits for the operations on the view.
	dropWait time.Duration
}

// anchorStore is what a token keeps its rollback anchors in
// (anchorObjects, through the Modules that opened the token).
type anchorStore interface {
	anchorKeeper
	// probe says whether the token can keep anchors: nil, a
	// *NoAnchorsError, or a failure of the moment.
	probe(ctx context.Context) error
	// close ends the store's session; the library stays loaded.
	close()
}

// openToken configures crypto11 on the member's token, opens its raw
// sessions and finds its keys. The token's anchor store shares its write
// guard with every other token m opens on the same module and label.
func (m *Modules) openToken(cfg MemberConfig) (*p11Token, error) {
	ctx, err := crypto11.Configure(&crypto11.Config{
		Path:       cfg.Module,
		TokenLabel: cfg.TokenLabel,
		Pin:        cfg.PIN,
		// crypto11 only finds, reads and creates keys; requests use the
		// raw sessions. It keeps one session for itself and pools one.
		MaxSessions:     2,
		PoolWaitTimeout: 10 * time.Second,
		// Always 12-byte nonces, should a crypto11 AEAD ever be made.
		GCMIVLength: 12,
	})
	if err != nil {
		return nil, fmt.Errorf("open token %q on %s: %w", cfg.TokenLabel, cfg.Module, scrubPIN(err, cfg.PIN))
	}
	raw, err := openRawSessions(cfg.Module, cfg.TokenLabel, max(cfg.MaxSessions, 1))
	if err != nil {
		ctx.Close()
		return nil, fmt.Errorf("open token %q on %s: %w", cfg.TokenLabel, cfg.Module, err)
	}
	t := &p11Token{ctx: ctx, raw: raw, keys: map[vault.KeyID]*crypto11.SecretKey{},
		tokenKeys: map[vault.KeyID]pkcs11.ObjectHandle{}, handles: map[vault.KeyID]pkcs11.ObjectHandle{},
		copies:   m.keyCopies(raw),
		profiles: map[uint32]vault.Profile{}, aesProfile: cfg.aesProfile, anchorObjs: m.anchorObjects(cfg.Module, cfg.TokenLabel), name: cfg.Name, label: cfg.TokenLabel,
		dropWait: cmp.Or(m.dropWait, dropWait)}
	if err := t.findKeys(); err != nil {
		t.Close()
		return nil, err
	}
	return t, nil
}

// findKeys caches every version of every role, and the copies to serve
// them with. Versions are discovered from the labels of the token's
// secret keys rather than by counting up from 1, because retiring a
// version leaves a gap (v1 gone, v2 there). Two token objects with one
// label are refused: which one a lookup returns would be up to the HSM.
// Session objects (the copies, which carry their key's label) are not
// the token's keys.
func (t *p11Token) findKeys() error {
	all, err := t.ctx.FindAllKeys()
	if err != nil {
		return fmt.Errorf("list keys: %w", err)
	}
	seen := map[vault.KeyID]bool{}
	for _, k := range all {
		attrs, err := t.ctx.GetAttributes(k, []crypto11.AttributeType{crypto11.CkaLabel, crypto11.CkaToken})
		if err != nil || attrs[crypto11.CkaLabel] == nil {
			continue // not ours to judge: keyvault's keys all carry a label
		}
		if tok := attrs[crypto11.CkaToken]; tok == nil || len(tok.Value) != 1 || tok.Value[0] != 1 {
			continue // a session copy, this process's
		}
		if id, ok := parseLabel(string(attrs[crypto11.CkaLabel].Value)); ok {
			seen[id] = true
		}
	}
	for id := range seen {
		ks, err := t.findTokenKeys(id)
		if err != nil {
			return err
		}
		if len(ks) != 1 {
			return fmt.Errorf("find key %s: %d objects carry this label", id.Label(), len(ks))
		}
		keyType, err := t.checkProtected(ks[0], id)
		if err != nil {
			return err
		}
		if id.Role == vault.RoleWrap {
			p, err := wrapProfileOf(id, keyType)
			if err != nil {
				return err
			}
			if p == vault.ProfileGCM && t.aesProfile != "" {
				p = t.aesProfile
			}
			t.profiles[id.Version] = p
		} else if keyType != pkcs11.CKK_GENERIC_SECRET {
			return fmt.Errorf("key %s has key type %#x, not a generic secret for HMAC-SHA256; refusing to use it", id.Label(), keyType)
		}
		h, err := t.raw.findKey(id.Label())
		if err != nil {
			return fmt.Errorf("find key %s: %w", id.Label(), err)
		}
		t.keys[id], t.tokenKeys[id] = ks[0], h
	}
	return t.serveFromCopies()
}

// findTokenKeys returns the token objects labelled as id: not the
// session copies of this process, which carry the same label.
func (t *p11Token) findTokenKeys(id vault.KeyID) ([]*crypto11.SecretKey, error) {
	return tokenKeysLabelled(t.ctx, id)
}

// tokenKeysLabelled returns the token objects on ctx's token labelled as
// id, leaving out session objects (the copies of a serving process carry
// the same label).
func tokenKeysLabelled(ctx *crypto11.Context, id vault.KeyID) ([]*crypto11.SecretKey, error) {
	ks, err := ctx.FindKeys(nil, []byte(id.Label()))
	if err != nil {
		return nil, fmt.Errorf("find key %s: %w", id.Label(), err)
	}
	var out []*crypto11.SecretKey
	for _, k := range ks {
		a, err := ctx.GetAttribute(k, crypto11.CkaToken)
		if err != nil {
			return nil, fmt.Errorf("find key %s: read CKA_TOKEN: %w", id.Label(), err)
		}
		if a != nil && len(a.Value) == 1 && a.Value[0] == 1 {
			out = append(out, k)
		}
	}
	return out, nil
}

// serveFromCopies sets the view's handles to the copies of its token
// keys, made now or shared with another view, or to the token keys if
// the token refuses copies, and what each token key is checked against
// while the view serves (checked). It fails if a token key whose copy it
// would share fails its check, or if a token key it serves as it is
// gives no check value.
func (t *p11Token) serveFromCopies() error {
	keys := make([]keySpec, 0, len(t.tokenKeys))
	for id, tk := range t.tokenKeys {
		keys = append(keys, keySpec{id: id, tk: tk, kcv: func(s pkcs11.SessionHandle, h pkcs11.ObjectHandle) ([]byte, error) {
			return t.kcvWith(s, id, h)
		}})
	}
	held, left, err := t.copies.acquire(keys)
	if err != nil {
		return err
	}
	t.held, t.copyLeft = held, left
	t.handles = make(map[vault.KeyID]pkcs11.ObjectHandle, len(t.tokenKeys))
	t.checked = make(map[vault.KeyID]*keyCopy, len(t.tokenKeys))
	for id, tk := range t.tokenKeys {
		t.handles[id] = tk
		if cp := held[id]; cp != nil {
			t.handles[id] = cp.h
			t.checked[id] = cp
		}
	}
	if len(held) == len(t.tokenKeys) {
		return nil
	}
	return t.tokenKeyRecords()
}

// tokenKeyRecords records, for each key the view serves with its token
// key, the check value the token key gives now, just found by its label,
// so that the token key check holds the handle to the key the view was
// made with, as it holds a copy's token key to the key the copy was made
// from.
func (t *p11Token) tokenKeyRecords() error {
	return t.raw.with(func(s pkcs11.SessionHandle) error {
		for id, tk := range t.tokenKeys {
			if t.checked[id] != nil {
				continue
			}
			kcv, err := t.kcvWith(s, id, tk)
			if err != nil {
				return fmt.Errorf("check value of %s with the token key: %w", id.Label(), err)
			}
			t.checked[id] = &keyCopy{id: id, tk: tk, h: tk, kcv: kcv}
		}
		return nil
	})
}

// kcvWith computes id's check value as kcv does, with the key object h
// (the token key or a copy of it) on session s.
func (t *p11Token) kcvWith(s pkcs11.SessionHandle, id vault.KeyID, h pkcs11.ObjectHandle) ([]byte, error) {
	var out []byte
	var err error
	switch p := t.profiles[id.Version]; {
	case id.Role == vault.RoleWrap && p == vault.ProfileGCM:
		out, err = t.raw.mod.SealGCM(s, h, kcvNonce, nil, kcvInput(id))
	case id.Role == vault.RoleWrap && p == vault.ProfileGCMHSMIV:
		out, err = t.encryptBlock(s, h, make([]byte, 16))
	default:
		out, err = t.raw.mod.Sign(s, h, pkcs11.CKM_SHA256_HMAC, kcvInput(id), sha256.Size)
	}
	if err != nil {
		return nil, err
	}
	if len(out) < 8 {
		return nil, fmt.Errorf("check value of %s: %d bytes", id.Label(), len(out))
	}
	return out[:8], nil
}

// viewUse counts the operations running on a view, so that the copies
// of a dropped view are destroyed only once none runs on them: a token
// may give a destroyed copy's handle number to the next copy, of another
// key.
type viewUse struct {
	mu                sync.Mutex
	active            int
	dropped, released bool
	done              chan struct{} // closed once released
	err               error         // what releasing the copies met
	// late gets err when the copies are released after drop stopped
	// waiting.
	late func(error)
}

// errViewDropped: the view's copies are gone; the operation must run on
// the member's current view.
var errViewDropped = errors.New("the view of the token was dropped")

// enter starts an operation on the view; false once its copies are
// released. Each enter that returns true is paired with a leave.
func (t *p11Token) enter() bool {
	t.use.mu.Lock()
	defer t.use.mu.Unlock()
	if t.use.released {
		return false
	}
	t.use.active++
	return true
}

// leave ends an operation on the view, releasing the copies of a dropped
// view with the last one.
func (t *p11Token) leave() {
	t.use.mu.Lock()
	t.use.active--
	last := t.use.dropped && t.use.active == 0 && !t.use.released
	if last {
		t.use.released = true
	}
	t.use.mu.Unlock()
	if last {
		t.releaseCopies()
	}
}

func (t *p11Token) releaseCopies() {
	err := t.copies.release(t.held)
	t.use.mu.Lock()
	t.use.err = err
	if t.use.done != nil {
		close(t.use.done)
	}
	late := t.use.late
	t.use.mu.Unlock()
	if late != nil {
		go late(err)
	}
}

// dropWait bounds how long drop waits for the operations on a view,
// unless the view's Modules says otherwise (a test's).
const dropWait = 5 * time.Second

// drop lets go of the view's copies: the pool has put another view of
// the token in its place, or never used it. A copy no view holds is
// destroyed, once the operations running on the view have ended: drop
// waits for them, within t.dropWait. It reports copies the token would not
// destroy, or that operations still run on them; then late, if not nil,
// gets what releasing the copies met once the last one has ended, on a
// goroutine of its own.
func (t *p11Token) drop(late func(error)) error {
	t.use.mu.Lock()
	if t.use.dropped {
		t.use.mu.Unlock()
		return nil
	}
	t.use.dropped = true
	if t.use.active == 0 {
		t.use.released = true
		t.use.mu.Unlock()
		t.releaseCopies()
		return t.use.err
	}
	done := make(chan struct{})
	t.use.done = done
	t.use.mu.Unlock()
	timer := time.NewTimer(t.dropWait)
	defer timer.Stop()
	select {
	case <-done:
	case <-timer.C:
	}
	t.use.mu.Lock()
	defer t.use.mu.Unlock()
	select {
	case <-done:
		return t.use.err
	default:
	}
	t.use.late = late
	return fmt.Errorf("member %s: an operation still runs on the session copies of a dropped view after %v; they are destroyed when it returns", t.name, t.dropWait)
}

// sessionCopies is nil when the view serves from session copies of the
// token's keys, else why it does not.
func (t *p11Token) sessionCopies() error {
	if len(t.held) > 0 {
		return nil
	}
	if err := t.copies.verdict(); err != nil {
		return err
	}
	return errors.New("no keys to copy")
}

// checkTokenKey runs on the session s of an operation under id: at most
// once per tokenCheckInterval for each key it first checks the token key
// (checkCopy), so that a token gone, re-initialised or provisioned anew
// under its copies, or a token key handle that now names another key,
// fails the operation instead of serving another key, or a lost one.
func (t *p11Token) checkTokenKey(s pkcs11.SessionHandle, id vault.KeyID) error {
	cp := t.checked[id]
	if cp == nil || !cp.checkDue() {
		return nil
	}
	if err := t.checkCopy(s, cp); err != nil {
		// The next operation checks again.
		cp.lastCheck.Store(0)
		return err
	}
	return nil
}

// checkCopy checks that the copy's token key is still the key the copy
// was made from (for a token key record, the key the view was made
// with): the object at its handle carries its label and gives its check
// value.
func (t *p11Token) checkCopy(s pkcs11.SessionHandle, cp *keyCopy) error {
	a, err := t.raw.p.GetAttributeValue(s, cp.tk, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)})
	if err != nil {
		return fmt.Errorf("%w: %s: %w", errTokenKey, cp.id.Label(), err)
	}
	if len(a) != 1 || string(a[0].Value) != cp.id.Label() {
		return fmt.Errorf("%w: %s: the token key's handle now names an object labelled %q", errTokenKey, cp.id.Label(), labelOf(a))
	}
	got, err := t.kcvWith(s, cp.id, cp.tk)
	if err != nil {
		return fmt.Errorf("%w: %s: check value: %w", errTokenKey, cp.id.Label(), err)
	}
	if !bytes.Equal(got, cp.kcv) {
		return fmt.Errorf("%w: %s: the token key gives check value %x, the copy %x: another key under its label", errTokenKey, cp.id.Label(), got, cp.kcv)
	}
	return nil
}

func labelOf(a []*pkcs11.Attribute) string {
	if len(a) != 1 {
		return ""
	}
	return string(a[0].Value)
}

// checkTokenKeys checks every token key of the view as checkCopy does,
// so that the check values the probe computes through the view are
// those of the keys it was made with. It is the probe's test that the
// token under the view is still the one its copies, or its token key
// handles, were taken from.
func (t *p11Token) checkTokenKeys() error {
	if !t.enter() {
		return errViewDropped
	}
	defer t.leave()
	return t.raw.with(func(s pkcs11.SessionHandle) error {
		for _, cp := range t.checked {
			if err := t.checkCopy(s, cp); err != nil {
				return err
			}
		}
		return nil
	})
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

// view is another view of the token, on the same context, sessions,
// copies and anchor store, with what it knows of the token (its AES
// profile, how it takes a GCM IV), over the key maps given. It holds no
// copies until its caller sets its handles.
func (t *p11Token) view(keys map[vault.KeyID]*crypto11.SecretKey, tokenKeys, handles map[vault.KeyID]pkcs11.ObjectHandle, profiles map[uint32]vault.Profile) *p11Token {
	n := &p11Token{ctx: t.ctx, raw: t.raw, keys: keys, tokenKeys: tokenKeys, handles: handles, copies: t.copies, profiles: profiles,
		aesProfile: t.aesProfile, anchorObjs: t.anchorObjs, name: t.name, label: t.label, dropWait: t.dropWait}
	n.ivMode.Store(t.ivMode.Load())
	return n
}

// refreshed looks the token's keys up again on the same crypto11 context,
// for keys created by another process (keys rotate) or destroyed by this
// one (retire). SoftHSM 2.6 lists objects another process created without
// being re-initialised. The current token stays as it is: requests in
// flight keep using it. copyLeft: a copy refused for the new view stays
// on a session the views in use hold copies on, until they are dropped.
func (t *p11Token) refreshed() (_ token, copyLeft bool, _ error) {
	n := t.view(map[vault.KeyID]*crypto11.SecretKey{}, map[vault.KeyID]pkcs11.ObjectHandle{}, map[vault.KeyID]pkcs11.ObjectHandle{}, map[uint32]vault.Profile{})
	if err := n.findKeys(); err != nil {
		return nil, false, err
	}
	return n, n.copyLeft, nil
}

// recopied returns a view of the token over the same keys, serving from
// copies shared from a session without undestroyed objects, or made
// afresh on one.
func (t *p11Token) recopied() (token, error) {
	n := t.view(maps.Clone(t.keys), maps.Clone(t.tokenKeys), nil, maps.Clone(t.profiles))
	if err := n.serveFromCopies(); err != nil {
		return nil, err
	}
	return n, nil
}

// destroy deletes the key object of id from the token, found afresh by
// label, and reports whether there was one. Its session copies go when
// the views that hold them are dropped.
func (t *p11Token) destroy(id vault.KeyID) (bool, error) {
	ks, err := t.findTokenKeys(id)
	if err != nil {
		return false, err
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
// made by keyvault, or has been tampered with. It returns the key's type.
func (t *p11Token) checkProtected(k *crypto11.SecretKey, id vault.KeyID) (keyType uint, err error) {
	attrs, err := t.ctx.GetAttributes(k, []crypto11.AttributeType{crypto11.CkaSensitive, crypto11.CkaExtractable, crypto11.CkaToken, crypto11.CkaKeyType})
	if err != nil {
		return 0, fmt.Errorf("key %s: read attributes: %w", id.Label(), err)
	}
	isTrue := func(a crypto11.AttributeType) bool {
		v := attrs[a]
		return v != nil && len(v.Value) == 1 && v.Value[0] == 1
	}
	if !isTrue(crypto11.CkaSensitive) || isTrue(crypto11.CkaExtractable) || !isTrue(crypto11.CkaToken) {
		return 0, fmt.Errorf("key %s is not a sensitive, non-extractable token object; refusing to use it", id.Label())
	}
	kt := attrs[crypto11.CkaKeyType]
	if kt == nil {
		return 0, fmt.Errorf("key %s: the token gave no key type", id.Label())
	}
	keyType, ok := ulongOf(kt.Value)
	if !ok {
		return 0, fmt.Errorf("key %s: key type of %d bytes", id.Label(), len(kt.Value))
	}
	return keyType, nil
}

// ulongOf decodes a CK_ULONG attribute value, in the platform's byte order.
func ulongOf(b []byte) (uint, bool) {
	switch len(b) {
	case 8:
		return uint(binary.NativeEndian.Uint64(b)), true
	case 4:
		return uint(binary.NativeEndian.Uint32(b)), true
	}
	return 0, false
}

// wrapProfileOf is the profile a wrap key serves, by its key type.
func wrapProfileOf(id vault.KeyID, keyType uint) (vault.Profile, error) {
	switch keyType {
	case pkcs11.CKK_AES:
		return vault.ProfileGCM, nil
	case pkcs11.CKK_GENERIC_SECRET:
		return vault.ProfileHMAC, nil
	}
	return "", fmt.Errorf("key %s has key type %#x, neither AES (profile gcm) nor generic secret (profile hmac); refusing to use it", id.Label(), keyType)
}

func (t *p11Token) WrapProfile(version uint32) vault.Profile { return t.profiles[version] }

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

// HMAC computes HMAC-SHA256 in one single-part C_Sign, under a PIN or
// root key, or a wrap key of the hmac profile.
func (t *p11Token) HMAC(id vault.KeyID, msg []byte) ([]byte, error) {
	h, ok := t.handles[id]
	if !ok {
		return nil, fmt.Errorf("%s: %w", id.Label(), errNoKey)
	}
	if id.Role == vault.RoleWrap && t.profiles[id.Version] != vault.ProfileHMAC {
		return nil, fmt.Errorf("%w: HMAC under %s, a wrap key of the %s profile", errCaller, id.Label(), t.profiles[id.Version])
	}
	if !t.enter() {
		return nil, errViewDropped
	}
	defer t.leave()
	var out []byte
	err := t.raw.with(func(s pkcs11.SessionHandle) (err error) {
		if err := t.checkTokenKey(s, id); err != nil {
			return err
		}
		out, err = t.raw.mod.Sign(s, h, pkcs11.CKM_SHA256_HMAC, msg, sha256.Size)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("hmac under %s: %w", id.Label(), err)
	}
	return out, nil
}

// gcmNonceSize is the only GCM nonce length the vault uses: a token given
// none might pick its own, or a zero IV.
const gcmNonceSize = 12

func (t *p11Token) wrapKey(id vault.KeyID, nonce []byte) (pkcs11.ObjectHandle, error) {
	h, ok := t.handles[id]
	if !ok || id.Role != vault.RoleWrap {
		return 0, fmt.Errorf("%s: %w", id.Label(), errNoKey)
	}
	if p := t.profiles[id.Version]; p != vault.ProfileGCM && p != vault.ProfileGCMHSMIV {
		return 0, fmt.Errorf("%w: GCM in the HSM under %s, a wrap key of the %s profile", errCaller, id.Label(), p)
	}
	if len(nonce) != gcmNonceSize {
		return 0, fmt.Errorf("%w: GCM nonce of %d bytes, want %d", errCaller, len(nonce), gcmNonceSize)
	}
	return h, nil
}

// How a token takes the GCM IV, learnt at its first seal under
// gcm-hsm-iv.
const (
	ivUnknown = iota
	ivToken   // it writes an IV of its own into the buffer
	ivCaller  // it uses the IV it is given
)

// Seal encrypts with AES-GCM in one C_Encrypt, into a buffer of
// plaintext plus tag: no size query. Under gcm-hsm-iv a token that
// chooses the IV gets a zeroed buffer, and the IV it wrote is copied into
// nonce; a token that keeps the IV it is given seals under nonce. Which
// kind the token is, its first seal finds out: a zeroed buffer left
// zeroed means it sealed under the all-zero IV, and that ciphertext is
// discarded, never returned.
func (t *p11Token) Seal(id vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error) {
	h, err := t.wrapKey(id, nonce)
	if err != nil {
		return nil, err
	}
	if !t.enter() {
		return nil, errViewDropped
	}
	defer t.leave()
	var out []byte
	err = t.raw.with(func(s pkcs11.SessionHandle) (err error) {
		if err := t.checkTokenKey(s, id); err != nil {
			return err
		}
		if t.profiles[id.Version] == vault.ProfileGCMHSMIV && t.ivMode.Load() != ivCaller {
			iv, ct, err := t.raw.mod.SealGCMTokenIV(s, h, gcmNonceSize, plaintext, aad)
			switch {
			case err == nil:
				t.ivMode.Store(ivToken)
				copy(nonce, iv)
				out = ct
				return nil
			case !errors.Is(err, p11raw.ErrTokenKeptIV):
				return err
			}
			t.ivMode.Store(ivCaller)
		}
		out, err = t.raw.mod.SealGCM(s, h, nonce, plaintext, aad)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("seal under %s: %w", id.Label(), err)
	}
	return out, nil
}

// Open decrypts and authenticates with AES-GCM in one C_Decrypt.
func (t *p11Token) Open(id vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	h, err := t.wrapKey(id, nonce)
	if err != nil {
		return nil, err
	}
	if !t.enter() {
		return nil, errViewDropped
	}
	defer t.leave()
	var out []byte
	err = t.raw.with(func(s pkcs11.SessionHandle) (err error) {
		if err := t.checkTokenKey(s, id); err != nil {
			return err
		}
		out, err = t.raw.mod.OpenGCM(s, h, nonce, ciphertext, aad)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open under %s: %w", id.Label(), err)
	}
	return out, nil
}

// EncryptBlock encrypts one 16-byte block with CKM_AES_ECB under a wrap
// key of gcm-hsm-iv, for its check value.
func (t *p11Token) EncryptBlock(id vault.KeyID, block []byte) ([]byte, error) {
	h, ok := t.handles[id]
	if !ok || id.Role != vault.RoleWrap || t.profiles[id.Version] != vault.ProfileGCMHSMIV {
		return nil, fmt.Errorf("%s: %w", id.Label(), errNoKey)
	}
	if !t.enter() {
		return nil, errViewDropped
	}
	defer t.leave()
	var out []byte
	err := t.raw.with(func(s pkcs11.SessionHandle) (err error) {
		if err := t.checkTokenKey(s, id); err != nil {
			return err
		}
		out, err = t.encryptBlock(s, h, block)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("AES-ECB under %s: %w", id.Label(), err)
	}
	return out, nil
}

// encryptBlock encrypts one block with CKM_AES_ECB under the key object h.
func (t *p11Token) encryptBlock(s pkcs11.SessionHandle, h pkcs11.ObjectHandle, block []byte) ([]byte, error) {
	if err := t.raw.p.EncryptInit(s, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_ECB, nil)}, h); err != nil {
		return nil, err
	}
	out, err := t.raw.p.Encrypt(s, block)
	if err != nil {
		return nil, err
	}
	if len(out) != len(block) {
		return nil, fmt.Errorf("%d bytes out of %d", len(out), len(block))
	}
	return out, nil
}

// Close closes the raw and anchor sessions first, and waits for the calls
// running on raw sessions to return: closing the last crypto11 context
// finalises the library under them, and a call in flight then crashes.
// A member re-opened after a failure closes its old token while
// operations started before the failure may still run on it. The copies
// are destroyed once no call runs on them. Closing any view of a token
// closes the token, for every view.
func (t *p11Token) Close() error {
	t.raw.close()
	t.raw.waitIdle()
	t.copies.close()
	t.anchorObjs.close()
	return t.ctx.Close()
}

// What p11Token offers the pool beyond token, each through an interface
// the pool declares where it uses it.
var (
	_ sessionLimiter   = (*p11Token)(nil)
	_ anchorKeeper     = (*p11Token)(nil)
	_ anchorProber     = (*p11Token)(nil)
	_ capabilityProber = (*p11Token)(nil)
	_ refresher        = (*p11Token)(nil)
	_ blockEncrypter   = (*p11Token)(nil)
	_ dropper          = (*p11Token)(nil)
	_ tokenKeyChecker  = (*p11Token)(nil)
	_ copyReporter     = (*p11Token)(nil)
)

func (t *p11Token) sessionLimit() int { return t.raw.sessionLimit() }

func (t *p11Token) ReadAnchors() ([][]byte, error) { return t.anchorObjs.ReadAnchors() }

func (t *p11Token) WriteAnchor(ctx context.Context, w uint64, v []byte) error {
	return t.anchorObjs.WriteAnchor(ctx, w, v)
}

func (t *p11Token) ProbeAnchors(ctx context.Context) error {
	err := t.anchorObjs.probe(ctx)
	var na *NoAnchorsError
	if errors.As(err, &na) {
		na.Member, na.Token = t.name, t.label
	}
	return err
}

func (t *p11Token) probeCapabilities(profile vault.Profile) (*Capabilities, error) {
	c, err := probeCapabilities(t.raw, t.name, t.label, profile, t.profiles)
	if c != nil {
		c.SessionCopies = t.copiesLine()
	}
	return c, err
}

// copiesLine says whether the view serves from session copies, for a
// line of hsm check.
func (t *p11Token) copiesLine() string {
	switch err := t.sessionCopies(); {
	case err == nil:
		return "yes"
	case len(t.tokenKeys) == 0:
		return "not tried (no keyvault keys on the token yet)"
	default:
		return fmt.Sprintf("no (%v); it serves with its token keys", err)
	}
}

// without returns a view of the token without the keys ids, sharing its
// context and the copies of the keys it keeps: Retire stops using them
// before it destroys them, and the copies of ids go when t is dropped.
func (t *p11Token) without(ids ...vault.KeyID) token {
	n := t.view(maps.Clone(t.keys), maps.Clone(t.tokenKeys), maps.Clone(t.handles), maps.Clone(t.profiles))
	for _, id := range ids {
		delete(n.keys, id)
		delete(n.tokenKeys, id)
		delete(n.handles, id)
		if id.Role == vault.RoleWrap {
			delete(n.profiles, id.Version)
		}
	}
	n.held, n.checked = maps.Clone(t.held), maps.Clone(t.checked)
	for _, id := range ids {
		delete(n.held, id)
		delete(n.checked, id)
	}
	n.copies.retain(n.held)
	return n
}

// scrubPIN removes the PIN from an error's text, in case a library ever
// echoes its arguments.
func scrubPIN(err error, pin string) error {
	if err == nil || pin == "" || !strings.Contains(err.Error(), pin) {
		return err
	}
	return errors.New("error text withheld: it contained the PIN")
}
