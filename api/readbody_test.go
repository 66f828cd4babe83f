package api

import (
	"bytes"
	"errors"
	"io"
	"net/http/httptest"
	"strings"
	"testing"
)

// unsized hides a body's length, as a chunked upload does: the request's
// ContentLength is -1.
type unsized struct{ io.Reader }

// failing yields its bytes, then an error that is not EOF.
type failing struct{ r io.Reader }

func (f *failing) Read(p []byte) (int, error) {
	if n, _ := f.r.Read(p); n > 0 {
		return n, nil
	}
	return 0, errors.New("connection reset")
}

// A body is read whole whether or not its length is declared, and
// whatever its size up to MaxBodyBytes; a longer one is a 413 and a read
// error a 400, all before the vault.
func TestBodyRead(t *testing.T) {
	t.Parallel()
	pin := func(n int) string { return strings.Repeat("7", n) }
	cases := []struct {
		name     string
		body     io.Reader
		length   int64 // -1: as httptest sets it from body
		status   int
		code     string
		detail   string
		pinAtEnd string
	}{
		{"declared", strings.NewReader(`{"pin":"1234"}`), -1, 200, "", "", "1234"},
		{"unsized", unsized{strings.NewReader(`{"pin":"1234"}`)}, -1, 200, "", "", "1234"},
		{"unsized, past the first buffer", unsized{strings.NewReader(`{"pin":"` + pin(100) + `",` + strings.Repeat(" ", 3000) + `"pin":"1"}`)}, -1, 400, codeInvalid, "body: field pin appears more than once", ""},
		{"unsized, a long PIN", unsized{strings.NewReader(`{"pin":"` + pin(128) + `"}` + strings.Repeat(" ", 5000))}, -1, 200, "", "", pin(128)},
		{"unsized, MaxBodyBytes", unsized{strings.NewReader(`{"pin":"` + pin(MaxBodyBytes-10) + `"}`)}, -1, 400, codeInvalid, "", ""},
		{"unsized, one byte over", unsized{strings.NewReader(`{"pin":"` + pin(MaxBodyBytes-9) + `"}`)}, -1, 413, codeTooLarge, "The body must be at most 65536 bytes.", ""},
		{"declared, past the first buffer", strings.NewReader(`{"pin":"` + pin(128) + `"}` + strings.Repeat(" ", 3000)), -1, 200, "", "", pin(128)},
		{"declared short of the body", strings.NewReader(`{"pin":"1234"}`), 3, 200, "", "", "1234"},
		{"declared empty", strings.NewReader(""), -1, 400, codeInvalid, "body: a JSON object is required", ""},
		{"a read error", &failing{strings.NewReader(`{"pin":"12`)}, -1, 400, codeInvalid, "body: could not be read", ""},
	}
	for _, c := range cases {
		s := &stubBackups{secretOut: []byte("0123456789abcdef")}
		h := newTestRouter(s, nil)
		r := httptest.NewRequest("POST", "/v1/backups/u/recover", c.body)
		if c.length >= 0 {
			r.ContentLength = c.length
		}
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("Authorization", "Bearer token-a")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != c.status {
			t.Errorf("%s: status %d, want %d: %s", c.name, w.Code, c.status, w.Body)
			continue
		}
		if c.status != 200 {
			p := decodeProblem(t, w)
			if p.Code != c.code || c.detail != "" && p.Detail != c.detail {
				t.Errorf("%s: problem %s %q, want %s %q", c.name, p.Code, p.Detail, c.code, c.detail)
			}
			if s.calls != 0 {
				t.Errorf("%s: reached the vault", c.name)
			}
			continue
		}
		if !bytes.Equal(s.pin, []byte(c.pinAtEnd)) {
			t.Errorf("%s: PIN %q, want %q", c.name, s.pin, c.pinAtEnd)
		}
	}
}
