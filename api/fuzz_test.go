package api

import (
	"bytes"
	"net/http/httptest"
	"testing"
	"unicode/utf8"
)

// FuzzDecode feeds arbitrary bodies to the strict decoder: it must never
// panic, and whatever it accepts is one JSON object of the known fields.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"pin":"1234"}`, `{"pin":"1234","new_pin":"5678"}`,
		`{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234","max_attempts":5}`,
		`{"pin":"\u00e9\u00e9\u00e9\u00e9"}`, `{"pin":"\\"}`, `{"pin":null}`, `{"pin":1}`,
		`{`, `[]`, `{"pin":"1234"} {}`, `{"pin":"1234","x":1}`, ``, `null`, `{"max_attempts":1e400}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var e enrollRequest
		if err := decodeJSON(body, &e); err == nil {
			if e.PIN != nil && !utf8.Valid(e.PIN) {
				t.Fatalf("accepted a PIN that is not UTF-8: %q", e.PIN)
			}
			if _, err := decodeSecret(e.Secret); err == nil && len(e.Secret)%4 != 0 {
				t.Fatalf("accepted unpadded base64 %q", e.Secret)
			}
		}
		var r recoverRequest
		_ = decodeJSON(body, &r)
		var c changePINRequest
		_ = decodeJSON(body, &c)
	})
}

// FuzzPreconditions: arbitrary If-Match and If-None-Match headers never
// panic, and an accepted If-Match is a positive generation.
func FuzzPreconditions(f *testing.F) {
	for _, s := range [][2]string{{`"3"`, ""}, {"", "*"}, {`W/"3"`, ""}, {`"0"`, ""}, {`"18446744073709551616"`, ""}, {"*", "x"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, ifMatch, ifNoneMatch string) {
		r := httptest.NewRequest("PUT", "/", bytes.NewReader(nil))
		r.Header["If-Match"] = []string{ifMatch}
		r.Header["If-None-Match"] = []string{ifNoneMatch}
		p, err := preconditions(r, true)
		if err == nil && ifMatch != "" && p.IfMatch == 0 {
			t.Fatalf("If-Match %q accepted as no precondition", ifMatch)
		}
	})
}
