package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Admin calls the key lifecycle endpoints of a vault's admin listener
// (/admin/keys/reload, /admin/keys/usage, /admin/keys/retire and
// /admin/rewrap) with the admin bearer token. Nothing they answer is
// secret, but they change what protects every backup. Admin never retries:
// a reload, retire or re-wrap start whose answer was lost may have been
// applied, and the caller decides whether to send it again. Safe for
// concurrent use.
type Admin struct {
	base string // scheme://host[/prefix], no trailing slash
	auth string
	hc   *http.Client
}

// maxAdminResponseBytes bounds an admin answer's body read: a usage count
// or a retire's labels, by member.
const maxAdminResponseBytes = 1 << 20

// DefaultAdminTimeout bounds one admin call: the vault gives a usage count
// or a retire, which read every backup, two minutes to answer.
const DefaultAdminTimeout = 2 * time.Minute

// AdminOption configures an Admin client.
type AdminOption func(*adminOptions)

type adminOptions struct{ plaintext bool }

// AdminInsecurePlaintext allows an http:// base URL on a host other than
// loopback, which sends the admin token unencrypted: for an admin listener
// with admin_insecure_plaintext, behind a network layer that encrypts.
func AdminInsecurePlaintext() AdminOption {
	return func(o *adminOptions) { o.plaintext = true }
}

// NewAdmin returns a client of the admin listener at baseURL (for example
// "http://127.0.0.1:9090") that authenticates with the admin bearer token.
// hc carries the TLS settings for an admin listener with admin_tls (nil:
// http.DefaultTransport with a Timeout of DefaultAdminTimeout); Admin uses
// a copy that never follows redirects. Plain http:// is refused except to
// loopback, unless AdminInsecurePlaintext is given.
func NewAdmin(baseURL, token string, hc *http.Client, opts ...AdminOption) (*Admin, error) {
	var o adminOptions
	for _, opt := range opts {
		opt(&o)
	}
	u, err := url.Parse(baseURL)
	switch {
	case err != nil:
		return nil, errors.New("keyvault admin client: the base URL does not parse")
	case u.Scheme != "http" && u.Scheme != "https":
		return nil, errors.New("keyvault admin client: the base URL must start with https:// or http://")
	case u.Host == "":
		return nil, errors.New("keyvault admin client: the base URL has no host")
	case u.User != nil || u.RawQuery != "" || u.Fragment != "":
		return nil, errors.New("keyvault admin client: the base URL must hold no credentials, query or fragment")
	case u.Scheme == "http" && !o.plaintext && !isLoopback(u.Hostname()):
		return nil, ErrAdminPlaintext
	}
	if token == "" {
		return nil, errors.New("keyvault admin client: the admin token is empty")
	}
	if strings.ContainsFunc(token, func(r rune) bool { return r <= ' ' || r >= 0x7f }) {
		return nil, errors.New("keyvault admin client: the admin token holds a space, control or non-ASCII character")
	}
	c := &http.Client{Timeout: DefaultAdminTimeout}
	if hc != nil {
		copied := *hc
		c = &copied
	}
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &Admin{base: u.Scheme + "://" + u.Host + strings.TrimRight(u.EscapedPath(), "/"), auth: "Bearer " + token, hc: c}, nil
}

// ErrAdminPlaintext refuses a plain http:// admin URL to a host other than
// loopback: the admin token would cross the network unencrypted.
var ErrAdminPlaintext = errors.New("keyvault admin client: refusing plain http:// to a host other than loopback (use https://, or AdminInsecurePlaintext)")

// String names the admin client without its token.
func (a *Admin) String() string { return "keyvault admin client for " + a.base }

// GoString is String, for %#v.
func (a *Admin) GoString() string { return a.String() }

// URL is the base URL the client calls.
func (a *Admin) URL() string { return a.base }

// The admin endpoints' JSON bodies. The vault's admin listener (package
// api) encodes and decodes these same types.
type (
	// KeyVersions is the answer of POST /admin/keys/reload: the newest key
	// version of each role ("wrap", "pin", "root") every member holds.
	KeyVersions struct {
		Versions map[string]uint32 `json:"versions"`
	}
	// KeyUsage is the answer of GET /admin/keys/usage: backups by wrap and
	// PIN key version.
	KeyUsage struct {
		Wrap map[uint32]int `json:"wrap"`
		PIN  map[uint32]int `json:"pin"`
	}
	// RetireRequest is the body of POST /admin/keys/retire.
	RetireRequest struct {
		Version uint32 `json:"version"`
	}
	// Retired is the answer of a retire: the version and the key labels
	// destroyed, by member.
	Retired struct {
		Version   uint32              `json:"retired"`
		Destroyed map[string][]string `json:"destroyed"`
	}
	// RewrapRequest is the body of POST /admin/rewrap.
	RewrapRequest struct {
		PerSecond float64 `json:"per_second"` // 0: no limit
	}
	// RewrapStatus is the re-wrap job's progress (GET and POST
	// /admin/rewrap).
	RewrapStatus struct {
		Running    bool       `json:"running"`
		Target     uint32     `json:"target_version"` // the wrap key version records move to
		Total      int        `json:"total"`          // records on older versions when the run began
		Done       int        `json:"done"`           // records moved
		Skipped    int        `json:"skipped"`        // records left for a later run
		Errors     int        `json:"errors"`         // records that failed; a later run retries them
		LastError  string     `json:"last_error"`     // the latest error's text (no record contents)
		StartedAt  *time.Time `json:"started_at,omitempty"`
		FinishedAt *time.Time `json:"finished_at,omitempty"`
	}
)

// ReloadKeys has the vault use the newest key versions every HSM member
// holds (as SIGHUP does) and returns them.
func (a *Admin) ReloadKeys(ctx context.Context) (KeyVersions, error) {
	var out KeyVersions
	err := a.call(ctx, http.MethodPost, "/admin/keys/reload", nil, &out, http.StatusOK)
	return out, err
}

// KeyUsage counts backups by key version.
func (a *Admin) KeyUsage(ctx context.Context) (KeyUsage, error) {
	var out KeyUsage
	err := a.call(ctx, http.MethodGet, "/admin/keys/usage", nil, &out, http.StatusOK)
	return out, err
}

// RetireKeys destroys key version on every member; the vault refuses (409
// keys_in_use) while a backup uses it.
func (a *Admin) RetireKeys(ctx context.Context, version uint32) (Retired, error) {
	var out Retired
	err := a.call(ctx, http.MethodPost, "/admin/keys/retire", RetireRequest{Version: version}, &out, http.StatusOK)
	return out, err
}

// StartRewrap starts the re-wrap job at perSecond records a second (0: no
// limit); started is false if a job was running already, whose status is
// then returned.
func (a *Admin) StartRewrap(ctx context.Context, perSecond float64) (st RewrapStatus, started bool, err error) {
	code, err := a.callStatus(ctx, http.MethodPost, "/admin/rewrap", RewrapRequest{PerSecond: perSecond}, &st, http.StatusAccepted, http.StatusOK)
	return st, code == http.StatusAccepted, err
}

// RewrapStatus is the re-wrap job's progress.
func (a *Admin) RewrapStatus(ctx context.Context) (RewrapStatus, error) {
	var out RewrapStatus
	err := a.call(ctx, http.MethodGet, "/admin/rewrap", nil, &out, http.StatusOK)
	return out, err
}

func (a *Admin) call(ctx context.Context, method, path string, body, out any, want ...int) error {
	_, err := a.callStatus(ctx, method, path, body, out, want...)
	return err
}

// callStatus sends body as JSON and decodes an answer of one of the want
// statuses into out. Another status is an *Error (Op is the method and
// path); a failure in transit is wrapped with the method and path.
func (a *Admin) callStatus(ctx context.Context, method, path string, body, out any, want ...int) (int, error) {
	op := method + " " + path
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return 0, fmt.Errorf("keyvault admin: %s: encode the body: %w", op, err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, a.base+path, rd)
	if err != nil {
		return 0, fmt.Errorf("keyvault admin: %s: %w", op, err)
	}
	req.Header.Set("Authorization", a.auth)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", DefaultUserAgent)
	resp, err := a.hc.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // its text repeats the URL
		}
		return 0, fmt.Errorf("keyvault admin: %s at %s: %w", op, a.base, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, maxAdminResponseBytes))
	if err != nil {
		return resp.StatusCode, fmt.Errorf("keyvault admin: %s: read the answer: %w", op, err)
	}
	for _, w := range want {
		if resp.StatusCode == w {
			if err := json.Unmarshal(raw, out); err != nil {
				return w, fmt.Errorf("keyvault admin: %s: decode the answer: %w", op, err)
			}
			return w, nil
		}
	}
	// The admin endpoints answer refusals with a problem document, served
	// as application/json or application/problem+json.
	e := &Error{Op: op, Status: resp.StatusCode, RequestID: resp.Header.Get("X-Request-Id")}
	var p struct {
		Type, Title, Detail, Code string
	}
	if json.Unmarshal(raw, &p) == nil {
		e.Type, e.Title, e.Detail, e.Code = p.Type, p.Title, p.Detail, p.Code
	}
	if e.Title == "" {
		e.Title = http.StatusText(resp.StatusCode)
	}
	return resp.StatusCode, e
}
