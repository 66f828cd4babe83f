package api

import (
	"context"
	"log/slog"
	"net/http"
	"time"
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

// audit opens the event of op on userID; its user is "-" without a
// logIDer, or for an ID the API refused ("").
func (h *handlers) audit(r *http.Request, op, ns, userID string) auditEvent {
	e := auditEvent{h: h, r: r, op: op, ns: ns, user: "-", start: time.Now(), onSuccess: "success"}
	if l, ok := h.b.(logIDer); ok && userID != "" {
		e.user = l.LogID(ns, userID)
	}
	return e
}

// finish, deferred by the handler, writes the event with the handler's
// error, or as "internal" if the handler panics: the panic goes on to
// the recoverer, which answers 500.
func (e *auditEvent) finish(err *error) {
	if p := recover(); p != nil {
		e.done(errPanicked)
		panic(p)
	}
	e.done(*err)
}

// done writes the event, with the operation's outcome, to the audit
// logger (Options.Audit), which no log level filters.
func (e *auditEvent) done(err error) {
	client := ""
	if c := clientOf(e.r.Context()); c != nil {
		client = c.Name
	}
	e.h.auditLog.LogAttrs(context.Background(), slog.LevelInfo, "audit",
		slog.String("request_id", requestID(e.r.Context())),
		slog.String("client", client),
		slog.String("op", e.op),
		slog.String("namespace", e.ns),
		slog.String("user", e.user),
		slog.String("result", e.result(err)),
		slog.Float64("duration_ms", float64(time.Since(e.start).Microseconds())/1000))
}

func (e *auditEvent) result(err error) string {
	if err == nil {
		return e.onSuccess
	}
	return auditResult(classify(err))
}

// auditResult names an outcome in an audit event (docs/audit.md): the
// metric's result, except "lockout" for this request's wrong PIN that used
// the last attempt, and the API's problem codes where they differ.
func auditResult(o outcome) string {
	switch {
	case o.Lockout:
		return "lockout"
	case o.Result == "invalid":
		return codeInvalid
	case o.Result == "error":
		return codeInternal
	default:
		return o.Result
	}
}

// adminAudit writes the event of a key lifecycle request on the admin
// listener: who asked (the request ID; the admin token has no name), the
// operation, its result and the key version it names, if any.
func adminAudit(log *slog.Logger, r *http.Request, op string, start time.Time, result string, attrs ...any) {
	log.Info("audit", append([]any{
		"request_id", requestID(r.Context()),
		"client", "admin",
		"op", op,
		"result", result,
		"duration_ms", float64(time.Since(start).Microseconds()) / 1000,
	}, attrs...)...)
}
