package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/go-chi/chi/v5"
	"go.yaml.in/yaml/v3"

	"github.com/keyvault/keyvault/ratelimit"
	"github.com/keyvault/keyvault/vault"
)

// The tests here hold api/openapi.yaml to the code: its operations are
// exactly the router's routes, its problem codes exactly problems.go's,
// and every answer the handlers give a documented request (driven through
// the real router over a stub vault, stub limits and stub admission) is
// one the document lists for that operation, with the documented content
// type, headers and body shape. Conversely every status the document
// lists for an operation must be produced by at least one of those
// requests, so a listed status that the code cannot give fails too.

// openAPIDoc is the parsed document.
type openAPIDoc struct {
	root map[string]any
}

func loadOpenAPI(t *testing.T) *openAPIDoc {
	t.Helper()
	var root map[string]any
	if err := yaml.Unmarshal(openAPIDocument, &root); err != nil {
		t.Fatalf("openapi.yaml does not parse: %v", err)
	}
	if v, _ := root["openapi"].(string); !strings.HasPrefix(v, "3.1.") {
		t.Fatalf("openapi: %q, want 3.1.x", v)
	}
	return &openAPIDoc{root: root}
}

// resolve follows a local $ref ("#/components/...") until it reaches an
// object without one.
func (d *openAPIDoc) resolve(t *testing.T, v any) map[string]any {
	t.Helper()
	for range 10 {
		m, ok := v.(map[string]any)
		if !ok {
			t.Fatalf("not an object: %v", v)
		}
		ref, ok := m["$ref"].(string)
		if !ok {
			return m
		}
		v = d.lookup(t, ref)
	}
	t.Fatalf("a $ref chain too long at %v", v)
	return nil
}

func (d *openAPIDoc) lookup(t *testing.T, ref string) any {
	t.Helper()
	path, ok := strings.CutPrefix(ref, "#/")
	if !ok {
		t.Fatalf("$ref %q: only local references are used", ref)
	}
	var cur any = d.root
	for _, part := range strings.Split(path, "/") {
		part = strings.ReplaceAll(strings.ReplaceAll(part, "~1", "/"), "~0", "~")
		m, ok := cur.(map[string]any)
		if !ok || m[part] == nil {
			t.Fatalf("$ref %q does not resolve (at %q)", ref, part)
		}
		cur = m[part]
	}
	return cur
}

var httpMethods = []string{"get", "put", "post", "delete", "patch", "head", "options", "trace"}

// operations maps "METHOD /path" to the document's operation object.
func (d *openAPIDoc) operations(t *testing.T) map[string]map[string]any {
	t.Helper()
	paths, ok := d.root["paths"].(map[string]any)
	if !ok {
		t.Fatal("no paths")
	}
	ops := map[string]map[string]any{}
	for p, item := range paths {
		item := d.resolve(t, item)
		for _, m := range httpMethods {
			if op, ok := item[m].(map[string]any); ok {
				ops[strings.ToUpper(m)+" "+p] = op
			}
		}
	}
	return ops
}

// responses maps each documented status of an operation to its resolved
// response object.
func (d *openAPIDoc) responses(t *testing.T, op map[string]any) map[int]map[string]any {
	t.Helper()
	out := map[int]map[string]any{}
	rs, _ := op["responses"].(map[string]any)
	for k, r := range rs {
		status, err := strconv.Atoi(k)
		if err != nil {
			t.Fatalf("response key %q: only explicit statuses are used", k)
		}
		out[status] = d.resolve(t, r)
	}
	return out
}

// routerRoutes lists the router's routes as "METHOD /pattern".
func routerRoutes(t *testing.T, h http.Handler) map[string]bool {
	t.Helper()
	routes, ok := h.(chi.Routes)
	if !ok {
		t.Fatalf("NewRouter returned a %T, not chi.Routes", h)
	}
	got := map[string]bool{}
	paramRegexp := regexp.MustCompile(`\{([^}:]+):[^}]*\}`) // {id:[0-9]+} is {id} in OpenAPI
	err := chi.Walk(routes, func(method, route string, _ http.Handler, _ ...func(http.Handler) http.Handler) error {
		got[method+" "+paramRegexp.ReplaceAllString(route, "{$1}")] = true
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// setDiff lists what is in a but not in b.
func setDiff[K comparable](a, b map[K]bool) []K {
	var out []K
	for k := range a {
		if !b[k] {
			out = append(out, k)
		}
	}
	return out
}

func TestOpenAPIRoutesMatchRouter(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	documented := map[string]bool{}
	for k := range doc.operations(t) {
		documented[k] = true
	}
	routed := routerRoutes(t, NewRouter(&stubBackups{}, Options{}))
	if len(routed) == 0 {
		t.Fatal("the router has no routes")
	}
	for _, r := range setDiff(routed, documented) {
		t.Errorf("route %s is not in openapi.yaml", r)
	}
	for _, r := range setDiff(documented, routed) {
		t.Errorf("openapi.yaml documents %s, which the router does not serve", r)
	}

	// The comparison notices a route the document lacks.
	mux := NewRouter(&stubBackups{}, Options{}).(*chi.Mux)
	mux.Patch("/v1/backups/{user_id}", func(http.ResponseWriter, *http.Request) {})
	if extra := setDiff(routerRoutes(t, mux), documented); !slices.Contains(extra, "PATCH /v1/backups/{user_id}") {
		t.Errorf("an undocumented route went unnoticed: %v", extra)
	}
}

// problemCodeConstants parses the package's non-test files for the
// string constants named code*: the problem codes.
func problemCodeConstants(t *testing.T) map[string]bool {
	t.Helper()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	codes := map[string]bool{}
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, n := range vs.Names {
					if !strings.HasPrefix(n.Name, "code") || i >= len(vs.Values) {
						continue
					}
					if lit, ok := vs.Values[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
						v, err := strconv.Unquote(lit.Value)
						if err != nil {
							t.Fatal(err)
						}
						codes[v] = true
					}
				}
			}
		}
	}
	return codes
}

func TestOpenAPIProblemCodes(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	enum := map[string]bool{}
	for _, v := range doc.resolve(t, doc.lookup(t, "#/components/schemas/ProblemCode"))["enum"].([]any) {
		enum[v.(string)] = true
	}
	consts := problemCodeConstants(t)
	if len(consts) < 11 {
		t.Fatalf("found only %d problem code constants: %v", len(consts), consts)
	}
	for _, c := range setDiff(consts, enum) {
		t.Errorf("problem code %q (a constant) is not in the ProblemCode enum", c)
	}
	for c := range titles {
		if !enum[c] {
			t.Errorf("problem code %q (in titles) is not in the ProblemCode enum", c)
		}
	}
	for _, c := range setDiff(enum, consts) {
		t.Errorf("the ProblemCode enum has %q, which problems.go does not define", c)
	}
	for c := range enum {
		if titles[c] == "" {
			t.Errorf("problem code %q has no title", c)
		}
	}
}

// Every documented response is complete: a description, X-Request-Id, a
// body schema unless it is a 204, problem documents for errors, and
// Retry-After where the code sets it. Every $ref resolves.
func TestOpenAPIResponsesAreComplete(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if ref, ok := v["$ref"].(string); ok {
				doc.lookup(t, ref)
			}
			for _, x := range v {
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(doc.root)

	for key, op := range doc.operations(t) {
		if op["operationId"] == nil || op["summary"] == nil {
			t.Errorf("%s: no operationId or summary", key)
		}
		rs := doc.responses(t, op)
		if len(rs) == 0 {
			t.Errorf("%s: no responses", key)
		}
		for status, r := range rs {
			where := fmt.Sprintf("%s %d", key, status)
			if d, _ := r["description"].(string); d == "" {
				t.Errorf("%s: no description", where)
			}
			headers, _ := r["headers"].(map[string]any)
			if headers["X-Request-Id"] == nil {
				t.Errorf("%s: X-Request-Id is not documented", where)
			}
			if (status == 429 || status == 503) && headers["Retry-After"] == nil {
				t.Errorf("%s: Retry-After is not documented", where)
			}
			content, _ := r["content"].(map[string]any)
			if status == http.StatusNoContent {
				if len(content) != 0 {
					t.Errorf("%s: a 204 has no body", where)
				}
				continue
			}
			if len(content) == 0 {
				t.Errorf("%s: no content", where)
			}
			for ct, media := range content {
				if m, _ := media.(map[string]any); m["schema"] == nil {
					t.Errorf("%s %s: no schema", where, ct)
				}
			}
			if status >= 400 && (len(content) != 1 || content["application/problem+json"] == nil) {
				t.Errorf("%s: an error must be application/problem+json only", where)
			}
		}
	}
}

// TestOpenAPIServed: the document is served, as embedded, without a token.
func TestOpenAPIServed(t *testing.T) {
	t.Parallel()
	s := &stubBackups{}
	w := do(newTestRouter(s, nil), "GET", "/openapi.yaml", "", "")
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "application/yaml" {
		t.Fatalf("GET /openapi.yaml: %d %q", w.Code, w.Header().Get("Content-Type"))
	}
	if !bytes.Equal(w.Body.Bytes(), openAPIDocument) || len(openAPIDocument) == 0 {
		t.Fatal("GET /openapi.yaml did not serve the embedded document")
	}
	onDisk, err := os.ReadFile("openapi.yaml")
	if err != nil || !bytes.Equal(onDisk, openAPIDocument) {
		t.Fatalf("the embedded document is not openapi.yaml: %v", err)
	}
	if w.Header().Get("X-Request-Id") == "" || s.calls != 0 {
		t.Fatal("no X-Request-Id, or the vault was called")
	}
}

// docStub is stubBackups answering realistic backups, as the vault would.
type docStub struct {
	stubBackups
	replaced bool // Enroll answers "replaced" rather than "created"
}

func realBackup(b vault.Backup, locked bool) vault.Backup {
	now := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	b.UserID, b.MaxAttempts, b.AttemptsRemaining = "alice", 5, 5
	b.KeyVersion, b.PINKeyVersion, b.CreatedAt, b.UpdatedAt = 1, 2, now, now
	if locked {
		b.Locked, b.AttemptsRemaining = true, 0
	}
	return b
}

func (s *docStub) Enroll(ctx context.Context, ns, userID string, secret, pin []byte, max int, pre vault.Precondition) (vault.Backup, bool, error) {
	b, created, err := s.stubBackups.Enroll(ctx, ns, userID, secret, pin, max, pre)
	return realBackup(b, false), created && !s.replaced, err
}

func (s *docStub) Status(ctx context.Context, ns, userID string) (vault.Backup, error) {
	b, err := s.stubBackups.Status(ctx, ns, userID)
	return realBackup(b, true), err
}

func (s *docStub) ChangePIN(ctx context.Context, ns, userID string, pin, newPIN []byte, pre vault.Precondition) (vault.Backup, error) {
	b, err := s.stubBackups.ChangePIN(ctx, ns, userID, pin, newPIN, pre)
	return realBackup(b, false), err
}

// docLimiter refuses per-client requests or guesses with a fixed error.
type docLimiter struct{ request, guess error }

func (l docLimiter) Request(string) error { return l.request }
func (l docLimiter) ReserveGuess(string, string, string) (func(), error) {
	if l.guess != nil {
		return nil, l.guess
	}
	return func() {}, nil
}
func (docLimiter) WrongGuess(string)              {}
func (docLimiter) EscalatingDelayRejected()       {}
func (docLimiter) HoldHSM(string) (func(), error) { return func() {}, nil }

// vaultErrors are the errors the vault's methods return, by name.
var vaultErrors = map[string]error{
	"invalid":       fmt.Errorf("%w: max_attempts: must be from 1 to 20", vault.ErrInvalid),
	"wrong_pin":     fmt.Errorf("recover: %w", &vault.WrongPINError{Remaining: 2}),
	"locked":        fmt.Errorf("recover: %w", vault.ErrLocked),
	"locked_here":   fmt.Errorf("recover: %w", &vault.LockedError{Checked: true}),
	"not_found":     fmt.Errorf("x: %w", vault.ErrNotFound),
	"precondition":  fmt.Errorf("x: %w: generation does not match", vault.ErrPrecondition),
	"delay":         fmt.Errorf("x: %w", &vault.DelayedError{RetryAfter: 90 * time.Second}),
	"unavailable":   fmt.Errorf("x: %w: read record: disk", vault.ErrUnavailable),
	"integrity":     fmt.Errorf("x: %w: MAC mismatch", vault.ErrIntegrity),
	"unknown error": errors.New("something else"),
}

// cannotReturn lists, per operation, the vault errors its vault method
// (and, for guesses, Precheck) never returns, read from package vault:
// Enroll counts no guess and has no "not found"; Status takes no
// precondition and counts nothing; Delete counts nothing; Recover passes
// no precondition. These are the only combinations not held to the
// document.
var cannotReturn = map[string][]string{
	"PUT /v1/backups/{user_id}":          {"wrong_pin", "locked", "locked_here", "not_found", "delay"},
	"GET /v1/backups/{user_id}":          {"wrong_pin", "locked", "locked_here", "precondition", "delay"},
	"DELETE /v1/backups/{user_id}":       {"wrong_pin", "locked", "locked_here", "delay"},
	"POST /v1/backups/{user_id}/recover": {"precondition"},
	"POST /v1/backups/{user_id}/pin":     {},
}

// A valid request of each operation.
var docRequests = map[string]struct{ body string }{
	"PUT /v1/backups/{user_id}":          {`{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","pin":"1234","max_attempts":5}`},
	"GET /v1/backups/{user_id}":          {""},
	"DELETE /v1/backups/{user_id}":       {""},
	"POST /v1/backups/{user_id}/recover": {`{"pin":"1234"}`},
	"POST /v1/backups/{user_id}/pin":     {`{"pin":"1234","new_pin":"5678"}`},
	"GET /openapi.yaml":                  {""},
}

func TestOpenAPIStatusesMatchHandlers(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	ops := doc.operations(t)
	for key := range ops {
		if _, ok := docRequests[key]; !ok {
			t.Fatalf("no test request for %s: add one to docRequests and cannotReturn", key)
		}
	}
	tokA := sha256.Sum256([]byte("token-a"))
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	observed := map[string]map[int]bool{}

	type scenario struct {
		name      string
		key       string // "METHOD /pattern"
		s         *docStub
		limits    Limiter
		admission Admitter
		token     string
		path      string // default: the pattern with user_id alice
		body      *string
		hdr       []string // extra header name/value pairs
	}
	check := func(sc scenario) {
		t.Helper()
		op := ops[sc.key]
		method, pattern, _ := strings.Cut(sc.key, " ")
		path := sc.path
		if path == "" {
			path = strings.ReplaceAll(pattern, "{user_id}", "alice")
		}
		body := docRequests[sc.key].body
		if sc.body != nil {
			body = *sc.body
		}
		h := NewRouter(sc.s, Options{Logger: quiet, Limits: sc.limits, Admission: sc.admission,
			Clients: []Client{{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{tokA}}}})
		w := do(h, method, path, sc.token, body, append([]string{"X-Request-Id", "doc-test-1"}, sc.hdr...)...)
		where := fmt.Sprintf("%s (%s): %d", sc.key, sc.name, w.Code)
		r, ok := doc.responses(t, op)[w.Code]
		if !ok {
			t.Errorf("%s: openapi.yaml does not list status %d for this operation; body %s", where, w.Code, w.Body)
			return
		}
		if observed[sc.key] == nil {
			observed[sc.key] = map[int]bool{}
		}
		observed[sc.key][w.Code] = true
		for _, e := range doc.checkResponse(t, r, w) {
			t.Errorf("%s: %s", where, e)
		}
	}

	for key := range ops {
		if !strings.HasPrefix(key, "GET /openapi") {
			continue
		}
		check(scenario{name: "no token", key: key, s: &docStub{}})
	}
	long := `{"pin":"` + strings.Repeat("1", MaxBodyBytes) + `"}`
	for key := range cannotReturn {
		if ops[key] == nil {
			t.Fatalf("cannotReturn names %s, which openapi.yaml does not document", key)
		}
		method, _, _ := strings.Cut(key, " ")
		guess := strings.HasSuffix(key, "/recover") || strings.HasSuffix(key, "/pin")
		// Successes.
		check(scenario{name: "success", key: key, s: &docStub{stubBackups: stubBackups{secretOut: []byte("0123456789abcdef")}}, token: "token-a"})
		if method == "PUT" {
			check(scenario{name: "replaced", key: key, s: &docStub{replaced: true}, token: "token-a"})
		}
		// Refused before the vault.
		check(scenario{name: "no token", key: key, s: &docStub{}})
		check(scenario{name: "bad user_id", key: key, s: &docStub{}, token: "token-a", path: strings.Replace(strings.Split(key, " ")[1], "{user_id}", "a%20b", 1)})
		if docRequests[key].body != "" {
			check(scenario{name: "body too large", key: key, s: &docStub{}, token: "token-a", body: &long})
			check(scenario{name: "body not sent as JSON", key: key, s: &docStub{}, token: "token-a",
				hdr: []string{"Content-Type", "application/x-www-form-urlencoded"}})
		}
		check(scenario{name: "client request limit", key: key, s: &docStub{}, token: "token-a",
			limits: docLimiter{request: &ratelimit.Error{Limiter: "requests_per_client", RetryAfter: time.Second}}})
		if guess {
			check(scenario{name: "per-user guess limit", key: key, s: &docStub{}, token: "token-a",
				limits: docLimiter{guess: &ratelimit.Error{Limiter: "guesses_per_user", RetryAfter: 30 * time.Second}}})
		}
		if method != "GET" && method != "DELETE" {
			check(scenario{name: "HSM admission sheds", key: key, s: &docStub{}, token: "token-a", admission: &refuseAll{}})
		}
		// Every error the vault can return, from the operation, and for a
		// guess from its precheck.
		for name, err := range vaultErrors {
			if slices.Contains(cannotReturn[key], name) {
				continue
			}
			check(scenario{name: "vault: " + name, key: key, s: &docStub{stubBackups: stubBackups{err: err}}, token: "token-a"})
			if guess {
				check(scenario{name: "precheck: " + name, key: key, s: &docStub{stubBackups: stubBackups{precheck: err}}, token: "token-a"})
			}
		}
	}

	// Every listed status was produced by some request above.
	for key, op := range ops {
		for status := range doc.responses(t, op) {
			if !observed[key][status] {
				t.Errorf("openapi.yaml lists %d for %s, but no request produced it: drop it, or add the request that does", status, key)
			}
		}
	}
}

// checkResponse holds a recorded response to its documented one: content
// type, required headers, and the body against the schema.
func (d *openAPIDoc) checkResponse(t *testing.T, r map[string]any, w *httptest.ResponseRecorder) []string {
	t.Helper()
	var errs []string
	headers, _ := r["headers"].(map[string]any)
	for name, h := range headers {
		h := d.resolve(t, h)
		v := w.Header().Get(name)
		if v == "" {
			if req, _ := h["required"].(bool); req {
				errs = append(errs, "header "+name+" is missing")
			}
			continue
		}
		var val any = v
		if s := d.resolve(t, h["schema"]); s["type"] == "integer" {
			val = json.Number(v)
		}
		errs = append(errs, d.validate(t, h["schema"], val, "header "+name)...)
	}
	content, _ := r["content"].(map[string]any)
	if len(content) == 0 {
		if w.Body.Len() != 0 {
			errs = append(errs, "a body where none is documented")
		}
		return errs
	}
	ct, _, _ := strings.Cut(w.Header().Get("Content-Type"), ";")
	media, ok := content[strings.TrimSpace(ct)].(map[string]any)
	if !ok {
		return append(errs, fmt.Sprintf("Content-Type %q is not documented", ct))
	}
	if !strings.HasSuffix(ct, "json") {
		return errs
	}
	dec := json.NewDecoder(bytes.NewReader(w.Body.Bytes()))
	dec.UseNumber()
	var body any
	if err := dec.Decode(&body); err != nil {
		return append(errs, "body is not JSON: "+err.Error())
	}
	errs = append(errs, d.validate(t, media["schema"], body, "body")...)
	// An ETag names the generation the body holds.
	if etag := w.Header().Get("ETag"); etag != "" {
		if m, ok := body.(map[string]any); ok && etag != `"`+fmt.Sprint(m["generation"])+`"` {
			errs = append(errs, fmt.Sprintf("ETag %s is not the body's generation %v", etag, m["generation"]))
		}
	}
	return errs
}

// validate checks v (decoded JSON with json.Number) against the subset of
// JSON Schema the document uses. Objects that declare type object are
// also held to their listed properties, so that a field the code adds
// without documenting it is caught.
func (d *openAPIDoc) validate(t *testing.T, schema, v any, at string) []string {
	t.Helper()
	s := d.resolve(t, schema)
	var errs []string
	fail := func(f string, args ...any) { errs = append(errs, at+": "+fmt.Sprintf(f, args...)) }
	for _, sub := range asList(s["allOf"]) {
		errs = append(errs, d.validate(t, sub, v, at)...)
	}
	if c, ok := s["const"]; ok && fmt.Sprint(c) != fmt.Sprint(v) {
		fail("%v, want %v", v, c)
	}
	if e, ok := s["enum"]; ok && !slices.ContainsFunc(asList(e), func(x any) bool { return fmt.Sprint(x) == fmt.Sprint(v) }) {
		fail("%v is not one of %v", v, e)
	}
	switch typ, _ := s["type"].(string); typ {
	case "":
	case "string":
		str, ok := v.(string)
		if !ok {
			fail("%v is not a string", v)
			break
		}
		if p, ok := s["pattern"].(string); ok && !regexp.MustCompile(p).MatchString(str) {
			fail("%q does not match %s", str, p)
		}
		if n, ok := s["minLength"].(int); ok && utf8.RuneCountInString(str) < n {
			fail("%q is shorter than %d", str, n)
		}
		if n, ok := s["maxLength"].(int); ok && utf8.RuneCountInString(str) > n {
			fail("%q is longer than %d", str, n)
		}
		if s["format"] == "date-time" {
			if _, err := time.Parse(time.RFC3339Nano, str); err != nil {
				fail("%q is not a date-time", str)
			}
		}
	case "integer", "number":
		n, ok := v.(json.Number)
		if !ok {
			fail("%v is not a number", v)
			break
		}
		i, err := n.Int64()
		if typ == "integer" && err != nil {
			fail("%v is not an integer", v)
			break
		}
		if m, ok := s["minimum"].(int); ok && i < int64(m) {
			fail("%v is less than %d", v, m)
		}
	case "boolean":
		if _, ok := v.(bool); !ok {
			fail("%v is not a boolean", v)
		}
	case "object":
		if _, ok := v.(map[string]any); !ok {
			fail("%v is not an object", v)
		}
	default:
		t.Fatalf("%s: the test validator does not know type %q", at, typ)
	}
	obj, isObj := v.(map[string]any)
	if !isObj {
		return errs
	}
	for _, name := range asList(s["required"]) {
		if _, ok := obj[name.(string)]; !ok {
			fail("required field %s is missing", name)
		}
	}
	props, _ := s["properties"].(map[string]any)
	for name, val := range obj {
		if p, ok := props[name]; ok {
			errs = append(errs, d.validate(t, p, val, at+"."+name)...)
		} else if s["type"] == "object" {
			fail("field %s is not documented", name)
		}
	}
	return errs
}

func asList(v any) []any {
	l, _ := v.([]any)
	return l
}

// The document's request schemas accept the requests the tests send.
func TestOpenAPIRequestSchemas(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	ops := doc.operations(t)
	for key, req := range docRequests {
		op := ops[key]
		rb, _ := op["requestBody"].(map[string]any)
		if req.body == "" {
			if rb != nil {
				t.Errorf("%s: documents a body the handler does not read", key)
			}
			continue
		}
		if rb == nil {
			t.Errorf("%s: no requestBody documented", key)
			continue
		}
		rb = doc.resolve(t, rb)
		media, _ := rb["content"].(map[string]any)["application/json"].(map[string]any)
		schema := doc.resolve(t, media["schema"])
		if schema["additionalProperties"] != false {
			t.Errorf("%s: the request schema must say additionalProperties: false", key)
		}
		dec := json.NewDecoder(strings.NewReader(req.body))
		dec.UseNumber()
		var v any
		if err := dec.Decode(&v); err != nil {
			t.Fatal(err)
		}
		for _, e := range doc.validate(t, schema, v, key+" body") {
			t.Error(e)
		}
		// The schema's fields are the decoder's.
		var names []string
		for n := range schema["properties"].(map[string]any) {
			names = append(names, n)
		}
		var dst any
		switch key {
		case "PUT /v1/backups/{user_id}":
			dst = &enrollRequest{}
		case "POST /v1/backups/{user_id}/recover":
			dst = &recoverRequest{}
		case "POST /v1/backups/{user_id}/pin":
			dst = &changePINRequest{}
		}
		want := fields(dst)
		slices.Sort(names)
		slices.Sort(want)
		if !slices.Equal(names, want) {
			t.Errorf("%s: documented fields %v, the decoder's %v", key, names, want)
		}
	}
}

// The Secret schema accepts exactly the texts the handler accepts: its
// pattern and lengths agree with decodeSecret and vault.CheckSecret, length
// by length and for the non-canonical encodings Strict decoding refuses.
func TestOpenAPISecretSchema(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	schema := doc.resolve(t, doc.lookup(t, "#/components/schemas/Secret"))
	if schema["type"] != "string" || schema["format"] != "byte" || schema["contentEncoding"] != nil || schema["contentMediaType"] != nil {
		t.Errorf("Secret: want type string, format byte and no contentEncoding or contentMediaType (generators make those a file): %v", schema)
	}
	accepted := func(text string) bool {
		secret, err := decodeSecret(sensitive(text))
		return err == nil && vault.CheckSecret(secret) == nil
	}
	texts := []string{"", "MDEyMzQ1Njc4OWFiY2RlZg", "MDEyMzQ1Njc4OWFiY2RlZh==", "MDEyMzQ1Njc4OWFiY2RlZg==\n", "MDEy-zQ1Njc4OWFiY2RlZg=="}
	for n := range 520 {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(i*7 + n)
		}
		enc := base64.StdEncoding.EncodeToString(b)
		texts = append(texts, enc)
		if strings.HasSuffix(enc, "=") { // the same text with a nonzero unused bit
			i := strings.IndexByte(enc, '=') - 1
			texts = append(texts, enc[:i]+string(base64Alphabet[strings.IndexByte(base64Alphabet, enc[i])|1])+enc[i+1:])
		}
	}
	for _, text := range texts {
		want := accepted(text)
		if errs := doc.validate(t, schema, text, "secret"); (len(errs) == 0) != want {
			t.Errorf("secret of %d characters: the handler accepts it: %v; the schema: %v", len(text), want, errs)
		}
	}
}

const base64Alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

// Every problem response has its own schema, allOf the base Problem and
// an object whose code and status are typed one-value (or, for 500,
// two-value) enums, never const: generators such as oapi-codegen type
// those fields, and leave allOf + const ones untyped. The status enum is
// the status each operation lists the response under.
func TestOpenAPIProblemSchemasTyped(t *testing.T) {
	t.Parallel()
	doc := loadOpenAPI(t)
	codes := map[string]bool{}
	for _, v := range doc.resolve(t, doc.lookup(t, "#/components/schemas/ProblemCode"))["enum"].([]any) {
		codes[v.(string)] = true
	}
	statusOf := map[string]int{} // problem schema name -> its status enum
	responses := doc.root["components"].(map[string]any)["responses"].(map[string]any)
	for name, r := range responses {
		media, _ := doc.resolve(t, r)["content"].(map[string]any)["application/problem+json"].(map[string]any)
		if media == nil {
			continue
		}
		ref, _ := media["schema"].(map[string]any)["$ref"].(string)
		schemaName, ok := strings.CutPrefix(ref, "#/components/schemas/")
		if !ok || !strings.HasSuffix(schemaName, "Problem") {
			t.Errorf("response %s: the schema must be a $ref to its own components/schemas/...Problem, not %v", name, media["schema"])
			continue
		}
		s := doc.resolve(t, doc.lookup(t, ref))
		parts := asList(s["allOf"])
		if len(parts) != 2 || parts[0].(map[string]any)["$ref"] != "#/components/schemas/Problem" {
			t.Errorf("%s: want allOf [Problem, {properties: code, status}], got %v", schemaName, s)
			continue
		}
		props, _ := parts[1].(map[string]any)["properties"].(map[string]any)
		code, _ := props["code"].(map[string]any)
		status, _ := props["status"].(map[string]any)
		if code["type"] != "string" || len(asList(code["enum"])) == 0 || code["const"] != nil {
			t.Errorf("%s: code must be type string with an enum, got %v", schemaName, code)
		}
		for _, c := range asList(code["enum"]) {
			if !codes[c.(string)] {
				t.Errorf("%s: code %v is not in ProblemCode", schemaName, c)
			}
		}
		if status["type"] != "integer" || len(asList(status["enum"])) != 1 || status["const"] != nil {
			t.Errorf("%s: status must be type integer with a one-value enum, got %v", schemaName, status)
			continue
		}
		statusOf["#/components/responses/"+name] = asList(status["enum"])[0].(int)
	}
	if len(statusOf) < 12 {
		t.Fatalf("only %d typed problem responses", len(statusOf))
	}
	for key, op := range doc.operations(t) {
		for code, r := range op["responses"].(map[string]any) {
			ref, _ := r.(map[string]any)["$ref"].(string)
			if want, ok := statusOf[ref]; ok && strconv.Itoa(want) != code {
				t.Errorf("%s lists %s under %s, whose schema's status is %d", key, ref, code, want)
			}
		}
	}
}

// TestOpenAPILicense: the document names the repository's license, so a
// generated client says what it may be used under.
func TestOpenAPILicense(t *testing.T) {
	d := loadOpenAPI(t)
	info, _ := d.root["info"].(map[string]any)
	license, _ := info["license"].(map[string]any)
	if license["identifier"] != "Apache-2.0" || license["name"] != "Apache-2.0" {
		t.Errorf("info.license = %v, want name and identifier Apache-2.0", license)
	}
	text, err := os.ReadFile("../LICENSE")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(text), "Apache License\n                           Version 2.0") {
		t.Error("LICENSE is not the Apache License 2.0 that info.license names")
	}
}
