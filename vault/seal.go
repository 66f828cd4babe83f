package vault

// The HSM side of a record: the PIN check, sealing and opening the secret's
// two layers, and the durable count of seals under each wrap key version.

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
)

// sealBlock hands out GCM seal operations under one wrap key version from a
// block reserved durably in the store, so that the count of seals under a
// version (at most 2^32 with random nonces) is never under-reported, across
// processes and restarts. A crash wastes at most the rest of one block.
type sealBlock struct{ next, end uint64 }

const (
	sealBlockSize = 1 << 12
	maxSealsPerKV = 1 << 32
)

func sealCountKey(version uint32) []byte {
	return binary.BigEndian.AppendUint32([]byte("m\x00seals/wrap/"), version)
}

// sealCount encodes a seal count: the count (8 bytes), the root key
// version of its MAC (4), and the MAC, as a record's, so that nobody who
// can write the store can wind it back.
func (v *Vault) sealCount(key []byte, n uint64) []byte {
	body := binary.BigEndian.AppendUint64(nil, n)
	body = binary.BigEndian.AppendUint32(body, v.macVersion)
	return appendRecordMAC(body, v.macKeys[v.macVersion], key, body)
}

func (v *Vault) parseSealCount(key, raw []byte) (uint64, error) {
	if raw == nil {
		return 0, nil
	}
	if len(raw) != 12+macLen {
		return 0, errors.New("seal count malformed")
	}
	body, mac := raw[:12], raw[12:]
	k, ok := v.macKeys[binary.BigEndian.Uint32(body[8:])]
	if !ok || !verifyRecordMAC(k, mac, key, body) {
		return 0, errors.New("seal count MAC mismatch")
	}
	return binary.BigEndian.Uint64(body), nil
}

// takeSeal reserves one seal under the wrap key version.
func (v *Vault) takeSeal(ctx context.Context, version uint32) error {
	v.sealMu.Lock()
	defer v.sealMu.Unlock()
	b := v.seals[version]
	if b == nil || b.next == b.end {
		key := sealCountKey(version)
		for {
			raw, rev, err := v.store.Get(ctx, key)
			if err != nil {
				return fmt.Errorf("%w: read seal count: %w", ErrUnavailable, err)
			}
			n, err := v.parseSealCount(key, raw)
			if err != nil {
				v.integrityFailure(key, "seal count", err)
				return fmt.Errorf("%w: %w", ErrIntegrity, err)
			}
			if n+sealBlockSize > maxSealsPerKV {
				return fmt.Errorf("%w: wrap key version %d has sealed its limit of 2^32 records; rotate the keys", ErrUnavailable, version)
			}
			_, err = v.store.CompareAndSwap(context.WithoutCancel(ctx), key, rev, v.sealCount(key, n+sealBlockSize))
			if errors.Is(err, ErrConflict) {
				continue
			}
			if err != nil {
				return fmt.Errorf("%w: reserve seals: %w", ErrUnavailable, err)
			}
			b = &sealBlock{next: n, end: n + sealBlockSize}
			v.seals[version] = b
			v.metrics.sealsReserved.WithLabelValues(fmt.Sprint(version)).Set(float64(b.end))
			break
		}
	}
	b.next++
	return nil
}

// verify checks a PIN against a record: one HSM HMAC, then a constant-time
// comparison of the derived verifier. On a match it also returns the inner
// key; the caller wipes it.
func (v *Vault) verify(ctx context.Context, ns, userID string, r *record, pin []byte) (ok bool, inner []byte, err error) {
	msg := pinMACInput(ns, userID, r.Generation, r.Salt, pin)
	defer wipe(msg)
	m, err := v.hsm.HMAC(ctx, KeyID{RolePIN, r.PINVersion}, msg)
	if err != nil {
		return false, nil, fmt.Errorf("%w: PIN check: %w", ErrUnavailable, err)
	}
	defer wipe(m)
	verifier, inner, err := pinKeys(m)
	if err != nil {
		return false, nil, err
	}
	defer wipe(verifier)
	if subtle.ConstantTimeCompare(verifier, r.Verifier) != 1 {
		wipe(inner)
		return false, nil, nil
	}
	return true, inner, nil
}

// openOuter removes the outer layer of a record's sealed secret, as the
// record's sealing profile says, and returns the inner layer; the caller
// wipes it. The profile comes from the record, whose MAC vouches for it,
// and must be the one of the wrap key version it names: a key of another
// kind under that label cannot have sealed it.
func (v *Vault) openOuter(ctx context.Context, ns, userID string, r *record, sealed []byte) ([]byte, error) {
	if p := v.hsm.WrapProfile(r.WrapVersion); p != "" && !SameKeyKind(p, r.Sealing) {
		err := fmt.Errorf("sealed by the %s profile, but wrap key v%d is of the %s profile", r.Sealing, r.WrapVersion, p)
		v.integrityFailure(recordKey(ns, userID), "sealed secret", err)
		return nil, fmt.Errorf("%w: open outer layer: %w", ErrIntegrity, err)
	}
	aad := outerAAD(ns, userID, r.Generation, r.WrapVersion, r.PINVersion)
	pt, err := v.hsm.Open(ctx, KeyID{RoleWrap, r.WrapVersion}, r.Nonce, sealed, aad)
	if err != nil {
		if errors.Is(err, ErrIntegrity) {
			v.integrityFailure(recordKey(ns, userID), "sealed secret", errors.New("outer layer failed authentication"))
			return nil, fmt.Errorf("open outer layer: %w", err)
		}
		return nil, fmt.Errorf("%w: open outer layer: %w", ErrUnavailable, err)
	}
	return pt, nil
}

// sealOuter seals an inner layer under a wrap key version, with a fresh
// nonce (or the HSM's IV, which Seal writes into it), and sets the
// record's outer fields: version, sealing profile, nonce and sealed bytes,
// which always change together.
func (v *Vault) sealOuter(ctx context.Context, ns, userID string, r *record, version uint32, inner []byte) error {
	profile := v.hsm.WrapProfile(version)
	if profile == "" {
		return fmt.Errorf("%w: the HSM holds no wrap key v%d", ErrUnavailable, version)
	}
	if err := v.takeSeal(ctx, version); err != nil {
		return err
	}
	nonce := make([]byte, nonceLen)
	rand.Read(nonce) // never fails (crypto/rand, Go 1.24+)
	sealed, err := v.hsm.Seal(ctx, KeyID{RoleWrap, version}, nonce, inner, outerAAD(ns, userID, r.Generation, version, r.PINVersion))
	if err != nil {
		return fmt.Errorf("%w: seal: %w", ErrUnavailable, err)
	}
	r.WrapVersion, r.Sealing, r.Nonce, r.Sealed = version, profile, nonce, sealed
	return nil
}

// open removes both layers of a record's sealed secret.
func (v *Vault) open(ctx context.Context, ns, userID string, r *record, sealed, inner []byte) ([]byte, error) {
	pt, err := v.openOuter(ctx, ns, userID, r, sealed)
	if err != nil {
		return nil, err
	}
	defer wipe(pt)
	g, err := innerGCM(inner)
	if err != nil {
		return nil, err
	}
	if len(pt) < nonceLen {
		v.integrityFailure(recordKey(ns, userID), "sealed secret", errors.New("inner layer too short"))
		return nil, fmt.Errorf("%w: inner layer too short", ErrIntegrity)
	}
	secret, err := g.Open(nil, pt[:nonceLen], pt[nonceLen:], innerAAD(ns, userID, r.Generation))
	if err != nil {
		v.integrityFailure(recordKey(ns, userID), "sealed secret", errors.New("inner layer failed authentication"))
		return nil, fmt.Errorf("%w: open inner layer", ErrIntegrity)
	}
	return secret, nil
}

// seal builds the PIN check and both layers of a new generation of a backup.
func (v *Vault) seal(ctx context.Context, ns, userID string, gen uint64, secret, pin []byte) (*record, error) {
	wrapVersion := v.hsm.KeyVersion(RoleWrap)
	r := &record{
		Generation: gen,
		PINVersion: v.hsm.KeyVersion(RolePIN),
		Salt:       make([]byte, saltLen),
		freshWrap:  true,
		freshPIN:   true,
	}
	if wrapVersion == 0 || r.PINVersion == 0 {
		return nil, fmt.Errorf("%w: the HSM holds no wrap or PIN key", ErrUnavailable)
	}
	if err := v.mayUse(wrapVersion, r.PINVersion); err != nil {
		return nil, err
	}
	rand.Read(r.Salt) // never fails (crypto/rand, Go 1.24+)

	msg := pinMACInput(ns, userID, gen, r.Salt, pin)
	defer wipe(msg)
	m, err := v.hsm.HMAC(ctx, KeyID{RolePIN, r.PINVersion}, msg)
	if err != nil {
		return nil, fmt.Errorf("%w: PIN MAC: %w", ErrUnavailable, err)
	}
	defer wipe(m)
	verifier, innerKey, err := pinKeys(m)
	if err != nil {
		return nil, err
	}
	defer wipe(innerKey)
	r.Verifier = verifier

	g, err := innerGCM(innerKey)
	if err != nil {
		return nil, err
	}
	inner := make([]byte, nonceLen, nonceLen+len(secret)+g.Overhead())
	rand.Read(inner)
	inner = g.Seal(inner, inner[:nonceLen], secret, innerAAD(ns, userID, gen))
	defer wipe(inner)

	if err := v.sealOuter(ctx, ns, userID, r, wrapVersion, inner); err != nil {
		return nil, err
	}
	return r, nil
}
