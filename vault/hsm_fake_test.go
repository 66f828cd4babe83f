package vault_test

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/keyvault/keyvault/vault"
)

// fakeHSM is a vault.HSM on Go's crypto, for unit tests: HMAC-SHA256 and
// AES-256-GCM under random per-KeyID keys. It can fail the next N HMAC, Seal
// or Open calls with ErrUnavailable, run a hook inside every HMAC (which may
// block, so a test can hold one request at a known point while others run),
// and counts HMACs, PIN checks among them. It also polices how the vault
// uses it: a key used for the wrong role, a key version it does not hold, a
// nonce of the wrong length or a (key, nonce) pair sealed twice is recorded
// as misuse and fails the test at cleanup.
type fakeHSM struct {
	t        *testing.T
	ring     *keyring
	versions map[vault.KeyRole]uint32 // read-only after construction
	// profiles are the wrap key versions' profiles (absent: gcm); under
	// hmac, Seal and Open derive a key per seal from the wrap key by HMAC
	// over vault.SealKeyInput and run GCM under it, as hsmpool does; under
	// gcm-hsm-iv, Seal chooses the IV, as an HSM that generates it does,
	// writes it into the caller's nonce and keeps it in ring.chosenIVs.
	profiles map[uint32]vault.Profile // read-only after construction

	failHMAC atomic.Int64 // fail the next N HMAC calls
	failTags sync.Map     // request tag -> fail its next HMAC
	failSeal atomic.Int64
	failOpen atomic.Int64

	hookMu    sync.Mutex
	hook      func(ctx context.Context, key vault.KeyID, msg []byte)
	afterHook func(ctx context.Context, key vault.KeyID)

	hmacCalls atomic.Int64 // every HMAC call, failed ones included
	pinHMACs  atomic.Int64 // HMACs under the PIN key that produced a result
	sealCalls atomic.Int64
	openCalls atomic.Int64
}

// keyring is the key material; fakes made by sameKeys share it, as HSM
// members holding the same key versions would.
type keyring struct {
	mu     sync.Mutex
	keys   map[vault.KeyID][]byte
	nonces map[string]bool // key label + nonce of every seal
	// chosenIVs are the IVs Seal chose under gcm-hsm-iv, by key label.
	chosenIVs map[string][][]byte
	misuse    []string
}

var _ vault.HSM = (*fakeHSM)(nil)

// newFakeHSM returns an HSM holding version 1 of every role.
func newFakeHSM(t *testing.T) *fakeHSM {
	return newFakeHSMVersions(t, map[vault.KeyRole]uint32{vault.RoleWrap: 1, vault.RolePIN: 1, vault.RoleRoot: 1})
}

func newFakeHSMVersions(t *testing.T, versions map[vault.KeyRole]uint32) *fakeHSM {
	ring := &keyring{keys: map[vault.KeyID][]byte{}, nonces: map[string]bool{}}
	return newFakeOnRing(t, ring, versions)
}

func newFakeOnRing(t *testing.T, ring *keyring, versions map[vault.KeyRole]uint32) *fakeHSM {
	return newFakeProfiles(t, ring, versions, nil)
}

func newFakeProfiles(t *testing.T, ring *keyring, versions map[vault.KeyRole]uint32, profiles map[uint32]vault.Profile) *fakeHSM {
	f := &fakeHSM{t: t, ring: ring, versions: versions, profiles: profiles}
	t.Cleanup(func() {
		ring.mu.Lock()
		defer ring.mu.Unlock()
		for _, m := range ring.misuse {
			t.Errorf("fake HSM misused: %s", m)
		}
		ring.misuse = nil
	})
	return f
}

// sameKeys returns a fresh fake (no counters, hooks or pending failures)
// holding the same key material: the HSM as a restarted vault finds it.
func (f *fakeHSM) sameKeys() *fakeHSM { return newFakeProfiles(f.t, f.ring, f.versions, f.profiles) }

// withProfiles returns a fake on the same key material whose wrap key
// versions have the given profiles (absent: gcm). A version's profile is
// the kind of its key, so a test gives each version one for good.
func (f *fakeHSM) withProfiles(profiles map[uint32]vault.Profile) *fakeHSM {
	return newFakeProfiles(f.t, f.ring, f.versions, profiles)
}

// withVersions returns a fake on the same key material that holds the
// given versions: the HSM after keys of a new version were added.
func (f *fakeHSM) withVersions(versions map[vault.KeyRole]uint32) *fakeHSM {
	return newFakeProfiles(f.t, f.ring, versions, f.profiles)
}

// withNewRoot returns a fake with the same wrap and PIN keys but another
// root key: another deployment's HSM that happens to share those keys.
func (f *fakeHSM) withNewRoot() *fakeHSM {
	ring := &keyring{keys: map[vault.KeyID][]byte{}, nonces: map[string]bool{}}
	f.ring.mu.Lock()
	for id, k := range f.ring.keys {
		if id.Role != vault.RoleRoot {
			ring.keys[id] = k
		}
	}
	f.ring.mu.Unlock()
	return newFakeProfiles(f.t, ring, f.versions, f.profiles)
}

// failNextHMAC makes the next n HMAC calls fail with an error wrapping
// vault.ErrUnavailable (no result obtained).
func (f *fakeHSM) failNextHMAC(n int) { f.failHMAC.Store(int64(n)) }

// failTagged makes the next HMAC of the request tagged tag fail with
// ErrUnavailable; called from a hook, it fails the call that runs the hook.
func (f *fakeHSM) failTagged(tag string) { f.failTags.Store(tag, true) }

func (f *fakeHSM) failNextSeal(n int) { f.failSeal.Store(int64(n)) }
func (f *fakeHSM) failNextOpen(n int) { f.failOpen.Store(int64(n)) }

// setHook installs fn to run at the start of every HMAC call, before any
// injected failure is applied; fn may block. nil removes it.
func (f *fakeHSM) setHook(fn func(ctx context.Context, key vault.KeyID, msg []byte)) {
	f.hookMu.Lock()
	f.hook = fn
	f.hookMu.Unlock()
}

// setAfterHook installs fn to run after an HMAC has produced its result,
// just before it is returned. nil removes it.
func (f *fakeHSM) setAfterHook(fn func(ctx context.Context, key vault.KeyID)) {
	f.hookMu.Lock()
	f.afterHook = fn
	f.hookMu.Unlock()
}

// pinChecks is the number of HMACs under the PIN key that produced a
// result: PIN checks, plus one per sealed generation (Enroll, ChangePIN).
func (f *fakeHSM) pinChecks() int64 { return f.pinHMACs.Load() }

func take(n *atomic.Int64) bool {
	for {
		v := n.Load()
		if v <= 0 {
			return false
		}
		if n.CompareAndSwap(v, v-1) {
			return true
		}
	}
}

func (f *fakeHSM) misused(format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	f.ring.mu.Lock()
	f.ring.misuse = append(f.ring.misuse, msg)
	f.ring.mu.Unlock()
	return errors.New("fake hsm: " + msg)
}

// key returns the material of id, creating it on first use, if the fake
// holds that version of that role and the role is the one the operation
// needs.
func (f *fakeHSM) key(id vault.KeyID, op string, roles ...vault.KeyRole) ([]byte, error) {
	ok := false
	for _, r := range roles {
		ok = ok || id.Role == r
	}
	if !ok {
		return nil, f.misused("%s under %s, a key of another role", op, id.Label())
	}
	if id.Version == 0 || id.Version > f.versions[id.Role] {
		return nil, f.misused("%s under %s, a key version the HSM does not hold", op, id.Label())
	}
	f.ring.mu.Lock()
	defer f.ring.mu.Unlock()
	k, ok := f.ring.keys[id]
	if !ok {
		k = make([]byte, 32)
		rand.Read(k)
		f.ring.keys[id] = k
	}
	return k, nil
}

func (f *fakeHSM) HMAC(ctx context.Context, id vault.KeyID, msg []byte) ([]byte, error) {
	f.hmacCalls.Add(1)
	f.hookMu.Lock()
	hook := f.hook
	f.hookMu.Unlock()
	if hook != nil {
		hook(ctx, id, msg)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("fake hsm: %w: %w", vault.ErrUnavailable, err)
	}
	if _, ok := f.failTags.LoadAndDelete(tagOf(ctx)); ok || take(&f.failHMAC) {
		return nil, fmt.Errorf("fake hsm: injected HMAC failure: %w", vault.ErrUnavailable)
	}
	k, err := f.key(id, "HMAC", vault.RolePIN, vault.RoleRoot)
	if err != nil {
		return nil, err
	}
	m := hmac.New(sha256.New, k)
	m.Write(msg)
	if id.Role == vault.RolePIN {
		f.pinHMACs.Add(1)
	}
	f.hookMu.Lock()
	after := f.afterHook
	f.hookMu.Unlock()
	if after != nil {
		after(ctx, id)
	}
	return m.Sum(nil), nil
}

func (f *fakeHSM) gcm(id vault.KeyID, op string, nonce, aad []byte) (cipher.AEAD, error) {
	k, err := f.key(id, op, vault.RoleWrap)
	if err != nil {
		return nil, err
	}
	if len(nonce) != 12 {
		return nil, f.misused("%s with a %d-byte nonce", op, len(nonce))
	}
	if f.WrapProfile(id.Version) == vault.ProfileHMAC {
		m := hmac.New(sha256.New, k)
		m.Write(vault.SealKeyInput(nonce, aad))
		k = m.Sum(nil)
	}
	block, err := aes.NewCipher(k)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

func (f *fakeHSM) Seal(ctx context.Context, id vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error) {
	f.sealCalls.Add(1)
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("fake hsm: %w: %w", vault.ErrUnavailable, err)
	}
	if take(&f.failSeal) {
		return nil, fmt.Errorf("fake hsm: injected seal failure: %w", vault.ErrUnavailable)
	}
	g, err := f.gcm(id, "seal", nonce, aad)
	if err != nil {
		return nil, err
	}
	if f.WrapProfile(id.Version) == vault.ProfileGCMHSMIV {
		rand.Read(nonce)
		f.ring.mu.Lock()
		if f.ring.chosenIVs == nil {
			f.ring.chosenIVs = map[string][][]byte{}
		}
		f.ring.chosenIVs[id.Label()] = append(f.ring.chosenIVs[id.Label()], bytes.Clone(nonce))
		f.ring.mu.Unlock()
	}
	f.ring.mu.Lock()
	n := id.Label() + "/" + string(nonce)
	reused := f.ring.nonces[n]
	f.ring.nonces[n] = true
	f.ring.mu.Unlock()
	if reused {
		return nil, f.misused("seal under %s reused a nonce", id.Label())
	}
	return g.Seal(nil, nonce, plaintext, aad), nil
}

func (f *fakeHSM) Open(ctx context.Context, id vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	f.openCalls.Add(1)
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("fake hsm: %w: %w", vault.ErrUnavailable, err)
	}
	if take(&f.failOpen) {
		return nil, fmt.Errorf("fake hsm: injected open failure: %w", vault.ErrUnavailable)
	}
	g, err := f.gcm(id, "open", nonce, aad)
	if err != nil {
		return nil, err
	}
	pt, err := g.Open(nil, nonce, ciphertext, aad)
	if err != nil {
		return nil, fmt.Errorf("fake hsm: GCM open: %w", vault.ErrIntegrity)
	}
	return pt, nil
}

func (f *fakeHSM) KeyVersion(role vault.KeyRole) uint32 { return f.versions[role] }

func (f *fakeHSM) WrapProfile(version uint32) vault.Profile {
	if version == 0 || version > f.versions[vault.RoleWrap] {
		return ""
	}
	if p, ok := f.profiles[version]; ok {
		return p
	}
	return vault.ProfileGCM
}

// rawKey is the material of a key, for tests that recompute what the HSM
// would (known-answer checks of the stored format).
func (f *fakeHSM) rawKey(id vault.KeyID) []byte {
	f.ring.mu.Lock()
	defer f.ring.mu.Unlock()
	return f.ring.keys[id]
}

// Requests are told apart by a tag in their context, which the vault passes
// down to the HSM and the store.
type tagKey struct{}

func withTag(ctx context.Context, tag string) context.Context {
	return context.WithValue(ctx, tagKey{}, tag)
}

func tagOf(ctx context.Context) string {
	s, _ := ctx.Value(tagKey{}).(string)
	return s
}

// pause holds the nth (1-based) HMAC under the PIN key made by the request
// tagged tag. entered is closed once that call is held; release lets it go
// on (it is idempotent and also runs at cleanup, so a failing test cannot
// leave a goroutine blocked). It replaces any other hook.
func (f *fakeHSM) pause(tag string, nth int) (entered <-chan struct{}, release func()) {
	in, out := make(chan struct{}), make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(out) }) }
	f.t.Cleanup(release)
	var mu sync.Mutex
	seen := 0
	f.setHook(func(ctx context.Context, key vault.KeyID, _ []byte) {
		if key.Role != vault.RolePIN || tagOf(ctx) != tag {
			return
		}
		mu.Lock()
		seen++
		hold := seen == nth
		mu.Unlock()
		if hold {
			close(in)
			<-out
		}
	})
	return in, release
}
