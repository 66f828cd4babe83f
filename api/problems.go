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
	// keys_in_use: the key version and how many backups use it.
	Version     *uint32 `json:"version,omitempty"`
	WrapRecords *int    `json:"wrap_records,omitempty"`
	PINRecords  *int    `json:"pin_records,omitempty"`
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

// outcome is what an error means to the API: its own refusals (an
// apiError, a rate limit) first, then the vault's Classify. Every answer,
// metric, audit event and limit reads it.
type outcome struct {
	vault.Outcome
	api     *apiError             // the API's own problem; Result is its code
	limited *ratelimit.Error      // a rate limit; Result is "rate_limited"
	inUse   *vault.KeysInUseError // joined to a keys_in_use apiError: its counts join the body
}

func classify(err error) outcome {
	// AsType, unlike As, leaves o on the stack: this runs several times a
	// request.
	var o outcome
	var ok bool
	o.inUse, _ = errors.AsType[*vault.KeysInUseError](err)
	if o.limited, ok = errors.AsType[*ratelimit.Error](err); ok {
		o.Result = "rate_limited"
	} else if o.api, ok = errors.AsType[*apiError](err); ok {
		o.Result = o.api.code
	} else {
		o.Outcome = vault.Classify(err)
	}
	return o
}

// writeError is the one place errors become responses. Only texts written
// by keyvault reach the body: vault.ErrInvalid details name a field and a
// rule, never a value.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	p := problem{RequestID: requestID(r.Context())}
	o := classify(err)
	retryAfter := retryAfterSeconds
	switch {
	case o.limited != nil:
		p.Status, p.Code, retryAfter = http.StatusTooManyRequests, codeRateLimited, o.limited.RetryAfterSeconds()
		p.Detail = "Too many requests or guesses (" + o.limited.Limiter + "); nothing was checked or counted. Retry after Retry-After seconds."
	case o.api != nil:
		p.Status, p.Code, p.Detail = o.api.status, o.api.code, o.api.detail
		if u := o.inUse; u != nil && p.Code == adminKeysInUse {
			p.Version, p.WrapRecords, p.PINRecords = &u.Version, &u.WrapRecords, &u.PINRecords
		}
	case o.Delayed:
		p.Status, p.Code, retryAfter = http.StatusTooManyRequests, codeRateLimited, ceilSeconds(o.RetryAfter)
		p.Detail = "Too many wrong guesses in a row: wait before the next one. Nothing was checked or counted. Retry after Retry-After seconds."
	case o.Result == "invalid":
		p.Status, p.Code, p.Detail = http.StatusBadRequest, codeInvalid, err.Error()
	case o.Result == "wrong_pin":
		n := o.Remaining
		p.Status, p.Code, p.AttemptsRemaining = http.StatusForbidden, codeWrongPIN, &n
		p.Detail = "The PIN is wrong; the guess was counted."
	case o.Result == "locked":
		p.Status, p.Code = http.StatusGone, codeLocked
		p.Detail = "Every attempt was used; enroll the backup again to use it."
	case o.Result == "not_found":
		p.Status, p.Code, p.Detail = http.StatusNotFound, codeNotFound, "No backup for this user_id."
	case o.Result == "precondition_failed":
		p.Status, p.Code = http.StatusPreconditionFailed, codePrecondition
		p.Detail = "The If-Match or If-None-Match precondition does not hold for this backup; nothing was counted or written."
	case o.Result == "integrity_error":
		p.Status, p.Code = http.StatusInternalServerError, codeIntegrity
		p.Detail = "The stored backup failed authentication and was not used; operators have been alerted by metric."
	case o.Result == "unavailable":
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
	if p.Title = titles[p.Code]; p.Title == "" {
		p.Title = adminTitles[p.Code]
	}
	p.Type = "urn:keyvault:problem:" + p.Code
	w.Header().Set("Content-Type", "application/problem+json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(p.Status)
	_ = json.NewEncoder(w).Encode(p)
}
