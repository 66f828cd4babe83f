package client

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Defaults of the options.
const (
	DefaultMaxRetries = 2
	DefaultBaseDelay  = 200 * time.Millisecond
	DefaultMaxWait    = 5 * time.Second
	DefaultTimeout    = 30 * time.Second
	DefaultUserAgent  = "keyvault-go-client/1"
)

// maxResponseBytes bounds a response body read; keyvault's are well under
// 1 KiB.
const maxResponseBytes = 64 << 10

// Client calls one keyvault API as one configured client (bearer token). It
// is safe for concurrent use; make one and share it.
type Client struct {
	base       string // scheme://host[/prefix], no trailing slash
	auth       string // "Bearer <token>"
	hc         *http.Client
	userAgent  string
	maxRetries int
	baseDelay  time.Duration
	maxWait    time.Duration
	plaintext  bool

	// Replaced by tests.
	sleep  func(ctx context.Context, d time.Duration) error
	jitter func(d time.Duration) time.Duration
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient makes the client send its requests through hc (for its
// Transport, TLS settings, proxy, Timeout). The client uses a copy of hc
// that never follows redirects: the API answers none, and a redirected PIN
// could be sent elsewhere. Default: http.DefaultTransport with a Timeout of
// DefaultTimeout, above the vault's own 25 s request limit.
func WithHTTPClient(hc *http.Client) Option {
	return func(c *Client) { c.hc = hc }
}

// WithRetry sets how many times one call may be retried after its first
// attempt (max; 0 turns retries off) and the first backoff delay (doubled
// on each retry, at least any Retry-After, plus up to 25% jitter). Which
// failures are retried depends on the call: see the package documentation.
// Default: DefaultMaxRetries, DefaultBaseDelay.
func WithRetry(max int, baseDelay time.Duration) Option {
	return func(c *Client) { c.maxRetries, c.baseDelay = max, baseDelay }
}

// WithMaxWait caps the time the client waits before one retry. An answer
// whose Retry-After is longer is returned to the caller at once, with
// Error.RetryAfter set, rather than slept on: a user waiting for a
// recovery is better told to come back. Default: DefaultMaxWait.
func WithMaxWait(d time.Duration) Option {
	return func(c *Client) { c.maxWait = d }
}

// WithUserAgent sets the User-Agent header. Default: DefaultUserAgent.
func WithUserAgent(ua string) Option {
	return func(c *Client) { c.userAgent = ua }
}

// WithInsecurePlaintext allows an http:// base URL on a host other than
// loopback, which sends the bearer token, PINs and secrets unencrypted
// (the vault's own config calls its counterpart insecure_plaintext). Use
// it only behind a network layer that encrypts, such as a service mesh.
func WithInsecurePlaintext() Option {
	return func(c *Client) { c.plaintext = true }
}

// New returns a client of the API at baseURL (for example
// "https://keyvault.internal:8443"; a path prefix is kept) that
// authenticates with the bearer token.
func New(baseURL, token string, opts ...Option) (*Client, error) {
	c := &Client{
		auth:       "Bearer " + token,
		userAgent:  DefaultUserAgent,
		maxRetries: DefaultMaxRetries,
		baseDelay:  DefaultBaseDelay,
		maxWait:    DefaultMaxWait,
		sleep:      sleepCtx,
		jitter:     randomJitter,
	}
	for _, o := range opts {
		o(c)
	}
	// Error texts never quote baseURL: it could hold a password.
	u, err := url.Parse(baseURL)
	switch {
	case err != nil:
		return nil, errors.New("keyvault client: the base URL does not parse")
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, errors.New("keyvault client: the base URL must start with https:// or http://")
	case u.Host == "":
		return nil, errors.New("keyvault client: the base URL has no host")
	case u.User != nil:
		return nil, errors.New("keyvault client: the base URL must not hold credentials; pass the bearer token")
	case u.RawQuery != "" || u.Fragment != "" || u.ForceQuery:
		return nil, errors.New("keyvault client: the base URL must have no query or fragment")
	case u.Scheme == "http" && !c.plaintext && !isLoopback(u.Hostname()):
		return nil, errors.New("keyvault client: refusing plain http:// to a host other than loopback (use https://, or WithInsecurePlaintext)")
	}
	if token == "" {
		return nil, errors.New("keyvault client: the bearer token is empty")
	}
	for i := 0; i < len(token); i++ {
		if token[i] <= ' ' || token[i] >= 0x7f {
			return nil, errors.New("keyvault client: the bearer token holds a space, control or non-ASCII character")
		}
	}
	switch {
	case c.maxRetries < 0:
		return nil, errors.New("keyvault client: WithRetry: max must be 0 or more")
	case c.baseDelay < 0:
		return nil, errors.New("keyvault client: WithRetry: baseDelay must be 0 or more")
	case c.maxWait < 0:
		return nil, errors.New("keyvault client: WithMaxWait: must be 0 or more")
	}
	if c.hc == nil {
		c.hc = &http.Client{Timeout: DefaultTimeout}
	} else {
		hc := *c.hc
		c.hc = &hc
	}
	c.hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	c.base = u.Scheme + "://" + u.Host + strings.TrimRight(u.EscapedPath(), "/")
	return c, nil
}

// String names the client without its token, so that printing a Client
// (even with %+v) leaks no credential.
func (c *Client) String() string { return "keyvault client for " + c.base }

// GoString is String, for %#v.
func (c *Client) GoString() string { return c.String() }

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// Backup is the public state of a backup, never its secret: the
// document's BackupStatus (Status), or its Backup (Enroll, ChangePIN),
// which lacks locked and updated_at.
type Backup struct {
	UserID string
	// Generation increases with every Enroll and ChangePIN of the user_id
	// (1 or more); pass it to IfMatch to make the next write conditional
	// on it.
	Generation        int64
	MaxAttempts       int
	AttemptsRemaining int
	// Locked: every attempt was used and the secret destroyed. Only Status
	// reports it; Enroll and ChangePIN always answer with an unlocked
	// backup.
	Locked bool
	// KeyVersion is the version of the wrap key sealing the record,
	// PINKeyVersion that of the PIN key checking it.
	KeyVersion, PINKeyVersion int
	// CreatedAt is when this generation was written; UpdatedAt when the
	// record last changed (a counted guess, say). Only Status reports
	// UpdatedAt; Enroll and ChangePIN write a new generation, so there it
	// is CreatedAt.
	CreatedAt, UpdatedAt time.Time
}

// backupJSON is the wire form of Backup. Its fields are the properties of
// the document's BackupStatus, a superset of its Backup (TestDocument).
type backupJSON struct {
	UserID            string    `json:"user_id"`
	Generation        int64     `json:"generation"`
	MaxAttempts       int       `json:"max_attempts"`
	AttemptsRemaining int       `json:"attempts_remaining"`
	Locked            bool      `json:"locked"`
	KeyVersion        int       `json:"key_version"`
	PINKeyVersion     int       `json:"pin_key_version"`
	CreatedAt         time.Time `json:"created_at"`
	UpdatedAt         time.Time `json:"updated_at"`
}

func decodeBackup(op string, body []byte) (Backup, error) {
	var j backupJSON
	if err := json.Unmarshal(body, &j); err != nil {
		return Backup{}, fmt.Errorf("keyvault: %s: the response is not a backup: %w", op, err)
	}
	if j.UpdatedAt.IsZero() {
		j.UpdatedAt = j.CreatedAt
	}
	return Backup(j), nil
}

// writeOptions are the settings of one write, set by its options.
type writeOptions struct {
	ifMatch        int64
	hasIfMatch     bool
	ifNoneMatch    bool
	maxAttempts    int
	hasMaxAttempts bool
}

// check refuses what the vault would refuse without counting anything:
// a generation below 1, or both preconditions.
func (w *writeOptions) check(op string) error {
	switch {
	case w.hasIfMatch && w.ifMatch < 1:
		return localInvalid(op, "IfMatch: a generation is 1 or more")
	case w.hasIfMatch && w.ifNoneMatch:
		return localInvalid(op, "IfMatch and IfNoneMatch exclude each other")
	}
	return nil
}

// header is the precondition header of w, if any.
func (w *writeOptions) header() [][2]string {
	switch {
	case w.hasIfMatch:
		return [][2]string{{"If-Match", `"` + strconv.FormatInt(w.ifMatch, 10) + `"`}}
	case w.ifNoneMatch:
		return [][2]string{{"If-None-Match", "*"}}
	}
	return nil
}

// conditional reports whether w makes a write fail its precondition the
// second time it is applied.
func (w *writeOptions) conditional() bool { return w.hasIfMatch || w.ifNoneMatch }

// EnrollOption is an option of Enroll: IfMatch, IfNoneMatch or
// MaxAttempts.
type EnrollOption interface{ applyEnroll(*writeOptions) }

// ChangePINOption is an option of ChangePIN: IfMatch.
type ChangePINOption interface{ applyChangePIN(*writeOptions) }

// DeleteOption is an option of Delete: IfMatch.
type DeleteOption interface{ applyDelete(*writeOptions) }

// MatchOption is the option IfMatch returns; Enroll, ChangePIN and Delete
// all take it.
type MatchOption struct{ generation int64 }

// IfMatch makes a write apply only to the live backup of this generation
// (1 or more, as Backup.Generation gave it); else ErrPrecondition, with
// nothing counted or written. It keeps two devices from overwriting each
// other unseen, and makes an Enroll or Delete safe to retry after a
// failure in transit (see the package documentation). Default: no
// precondition.
func IfMatch(generation int64) MatchOption { return MatchOption{generation} }

func (o MatchOption) applyEnroll(w *writeOptions)    { o.apply(w) }
func (o MatchOption) applyChangePIN(w *writeOptions) { o.apply(w) }
func (o MatchOption) applyDelete(w *writeOptions)    { o.apply(w) }
func (o MatchOption) apply(w *writeOptions)          { w.ifMatch, w.hasIfMatch = o.generation, true }

type enrollOption func(*writeOptions)

func (f enrollOption) applyEnroll(w *writeOptions) { f(w) }

// IfNoneMatch makes Enroll create the backup only if no live one exists
// (a locked backup is live); else ErrPrecondition. Use it for a first
// enrollment: it also makes the call safe to retry after a failure in
// transit. It excludes IfMatch. Default: replace any backup.
func IfNoneMatch() EnrollOption {
	return enrollOption(func(w *writeOptions) { w.ifNoneMatch = true })
}

// MaxAttempts sets the number of wrong guesses in a row that destroy the
// secret (1 up to the vault's configured limit, else ErrInvalid).
// Default: the vault's configured default (10).
func MaxAttempts(n int) EnrollOption {
	return enrollOption(func(w *writeOptions) { w.maxAttempts, w.hasMaxAttempts = n, true })
}

// Enroll stores secret (16 to 512 bytes) under pin (4 to 128 bytes of
// UTF-8, normalised to NFC by the caller) for userID, as a new generation
// with a fresh guess counter. created is true when no live backup existed;
// else a live one (locked or not) was replaced. Its options are IfMatch,
// IfNoneMatch and MaxAttempts. Use IfNoneMatch for a first enrollment and
// IfMatch for a replacement: they keep two devices from overwriting each
// other unseen, and make the call safe to retry after a failure in transit
// (see the package documentation).
func (c *Client) Enroll(ctx context.Context, userID string, secret []byte, pin string, opts ...EnrollOption) (b Backup, created bool, err error) {
	const op = "enroll"
	if err := checkUserID(op, userID); err != nil {
		return Backup{}, false, err
	}
	if err := checkPIN(op, "pin", pin); err != nil {
		return Backup{}, false, err
	}
	var o writeOptions
	for _, opt := range opts {
		if opt != nil {
			opt.applyEnroll(&o)
		}
	}
	if err := o.check(op); err != nil {
		return Backup{}, false, err
	}
	body := make([]byte, 0, len(`{"secret":"","pin":,"max_attempts":}`)+base64.StdEncoding.EncodedLen(len(secret))+jsonStringMax(pin)+20)
	body = append(body, `{"secret":"`...)
	body = base64.StdEncoding.AppendEncode(body, secret)
	body = append(body, `","pin":`...)
	body = appendJSONString(body, pin)
	if o.hasMaxAttempts {
		body = append(body, `,"max_attempts":`...)
		body = strconv.AppendInt(body, int64(o.maxAttempts), 10)
	}
	body = append(body, '}')
	res, err := c.do(ctx, request{op: op, method: http.MethodPut, path: backupPath(userID), body: body, header: o.header(),
		repeatable: o.conditional(), uncertainMeans: "the backup may have been written"})
	if err != nil {
		return Backup{}, false, err
	}
	defer clear(res.body)
	b, err = decodeBackup(op, res.body)
	return b, res.status == http.StatusCreated, err
}

// Recover returns the secret of userID's backup for the right pin, and the
// attempts remaining (reset to the maximum). The guess is counted before
// its outcome is known: a wrong PIN answers ErrWrongPIN, with
// attemptsRemaining (at least 1) both returned and in the *Error; the wrong
// guess that uses the last attempt answers ErrLocked, as does every call
// after it. The caller owns the returned slice; wipe it (clear) after use.
//
// A failure in transit after the request was sent is never retried, since
// the vault may have counted the guess: the error is then not an *Error,
// and Status tells the attempts left. Check the recovered secret (for
// example against the user's message history): a holder of the bearer
// token can replace a backup without the PIN.
func (c *Client) Recover(ctx context.Context, userID, pin string) (secret []byte, attemptsRemaining int, err error) {
	const op = "recover"
	if err := checkUserID(op, userID); err != nil {
		return nil, 0, err
	}
	if err := checkPIN(op, "pin", pin); err != nil {
		return nil, 0, err
	}
	body := make([]byte, 0, len(`{"pin":}`)+jsonStringMax(pin))
	body = append(body, `{"pin":`...)
	body = appendJSONString(body, pin)
	body = append(body, '}')
	res, err := c.do(ctx, request{op: op, method: http.MethodPost, path: backupPath(userID) + "/recover", body: body,
		uncertainMeans: "the guess may have been counted"})
	if err != nil {
		var e *Error
		if errors.As(err, &e) && e.Code == CodeWrongPIN {
			return nil, e.AttemptsRemaining, err
		}
		return nil, 0, err
	}
	defer clear(res.body)
	var j struct {
		Secret            secretJSON `json:"secret"`
		AttemptsRemaining int        `json:"attempts_remaining"`
	}
	if err := json.Unmarshal(res.body, &j); err != nil || j.Secret == nil {
		clear(j.Secret)
		return nil, 0, fmt.Errorf("keyvault: %s: the response holds no valid secret (the guess was right and the counter reset)", op)
	}
	return j.Secret, j.AttemptsRemaining, nil
}

// Status returns the public state of userID's backup; a locked one is
// returned with Locked set, not as an error. ErrNotFound when there is
// none.
func (c *Client) Status(ctx context.Context, userID string) (Backup, error) {
	const op = "status"
	if err := checkUserID(op, userID); err != nil {
		return Backup{}, err
	}
	res, err := c.do(ctx, request{op: op, method: http.MethodGet, path: backupPath(userID), repeatable: true})
	if err != nil {
		return Backup{}, err
	}
	return decodeBackup(op, res.body)
}

// Delete removes userID's backup (locked or not); ErrNotFound when there
// is none. Its option is IfMatch, which deletes only the live backup of
// that generation (else ErrPrecondition) and makes the call safe to retry
// after a failure in transit.
func (c *Client) Delete(ctx context.Context, userID string, opts ...DeleteOption) error {
	const op = "delete"
	if err := checkUserID(op, userID); err != nil {
		return err
	}
	var o writeOptions
	for _, opt := range opts {
		if opt != nil {
			opt.applyDelete(&o)
		}
	}
	if err := o.check(op); err != nil {
		return err
	}
	_, err := c.do(ctx, request{op: op, method: http.MethodDelete, path: backupPath(userID), header: o.header(),
		repeatable: o.conditional(), uncertainMeans: "the backup may have been deleted"})
	return err
}

// ChangePIN replaces the PIN of userID's backup, keeping its secret and
// max_attempts, and returns the new generation with a full counter. It
// counts as a guess with pin, answering exactly as Recover does
// (ErrWrongPIN, ErrLocked, ErrNotFound, ...); an invalid newPIN is
// ErrInvalid before anything is counted. Its option is IfMatch, which
// changes only the live backup of that generation (else ErrPrecondition,
// nothing counted): pass the generation the user's device knows.
//
// Like Recover, a failure in transit after the request was sent is never
// retried: the vault may have counted the guess. (If-Match makes a repeat
// of a successful change harmless, but a repeat of a wrong one would be
// counted twice.)
func (c *Client) ChangePIN(ctx context.Context, userID, pin, newPIN string, opts ...ChangePINOption) (Backup, error) {
	const op = "change PIN"
	if err := checkUserID(op, userID); err != nil {
		return Backup{}, err
	}
	var o writeOptions
	for _, opt := range opts {
		if opt != nil {
			opt.applyChangePIN(&o)
		}
	}
	if err := o.check(op); err != nil {
		return Backup{}, err
	}
	if err := checkPIN(op, "pin", pin); err != nil {
		return Backup{}, err
	}
	if err := checkPIN(op, "new_pin", newPIN); err != nil {
		return Backup{}, err
	}
	body := make([]byte, 0, len(`{"pin":,"new_pin":}`)+jsonStringMax(pin)+jsonStringMax(newPIN))
	body = append(body, `{"pin":`...)
	body = appendJSONString(body, pin)
	body = append(body, `,"new_pin":`...)
	body = appendJSONString(body, newPIN)
	body = append(body, '}')
	res, err := c.do(ctx, request{op: op, method: http.MethodPost, path: backupPath(userID) + "/pin", body: body, header: o.header(),
		uncertainMeans: "the guess may have been counted and the PIN changed"})
	if err != nil {
		return Backup{}, err
	}
	defer clear(res.body)
	return decodeBackup(op, res.body)
}

func backupPath(userID string) string { return "/v1/backups/" + userID }

// checkUserID applies the API's user_id rule, which also keeps the ID
// from changing the request path: every allowed character is literal in
// a path segment.
func checkUserID(op, id string) error {
	if len(id) < 1 || len(id) > 128 {
		return localInvalid(op, "user_id: must be 1 to 128 characters from [A-Za-z0-9._~:@-]")
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("._~:@-", c) >= 0) {
			return localInvalid(op, "user_id: must be 1 to 128 characters from [A-Za-z0-9._~:@-]")
		}
	}
	return nil
}

// checkPIN refuses a PIN that is not UTF-8: JSON could not carry it
// unchanged. The vault checks the length.
func checkPIN(op, field, pin string) error {
	if !utf8.ValidString(pin) {
		return localInvalid(op, field+": must be valid UTF-8 (normalised to NFC)")
	}
	return nil
}

// jsonStringMax is the most bytes appendJSONString writes for s.
func jsonStringMax(s string) int { return 2 + 6*len(s) }

// appendJSONString appends s as a JSON string. Written by hand so that the
// PIN only ever lands in buffers the client wipes.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '"' || c == '\\':
			b = append(b, '\\', c)
		case c < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
		default:
			b = append(b, c)
		}
	}
	return append(b, '"')
}

// secretJSON decodes a base64 JSON string straight into bytes, with no
// intermediate string that could not be wiped.
type secretJSON []byte

func (s *secretJSON) UnmarshalJSON(data []byte) error {
	clear(*s)
	*s = nil
	if len(data) < 2 || data[0] != '"' || data[len(data)-1] != '"' {
		return errors.New("secret: not a string")
	}
	inner := data[1 : len(data)-1]
	if bytes.IndexByte(inner, '\\') >= 0 {
		return errors.New("secret: not plain base64")
	}
	out := make([]byte, base64.StdEncoding.DecodedLen(len(inner)))
	n, err := base64.StdEncoding.Strict().Decode(out, inner)
	if err != nil {
		clear(out)
		return errors.New("secret: not standard base64")
	}
	*s = out[:n:n]
	return nil
}

// request is one API call.
type request struct {
	op, method, path string
	body             []byte // wiped when the call is done
	header           [][2]string
	// repeatable: sending it twice cannot apply it twice (GET, and PUT or
	// DELETE with a precondition), so it is retried after failures in
	// transit too.
	repeatable bool
	// uncertainMeans is what a failure in transit may have done.
	uncertainMeans string
}

// response is a complete answer; the caller wipes body if it is secret.
type response struct {
	status int
	header http.Header
	body   []byte
}

// requestIDKey is the context key of ContextWithRequestID.
type requestIDKey struct{}

// ContextWithRequestID makes calls with ctx send id as their X-Request-Id
// (on every attempt), so the vault's logs carry the caller's own ID. The
// vault accepts 1 to 128 characters from [A-Za-z0-9-_.:]; for any other id
// the client generates one, as it does by default.
func ContextWithRequestID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, requestIDKey{}, id)
}

func requestIDFrom(ctx context.Context) string {
	if id, ok := ctx.Value(requestIDKey{}).(string); ok && validRequestID(id) {
		return id
	}
	return rand.Text()
}

// validRequestID is the vault's rule (api/middleware.go).
func validRequestID(id string) bool {
	if len(id) == 0 || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-_.:", c) >= 0) {
			return false
		}
	}
	return true
}

// do runs a call with the retry rule of the package documentation, and
// wipes r.body when done. It returns a 2xx answer, an *Error, or an error
// in transit.
func (c *Client) do(ctx context.Context, r request) (*response, error) {
	var buf *wipeBuffer
	if r.body != nil {
		buf = newWipeBuffer(r.body)
		defer buf.release()
	}
	id := requestIDFrom(ctx)
	uncertain := false
	for attempt := 0; ; attempt++ {
		res, err := c.once(ctx, r, buf, id)
		var last error
		var retryAfter time.Duration
		switch {
		case err != nil && ctx.Err() != nil:
			return nil, c.transportError(r, id, err, ctx.Err(), uncertain || !neverSent(err))
		case err != nil:
			sent := !neverSent(err)
			last = c.transportError(r, id, err, nil, uncertain || sent)
			if sent {
				if !r.repeatable {
					return nil, last
				}
				uncertain = uncertain || r.method != http.MethodGet
			}
		case res.status >= 200 && res.status < 300:
			return res, nil
		default:
			e := c.apiError(r, res, id)
			clear(res.body)
			e.Uncertain = uncertain
			if !c.retryableAnswer(r, e) {
				return nil, e
			}
			last, retryAfter = e, e.RetryAfter
			// The vault's 503 may leave a write's outcome unknown (a store
			// that could not confirm it), so the repeat's answer may
			// describe this call's own earlier attempt.
			uncertain = uncertain || e.Code == CodeUnavailable && r.method != http.MethodGet
		}
		if attempt >= c.maxRetries {
			return nil, last
		}
		wait, ok := c.backoff(ctx, attempt, retryAfter)
		if !ok {
			return nil, last
		}
		if err := c.sleep(ctx, wait); err != nil {
			return nil, fmt.Errorf("%w (stopped waiting to retry: %w)", last, err)
		}
	}
}

// once sends one attempt and reads the whole answer.
func (c *Client) once(ctx context.Context, r request, buf *wipeBuffer, id string) (*response, error) {
	req, err := http.NewRequestWithContext(ctx, r.method, c.base+r.path, nil)
	if err != nil {
		return nil, notSentError{err}
	}
	if buf != nil {
		body, err := buf.reader()
		if err != nil {
			return nil, notSentError{err}
		}
		req.Body = body
		req.ContentLength = int64(buf.len())
		req.GetBody = func() (io.ReadCloser, error) { return buf.reader() }
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Authorization", c.auth)
	req.Header.Set("Accept", "application/json, application/problem+json")
	req.Header.Set("X-Request-Id", id)
	if c.userAgent != "" {
		req.Header.Set("User-Agent", c.userAgent)
	}
	for _, h := range r.header {
		req.Header.Set(h[0], h[1])
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := readBody(resp.Body, maxResponseBytes, resp.ContentLength)
	if err != nil {
		return nil, err
	}
	return &response{status: resp.StatusCode, header: resp.Header, body: body}, nil
}

// notSentError is a failure before the request went to the transport.
type notSentError struct{ err error }

func (e notSentError) Error() string { return e.err.Error() }
func (e notSentError) Unwrap() error { return e.err }

// neverSent reports a failure before sending or to connect: the request
// cannot have reached the vault, so even a guess may be sent again.
func neverSent(err error) bool {
	var op *net.OpError
	var ns notSentError
	return errors.As(err, &ns) || errors.As(err, &op) && (op.Op == "dial" || op.Op == "proxyconnect")
}

// transportError wraps a failure in transit without the request URL (which
// holds the user_id) and says what it may have done.
func (c *Client) transportError(r request, id string, err, ctxErr error, uncertain bool) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	msg := "keyvault: " + r.op + " (request ID " + id + ")"
	if uncertain && r.uncertainMeans != "" {
		msg += ": " + r.uncertainMeans
	}
	if ctxErr != nil && !errors.Is(err, ctxErr) {
		return fmt.Errorf("%s: %w: %w", msg, ctxErr, err)
	}
	return fmt.Errorf("%s: %w", msg, err)
}

// apiError reads a non-2xx answer.
func (c *Client) apiError(r request, res *response, id string) *Error {
	e := &Error{Op: r.op, Status: res.status, RequestID: id}
	if h := res.header.Get("X-Request-Id"); h != "" {
		e.RequestID = h
	}
	if mt, _, err := mime.ParseMediaType(res.header.Get("Content-Type")); err == nil && mt == "application/problem+json" {
		var p struct {
			Type              string `json:"type"`
			Title             string `json:"title"`
			Detail            string `json:"detail"`
			Code              string `json:"code"`
			AttemptsRemaining int    `json:"attempts_remaining"`
			RequestID         string `json:"request_id"`
		}
		if json.Unmarshal(res.body, &p) == nil {
			e.Code, e.Type, e.Title, e.Detail, e.AttemptsRemaining = p.Code, p.Type, p.Title, p.Detail, p.AttemptsRemaining
			if p.RequestID != "" {
				e.RequestID = p.RequestID
			}
		}
	}
	if e.Title == "" {
		e.Title = http.StatusText(res.status)
	}
	e.RetryAfter = parseRetryAfter(res.header.Get("Retry-After"), time.Now())
	return e
}

// retryableAnswer applies the retry rule to an answer. The vault's own
// 429 rate_limited and 503 unavailable say that nothing was counted or
// written, so any call may be retried; a 429 or 5xx from elsewhere (a
// proxy) says no such thing, so only a repeatable call is.
func (c *Client) retryableAnswer(r request, e *Error) bool {
	if e.RetryAfter > c.maxWait {
		return false
	}
	switch {
	case e.Status == http.StatusTooManyRequests && e.Code == CodeRateLimited,
		e.Status == http.StatusServiceUnavailable && e.Code == CodeUnavailable:
		return true
	case r.repeatable && e.Code == "":
		switch e.Status {
		case http.StatusTooManyRequests, http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
			return true
		}
	}
	return false
}

// backoff is the wait before retry attempt+1: baseDelay doubled per
// attempt, at least retryAfter, plus up to 25% jitter, and at most maxWait
// (retryAfter is never above it here). ok is false when the context's
// deadline comes first.
func (c *Client) backoff(ctx context.Context, attempt int, retryAfter time.Duration) (d time.Duration, ok bool) {
	d = c.maxWait
	if attempt < 30 && c.baseDelay < c.maxWait>>attempt {
		d = c.baseDelay << attempt
	}
	d = max(d, retryAfter)
	d = min(d+c.jitter(d/4), max(c.maxWait, retryAfter))
	if dl, has := ctx.Deadline(); has && time.Until(dl) < d {
		return 0, false
	}
	return d, true
}

func randomJitter(d time.Duration) time.Duration {
	if d <= 0 {
		return 0
	}
	return mrand.N(d)
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// parseRetryAfter reads delay-seconds or an HTTP date; 0 if absent or bad.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(n) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}
