package vault

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// recordFormatV1, V2 and V3 are the first byte of a record.
// docs/format.md has the layouts; a change needs a new format number and a
// reader for the old. Version 2 adds the operation IDs of the last writes,
// version 3 the byte that says how the outer layer was sealed; records are
// written as version 3 and read in any.
const (
	recordFormatV1 = 1
	recordFormatV2 = 2
	recordFormatV3 = 3
)

// The sealing byte of a format 3 record: the profile that sealed its outer
// layer. Records of formats 1 and 2 were all sealed by GCM in the HSM.
const (
	sealingNone = 0 // a tombstone
	sealingGCM  = 1
	sealingHMAC = 2
	// sealingGCMHSMIV: GCM in the HSM under the IV the HSM chose, which
	// the record's outer nonce holds; opened as sealingGCM.
	sealingGCMHSMIV = 3
)

func sealingByte(p Profile) byte {
	switch p {
	case ProfileGCM:
		return sealingGCM
	case ProfileHMAC:
		return sealingHMAC
	case ProfileGCMHSMIV:
		return sealingGCMHSMIV
	}
	return sealingNone
}

func sealingOf(b byte) (Profile, bool) {
	switch b {
	case sealingNone:
		return "", true
	case sealingGCM:
		return ProfileGCM, true
	case sealingHMAC:
		return ProfileHMAC, true
	case sealingGCMHSMIV:
		return ProfileGCMHSMIV, true
	}
	return "", false
}

const (
	// opIDLen and maxOpIDs size the operation IDs a record keeps: enough
	// that a writer whose answer was lost can still find its own write
	// after a few others (see Vault.resolve).
	opIDLen  = 8
	maxOpIDs = 8
)

const (
	flagLocked    = 1 << 0
	flagTombstone = 1 << 1
	flagLockFinal = 1 << 2

	saltLen     = 32
	verifierLen = 32
	nonceLen    = 12
	macLen      = sha256.Size

	// maxSealedLen bounds the outer ciphertext: inner nonce, the largest
	// secret, and two GCM tags.
	maxSealedLen = nonceLen + maxSecretLen + 2*16
)

// record is one backup, or the tombstone of a deleted one.
//
// The guess counter is three numbers rather than one so that concurrent
// requests can settle their guesses in any order (see Vault.Recover):
// Guesses counts every guess of this generation (guess i is the i-th);
// a successful guess i forgives every guess up to i (Forgiven = i); a guess
// that got no answer from the HSM is refunded (Refunds, reset when Forgiven
// moves). Attempts used = Guesses - Forgiven - Refunds.
type record struct {
	Generation  uint64
	Locked      bool // the secret was removed by the guess that used the last attempt
	LockFinal   bool // that guess settled wrong: the lock stands for this generation
	Tombstone   bool
	MaxAttempts uint32
	Guesses     uint32
	Forgiven    uint32
	Refunds     uint32
	CreatedAt   int64 // unix nanoseconds: when this generation was written
	UpdatedAt   int64 // unix nanoseconds: the last write of any kind
	LastGuessAt int64 // unix nanoseconds: when the latest guess was counted (0: none)
	WrapVersion uint32
	PINVersion  uint32
	MACVersion  uint32
	// Sealing is the profile that sealed the outer layer ("" in a
	// tombstone). It goes with Nonce and Sealed: whatever replaces one
	// replaces all three.
	Sealing  Profile
	Salt     []byte
	Verifier []byte
	Nonce    []byte // the outer GCM nonce actually used
	Sealed   []byte // outer ciphertext; empty when locked or a tombstone

	// OpSeq counts the writes of this key (all generations); OpIDs are the
	// random IDs of the last of them, oldest first, the newest being write
	// OpSeq. A writer whose write had an unknown outcome looks for its ID
	// here (format 2; a format 1 record has none).
	OpSeq uint64
	OpIDs [][]byte

	// freshWrap and freshPIN mark a record whose outer layer, or PIN check,
	// this process just made under the versions it names (not stored):
	// such a write must not land under a key version being retired. A
	// version carried over from the stored record is counted by RetireKeys
	// and needs no mark.
	freshWrap, freshPIN bool
	// undoBy, if set, is when a write that undoes a pending lock stops
	// being allowed to land (not stored): the guess that made the lock
	// may undo it only until then (guess.mayUnlock), so a write whose
	// outcome was lost is not sent again after it.
	undoBy time.Time
}

// undoExpired reports whether r undoes a pending lock and its time to
// land has passed.
func (r *record) undoExpired() bool {
	return !r.undoBy.IsZero() && !time.Now().Before(r.undoBy)
}

// recordKey is the store key of a backup: a type byte, then the namespace
// and the user_id, each prefixed by its length, so that no two pairs collide.
func recordKey(ns, userID string) []byte {
	k := make([]byte, 0, 3+len(ns)+len(userID))
	k = append(k, 'r', byte(len(ns)))
	k = append(k, ns...)
	k = append(k, byte(len(userID)))
	return append(k, userID...)
}

// recordFixedLen is the length of a format 3 record body without its
// variable fields: format, flags, generation, four counters, three times,
// three key versions, sealing, three byte lengths and one 4-byte length,
// the operation sequence and the count of operation IDs.
const recordFixedLen = 1 + 1 + 8 + 4*4 + 8*3 + 4*3 + 1 + 3 + 4 + 8 + 1

// marshal encodes the record body (everything the MAC covers, without it).
func (r *record) marshal() []byte {
	// Room for the fixed fields, the variable ones and the MAC the caller
	// appends.
	b := make([]byte, 0, recordFixedLen+len(r.Salt)+len(r.Verifier)+len(r.Nonce)+len(r.Sealed)+opIDLen*len(r.OpIDs)+macLen)
	var flags byte
	if r.Locked {
		flags |= flagLocked
	}
	if r.Tombstone {
		flags |= flagTombstone
	}
	if r.LockFinal {
		flags |= flagLockFinal
	}
	b = append(b, recordFormatV3, flags)
	b = binary.BigEndian.AppendUint64(b, r.Generation)
	b = binary.BigEndian.AppendUint32(b, r.MaxAttempts)
	b = binary.BigEndian.AppendUint32(b, r.Guesses)
	b = binary.BigEndian.AppendUint32(b, r.Forgiven)
	b = binary.BigEndian.AppendUint32(b, r.Refunds)
	b = binary.BigEndian.AppendUint64(b, uint64(r.CreatedAt))
	b = binary.BigEndian.AppendUint64(b, uint64(r.UpdatedAt))
	b = binary.BigEndian.AppendUint64(b, uint64(r.LastGuessAt))
	b = binary.BigEndian.AppendUint32(b, r.WrapVersion)
	b = binary.BigEndian.AppendUint32(b, r.PINVersion)
	b = binary.BigEndian.AppendUint32(b, r.MACVersion)
	b = append(b, sealingByte(r.Sealing))
	b = append(b, byte(len(r.Salt)))
	b = append(b, r.Salt...)
	b = append(b, byte(len(r.Verifier)))
	b = append(b, r.Verifier...)
	b = append(b, byte(len(r.Nonce)))
	b = append(b, r.Nonce...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Sealed)))
	b = append(b, r.Sealed...)
	b = binary.BigEndian.AppendUint64(b, r.OpSeq)
	b = append(b, byte(len(r.OpIDs)))
	for _, id := range r.OpIDs {
		b = append(b, id...)
	}
	return b
}

// hasOp reports whether the record holds the operation ID id.
func (r *record) hasOp(id []byte) bool {
	for _, o := range r.OpIDs {
		if hmac.Equal(o, id) {
			return true
		}
	}
	return false
}

var errMalformed = errors.New("malformed record")

// parseRecord decodes a record without checking its MAC; it returns the
// body the MAC covers and the MAC. Every length is checked, so arbitrary
// bytes give an error, never a panic.
func parseRecord(b []byte) (r *record, body, mac []byte, err error) {
	r = new(record)
	if body, mac, err = r.parse(b); err != nil {
		return nil, nil, nil, err
	}
	return r, body, mac, nil
}

// parse is parseRecord into r, which holds nothing of use after an error.
func (r *record) parse(b []byte) (body, mac []byte, err error) {
	if len(b) < macLen {
		return nil, nil, errMalformed
	}
	body, mac = b[:len(b)-macLen], b[len(b)-macLen:]
	d := decoder{b: body}
	format := d.byte()
	if format != recordFormatV1 && format != recordFormatV2 && format != recordFormatV3 {
		return nil, nil, fmt.Errorf("%w: unknown format %d", errMalformed, format)
	}
	flags := d.byte()
	*r = record{
		Locked:      flags&flagLocked != 0,
		LockFinal:   flags&flagLockFinal != 0,
		Tombstone:   flags&flagTombstone != 0,
		Generation:  d.u64(),
		MaxAttempts: d.u32(),
		Guesses:     d.u32(),
		Forgiven:    d.u32(),
		Refunds:     d.u32(),
		CreatedAt:   int64(d.u64()),
		UpdatedAt:   int64(d.u64()),
		LastGuessAt: int64(d.u64()),
		WrapVersion: d.u32(),
		PINVersion:  d.u32(),
		MACVersion:  d.u32(),
	}
	switch {
	case format >= recordFormatV3:
		var ok bool
		if r.Sealing, ok = sealingOf(d.byte()); !ok {
			return nil, nil, fmt.Errorf("%w: unknown sealing", errMalformed)
		}
	case !r.Tombstone:
		r.Sealing = ProfileGCM
	}
	r.Salt = d.bytes(int(d.byte()))
	r.Verifier = d.bytes(int(d.byte()))
	r.Nonce = d.bytes(int(d.byte()))
	r.Sealed = d.bytes(int(d.u32()))
	if format >= recordFormatV2 {
		r.OpSeq = d.u64()
		n := int(d.byte())
		if n > maxOpIDs {
			return nil, nil, errMalformed
		}
		if n > 0 {
			r.OpIDs = make([][]byte, 0, n)
		}
		for range n {
			r.OpIDs = append(r.OpIDs, d.bytes(opIDLen))
		}
	}
	if d.err || len(d.b) != 0 || flags&^(flagLocked|flagTombstone|flagLockFinal) != 0 {
		return nil, nil, errMalformed
	}
	return body, mac, nil
}

// check validates what a record with a correct MAC must satisfy anyway;
// a failure means a bug or a forged MAC, and is treated as tampering.
func (r *record) check() error {
	if len(r.OpIDs) > maxOpIDs || uint64(len(r.OpIDs)) > r.OpSeq {
		return errors.New("operation IDs out of range")
	}
	switch {
	case r.Generation == 0:
		return errors.New("generation 0")
	case r.Tombstone:
		if r.Locked || r.LockFinal || len(r.Sealed) != 0 || len(r.Salt) != 0 || r.Sealing != "" {
			return errors.New("tombstone with contents")
		}
		return nil
	case r.MaxAttempts == 0:
		return errors.New("max_attempts 0")
	case uint64(r.Forgiven)+uint64(r.Refunds) > uint64(r.Guesses):
		return errors.New("counter out of range")
	case r.used() > r.MaxAttempts:
		return errors.New("counter out of range")
	case !r.Locked && (r.used() == r.MaxAttempts || r.LockFinal):
		return errors.New("lock state disagrees with counter")
	case r.LockFinal && r.used() != r.MaxAttempts:
		return errors.New("final lock with attempts left")
	case r.Locked != (len(r.Sealed) == 0):
		return errors.New("lock state disagrees with sealed secret")
	case len(r.Salt) != saltLen || len(r.Verifier) != verifierLen || len(r.Nonce) != nonceLen:
		return errors.New("bad field length")
	case len(r.Sealed) > maxSealedLen:
		return errors.New("sealed secret too long")
	case r.Sealing != ProfileGCM && r.Sealing != ProfileHMAC && r.Sealing != ProfileGCMHSMIV:
		return errors.New("no sealing profile")
	}
	return nil
}

// recordMACLabel opens every record MAC input.
var recordMACLabel = []byte("keyvault/v1/record\x00")

// appendRecordMAC appends to dst the MAC under k of a record's bytes and
// the key it is stored under, so that neither an edit nor a move to another
// user's key goes unnoticed.
func appendRecordMAC(dst []byte, k *keyedHMAC, storeKey, body []byte) []byte {
	s := writeRecordMAC(k, storeKey, body)
	defer k.put(s)
	return append(dst, s.sum()...)
}

// verifyRecordMAC reports, in constant time, whether mac is the MAC under
// k of body stored under storeKey (see appendRecordMAC).
func verifyRecordMAC(k *keyedHMAC, mac, storeKey, body []byte) bool {
	s := writeRecordMAC(k, storeKey, body)
	defer k.put(s)
	return hmac.Equal(mac, s.sum())
}

func writeRecordMAC(k *keyedHMAC, storeKey, body []byte) *hmacState {
	s := k.get()
	s.h.Write(recordMACLabel)
	binary.BigEndian.PutUint32(s.buf[:4], uint32(len(storeKey)))
	s.h.Write(s.buf[:4])
	s.h.Write(storeKey)
	s.h.Write(body)
	return s
}

type decoder struct {
	b   []byte
	err bool
}

func (d *decoder) bytes(n int) []byte {
	if d.err || n < 0 || n > len(d.b) {
		d.err = true
		return nil
	}
	out := d.b[:n:n]
	d.b = d.b[n:]
	if n == 0 {
		return nil
	}
	return out
}

func (d *decoder) byte() byte {
	if b := d.bytes(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if b := d.bytes(4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if b := d.bytes(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}
