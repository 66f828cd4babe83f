package api

import (
	"bytes"
	"encoding/json"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// refDecodeJSON is the strict decoder written the plain way: a stream
// decoder for the names, checked with a map of its own, and decodeStream
// for the value whatever the body. decodeJSON must answer every body
// exactly as it does.
func refDecodeJSON(body []byte, dst any) error {
	if err := checkEscapes(body); err != nil {
		return err
	}
	if err := refCheckFieldNames(body, dst); err != nil {
		return err
	}
	return decodeStream(body, dst)
}

func refCheckFieldNames(body []byte, dst any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		name, _ := tok.(string)
		if !slices.Contains(fields(dst), name) {
			return badRequest("body: unknown field (allowed, in lower case: " + fieldList(dst) + ")")
		}
		if seen[name] {
			return badRequest("body: field " + name + " appears more than once")
		}
		seen[name] = true
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil
		}
	}
	return nil
}

// sameAsReference fails t unless decodeJSON answers body as refDecodeJSON
// does, for every request type: the same refusal, or the same values.
func sameAsReference(t *testing.T, body []byte) {
	t.Helper()
	for _, newDst := range []func() any{
		func() any { return new(enrollRequest) },
		func() any { return new(recoverRequest) },
		func() any { return new(changePINRequest) },
		func() any { return new(retireRequest) },
		func() any { return new(rewrapRequest) },
	} {
		got, want := newDst(), newDst()
		gotErr, wantErr := decodeJSON(body, got), refDecodeJSON(body, want)
		if !reflect.DeepEqual(gotErr, wantErr) {
			t.Fatalf("body %q into %T: error %v, want %v", body, got, gotErr, wantErr)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("body %q into %T: decoded %+v, want %+v", body, got, got, want)
		}
	}
}

var decodeCorpus = []string{
	``, ` `, "\n\t", `null`, ` null `, `true`, `1`, `-0.5e3`, `"pin"`, `[]`, `[{"pin":"1234"}]`, `{}`, ` {} `, `{}{}`, `{} x`, `{`, `}`, `{"pin"}`,
	`{"pin":"1234"}`, ` {"pin" : "1234" } `, "{\n\"pin\":\t\"1234\"\r\n}\n", `{"pin":"1234"} `, `{"pin":"1234"} {}`, `{"pin":"1234"}x`, `{"pin":"1234"}]`,
	`{"pin":"1234",}`, `{"pin" "1234"}`, `{"pin":"1234" "x":1}`, `{,"pin":"1234"}`, `{"pin":}`, `{"pin":"1234"`, `{"pin":"12` + "\x00" + `34"}`,
	`{"PIN":"1234"}`, `{"Pin":"1234"}`, `{"pin ":"1234"}`, `{"pin":"1234","pin":"5678"}`, `{"pin":"1234","PIN":"5678"}`, `{"pin":"1234","x":1}`,
	`{"x":1,"pin":"1234"}`, `{"x":{"pin":"1"}}`, `{"x":1 garbage}`, `{"x":1,"pin":"1234"} trailing`, `{"pin":"1","pin":2}`, `{"pin":"1","x":[}`,
	`{"p\u0069n":"1234"}`, `{"p\u0069n":"1234","pin":"5678"}`, `{"pin":"1234","p\u0069n":"5678"}`, `{"P\u0049N":"1234"}`, `{"\u0070in":"1234"} x`,
	`{"p\u0069n":"1234"`, `{"pi\n":"1234"}`, `{"pi\"n":"1"}`, `{"\\":1}`, `{"{":1}`, `{"}":"{"}`, `{"pin":"a\"}{,[\""}`, `{"pin":"\\"}`,
	`{"pin":null}`, `{"pin":1}`, `{"pin":true}`, `{"pin":{}}`, `{"pin":[]}`, `{"pin":["1234"]}`, `{"pin":{"pin":"1"}}`, `{"pin":"1234","new_pin":"5678"}`,
	`{"pin":"1234","new_pin":"5678","new_pin":"1"}`, `{"new_pin":"5678"}`, `{"pin":"1234","new_pin":null}`, `{"pin":"1234","new_pin":5}`,
	`{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234","max_attempts":5}`, `{"secret":"MDEy","pin":"1234","max_attempts":"5"}`,
	`{"max_attempts":1e400}`, `{"max_attempts":1.5}`, `{"max_attempts":-1}`, `{"max_attempts":null}`, `{"max_attempts":0}`, `{"max_attempts":[1]}`,
	`{"max_attempts":99999999999999999999}`, `{"version":3}`, `{"version":-3}`, `{"version":"3"}`, `{"version":4294967296}`, `{"per_second":2.5}`,
	`{"per_second":"x"}`, `{"per_second":1,"per_second":2}`, `{"pin":"\u00e9\u00e9\u00e9\u00e9"}`, `{"pin":"\ud83d\ude00"}`, `{"pin":"\ud800"}`,
	"{\"pin\":\"\xff\xfe1234\"}", "{\"p\xffn\":\"1234\"}", "{\"pin\":\"\xef\xbf\xbd1234\"}", `{"pin":"1234","x":{"a":[1,{"b":"}"}]},"y":2}`,
	`{"pin":"1234","new_pin":"5678","secret":"x","max_attempts":1,"version":1,"per_second":1}`, `{"pin":01}`, `{"max_attempts":01}`,
	`{"pin":"1234"}` + "\x00", "\ufeff" + `{"pin":"1234"}`, `{"pin":"1234"}` + strings.Repeat(" ", 600) + `{}`, `{"pin":"` + strings.Repeat("9", 700) + `"}`,
	`{"x":` + strings.Repeat("[", 600) + strings.Repeat("]", 600) + `,"pin":"1234"}`, `{"x":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `}`,
}

func TestDecodeMatchesReference(t *testing.T) {
	t.Parallel()
	for _, body := range decodeCorpus {
		sameAsReference(t, []byte(body))
	}
}

func FuzzDecodeMatchesReference(f *testing.F) {
	for _, body := range decodeCorpus {
		f.Add([]byte(body))
	}
	f.Fuzz(sameAsReference)
}
