package api

import (
	"errors"
	"net/http"
	"time"

	"github.com/keyvault/keyvault/vault"
)

// logIDer names a user in logs by a keyed hash; *vault.Vault implements
// it. Without one, audit events name no user.
type logIDer interface {
	LogID(ns, userID string) string
}

// auditEvent is the one log event of a vault operation: who asked (request
// ID and client, from the request's logger), on which backup (namespace
// and a keyed hash of the user_id, never the raw ID), what came of it and
// how long it took. It never holds a secret, PIN or token.
type auditEvent struct {
	h         *handlers
	r         *http.Request
	op        string
	ns, user  string
	start     time.Time
	onSuccess string // the result of a success: "success", "created" or "replaced"
}

func (h *handlers) audit(r *http.Request, op, ns, userID string) *auditEvent {
	e := &auditEvent{h: h, r: r, op: op, ns: ns, user: "-", start: time.Now(), onSuccess: "success"}
	if l, ok := h.b.(logIDer); ok {
		e.user = l.LogID(ns, userID)
	}
	return e
}

// done logs the event with the operation's outcome.
func (e *auditEvent) done(err error) {
	logger(e.r.Context()).Info("audit",
		"op", e.op,
		"namespace", e.ns,
		"user", e.user,
		"result", e.result(err),
		"duration_ms", float64(time.Since(e.start).Microseconds())/1000)
}

func (e *auditEvent) result(err error) string {
	var locked *vault.LockedError
	var ae *apiError
	switch {
	case err == nil:
		return e.onSuccess
	case errors.As(err, &locked) && locked.Checked:
		return "lockout" // this request's wrong PIN used the last attempt
	case errors.As(err, &ae):
		return ae.code
	}
	// The vault's names, in the API's problem codes where they differ.
	switch r := vault.ResultOf(err); r {
	case "invalid":
		return codeInvalid
	case "error":
		return codeInternal
	default:
		return r
	}
}
