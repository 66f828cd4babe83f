package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/getkin/kin-openapi/openapi3"
	"github.com/getkin/kin-openapi/openapi3filter"
	"github.com/getkin/kin-openapi/routers"
	"github.com/getkin/kin-openapi/routers/gorillamux"
)

// The e2e client (client.call, under every helper) holds each answer of
// the API to api/openapi.yaml with kin-openapi's openapi3filter: a status
// the operation does not list, a missing or malformed header, a body that
// breaks its schema, or a top-level field the schema does not name fails
// the test that made the request. A path or method the document does not
// have must answer one of the problems the document gives for those: 401
// under /v1, 404 or 405.

var apiDoc struct {
	once   sync.Once
	doc    *openapi3.T
	router routers.Router
	err    error
}

// loadAPIDoc loads and validates api/openapi.yaml once.
func loadAPIDoc() (*openapi3.T, routers.Router, error) {
	apiDoc.once.Do(func() {
		// The document is served as application/yaml and described as a
		// string: keep it one, rather than let the filter parse it.
		openapi3filter.RegisterBodyDecoder("application/yaml", func(r io.Reader, _ http.Header, _ *openapi3.SchemaRef, _ openapi3filter.EncodingFn) (any, error) {
			b, err := io.ReadAll(r)
			return string(b), err
		})
		doc, err := openapi3.NewLoader().LoadFromFile(filepath.Join(moduleRoot, "api", "openapi.yaml"))
		if err != nil {
			apiDoc.err = fmt.Errorf("load api/openapi.yaml: %w", err)
			return
		}
		if err := doc.Validate(context.Background()); err != nil {
			apiDoc.err = fmt.Errorf("api/openapi.yaml is not a valid OpenAPI document: %w", err)
			return
		}
		r, err := gorillamux.NewRouter(doc)
		if err != nil {
			apiDoc.err = fmt.Errorf("route api/openapi.yaml: %w", err)
			return
		}
		apiDoc.doc, apiDoc.router = doc, r
	})
	return apiDoc.doc, apiDoc.router, apiDoc.err
}

// checkAgainstDoc says why r, the answer to method path (path may carry a
// query), breaks api/openapi.yaml, or returns nil.
func checkAgainstDoc(method, path string, r response) error {
	doc, router, err := loadAPIDoc()
	if err != nil {
		return err
	}
	req, err := http.NewRequest(method, "http://vault"+path, nil)
	if err != nil {
		return err
	}
	route, params, err := router.FindRoute(req)
	switch {
	case err == nil:
	case errors.Is(err, routers.ErrPathNotFound), errors.Is(err, routers.ErrMethodNotAllowed):
		route = unroutedRoute(doc, req.URL.Path)
	default:
		return fmt.Errorf("find the route: %w", err)
	}
	err = openapi3filter.ValidateResponse(context.Background(), &openapi3filter.ResponseValidationInput{
		RequestValidationInput: &openapi3filter.RequestValidationInput{Request: req, PathParams: params, Route: route},
		Status:                 r.Status,
		Header:                 r.Header,
		Body:                   io.NopCloser(bytes.NewReader(r.Body)),
		Options:                &openapi3filter.Options{IncludeResponseStatus: true, MultiError: true},
	})
	if err != nil {
		return err
	}
	return undocumentedFields(route, method, r)
}

// unroutedRoute is a stand-in operation for a path or method the document
// lacks: its answers are the document's own 401 (under /v1), 404 and 405.
func unroutedRoute(doc *openapi3.T, path string) *routers.Route {
	rs := doc.Components.Responses
	opts := []openapi3.NewResponsesOption{
		openapi3.WithStatus(http.StatusNotFound, rs["NotFound"]),
		openapi3.WithStatus(http.StatusMethodNotAllowed, rs["MethodNotAllowed"]),
	}
	if path == "/v1" || strings.HasPrefix(path, "/v1/") {
		opts = append(opts, openapi3.WithStatus(http.StatusUnauthorized, rs["Unauthorized"]))
	}
	op := openapi3.NewOperation()
	op.Responses = openapi3.NewResponses(opts...)
	return &routers.Route{Spec: doc, Path: path, Operation: op}
}

// undocumentedFields refuses a JSON object body with a top-level field its
// schema (through allOf) does not name: the schemas leave additional
// properties open for clients' sake, but the server must not add one
// without documenting it.
func undocumentedFields(route *routers.Route, method string, r response) error {
	mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if method == http.MethodHead || err != nil || !strings.HasSuffix(mt, "json") {
		return nil
	}
	ref := route.Operation.Responses.Status(r.Status)
	if ref == nil || ref.Value == nil {
		return nil
	}
	media := ref.Value.Content.Get(mt)
	if media == nil || media.Schema == nil {
		return nil
	}
	var body map[string]any
	if err := json.Unmarshal(r.Body, &body); err != nil {
		return nil // not an object: the schema has judged it
	}
	names := map[string]bool{}
	schemaFields(media.Schema, names)
	var extra []string
	for k := range body {
		if !names[k] {
			extra = append(extra, k)
		}
	}
	if len(extra) > 0 {
		slices.Sort(extra)
		return fmt.Errorf("field(s) %v of the %d body are not in its schema", extra, r.Status)
	}
	return nil
}

// schemaFields collects the property names of s and of its allOf parts.
func schemaFields(s *openapi3.SchemaRef, into map[string]bool) {
	if s == nil || s.Value == nil {
		return
	}
	for name := range s.Value.Properties {
		into[name] = true
	}
	for _, sub := range s.Value.AllOf {
		schemaFields(sub, into)
	}
}

// recordingTB records Errorf instead of failing.
type recordingTB struct {
	testing.TB
	mu     sync.Mutex
	errors []string
}

func (r *recordingTB) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errors = append(r.errors, fmt.Sprintf(format, args...))
}

// TestDocCheckCatchesBreaches holds the checker to answers that keep and
// that break the document, and shows that a client's breach fails its test.
func TestDocCheckCatchesBreaches(t *testing.T) {
	t.Parallel()
	problem := func(status int, code string, extra string) string {
		return fmt.Sprintf(`{"type":"urn:keyvault:problem:%s","title":"t","status":%d,"detail":"d","code":"%s","request_id":"r1"%s}`, code, status, code, extra)
	}
	hdr := func(ct string, kv ...string) http.Header {
		h := http.Header{"Content-Type": {ct}, "X-Request-Id": {"r1"}, "Cache-Control": {"no-store"}}
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i+1] == "" {
				h.Del(kv[i])
			} else {
				h.Set(kv[i], kv[i+1])
			}
		}
		return h
	}
	const pj, js = "application/problem+json", "application/json"
	backup := `{"user_id":"alice","generation":3,"max_attempts":5,"attempts_remaining":5,"key_version":1,"pin_key_version":1,"created_at":"2026-01-02T03:04:05Z"}`
	cases := []struct {
		name, method, path string
		status             int
		header             http.Header
		body               string
		ok                 bool
	}{
		{"wrong_pin", "POST", "/v1/backups/alice/recover", 403, hdr(pj), problem(403, "wrong_pin", `,"attempts_remaining":2`), true},
		{"403 without attempts_remaining", "POST", "/v1/backups/alice/recover", 403, hdr(pj), problem(403, "wrong_pin", ""), false},
		{"403 with code locked", "POST", "/v1/backups/alice/recover", 403, hdr(pj), problem(403, "locked", `,"attempts_remaining":2`), false},
		{"410 with status 403 in the body", "POST", "/v1/backups/alice/recover", 410, hdr(pj), strings.Replace(problem(410, "locked", ""), `"status":410`, `"status":403`, 1), false},
		{"a status the operation does not list", "GET", "/v1/backups/alice", 410, hdr(pj), problem(410, "locked", ""), false},
		{"415 on PUT", "PUT", "/v1/backups/alice", 415, hdr(pj), problem(415, "invalid_request", ""), true},
		{"415 on GET, which reads no body", "GET", "/v1/backups/alice", 415, hdr(pj), problem(415, "invalid_request", ""), false},
		{"problem as application/json", "PUT", "/v1/backups/alice", 400, hdr(js), problem(400, "invalid_request", ""), false},
		{"no X-Request-Id", "PUT", "/v1/backups/alice", 400, hdr(pj, "X-Request-Id", ""), problem(400, "invalid_request", ""), false},
		{"429 without Retry-After", "POST", "/v1/backups/alice/pin", 429, hdr(pj), problem(429, "rate_limited", ""), false},
		{"429 with Retry-After", "POST", "/v1/backups/alice/pin", 429, hdr(pj, "Retry-After", "3"), problem(429, "rate_limited", ""), true},
		{"created", "PUT", "/v1/backups/alice", 201, hdr(js, "ETag", `"3"`), backup, true},
		{"created without ETag", "PUT", "/v1/backups/alice", 201, hdr(js), backup, false},
		{"created with an undocumented field", "PUT", "/v1/backups/alice", 201, hdr(js, "ETag", `"3"`), strings.Replace(backup, `{`, `{"pin":"1234",`, 1), false},
		{"generation as a string", "PUT", "/v1/backups/alice", 201, hdr(js, "ETag", `"3"`), strings.Replace(backup, `3,`, `"3",`, 1), false},
		{"recovered", "POST", "/v1/backups/alice/recover", 200, hdr(js), `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg==","attempts_remaining":5}`, true},
		{"recovered, secret unpadded", "POST", "/v1/backups/alice/recover", 200, hdr(js), `{"secret":"MDEyMzQ1Njc4OWFiY2RlZg","attempts_remaining":5}`, false},
		{"deleted", "DELETE", "/v1/backups/alice", 204, http.Header{"X-Request-Id": {"r1"}}, "", true},
		{"the document", "GET", "/openapi.yaml", 200, http.Header{"Content-Type": {"application/yaml"}, "X-Request-Id": {"r1"}}, "openapi: 3.1.0\n", true},
		{"no such route under /v1, no token", "GET", "/v1/nothing", 401, hdr(pj, "WWW-Authenticate", `Bearer realm="keyvault"`), problem(401, "unauthorized", ""), true},
		{"no such route", "GET", "/nothing", 404, hdr(pj), problem(404, "not_found", ""), true},
		{"no such route, answered 200", "GET", "/nothing", 200, hdr(js), `{}`, false},
		{"no such method", "PATCH", "/v1/backups/alice", 405, hdr(pj), problem(405, "invalid_request", ""), true},
		{"no such method, code not_found", "PATCH", "/v1/backups/alice", 405, hdr(pj), problem(405, "not_found", ""), false},
	}
	for _, c := range cases {
		err := checkAgainstDoc(c.method, c.path, response{Status: c.status, Header: c.header, Body: []byte(c.body)})
		if (err == nil) != c.ok {
			t.Errorf("%s: checkAgainstDoc: %v, want ok=%v", c.name, err, c.ok)
		}
	}

	// A client whose server breaks the document fails its test.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", pj)
		w.Header().Set("X-Request-Id", "r1")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(http.StatusForbidden)
		io.WriteString(w, problem(403, "locked", `,"attempts_remaining":2`))
	}))
	defer srv.Close()
	rec := &recordingTB{TB: t}
	c := newClient(rec, srv.URL, "token")
	c.recover(rec, "alice", "1234")
	if len(rec.errors) != 1 || !strings.Contains(rec.errors[0], "breaks api/openapi.yaml") {
		t.Errorf("a 403 with code locked: the test got %q, want one failure naming the document", rec.errors)
	}
}
