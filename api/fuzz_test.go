package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"unicode/utf16"
	"unicode/utf8"
)

// FuzzDecode feeds arbitrary bodies to the strict decoder: it must never
// panic, whatever it accepts is one JSON object of the known fields, and
// every string it accepts into a PIN, new PIN or secret holds exactly the
// characters the body wrote, escapes included: checked against strictString,
// which refuses what cannot be decoded without loss. Two different PINs in
// the body therefore never become one PIN in the vault.
func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		`{"pin":"1234"}`, `{"pin":"1234","new_pin":"5678"}`,
		`{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234","max_attempts":5}`,
		`{"pin":"\u00e9\u00e9\u00e9\u00e9"}`, `{"pin":"\\"}`, `{"pin":null}`, `{"pin":1}`,
		`{`, `[]`, `{"pin":"1234"} {}`, `{"pin":"1234","x":1}`, ``, `null`, `{"max_attempts":1e400}`,
		// Unpaired surrogates, which encoding/json alone turns into U+FFFD.
		`{"pin":"\ud800\ud800\ud800\ud800"}`, `{"pin":"\udfff\udc00\ud9ab\ufffd"}`,
		`{"pin":"1234","new_pin":"\udc00abc"}`, `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==\ud800","pin":"1234"}`,
		`{"pin":"12\ud800\u0041"}`, `{"pin":"\\\ud800abc"}`, `{"p\u0069n":"\ud800abcd"}`,
		// What is text: a pair, an escaped U+FFFD, an escaped backslash and u.
		`{"pin":"\ud83d\ude00\ufffd"}`, `{"pin":"\\ud800"}`, `{"pin":"\\\\\ud83d\ude00"}`,
		"{\"pin\":\"\xef\xbf\xbd1234\"}", "{\"pin\":\"\xed\xa0\x80123\"}",
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
			checkExact(t, body, map[string][]byte{"pin": e.PIN, "secret": e.Secret})
		}
		var r recoverRequest
		if err := decodeJSON(body, &r); err == nil {
			checkExact(t, body, map[string][]byte{"pin": r.PIN})
		}
		var c changePINRequest
		if err := decodeJSON(body, &c); err == nil {
			checkExact(t, body, map[string][]byte{"pin": c.PIN, "new_pin": c.NewPIN})
		}
	})
}

// checkExact holds each decoded field to the string the accepted body
// wrote for it, decoded by strictString.
func checkExact(t *testing.T, body []byte, got map[string][]byte) {
	t.Helper()
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(body, &raw); err != nil {
		t.Fatalf("accepted a body that is not a JSON object: %v", err)
	}
	for name, dec := range got {
		r, ok := raw[name]
		if !ok || bytes.Equal(r, []byte("null")) {
			continue
		}
		want, err := strictString(r)
		if err != nil {
			t.Fatalf("accepted field %s written %s, which does not decode without loss: %v", name, r, err)
		}
		if !bytes.Equal(dec, want) {
			t.Fatalf("field %s written %s decoded to %q, want exactly %q", name, r, dec, want)
		}
	}
}

// strictString decodes a JSON string (RFC 8259) on its own terms: each
// escape is the character it names, a surrogate only as a high-low pair,
// raw text only valid UTF-8. Anything else is an error, never U+FFFD.
func strictString(raw []byte) ([]byte, error) {
	if len(raw) < 2 || raw[0] != '"' || raw[len(raw)-1] != '"' {
		return nil, errors.New("not a string")
	}
	s, out := raw[1:len(raw)-1], []byte{}
	unit := func(i int) (rune, bool) {
		if i+6 > len(s) || s[i] != '\\' || s[i+1] != 'u' {
			return 0, false
		}
		n, err := strconv.ParseUint(string(s[i+2:i+6]), 16, 16)
		return rune(n), err == nil
	}
	for i := 0; i < len(s); {
		c := s[i]
		switch {
		case c == '\\' && i+1 < len(s) && s[i+1] == 'u':
			u, ok := unit(i)
			switch {
			case !ok:
				return nil, errors.New("bad \\u escape")
			case utf16.IsSurrogate(u):
				lo, ok := unit(i + 6)
				if u >= 0xdc00 || !ok || lo < 0xdc00 || lo > 0xdfff {
					return nil, errors.New("unpaired surrogate")
				}
				out, i = utf8.AppendRune(out, utf16.DecodeRune(u, lo)), i+12
			default:
				out, i = utf8.AppendRune(out, u), i+6
			}
		case c == '\\' && i+1 < len(s):
			e := strings.IndexByte(`"\/bfnrt`, s[i+1])
			if e < 0 {
				return nil, errors.New("bad escape")
			}
			out, i = append(out, "\"\\/\b\f\n\r\t"[e]), i+2
		case c == '\\' || c == '"' || c < 0x20:
			return nil, errors.New("bad character")
		default:
			r, n := utf8.DecodeRune(s[i:])
			if r == utf8.RuneError && n == 1 {
				return nil, errors.New("invalid UTF-8")
			}
			out, i = append(out, s[i:i+n]...), i+n
		}
	}
	return out, nil
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
