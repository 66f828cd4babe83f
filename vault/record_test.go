package vault

import (
	"bytes"
	"reflect"
	"testing"
)

// Records written before format 2 (no operation IDs) still parse, with
// every field as it was; format 2 round-trips its operation IDs.
func TestRecordFormats(t *testing.T) {
	for _, r := range seedRecordValues() {
		r.OpSeq = 9
		r.OpIDs = [][]byte{bytes.Repeat([]byte{1}, opIDLen), bytes.Repeat([]byte{2}, opIDLen)}
		v2 := r.marshal()
		got, _, _, err := parseRecord(append(bytes.Clone(v2), make([]byte, macLen)...))
		if err != nil || !reflect.DeepEqual(got, r) {
			t.Fatalf("format 2 round trip: %v\n got %+v\nwant %+v", err, got, r)
		}
		// The same record as format 1 wrote it: no trailing op fields.
		v1 := bytes.Clone(v2[:len(v2)-9-2*opIDLen])
		v1[0] = recordFormatV1
		got, _, _, err = parseRecord(append(v1, make([]byte, macLen)...))
		want := *r
		want.OpSeq, want.OpIDs = 0, nil
		if err != nil || !reflect.DeepEqual(got, &want) {
			t.Fatalf("format 1: %v\n got %+v\nwant %+v", err, got, &want)
		}
		// Too many IDs is malformed, not a panic.
		bad := bytes.Clone(v2)
		bad[len(bad)-1-2*opIDLen] = maxOpIDs + 1
		if _, _, _, err := parseRecord(append(bad, make([]byte, macLen)...)); err == nil {
			t.Fatal("a record with too many operation IDs parsed")
		}
	}
}
