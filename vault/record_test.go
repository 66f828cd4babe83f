package vault

import (
	"bytes"
	"reflect"
	"slices"
	"testing"
)

// Records of formats 1 and 2 (no sealing byte: all sealed by GCM in the
// HSM; format 1 also without operation IDs) still parse, with every field
// as it was and the gcm profile as their sealing; format 3 round-trips
// its sealing and operation IDs.
func TestRecordFormats(t *testing.T) {
	for _, r := range seedRecordValues() {
		r.OpSeq = 9
		r.OpIDs = [][]byte{bytes.Repeat([]byte{1}, opIDLen), bytes.Repeat([]byte{2}, opIDLen)}
		v3 := r.marshal()
		if v3[0] != recordFormatV3 || v3[62] != sealingByte(r.Sealing) {
			t.Fatalf("format 3: format %d, sealing byte %d for %q", v3[0], v3[62], r.Sealing)
		}
		got, _, _, err := parseRecord(append(bytes.Clone(v3), make([]byte, macLen)...))
		if err != nil || !reflect.DeepEqual(got, r) {
			t.Fatalf("format 3 round trip: %v\n got %+v\nwant %+v", err, got, r)
		}
		bad := bytes.Clone(v3)
		bad[62] = 4
		if _, _, _, err := parseRecord(append(bad, make([]byte, macLen)...)); err == nil {
			t.Fatal("a record with an unknown sealing byte parsed")
		}
		if r.Sealing != ProfileGCM {
			continue // formats 1 and 2 have no sealing byte: they are all gcm
		}
		// The same record as format 2 wrote it: no sealing byte.
		v2 := slices.Delete(bytes.Clone(v3), 62, 63)
		v2[0] = recordFormatV2
		got, _, _, err = parseRecord(append(bytes.Clone(v2), make([]byte, macLen)...))
		if err != nil || !reflect.DeepEqual(got, r) {
			t.Fatalf("format 2: %v\n got %+v\nwant %+v", err, got, r)
		}
		// As format 1 wrote it: no trailing op fields either.
		v1 := bytes.Clone(v2[:len(v2)-9-2*opIDLen])
		v1[0] = recordFormatV1
		got, _, _, err = parseRecord(append(v1, make([]byte, macLen)...))
		want := *r
		want.OpSeq, want.OpIDs = 0, nil
		if err != nil || !reflect.DeepEqual(got, &want) {
			t.Fatalf("format 1: %v\n got %+v\nwant %+v", err, got, &want)
		}
		// Too many IDs is malformed, not a panic.
		bad = bytes.Clone(v3)
		bad[len(bad)-1-2*opIDLen] = maxOpIDs + 1
		if _, _, _, err := parseRecord(append(bad, make([]byte, macLen)...)); err == nil {
			t.Fatal("a record with too many operation IDs parsed")
		}
	}
}

// A record's sealing must agree with what it is: a tombstone has none,
// anything else gcm, hmac or gcm-hsm-iv.
func TestRecordSealingInvariant(t *testing.T) {
	vals := seedRecordValues()
	live, tomb := vals[0], vals[2]
	live.Sealing = ""
	if err := live.check(); err == nil {
		t.Error("a live record without a sealing profile passed its check")
	}
	tomb.Sealing = ProfileGCM
	if err := tomb.check(); err == nil {
		t.Error("a tombstone with a sealing profile passed its check")
	}
}

// TestMarshalLength: recordFixedLen is what marshal writes besides the
// variable fields, so the buffer it sizes takes the record and its MAC
// without growing.
func TestMarshalLength(t *testing.T) {
	t.Parallel()
	r := &record{
		Generation: 1, MaxAttempts: 10, Sealing: ProfileGCM,
		Salt: make([]byte, saltLen), Verifier: make([]byte, verifierLen), Nonce: make([]byte, nonceLen), Sealed: make([]byte, 76),
		OpSeq: maxOpIDs, OpIDs: make([][]byte, maxOpIDs),
	}
	for i := range r.OpIDs {
		r.OpIDs[i] = make([]byte, opIDLen)
	}
	b := r.marshal()
	if want := recordFixedLen + saltLen + verifierLen + nonceLen + 76 + maxOpIDs*opIDLen; len(b) != want {
		t.Fatalf("marshal wrote %d bytes, want %d", len(b), want)
	}
	if cap(b)-len(b) != macLen {
		t.Fatalf("marshal left room for %d bytes after the body, want %d (the MAC)", cap(b)-len(b), macLen)
	}
}
