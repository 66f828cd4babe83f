package api

import (
	_ "embed"
	"net/http"
)

// openAPIDocument is the OpenAPI 3.1 description of the API, served at
// GET /openapi.yaml. TestOpenAPIMatchesRouter holds it to the route table
// and to what the handlers answer.
//
//go:embed openapi.yaml
var openAPIDocument []byte

// serveOpenAPI answers the embedded document. It needs no token: it
// describes the API and holds no data.
func serveOpenAPI(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/yaml")
	w.Header().Set("Cache-Control", "no-cache")
	_, _ = w.Write(openAPIDocument)
}
