package api

import (
	"strings"
	"testing"
)

// An unpaired surrogate escape would decode to U+FFFD under encoding/json,
// so "\ud800\ud800\ud800\ud800" and "\udfff\udc00\ud9ab\ufffd" would be one
// PIN. Such a body is a 400 before the limits, the HSMs or the vault see
// it, wherever the escape stands; a valid pair, an escaped U+FFFD and an
// escaped backslash followed by "u" are ordinary text.
func TestLoneSurrogateEscapesRefused(t *testing.T) {
	t.Parallel()
	const secret = `"MDEyMzQ1Njc4OWFiY2RlZg=="`
	refused := []struct{ name, method, path, body string }{
		{"enroll pin", "PUT", "/v1/backups/u", `{"secret":` + secret + `,"pin":"\ud800\ud800\ud800\ud800"}`},
		{"recover pin", "POST", "/v1/backups/u/recover", `{"pin":"\udfff\udc00\ud9ab\ufffd"}`},
		{"lone high at the end", "POST", "/v1/backups/u/recover", `{"pin":"1234\uD800"}`},
		{"lone low", "POST", "/v1/backups/u/recover", `{"pin":"1234\uDC00"}`},
		{"high then a non-surrogate escape", "POST", "/v1/backups/u/recover", `{"pin":"12\ud800\u0041"}`},
		{"high then a raw character", "POST", "/v1/backups/u/recover", `{"pin":"12\ud800A34"}`},
		{"two highs", "POST", "/v1/backups/u/recover", `{"pin":"12\ud800\ud800\udc00"}`},
		{"low then high", "POST", "/v1/backups/u/recover", `{"pin":"12\udc00\ud800"}`},
		{"after an escaped backslash", "POST", "/v1/backups/u/recover", `{"pin":"12\\\ud800"}`},
		{"change_pin pin", "POST", "/v1/backups/u/pin", `{"pin":"\ud800abcd","new_pin":"5678"}`},
		{"change_pin new_pin", "POST", "/v1/backups/u/pin", `{"pin":"1234","new_pin":"\ud800abcd"}`},
		{"secret", "PUT", "/v1/backups/u", `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==\udc00","pin":"1234"}`},
		{"field name", "POST", "/v1/backups/u/recover", `{"pin":"1234","\ud800":1}`},
	}
	for _, c := range refused {
		s := &stubBackups{}
		adm := &refuseAll{}
		h := newTestRouterWith(s, Options{Admission: adm})
		w := do(h, c.method, c.path, "token-a", c.body)
		if w.Code != 400 {
			t.Errorf("%s: status %d, want 400: %s", c.name, w.Code, w.Body)
			continue
		}
		p := decodeProblem(t, w)
		if p.Code != "invalid_request" || !strings.Contains(p.Detail, "surrogate") {
			t.Errorf("%s: problem %+v, want invalid_request naming the surrogate", c.name, p)
		}
		if s.calls != 0 || len(s.refused) != 0 || adm.asked != 0 {
			t.Errorf("%s: reached the vault (%d calls, %d refusals noted) or HSM admission (%d)", c.name, s.calls, len(s.refused), adm.asked)
		}
	}

	accepted := []struct{ name, body, pin string }{
		{"a valid pair", `{"pin":"12\ud83d\ude0034"}`, "12\U0001F60034"},
		{"a valid pair in upper case", `{"pin":"12\uD83D\uDE0034"}`, "12\U0001F60034"},
		{"an escaped U+FFFD", `{"pin":"\ufffd\ufffd\ufffd\ufffd"}`, strings.Repeat("\uFFFD", 4)},
		{"an escaped backslash, then u", `{"pin":"\\ud800"}`, `\ud800`},
		{"two escaped backslashes, then a pair", `{"pin":"\\\\\ud83d\ude00"}`, `\\` + "\U0001F600"},
		{"the edges of the BMP", `{"pin":"\ud7ff\ue000\uffff"}`, "\uD7FF\uE000\uFFFF"},
	}
	for _, c := range accepted {
		s := &stubBackups{}
		w := do(newTestRouter(s, nil), "POST", "/v1/backups/u/recover", "token-a", c.body)
		if w.Code != 200 || string(s.pin) != c.pin {
			t.Errorf("%s: status %d, PIN %q, want 200 with %q: %s", c.name, w.Code, s.pin, c.pin, w.Body)
		}
	}
}

// checkEscapes on its own: the position of each backslash is read from the
// start, so "\\u" is an escaped backslash and a letter u.
func TestCheckEscapes(t *testing.T) {
	t.Parallel()
	for body, ok := range map[string]bool{
		``:                      true,
		`"\\"`:                  true,
		`"\\u"`:                 true,
		`"\\\\ud800"`:           true,
		`"\\\ud800\udfff"`:      true,
		`"\ud800"`:              false,
		`"\\\ud800"`:            false,
		`"\ud800\\udc00"`:       false,
		`"\ud800`:               false,
		`"\ud80`:                true, // not an escape this check understands; the decoder refuses it
		`"\udbff\udfff"`:        true,
		`"\udbff\udfff\udfff"`:  false,
		`"\u00e9\n\t\"\/\b\f"`:  true,
		`"\uDBFF\uDFFF\uFFFD"`:  true,
		`{"a":"\ud800","b":1}`:  false,
		`{"\udc00":"x"}`:        false,
		`"\u+800\u-800\ud800z"`: false,
	} {
		if err := checkEscapes([]byte(body)); (err == nil) != ok {
			t.Errorf("checkEscapes(%s) = %v, want ok %v", body, err, ok)
		}
	}
}

// A body must be sent as application/json (charset utf-8 allowed): any
// other Content-Type, or none with a body, is a 415 invalid_request that
// reaches neither the limits nor the vault. A request with neither body
// nor Content-Type is a 400 for its missing object.
func TestContentTypeRequired(t *testing.T) {
	t.Parallel()
	const enroll = `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234"}`
	cases := []struct {
		name, method, path, ct, body string
		want                         int
	}{
		{"json", "PUT", "/v1/backups/u", "application/json", enroll, 201},
		{"json with charset utf-8", "PUT", "/v1/backups/u", "application/json; charset=utf-8", enroll, 201},
		{"json with charset UTF-8, no space", "POST", "/v1/backups/u/recover", "Application/JSON;charset=UTF-8", `{"pin":"1234"}`, 200},
		{"form-encoded", "PUT", "/v1/backups/u", "application/x-www-form-urlencoded", enroll, 415},
		{"no Content-Type with a body", "POST", "/v1/backups/u/recover", "", `{"pin":"1234"}`, 415},
		{"text/plain", "POST", "/v1/backups/u/pin", "text/plain", `{"pin":"1234","new_pin":"5678"}`, 415},
		{"json with charset latin1", "POST", "/v1/backups/u/recover", "application/json; charset=iso-8859-1", `{"pin":"1234"}`, 415},
		{"json with another parameter", "POST", "/v1/backups/u/recover", "application/json; v=1", `{"pin":"1234"}`, 415},
		{"a JSON suffix type", "POST", "/v1/backups/u/recover", "application/merge-patch+json", `{"pin":"1234"}`, 415},
		{"unparsable", "POST", "/v1/backups/u/recover", "application/json; charset", `{"pin":"1234"}`, 415},
		{"no body, no Content-Type", "POST", "/v1/backups/u/recover", "", "", 400},
		{"GET needs none", "GET", "/v1/backups/u", "", "", 200},
	}
	for _, c := range cases {
		s := &stubBackups{secretOut: []byte("0123456789abcdef")}
		h := newTestRouter(s, nil)
		w := do(h, c.method, c.path, "token-a", c.body, "Content-Type", c.ct)
		if w.Code != c.want {
			t.Errorf("%s: status %d, want %d: %s", c.name, w.Code, c.want, w.Body)
			continue
		}
		if c.want < 400 {
			continue
		}
		if p := decodeProblem(t, w); p.Code != codeInvalid {
			t.Errorf("%s: code %q, want %s", c.name, p.Code, codeInvalid)
		}
		if s.calls != 0 {
			t.Errorf("%s: the vault was called", c.name)
		}
	}
}
