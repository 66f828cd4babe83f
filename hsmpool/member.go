package hsmpool

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"

	"github.com/keyvault/keyvault/vault"
)

// member is one HSM of the pool.
type member struct {
	name string
	// reopen configures the member's token from scratch; nil for tokens a
	// test injected.
	reopen func() (token, error)

	st       atomic.Pointer[tokenState] // swapped whole when the member is re-opened
	sessions chan struct{}              // one slot per allowed concurrent operation
	// limit is how many of the slots serve: max_sessions, or fewer once
	// the token has refused a session (Pool.limitSessions holds the rest).
	limit       atomic.Int64
	limitLogged atomic.Bool
	inFlight    atomic.Int64
	healthy     atomic.Bool
	probing     atomic.Bool
	// refusal is set while the member's token lacks what the vault needs
	// (refusal.go).
	refusal atomic.Pointer[RefusedError]
	// copiesSaid is what the log last said of the member's session key
	// copies (noteCopies).
	copiesSaid atomic.Pointer[string]
	// work hands jobs to the member's idle workers; workers counts them,
	// at most one per session slot (Pool.hand).
	work    chan *job
	workers atomic.Int64
	// metrics are the member's children of the operation metrics.
	metrics *memberMetrics
}

func (m *member) state() *tokenState { return m.st.Load() }

// tokenState is one opened token of a member and what the pool learnt of it
// when admitting it: its key check values and its known answers.
type tokenState struct {
	tok  token
	kcvs map[vault.KeyID][]byte
	// selfTests are ciphertexts the token sealed at admission, one under
	// each wrap key version of the gcm profile, opened again to tell a bad
	// record from a bad member. A wrap key of the hmac profile has its
	// check value for that (checkKCV).
	selfTests map[uint32]*knownAnswer
}

// knownAnswer is a GCM ciphertext whose plaintext the pool knows.
type knownAnswer struct {
	key                vault.KeyID
	nonce, ct, aad, pt []byte
}

// errKeyMismatch: a member's keys differ from the pool's reference. It
// would open nothing the others sealed, so it is never used.
var errKeyMismatch = errors.New("keys differ from the pool's")

// admit checks a token before it serves: every key's check value must equal
// the reference's (ref nil: none yet, at start), and the self-tests it seals
// now must open.
func admit(t token, ref map[vault.KeyID][]byte) (*tokenState, error) {
	kcvs, err := keyCheckValues(t)
	if err != nil {
		return nil, err
	}
	if ref != nil {
		if err := holdsKeys(ref, kcvs); err != nil {
			return nil, err
		}
	}
	st := &tokenState{tok: t, kcvs: kcvs, selfTests: map[uint32]*knownAnswer{}}
	for _, v := range t.Versions(vault.RoleWrap) {
		if p := t.WrapProfile(v); p != vault.ProfileGCM && p != vault.ProfileGCMHSMIV {
			continue
		}
		ka := &knownAnswer{
			key:   vault.KeyID{Role: vault.RoleWrap, Version: v},
			nonce: make([]byte, 12),
			pt:    make([]byte, 16),
			aad:   []byte("keyvault/v1/self-test"),
		}
		rand.Read(ka.nonce)
		rand.Read(ka.pt)
		if ka.ct, err = safe(func() ([]byte, error) { return t.Seal(ka.key, ka.nonce, ka.pt, ka.aad) }); err != nil {
			return nil, fmt.Errorf("self-test seal under %s: %w", ka.key.Label(), err)
		}
		st.selfTests[v] = ka
		if err := st.runSelfTest(v); err != nil {
			return nil, err
		}
	}
	return st, nil
}

// runSelfTest opens the known answer under the wrap key version; an error
// means the member, not the data, is at fault.
func (st *tokenState) runSelfTest(version uint32) error {
	ka := st.selfTests[version]
	if ka == nil {
		return fmt.Errorf("no self-test for wrap key version %d", version)
	}
	pt, err := safe(func() ([]byte, error) { return st.tok.Open(ka.key, ka.nonce, ka.ct, ka.aad) })
	if err != nil {
		return fmt.Errorf("self-test open under %s: %w", ka.key.Label(), err)
	}
	if !bytes.Equal(pt, ka.pt) {
		return errors.New("self-test open: wrong plaintext")
	}
	return nil
}

// checkKCV computes the check value of one key on the token again and
// compares it with the one found at admission: an error means the member,
// not the data, is at fault.
func (st *tokenState) checkKCV(id vault.KeyID) error {
	got, err := safe(func() ([]byte, error) { return kcv(st.tok, id) })
	if err != nil {
		return fmt.Errorf("check value of %s: %w", id.Label(), err)
	}
	if want, ok := st.kcvs[id]; !ok || !bytes.Equal(got, want) {
		return fmt.Errorf("check value of %s: %x, at admission %x", id.Label(), got, want)
	}
	return nil
}

// tokenKeyChecker is a token that serves from session copies of its keys
// and can check that the token keys behind them still answer (p11Token).
type tokenKeyChecker interface {
	checkTokenKeys() error
}

// healthCheck is the probe's test of an admitted token: every self-test,
// and every key's check value against the reference, so that a token whose
// key handles went stale (re-initialised or restored) fails it; and,
// where the keys are served from session copies, which outlive such a
// token, the token keys themselves.
func (st *tokenState) healthCheck(ref map[vault.KeyID][]byte) error {
	if c, ok := st.tok.(tokenKeyChecker); ok {
		if err := c.checkTokenKeys(); err != nil {
			return err
		}
	}
	kcvs, err := keyCheckValues(st.tok)
	if err != nil {
		return err
	}
	if err := holdsKeys(ref, kcvs); err != nil {
		return err
	}
	for v := range st.selfTests {
		if err := st.runSelfTest(v); err != nil {
			return err
		}
	}
	return nil
}

// keyCheckValues computes the check value of every key on a token.
func keyCheckValues(t token) (map[vault.KeyID][]byte, error) {
	kcvs := map[vault.KeyID][]byte{}
	for _, role := range vault.Roles {
		vs := t.Versions(role)
		if len(vs) == 0 {
			return nil, fmt.Errorf("no %s key (run keyvault keys init)", role)
		}
		for _, v := range vs {
			id := vault.KeyID{Role: role, Version: v}
			c, err := safe(func() ([]byte, error) { return kcv(t, id) })
			if err != nil {
				return nil, fmt.Errorf("check value of %s: %w", id.Label(), err)
			}
			kcvs[id] = c
		}
	}
	return kcvs, nil
}

// sameKeys compares a member's check values with the reference's.
func sameKeys(ref, got map[vault.KeyID][]byte) error {
	for id, want := range ref {
		if g, ok := got[id]; !ok {
			return fmt.Errorf("%w: lacks %s", errKeyMismatch, id.Label())
		} else if !bytes.Equal(g, want) {
			return fmt.Errorf("%w: %s has check value %x, the pool's is %x", errKeyMismatch, id.Label(), g, want)
		}
	}
	for id := range got {
		if _, ok := ref[id]; !ok {
			return fmt.Errorf("%w: holds %s, which the pool lacks", errKeyMismatch, id.Label())
		}
	}
	return nil
}

// holdsKeys is sameKeys for admitting a member, except that the member may
// also hold versions newer than any the pool uses: `keys rotate` puts them
// on every member before the pool reloads, and a member re-opened in
// between must not be refused for it. The pool never uses them until
// Reload has checked every member holds them alike. Likewise it may hold
// older wrap and PIN versions the pool has let go (Forget: another node
// is destroying them).
func holdsKeys(ref, got map[vault.KeyID][]byte) error {
	newest := map[vault.KeyRole]uint32{}
	for id := range ref {
		newest[id.Role] = max(newest[id.Role], id.Version)
	}
	pending := map[vault.KeyID][]byte{}
	for id, kcv := range got {
		_, used := ref[id]
		letGo := (id.Role == vault.RoleWrap || id.Role == vault.RolePIN) && id.Version < newest[id.Role]
		if used || id.Version <= newest[id.Role] && !letGo {
			pending[id] = kcv
		}
	}
	return sameKeys(ref, pending)
}

// safe runs f, turning a crypto11 panic into an error.
func safe(f func() ([]byte, error)) (out []byte, err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("pkcs11: %v", r)
		}
	}()
	return f()
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

// blockEncrypter is a token that encrypts one AES block under a wrap key
// (CKM_AES_ECB): the check value of gcm-hsm-iv wrap keys.
type blockEncrypter interface {
	EncryptBlock(id vault.KeyID, block []byte) ([]byte, error)
}

// kcv computes the check value of one key on one token: a GCM tag for a
// wrap key of the gcm profile; the classic KCV, AES-ECB of a zero block,
// for one of gcm-hsm-iv (its tokens cannot seal under a fixed nonce);
// else an HMAC (the hmac profile's wrap key included), so a key's check
// value also tells its kind.
func kcv(t token, id vault.KeyID) ([]byte, error) {
	var out []byte
	var err error
	switch p := t.WrapProfile(id.Version); {
	case id.Role == vault.RoleWrap && p == vault.ProfileGCM:
		out, err = t.Seal(id, kcvNonce, nil, kcvInput(id))
	case id.Role == vault.RoleWrap && p == vault.ProfileGCMHSMIV:
		be, ok := t.(blockEncrypter)
		if !ok {
			return nil, fmt.Errorf("check value of %s: the token cannot encrypt an AES block", id.Label())
		}
		out, err = be.EncryptBlock(id, make([]byte, 16))
	default:
		out, err = t.HMAC(id, kcvInput(id))
	}
	if err != nil {
		return nil, err
	}
	return out[:8], nil
}
