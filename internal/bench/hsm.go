package bench

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"

	"github.com/keyvault/keyvault/vault"
)

// HSMOps are the operations HSM performs.
var HSMOps = []string{"recover", "enroll"}

// Pool is what HSM calls: an HSM pool, which it closes with the workload.
// Its calls are safe for concurrent use.
type Pool interface {
	HMAC(ctx context.Context, key vault.KeyID, msg []byte) ([]byte, error)
	Seal(ctx context.Context, key vault.KeyID, nonce, plaintext, aad []byte) ([]byte, error)
	Open(ctx context.Context, key vault.KeyID, nonce, ciphertext, aad []byte) ([]byte, error)
	KeyVersion(role vault.KeyRole) uint32
	Close() error
}

// The backup whose HSM calls HSM makes: a 32-byte secret under a 6-digit
// PIN, for a user ID as long as the HTTP workload's (with the default
// prefix) in a namespace named bench.
const (
	hsmNamespace = "bench"
	hsmUserID    = "bench-0000000"
	hsmSecretLen = 32
	hsmPINLen    = 6
)

// HSM performs exactly the HSM calls of one recover (the PIN HMAC, then
// the GCM open of the outer layer) or of one enroll (the HMAC, then a GCM
// seal), with inputs the size the vault sends (vault.SizesFor).
type HSM struct {
	kind  string
	pool  Pool
	pin   vault.KeyID
	wrap  vault.KeyID
	msg   []byte // a PIN MAC input
	aad   []byte
	pt    []byte // an inner layer
	nonce []byte
	ct    []byte
}

// NewHSM makes the workload of op (one of HSMOps) on pool's current key
// versions, and seals one outer layer for the recovers to open. The
// workload owns pool: Close closes it, and so does NewHSM when it fails.
func NewHSM(ctx context.Context, pool Pool, op string) (*HSM, error) {
	if !slices.Contains(HSMOps, op) {
		pool.Close()
		return nil, fmt.Errorf("the HSM workload has no operation %q", op)
	}
	sz := vault.SizesFor(hsmNamespace, hsmUserID, hsmSecretLen, hsmPINLen)
	w := &HSM{
		kind:  op,
		pool:  pool,
		pin:   vault.KeyID{Role: vault.RolePIN, Version: pool.KeyVersion(vault.RolePIN)},
		wrap:  vault.KeyID{Role: vault.RoleWrap, Version: pool.KeyVersion(vault.RoleWrap)},
		msg:   make([]byte, sz.PINMACInput),
		aad:   make([]byte, sz.OuterAAD),
		pt:    make([]byte, sz.Inner),
		nonce: make([]byte, sz.OuterNonce),
	}
	rand.Read(w.msg)
	rand.Read(w.aad)
	rand.Read(w.pt)
	rand.Read(w.nonce)
	var err error
	if w.ct, err = pool.Seal(ctx, w.wrap, w.nonce, w.pt, w.aad); err != nil {
		pool.Close()
		return nil, fmt.Errorf("seal the ciphertext to open: %w", err)
	}
	return w, nil
}

// Name is "hsm-" and the operation.
func (w *HSM) Name() string { return "hsm-" + w.kind }

// Before does nothing: every call is measured.
func (w *HSM) Before(context.Context, int) error { return nil }

// Close closes the pool.
func (w *HSM) Close() { w.pool.Close() }

// Op makes the calls of one recover or enroll.
func (w *HSM) Op(ctx context.Context, _ int) error {
	if _, err := w.pool.HMAC(ctx, w.pin, w.msg); err != nil {
		return hsmError{err}
	}
	var err error
	if w.kind == "recover" {
		_, err = w.pool.Open(ctx, w.wrap, w.nonce, w.ct, w.aad)
	} else {
		nonce := make([]byte, len(w.nonce))
		rand.Read(nonce)
		_, err = w.pool.Seal(ctx, w.wrap, nonce, w.pt, w.aad)
	}
	if err != nil {
		return hsmError{err}
	}
	return nil
}

// hsmError codes a raw HSM call's error as the API would: an operation the
// pool shed (no session free within its queue timeout) is "unavailable",
// the 503 the vault answers for it, and not a failure of the bench; any
// other is "error".
type hsmError struct{ error }

func (e hsmError) Unwrap() error { return e.error }
func (e hsmError) Code() string {
	if errors.Is(e.error, vault.ErrUnavailable) {
		return "unavailable"
	}
	return ""
}
