// Package api is keyvault's REST API (v1) on go-chi/chi, and its operator
// endpoints.
//
// NewRouter's route table reads top to bottom. Middleware runs in this
// order: request ID, metrics and request log, panic recovery (inside the
// metrics, so a panic counts as its 500), the request deadline, then for
// /v1 bearer-token authentication and the client's request limit. Handlers decode, call the vault, and encode; one
// function, writeError, turns every error into an RFC 9457 problem document,
// and anything it does not know becomes a bare 500 whose text stays in the
// process.
//
// Secrets (the history key and PINs) are decoded from the body into byte
// slices that are wiped after use; they never reach logs, metrics, or error
// bodies. Request logs name the route pattern, never the path, since the path
// holds the user_id.
package api
