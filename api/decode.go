package api

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/keyvault/keyvault/vault"
)

// MaxBodyBytes is the largest request body accepted (docs/api.md: 64 KiB).
const MaxBodyBytes = 64 << 10

// sensitive is a JSON string decoded straight into bytes, so that PINs and
// secrets live in slices the handler can wipe rather than in immutable
// strings.
type sensitive []byte

func (s *sensitive) UnmarshalJSON(data []byte) error {
	if bytes.Equal(data, []byte("null")) {
		*s = nil
		return nil
	}
	if len(data) < 2 || data[0] != '"' || data[len(data)-1] != '"' {
		return errors.New("must be a string")
	}
	inner := data[1 : len(data)-1]
	if bytes.IndexByte(inner, '\\') < 0 && utf8.Valid(inner) {
		*s = bytes.Clone(inner)
		return nil
	}
	// Invalid UTF-8 would be replaced by U+FFFD, making different PINs
	// equal: refuse it.
	if !utf8.Valid(inner) {
		return errors.New("must be valid UTF-8")
	}
	// decodeJSON has checked the whole body; checked again so that the
	// type holds its promise wherever it is decoded.
	if err := checkEscapes(inner); err != nil {
		return err
	}
	// Escapes are rare in PINs; this path leaves an unwipeable string copy.
	var str string
	if err := json.Unmarshal(data, &str); err != nil {
		return errors.New("must be a string")
	}
	*s = []byte(str)
	return nil
}

func (s sensitive) wipe() { clear(s) }

type enrollRequest struct {
	Secret      sensitive `json:"secret"`
	PIN         sensitive `json:"pin"`
	MaxAttempts *int      `json:"max_attempts"`
}

type recoverRequest struct {
	PIN sensitive `json:"pin"`
}

type changePINRequest struct {
	PIN    sensitive `json:"pin"`
	NewPIN sensitive `json:"new_pin"`
}

// decodeBody reads at most MaxBodyBytes and decodes exactly one JSON object
// with no unknown fields. Errors name the problem, never a value.
func decodeBody(r *http.Request, w http.ResponseWriter, dst any) error {
	if err := checkContentType(r); err != nil {
		return err
	}
	if r.ContentLength > MaxBodyBytes {
		return &apiError{http.StatusRequestEntityTooLarge, codeTooLarge, fmt.Sprintf("The body must be at most %d bytes.", MaxBodyBytes)}
	}
	body, err := readBody(w, r)
	defer clear(body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			return &apiError{http.StatusRequestEntityTooLarge, codeTooLarge, fmt.Sprintf("The body must be at most %d bytes.", MaxBodyBytes)}
		}
		return badRequest("body: could not be read")
	}
	return decodeJSON(body, dst)
}

// readBody reads the body, at most MaxBodyBytes. A body declared shorter
// than 512 bytes is read into a buffer of its length, one byte over to
// meet EOF without growing; no more than 512 bytes are taken before any
// arrive. A buffer that grows leaves no unwiped copy behind.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	rd := http.MaxBytesReader(w, r.Body, MaxBodyBytes)
	size := 512
	if r.ContentLength >= 0 && r.ContentLength < 512 {
		size = int(r.ContentLength) + 1
	}
	b := make([]byte, 0, size)
	for {
		if len(b) == cap(b) {
			grown := append(b, 0)[:len(b)]
			clear(b)
			b = grown
		}
		n, err := rd.Read(b[len(b):cap(b)])
		b = b[:len(b)+n]
		if err == io.EOF {
			return b, nil
		}
		if err != nil {
			return b, err
		}
	}
}

// checkContentType refuses, with a 415, a body not sent as application/json
// (a charset parameter of utf-8 allowed, no other parameter): a form-encoded
// body that happens to hold JSON is still a client's mistake to report, not
// to guess around. A request with neither body nor Content-Type passes, and
// the decoder answers its missing object with a 400.
func checkContentType(r *http.Request) error {
	ct := r.Header.Get("Content-Type")
	if ct == "" && r.ContentLength == 0 || ct == "application/json" {
		return nil
	}
	mt, params, err := mime.ParseMediaType(ct)
	if err == nil && mt == "application/json" {
		cs, ok := params["charset"]
		if len(params) == 0 || len(params) == 1 && ok && strings.EqualFold(cs, "utf-8") {
			return nil
		}
	}
	return errUnsupportedMediaType
}

var errUnsupportedMediaType = &apiError{http.StatusUnsupportedMediaType, codeInvalid,
	"Content-Type: the body must be sent as application/json (with charset=utf-8 or no parameter)."}

// decodeJSON is decodeBody's pure part, fuzzed by FuzzDecode.
func decodeJSON(body []byte, dst any) error {
	if err := checkEscapes(body); err != nil {
		return err
	}
	valid := json.Valid(body)
	if err := checkFieldNames(body, dst, valid); err != nil {
		return err
	}
	if valid {
		// One JSON value and nothing after it, whose top-level names are
		// all known and written exactly: Unmarshal decodes it as the
		// stream decoder below would, without its buffering.
		if err := json.Unmarshal(body, dst); err != nil {
			return decodeError(err, dst)
		}
		return nil
	}
	return decodeStream(body, dst)
}

// decodeStream decodes body into dst with the stream decoder, which names
// what it refuses and finds anything after the one value.
func decodeStream(body []byte, dst any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return decodeError(err, dst)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return badRequest("body: one JSON object only, nothing after it")
	}
	return nil
}

// decodeError names what the decoder refused, never a value.
func decodeError(err error, dst any) error {
	var typeErr *json.UnmarshalTypeError
	switch {
	case errors.Is(err, io.EOF):
		return badRequest("body: a JSON object is required")
	case errors.As(err, &typeErr) && typeErr.Field != "":
		return badRequest("body: field " + typeErr.Field + " has the wrong type")
	case strings.HasPrefix(err.Error(), "json: unknown field"):
		return badRequest("body: unknown field (allowed: " + fieldList(dst) + ")")
	default:
		return badRequest("body: not a valid JSON object of the expected shape")
	}
}

// fields lists the exact field names of a request body.
func fields(dst any) []string {
	switch dst.(type) {
	case *enrollRequest:
		return []string{"secret", "pin", "max_attempts"}
	case *recoverRequest:
		return []string{"pin"}
	case *changePINRequest:
		return []string{"pin", "new_pin"}
	case *retireRequest:
		return []string{"version"}
	case *rewrapRequest:
		return []string{"per_second"}
	}
	return nil
}

func fieldList(dst any) string { return strings.Join(fields(dst), ", ") }

// checkFieldNames holds the body's top-level names to the exact spelling
// and once each: encoding/json alone would take "PIN" for "pin" and let a
// repeated name silently win. Shape errors are left to the decoder. valid
// says that body is valid JSON (json.Valid).
func checkFieldNames(body []byte, dst any, valid bool) error {
	names := fieldNames{allowed: fields(dst)}
	if valid {
		if ok, err := names.checkValid(body); ok {
			return err
		}
		names.seen = 0
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil
		}
		name, _ := tok.(string)
		if err := names.check(name); err != nil {
			return err
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return nil
		}
		clear(skip)
	}
	return nil
}

// fieldNames checks the top-level names of one body, in order.
type fieldNames struct {
	allowed []string
	seen    uint64 // bit i: allowed[i] was seen
}

func (f *fieldNames) check(name string) error {
	i := slices.Index(f.allowed, name)
	if i < 0 {
		return badRequest("body: unknown field (allowed, in lower case: " + strings.Join(f.allowed, ", ") + ")")
	}
	if f.seen&(1<<i) != 0 {
		return badRequest("body: field " + name + " appears more than once")
	}
	f.seen |= 1 << i
	return nil
}

// checkValid calls check on each top-level name of body, which must be
// valid JSON, reading the names in place. ok is false, with nothing
// decided, if a name holds an escape: the tokenizer decodes those.
func (f *fieldNames) checkValid(body []byte) (ok bool, err error) {
	depth, atName := 0, false
	for i := 0; i < len(body); i++ {
		switch c := body[i]; c {
		case '"':
			start := i + 1
			for i = start; body[i] != '"'; i++ {
				if body[i] == '\\' {
					if atName {
						return false, nil
					}
					i++
				}
			}
			if atName {
				if err := f.check(string(body[start:i])); err != nil {
					return true, err
				}
				atName = false
			}
		case '{', '[':
			if depth == 0 && c == '[' {
				return true, nil // not an object: the decoder refuses it
			}
			depth++
			atName = depth == 1
		case '}', ']':
			depth--
		case ',':
			atName = depth == 1
		case ' ', '\t', '\r', '\n', ':':
		default:
			if depth == 0 {
				return true, nil // a scalar, not an object
			}
		}
	}
	return true, nil
}

// decodeSecret decodes standard base64 with padding, in its canonical form
// only: Strict refuses nonzero unused bits, and line breaks, which it would
// skip, are refused here, so the document's pattern is the whole rule.
func decodeSecret(enc sensitive) ([]byte, error) {
	if bytes.ContainsAny(enc, "\r\n") {
		return nil, badRequest("secret: must be standard base64 with padding")
	}
	out := make([]byte, base64.StdEncoding.DecodedLen(len(enc)))
	n, err := base64.StdEncoding.Strict().Decode(out, enc)
	if err != nil {
		clear(out)
		return nil, badRequest("secret: must be standard base64 with padding")
	}
	return out[:n], nil
}

// preconditions reads If-Match (a quoted generation) and, if allowed,
// If-None-Match (only "*").
func preconditions(r *http.Request, allowNoneMatch bool) (vault.Precondition, error) {
	var p vault.Precondition
	if v := r.Header.Get("If-Match"); v != "" {
		g, err := strconv.ParseUint(strings.Trim(strings.TrimSpace(v), `"`), 10, 64)
		if err != nil || g == 0 {
			return p, badRequest(`If-Match: must be a quoted generation, like "3"`)
		}
		p.IfMatch = g
	}
	if v := r.Header.Get("If-None-Match"); v != "" {
		if !allowNoneMatch || strings.TrimSpace(v) != "*" {
			return p, badRequest("If-None-Match: only * is supported, and only on PUT")
		}
		p.IfNoneMatch = true
	}
	return p, nil
}

// checkEscapes refuses a \u escape of a UTF-16 surrogate that is not a
// high one directly followed by an escaped low one. encoding/json decodes
// an unpaired surrogate to U+FFFD, so PINs written with different ones
// would be one PIN; refused everywhere in the body, no field is special.
// Backslashes are read from the start, each with the character after it,
// so "\\u" is an escaped backslash and a letter u. A body that is not
// valid JSON may be misread here, but the decoder refuses it anyway.
func checkEscapes(body []byte) error {
	for i := 0; i < len(body); i++ {
		if body[i] != '\\' {
			continue
		}
		r, ok := escapedUnit(body, i)
		if !ok {
			i++ // any other escape: skip the escaped character
			continue
		}
		i += 5
		switch {
		case !utf16.IsSurrogate(r):
		case r < 0xdc00: // high: the next escape must be a low one
			if lo, ok := escapedUnit(body, i+1); ok && 0xdc00 <= lo && lo <= 0xdfff {
				i += 6
				continue
			}
			return errLoneSurrogate
		default: // low, with no high before it
			return errLoneSurrogate
		}
	}
	return nil
}

var errLoneSurrogate = badRequest(`body: a \u escape of a UTF-16 surrogate must be a high one followed by a low one (a surrogate pair); an unpaired surrogate is not text`)

// escapedUnit reads the escape \uXXXX at body[i:], if there is one.
func escapedUnit(body []byte, i int) (rune, bool) {
	if i+6 > len(body) || body[i] != '\\' || body[i+1] != 'u' {
		return 0, false
	}
	n, err := strconv.ParseUint(string(body[i+2:i+6]), 16, 16)
	if err != nil {
		return 0, false
	}
	return rune(n), true
}
