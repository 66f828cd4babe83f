package client

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Sentinel errors, one per problem code of the API. An *Error matches the
// sentinel of its Code with errors.Is, and only when the vault itself
// answered with that code (a problem document), or when the client refused
// the call before sending it (ErrInvalid). A 502 from a proxy, say, matches
// none of them; look at (*Error).Status for those.
var (
	// ErrInvalid (400 invalid_request): the request broke a rule (user_id,
	// secret or PIN length, max_attempts range, body shape). Nothing was
	// counted. Also returned, with Status 0, for a call the client refused
	// to send.
	ErrInvalid = errors.New("keyvault: invalid request")
	// ErrUnauthorized (401 unauthorized): missing or unknown bearer token.
	ErrUnauthorized = errors.New("keyvault: unauthorized")
	// ErrNotFound (404 not_found): no backup for this user_id (never
	// enrolled, or deleted). Nothing was counted.
	ErrNotFound = errors.New("keyvault: no such backup")
	// ErrWrongPIN (403 wrong_pin): the PIN is wrong and the guess was
	// counted; at least one attempt is left (Error.AttemptsRemaining).
	ErrWrongPIN = errors.New("keyvault: wrong PIN")
	// ErrLocked (410 locked): every attempt is used and the secret is
	// destroyed; only a new Enroll (or Delete) helps.
	ErrLocked = errors.New("keyvault: backup locked")
	// ErrPrecondition (412 precondition_failed): If-Match or If-None-Match
	// did not hold. Nothing was counted or written.
	ErrPrecondition = errors.New("keyvault: precondition failed")
	// ErrTooLarge (413 payload_too_large): the body exceeded 64 KiB.
	ErrTooLarge = errors.New("keyvault: request too large")
	// ErrRateLimited (429 rate_limited): refused by a rate limit before
	// anything was checked or counted; retry after Error.RetryAfter.
	ErrRateLimited = errors.New("keyvault: rate limited")
	// ErrUnavailable (503 unavailable): the vault learnt or told no outcome:
	// its HSMs or store gave no answer in time, or a guess's count was
	// taken away while the HSM checked it (a later success forgave it, or
	// its backup was replaced) and could not be counted again. A guess is
	// then not counted (refused, refunded or forgiven), but for rare cases
	// the package documentation names; retry after Error.RetryAfter.
	ErrUnavailable = errors.New("keyvault: unavailable")
	// ErrIntegrity (500 integrity_error): the stored record failed its
	// integrity check and was not used; operators must look.
	ErrIntegrity = errors.New("keyvault: stored record failed its integrity check")
	// ErrInternal (500 internal): an unexpected server error.
	ErrInternal = errors.New("keyvault: internal server error")
)

// Problem codes of the API: the ProblemCode enum of api/openapi.yaml.
const (
	CodeInvalid      = "invalid_request"
	CodeUnauthorized = "unauthorized"
	CodeNotFound     = "not_found"
	CodeWrongPIN     = "wrong_pin"
	CodeLocked       = "locked"
	CodePrecondition = "precondition_failed"
	CodeTooLarge     = "payload_too_large"
	CodeRateLimited  = "rate_limited"
	CodeUnavailable  = "unavailable"
	CodeIntegrity    = "integrity_error"
	CodeInternal     = "internal"
)

var sentinels = map[string]error{
	CodeInvalid:      ErrInvalid,
	CodeUnauthorized: ErrUnauthorized,
	CodeNotFound:     ErrNotFound,
	CodeWrongPIN:     ErrWrongPIN,
	CodeLocked:       ErrLocked,
	CodePrecondition: ErrPrecondition,
	CodeTooLarge:     ErrTooLarge,
	CodeRateLimited:  ErrRateLimited,
	CodeUnavailable:  ErrUnavailable,
	CodeIntegrity:    ErrIntegrity,
	CodeInternal:     ErrInternal,
}

// Error is an answer from the vault other than success (usually an RFC 9457
// problem document), or a call the client refused to send (Status 0, Code
// invalid_request). Its text never holds a PIN, a secret or a user_id.
//
// Use errors.Is with the sentinels for the kind, and errors.As for the
// details:
//
//	var e *client.Error
//	if errors.As(err, &e) && errors.Is(err, client.ErrWrongPIN) {
//		fmt.Println(e.AttemptsRemaining, "attempts left")
//	}
type Error struct {
	// Op is the call: "enroll", "recover", "status", "delete" or
	// "change PIN"; for Admin, the method and path.
	Op string
	// Status is the HTTP status; 0 when the client refused to send the
	// call.
	Status int
	// Code is the problem document's machine-readable code (CodeWrongPIN,
	// ...); "" when the answer was not a keyvault problem document (for
	// example a proxy's 502).
	Code string
	// Type is the problem document's type, "urn:keyvault:problem:" and
	// the code; "" when there is no problem document.
	Type string
	// Title and Detail are the problem document's human-readable texts,
	// written by the vault (they never quote request values). Title falls
	// back to the HTTP status text.
	Title, Detail string
	// RequestID is the X-Request-Id of the call: the same on every attempt
	// of one call, and in the vault's logs.
	RequestID string
	// AttemptsRemaining is the number of guesses left, for ErrWrongPIN (at
	// least 1). It is 0 otherwise.
	AttemptsRemaining int
	// RetryAfter is the answer's Retry-After (ErrRateLimited,
	// ErrUnavailable): the client did not wait that long for you, because
	// it exceeded the client's maximum wait, the context's deadline, or the
	// retry budget.
	RetryAfter time.Duration
	// Uncertain reports that an earlier attempt of this same call may have
	// reached the vault and been applied: it was lost in transit (a
	// conditional Enroll or Delete, the only writes the client repeats
	// then), or answered 503 unavailable, which can leave a write's or a
	// guess's outcome unknown. This answer then describes the vault after
	// it. A 412 from an Enroll with IfNoneMatch or IfMatch or from a
	// ChangePIN with IfMatch, or a 404 from a Delete, can be the result of
	// this call's own earlier, successful attempt: read the backup with
	// Status to decide.
	Uncertain bool
}

// Error describes the failure without any request values.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("keyvault")
	if e.Op != "" {
		b.WriteString(": ")
		b.WriteString(e.Op)
	}
	b.WriteString(": ")
	if e.Status != 0 {
		b.WriteString(strconv.Itoa(e.Status))
		b.WriteByte(' ')
	}
	if e.Code != "" {
		b.WriteString(e.Code)
	} else {
		b.WriteString("error")
	}
	msg := e.Detail
	if msg == "" {
		msg = e.Title
	}
	if msg == "" && e.Status != 0 {
		msg = http.StatusText(e.Status)
	}
	if msg != "" {
		b.WriteString(": ")
		b.WriteString(msg)
	}
	var extra []string
	if e.Code == CodeWrongPIN {
		extra = append(extra, "attempts remaining: "+strconv.Itoa(e.AttemptsRemaining))
	}
	if e.RetryAfter > 0 {
		extra = append(extra, "retry after "+e.RetryAfter.String())
	}
	if e.Uncertain {
		extra = append(extra, "an earlier attempt may have been applied")
	}
	if e.RequestID != "" {
		extra = append(extra, "request ID "+e.RequestID)
	}
	if len(extra) > 0 {
		b.WriteString(" (")
		b.WriteString(strings.Join(extra, "; "))
		b.WriteByte(')')
	}
	return b.String()
}

// Is reports whether target is the sentinel of e's Code.
func (e *Error) Is(target error) bool {
	s, ok := sentinels[e.Code]
	return ok && s == target
}

// localInvalid is a call the client refuses to send.
func localInvalid(op, detail string) *Error {
	return &Error{Op: op, Code: CodeInvalid, Title: "The request is invalid", Detail: detail}
}
