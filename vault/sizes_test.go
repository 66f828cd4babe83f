package vault_test

import (
	"context"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// sizeRecorder passes every call to the fake HSM and records the lengths
// of the PIN MAC messages and of the outer seals' inputs.
type sizeRecorder struct {
	*fakeHSM
	mu     sync.Mutex
	pinMsg []int
	seal   []vault.Sizes // OuterNonce, OuterAAD, Inner of each Seal
	open   []vault.Sizes // of each Open, Inner being the ciphertext less the tag
}

func (r *sizeRecorder) HMAC(ctx context.Context, id vault.KeyID, msg []byte) ([]byte, error) {
	if id.Role == vault.RolePIN {
		r.mu.Lock()
		r.pinMsg = append(r.pinMsg, len(msg))
		r.mu.Unlock()
	}
	return r.fakeHSM.HMAC(ctx, id, msg)
}

func (r *sizeRecorder) Seal(ctx context.Context, id vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error) {
	r.mu.Lock()
	r.seal = append(r.seal, vault.Sizes{OuterNonce: len(nonce), OuterAAD: len(aad), Inner: len(plaintext)})
	r.mu.Unlock()
	return r.fakeHSM.Seal(ctx, id, nonce, plaintext, aad)
}

func (r *sizeRecorder) Open(ctx context.Context, id vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error) {
	r.mu.Lock()
	r.open = append(r.open, vault.Sizes{OuterNonce: len(nonce), OuterAAD: len(aad), Inner: len(ciphertext) - 16})
	r.mu.Unlock()
	return r.fakeHSM.Open(ctx, id, nonce, ciphertext, aad)
}

// SizesFor gives the lengths an enroll and a recover hand the HSM.
func TestSizesForMatchesTheHSMCalls(t *testing.T) {
	e := newEnv(t, vault.Options{})
	rec := &sizeRecorder{fakeHSM: e.hsm}
	v := e.newVault(e.store, rec, prometheus.NewRegistry())
	const user = "bench-0000001"
	secret, pin := randBytes(32), []byte("123456")
	e.remember([]byte(user), secret, pin)
	ctx := context.Background()
	if _, _, err := v.Enroll(ctx, ns, user, secret, pin, 10, vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := v.Recover(ctx, ns, user, pin); err != nil {
		t.Fatal(err)
	}
	want := vault.SizesFor(ns, user, len(secret), len(pin))
	outer := vault.Sizes{OuterNonce: want.OuterNonce, OuterAAD: want.OuterAAD, Inner: want.Inner}
	if len(rec.pinMsg) != 2 || rec.pinMsg[0] != want.PINMACInput || rec.pinMsg[1] != want.PINMACInput {
		t.Errorf("PIN MAC messages of %v bytes, want two of %d", rec.pinMsg, want.PINMACInput)
	}
	if len(rec.seal) != 1 || rec.seal[0] != outer {
		t.Errorf("seals %+v, want one of %+v", rec.seal, outer)
	}
	if len(rec.open) != 1 || rec.open[0] != outer {
		t.Errorf("opens %+v, want one of %+v", rec.open, outer)
	}
}
