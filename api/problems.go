package api

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/keyvault/keyvault/ratelimit"
	"github.com/keyvault/keyvault/vault"
)

// problem is an RFC 9457 problem document with keyvault's machine-readable
// code.
type problem struct {
	Type              string `json:"type"`
	Title             string `json:"title"`
	Status            int    `json:"status"`
	Detail            string `json:"detail"`
	Code              string `json:"code"`
	AttemptsRemaining *int   `json:"attempts_remaining,omitempty"`
	RequestID         string `json:"request_id,omitempty"`
}

// Problem codes (docs/api.md, "Fields and problem codes").
const (
	codeInvalid      = "invalid_request"
	codeUnauthorized = "unauthorized"
	codeNotFound     = "not_found"
	codeWrongPIN     = "wrong_pin"
	codeLocked       = "locked"
	codePrecondition = "precondition_failed"
	codeTooLarge     = "payload_too_large"
	codeRateLimited  = "rate_limited"
	codeUnavailable  = "unavailable"
	codeIntegrity    = "integrity_error"
	codeInternal     = "internal"
)

var titles = map[string]string{
	codeInvalid:      "The request is invalid",
	codeUnauthorized: "Missing or unknown bearer token",
	codeNotFound:     "No such backup",
	codeWrongPIN:     "Wrong PIN",
	codeLocked:       "The backup is locked and its secret destroyed",
	codePrecondition: "Precondition failed",
	codeTooLarge:     "The request body is too large",
	codeRateLimited:  "Too many requests",
	codeUnavailable:  "The vault cannot answer now",
	codeIntegrity:    "A stored record failed its integrity check",
	codeInternal:     "Internal error",
}

// retryAfterSeconds is the Retry-After of a 503: the HSM pool probes a
// failed member within about a second.
const retryAfterSeconds = 1

// ceilSeconds is a Retry-After in whole seconds, never early and at least 1.
func ceilSeconds(d time.Duration) int {
	return max(1, int((d+time.Second-1)/time.Second))
}

// apiError is an error the api package itself detects, with a detail text
// written here (never holding request values).
type apiError struct {
	status int
	code   string
	detail string
}

func (e *apiError) Error() string { return e.detail }

func badRequest(detail string) error {
	return &apiError{http.StatusBadRequest, codeInvalid, detail}
}

// writeError is the one place errors become responses. Only texts written
// by keyvault reach the body: vault.ErrInvalid details name a field and a
// rule, never a value.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	p := problem{RequestID: requestID(r.Context())}
	var ae *apiError
	var wrong *vault.WrongPINError
	var limited *ratelimit.Error
	var delayed *vault.RateLimitedError
	retryAfter := retryAfterSeconds
	switch {
	case errors.As(err, &limited):
		p.Status, p.Code, retryAfter = http.StatusTooManyRequests, codeRateLimited, limited.RetryAfterSeconds()
		p.Detail = "Too many requests or guesses (" + limited.Limiter + "); nothing was checked or counted. Retry after Retry-After seconds."
	case errors.As(err, &delayed):
		p.Status, p.Code, retryAfter = http.StatusTooManyRequests, codeRateLimited, ceilSeconds(delayed.RetryAfter)
		p.Detail = "Too many wrong guesses in a row: wait before the next one. Nothing was checked or counted. Retry after Retry-After seconds."
	case errors.As(err, &ae):
		p.Status, p.Code, p.Detail = ae.status, ae.code, ae.detail
	case errors.Is(err, vault.ErrInvalid):
		p.Status, p.Code, p.Detail = http.StatusBadRequest, codeInvalid, err.Error()
	case errors.As(err, &wrong):
		n := wrong.Remaining
		p.Status, p.Code, p.AttemptsRemaining = http.StatusForbidden, codeWrongPIN, &n
		p.Detail = "The PIN is wrong; the guess was counted."
	case errors.Is(err, vault.ErrLocked):
		p.Status, p.Code = http.StatusGone, codeLocked
		p.Detail = "Every attempt was used; enroll the backup again to use it."
	case errors.Is(err, vault.ErrNotFound):
		p.Status, p.Code, p.Detail = http.StatusNotFound, codeNotFound, "No backup for this user_id."
	case errors.Is(err, vault.ErrPrecondition):
		p.Status, p.Code = http.StatusPreconditionFailed, codePrecondition
		p.Detail = "The If-Match or If-None-Match precondition does not hold for this backup; nothing was counted or written."
	case errors.Is(err, vault.ErrIntegrity):
		p.Status, p.Code = http.StatusInternalServerError, codeIntegrity
		p.Detail = "The stored backup failed authentication and was not used; operators have been alerted by metric."
	case errors.Is(err, vault.ErrUnavailable):
		p.Status, p.Code = http.StatusServiceUnavailable, codeUnavailable
		p.Detail = "No HSM or store could answer in time. Retry later."
	default:
		p.Status, p.Code, p.Detail = http.StatusInternalServerError, codeInternal, "Internal error."
		logger(r.Context()).Error("internal error", "error", err.Error())
	}
	switch p.Code {
	case codeUnavailable, codeRateLimited:
		w.Header().Set("Retry-After", strconv.Itoa(retryAfter))
	case codeUnauthorized:
		w.Header().Set("WWW-Authenticate", `Bearer realm="keyvault"`)
	}
	p.Title = titles[p.Code]
	p.Type = "urn:keyvault:problem:" + p.Code
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(p.Status)
	_ = json.NewEncoder(w).Encode(p)
}
