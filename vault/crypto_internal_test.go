package vault

import (
	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"sync"
	"testing"
)

// refRecordMAC is the record MAC as the format defines it, on a state keyed
// anew each time.
func refRecordMAC(key, storeKey, body []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("keyvault/v1/record\x00"))
	m.Write(binary.BigEndian.AppendUint32(nil, uint32(len(storeKey))))
	m.Write(storeKey)
	m.Write(body)
	return m.Sum(nil)
}

// TestRecordMACPools: MACs from the pooled states of two key versions, used
// in turn and from many goroutines, are those of states keyed anew, and a
// MAC verifies under its own version only.
func TestRecordMACPools(t *testing.T) {
	t.Parallel()
	raw := [][]byte{bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32)}
	keys := []*keyedHMAC{newKeyedHMAC(raw[0]), newKeyedHMAC(raw[1])}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				k, other := keys[(g+i)%2], keys[(g+i+1)%2]
				storeKey := fmt.Appendf(nil, "r-%d", i)
				body := bytes.Repeat([]byte{byte(i)}, i)
				want := refRecordMAC(raw[(g+i)%2], storeKey, body)
				prefix := []byte("prefix")
				got := appendRecordMAC(prefix, k, storeKey, body)
				if !bytes.Equal(got[:len(prefix)], prefix) || !bytes.Equal(got[len(prefix):], want) {
					t.Errorf("appendRecordMAC = %x, want prefix then %x", got, want)
					return
				}
				if !verifyRecordMAC(k, want, storeKey, body) {
					t.Error("a MAC does not verify under its own key version")
					return
				}
				if verifyRecordMAC(other, want, storeKey, body) {
					t.Error("a MAC verifies under another key version")
					return
				}
				if verifyRecordMAC(k, want, storeKey, append(body, 0)) {
					t.Error("a MAC verifies for another body")
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestPinKeysHKDF: pinKeys gives what hkdf.Key gives for each label.
func TestPinKeysHKDF(t *testing.T) {
	t.Parallel()
	for _, m := range [][]byte{make([]byte, 32), bytes.Repeat([]byte{0xa5}, 32), []byte("a PIN MAC of another length")} {
		verifier, inner, err := pinKeys(m)
		if err != nil {
			t.Fatal(err)
		}
		wantV, _ := hkdf.Key(sha256.New, m, nil, infoVerifier, derivedKeyBytes)
		wantI, _ := hkdf.Key(sha256.New, m, nil, infoInner, derivedKeyBytes)
		if !bytes.Equal(verifier, wantV) || !bytes.Equal(inner, wantI) {
			t.Fatalf("pinKeys(%x) = %x, %x; hkdf.Key gives %x, %x", m, verifier, inner, wantV, wantI)
		}
	}
}

// TestAADEncoding: the associated data are the label, a zero byte, then
// the length-prefixed fields and the fixed-width numbers.
func TestAADEncoding(t *testing.T) {
	t.Parallel()
	prefix := func(label, ns, userID string, gen uint64) []byte {
		b := append([]byte(label), 0)
		b = binary.BigEndian.AppendUint32(b, uint32(len(ns)))
		b = append(b, ns...)
		b = binary.BigEndian.AppendUint32(b, uint32(len(userID)))
		b = append(b, userID...)
		return binary.BigEndian.AppendUint64(b, gen)
	}
	want := binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(prefix(labelOuterAAD, "ns", "user-1", 7), 3), 4)
	if got := outerAAD("ns", "user-1", 7, 3, 4); !bytes.Equal(got, want) {
		t.Errorf("outerAAD = %x, want %x", got, want)
	}
	if got, want := innerAAD("ns", "user-1", 7), prefix(labelInnerAAD, "ns", "user-1", 7); !bytes.Equal(got, want) {
		t.Errorf("innerAAD = %x, want %x", got, want)
	}
}

// TestLogIDPooled: a log ID from a pooled state, one use after another, is
// the first 12 bytes of HMAC-SHA256 of the store key under the log ID key.
func TestLogIDPooled(t *testing.T) {
	t.Parallel()
	key := bytes.Repeat([]byte{3}, 32)
	v := &Vault{logIDKey: newKeyedHMAC(key)}
	for i := range 50 {
		k := recordKey("ns", fmt.Sprintf("user-%d", i%7))
		m := hmac.New(sha256.New, key)
		m.Write(k)
		if got, want := v.logID(k), hex.EncodeToString(m.Sum(nil)[:12]); got != want {
			t.Fatalf("logID(%q) = %s, want %s", k, got, want)
		}
	}
}
