package vault

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// seedRecords are valid encodings of a live, a locked and a tombstone
// record, each followed by a 32-byte MAC.
func seedRecords() [][]byte {
	var out [][]byte
	for _, r := range seedRecordValues() {
		out = append(out, append(r.marshal(), bytes.Repeat([]byte{0xaa}, macLen)...))
	}
	return out
}

// seedRecordValues are a live, a locked and a tombstone record, and live
// ones sealed under the hmac and gcm-hsm-iv profiles.
func seedRecordValues() []*record {
	live := &record{
		Generation: 3, MaxAttempts: 10, Guesses: 4, Forgiven: 2, Refunds: 1,
		CreatedAt: 1700000000000000000, UpdatedAt: 1700000000000000001,
		WrapVersion: 1, PINVersion: 1, MACVersion: 1, Sealing: ProfileGCM,
		Salt: bytes.Repeat([]byte{1}, saltLen), Verifier: bytes.Repeat([]byte{2}, verifierLen),
		Nonce: bytes.Repeat([]byte{3}, nonceLen), Sealed: bytes.Repeat([]byte{4}, 76),
	}
	locked := *live
	locked.Locked, locked.Guesses, locked.Forgiven, locked.Refunds, locked.Sealed = true, 10, 0, 0, nil
	tomb := &record{Generation: 7, Tombstone: true, UpdatedAt: 5, MACVersion: 1}
	derived := *live
	derived.Sealing = ProfileHMAC
	hsmIV := *live
	hsmIV.Sealing = ProfileGCMHSMIV
	return []*record{live, &locked, tomb, &derived, &hsmIV}
}

func FuzzParseRecord(f *testing.F) {
	for _, s := range seedRecords() {
		f.Add(s)
		f.Add(s[:len(s)-1])                // truncated
		f.Add(append(s, 0))                // extended
		f.Add(s[:len(s)-macLen])           // no MAC
		f.Add(append([]byte{3}, s[1:]...)) // unknown format
		bad := bytes.Clone(s)
		bad[1] = 0x80 // unknown flag
		f.Add(bad)
		sealing := bytes.Clone(s)
		sealing[62] = 9 // unknown sealing
		f.Add(sealing)
		huge := bytes.Clone(s)
		huge[54] = 0xff // salt length past the end
		f.Add(huge)
	}
	f.Add([]byte{})
	f.Add(make([]byte, macLen))
	f.Add(make([]byte, macLen+1))
	f.Add(append([]byte{1}, make([]byte, macLen+60)...))
	f.Add(append([]byte{1, 0}, bytes.Repeat([]byte{0xff}, 200)...))

	f.Fuzz(func(t *testing.T, b []byte) {
		in := bytes.Clone(b)
		r, body, mac, err := parseRecord(b)
		if !bytes.Equal(in, b) {
			t.Fatal("parseRecord modified its input")
		}
		if err != nil {
			if r != nil || body != nil || mac != nil {
				t.Fatal("parseRecord returned values with an error")
			}
			return
		}
		_ = r.check() // must not panic either
		if len(mac) != macLen || !bytes.Equal(append(bytes.Clone(body), mac...), b) {
			t.Fatal("body and MAC are not a split of the input")
		}
		got := r.marshal()
		if body[0] == recordFormatV3 && !bytes.Equal(got, body) {
			t.Fatalf("re-marshal differs from the parsed body:\n got % x\nwant % x", got, body)
		}
		// A record of an older format is written back in the newest: it
		// must hold the same record.
		again, _, _, err := parseRecord(append(got, mac...))
		if err != nil || !reflect.DeepEqual(again, r) {
			t.Fatalf("re-marshalled record parses to %+v (%v), want %+v", again, err, r)
		}
	})
}

func TestSeedRecordsParse(t *testing.T) {
	for i, s := range seedRecords() {
		r, _, _, err := parseRecord(s)
		if err != nil {
			t.Fatalf("seed %d does not parse: %v", i, err)
		}
		if err := r.check(); err != nil {
			t.Fatalf("seed %d fails its invariants: %v", i, err)
		}
	}
}

var userIDOracle = regexp.MustCompile(`^[A-Za-z0-9._~:@-]{1,128}$`)

func FuzzValidUserID(f *testing.F) {
	for _, s := range []string{
		"", "a", "alice", "A-Z.a_z~0:9@x", strings.Repeat("a", 128), strings.Repeat("a", 129),
		"a b", "a/b", "a\x00", "ä", "a\n", "\na", "a%20b", "a+b", "a#b", "\xff", "AZaz09._~:@-",
		strings.Repeat("é", 64), strings.Repeat("@", 127) + "\u00e9",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if got, want := ValidUserID(id), userIDOracle.MatchString(id); got != want {
			t.Fatalf("ValidUserID(%q) = %v, the pattern says %v", id, got, want)
		}
	})
}

var namespaceOracle = regexp.MustCompile(`^[a-z0-9-]{1,64}$`)

func FuzzValidNamespace(f *testing.F) {
	for _, s := range []string{"", "a", "messenger", "a-1", strings.Repeat("z", 64), strings.Repeat("z", 65), "A", "a_b", "a.b", "ä", "a\n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := ValidNamespace(s), namespaceOracle.MatchString(s); got != want {
			t.Fatalf("ValidNamespace(%q) = %v, the pattern says %v", s, got, want)
		}
	})
}

// FuzzEncodingsInjective: two different (namespace, user_id, generation,
// salt, PIN) tuples never give the same PIN MAC input, outer or inner AAD,
// or (for valid names) store key.
func FuzzEncodingsInjective(f *testing.F) {
	f.Add("ab", "c", uint64(1), []byte("salt"), []byte("1234"), "a", "bc", uint64(1), []byte("salt"), []byte("1234"))
	f.Add("ns", "u", uint64(1), []byte("s1"), []byte("234"), "ns", "u", uint64(1), []byte("s"), []byte("1234"))
	f.Add("ns", "u", uint64(1), []byte(""), []byte("pin"), "ns", "u", uint64(1), []byte("pin"), []byte(""))
	f.Add("n", "u", uint64(256), []byte("x"), []byte("y"), "n", "u", uint64(1), []byte("x"), []byte("y"))
	f.Fuzz(func(t *testing.T, ns1, u1 string, g1 uint64, salt1, pin1 []byte, ns2, u2 string, g2 uint64, salt2, pin2 []byte) {
		same := ns1 == ns2 && u1 == u2 && g1 == g2
		if bytes.Equal(pinMACInput(ns1, u1, g1, salt1, pin1), pinMACInput(ns2, u2, g2, salt2, pin2)) &&
			!(same && bytes.Equal(salt1, salt2) && bytes.Equal(pin1, pin2)) {
			t.Fatal("two different tuples give the same PIN MAC input")
		}
		if bytes.Equal(innerAAD(ns1, u1, g1), innerAAD(ns2, u2, g2)) && !same {
			t.Fatal("two different tuples give the same inner AAD")
		}
		w1, p1 := uint32(len(salt1)), uint32(len(pin1))
		w2, p2 := uint32(len(salt2)), uint32(len(pin2))
		if bytes.Equal(outerAAD(ns1, u1, g1, w1, p1), outerAAD(ns2, u2, g2, w2, p2)) && !(same && w1 == w2 && p1 == p2) {
			t.Fatal("two different tuples give the same outer AAD")
		}
		if ValidNamespace(ns1) && ValidNamespace(ns2) && ValidUserID(u1) && ValidUserID(u2) &&
			bytes.Equal(recordKey(ns1, u1), recordKey(ns2, u2)) && (ns1 != ns2 || u1 != u2) {
			t.Fatal("two different (namespace, user_id) pairs share a store key")
		}
	})
}

// The verifier (stored) and the inner key (never stored) come from M under
// the two documented HKDF labels, and differ.
func TestPINKeysAreTheDocumentedHKDFs(t *testing.T) {
	m := bytes.Repeat([]byte{7}, 32)
	verifier, inner, err := pinKeys(m)
	if err != nil {
		t.Fatal(err)
	}
	wantV, _ := hkdf.Key(sha256.New, m, nil, "keyvault/v1/verifier", 32)
	wantI, _ := hkdf.Key(sha256.New, m, nil, "keyvault/v1/inner", 32)
	if !bytes.Equal(verifier, wantV) || !bytes.Equal(inner, wantI) || bytes.Equal(verifier, inner) {
		t.Fatal("pinKeys differs from HKDF-SHA256(M, verifier/inner labels)")
	}
	labels := []string{labelPINMAC, labelOuterAAD, labelInnerAAD, infoVerifier, infoInner, labelRecordKey, labelLogIDKey}
	seen := map[string]bool{}
	for _, l := range labels {
		if seen[l] {
			t.Fatalf("label %q is used twice", l)
		}
		seen[l] = true
	}
}
