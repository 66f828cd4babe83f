package client_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// fakeVault is an in-memory stand-in for the keyvault API (docs/api.md), enough for the examples and the round-trip tests: bearer token,
// enroll with preconditions, recover with the guess counter and lockout,
// status, delete with tombstone generations, PIN change, problem
// documents. It checks no limits and talks to no HSM.
type fakeVault struct {
	token string

	mu      sync.Mutex
	backups map[string]*fakeBackup // live and locked backups
	gens    map[string]uint64      // last generation, kept after DELETE
}

type fakeBackup struct {
	secret      []byte // nil once locked
	pin         string
	generation  uint64
	maxAttempts int
	used        int
	created     time.Time
	updated     time.Time
}

func newFakeVault(token string) *fakeVault {
	return &fakeVault{token: token, backups: map[string]*fakeBackup{}, gens: map[string]uint64{}}
}

func (f *fakeVault) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	id := r.Header.Get("X-Request-Id")
	w.Header().Set("X-Request-Id", id)
	if r.Header.Get("Authorization") != "Bearer "+f.token {
		fakeProblem(w, http.StatusUnauthorized, "unauthorized", -1)
		return
	}
	rest, ok := strings.CutPrefix(r.URL.Path, "/v1/backups/")
	if !ok {
		fakeProblem(w, http.StatusNotFound, "not_found", -1)
		return
	}
	user, action, _ := strings.Cut(rest, "/")
	f.mu.Lock()
	defer f.mu.Unlock()
	b := f.backups[user]
	var ifMatch uint64
	if v := r.Header.Get("If-Match"); v != "" {
		g, err := strconv.ParseUint(strings.Trim(v, `"`), 10, 64)
		if err != nil || g == 0 {
			fakeProblem(w, http.StatusBadRequest, "invalid_request", -1)
			return
		}
		ifMatch = g
	}
	if ifMatch != 0 && (b == nil || b.generation != ifMatch) ||
		r.Header.Get("If-None-Match") == "*" && b != nil {
		if action == "" && r.Method == http.MethodDelete && b == nil {
			fakeProblem(w, http.StatusNotFound, "not_found", -1)
			return
		}
		fakeProblem(w, http.StatusPreconditionFailed, "precondition_failed", -1)
		return
	}
	var body struct {
		Secret      []byte `json:"secret"`
		PIN         string `json:"pin"`
		NewPIN      string `json:"new_pin"`
		MaxAttempts int    `json:"max_attempts"`
	}
	if r.Method == http.MethodPut || r.Method == http.MethodPost {
		dec := json.NewDecoder(r.Body)
		dec.DisallowUnknownFields()
		if err := dec.Decode(&body); err != nil || len(body.PIN) < 4 {
			fakeProblem(w, http.StatusBadRequest, "invalid_request", -1)
			return
		}
	}
	now := time.Now().UTC()
	switch {
	case action == "" && r.Method == http.MethodPut:
		if len(body.Secret) < 16 || body.MaxAttempts < 0 {
			fakeProblem(w, http.StatusBadRequest, "invalid_request", -1)
			return
		}
		if body.MaxAttempts == 0 {
			body.MaxAttempts = 10
		}
		f.gens[user]++
		f.backups[user] = &fakeBackup{secret: body.Secret, pin: body.PIN, generation: f.gens[user],
			maxAttempts: body.MaxAttempts, created: now, updated: now}
		status := http.StatusOK
		if b == nil {
			status = http.StatusCreated
		}
		fakeJSON(w, status, f.backups[user].view(user, false))
	case action == "" && r.Method == http.MethodGet && b != nil:
		fakeJSON(w, http.StatusOK, b.view(user, true))
	case action == "" && r.Method == http.MethodDelete && b != nil:
		delete(f.backups, user)
		w.WriteHeader(http.StatusNoContent)
	case (action == "recover" || action == "pin") && r.Method == http.MethodPost && b != nil:
		if action == "pin" && len(body.NewPIN) < 4 {
			fakeProblem(w, http.StatusBadRequest, "invalid_request", -1)
			return
		}
		if b.secret == nil {
			fakeProblem(w, http.StatusGone, "locked", -1)
			return
		}
		b.used++
		b.updated = now
		if body.PIN != b.pin {
			if left := b.maxAttempts - b.used; left > 0 {
				fakeProblem(w, http.StatusForbidden, "wrong_pin", left)
			} else {
				b.secret = nil
				fakeProblem(w, http.StatusGone, "locked", -1)
			}
			return
		}
		b.used = 0
		if action == "pin" {
			f.gens[user]++
			b.pin, b.generation, b.created = body.NewPIN, f.gens[user], now
			fakeJSON(w, http.StatusOK, b.view(user, false))
			return
		}
		fakeJSON(w, http.StatusOK, map[string]any{"secret": base64.StdEncoding.EncodeToString(b.secret), "attempts_remaining": b.maxAttempts})
	default:
		fakeProblem(w, http.StatusNotFound, "not_found", -1)
	}
}

func (b *fakeBackup) view(user string, full bool) map[string]any {
	m := map[string]any{
		"user_id": user, "generation": b.generation, "max_attempts": b.maxAttempts,
		"attempts_remaining": b.maxAttempts - b.used, "key_version": 1, "pin_key_version": 1,
		"created_at": b.created.Format(time.RFC3339Nano),
	}
	if full {
		m["locked"] = b.secret == nil
		m["updated_at"] = b.updated.Format(time.RFC3339Nano)
	}
	return m
}

func fakeJSON(w http.ResponseWriter, status int, v any) {
	if m, ok := v.(map[string]any); ok {
		if g, ok := m["generation"].(uint64); ok {
			w.Header().Set("ETag", `"`+strconv.FormatUint(g, 10)+`"`)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// fakeProblem writes a problem document; attempts < 0 leaves
// attempts_remaining out.
func fakeProblem(w http.ResponseWriter, status int, code string, attempts int) {
	p := map[string]any{
		"type": "urn:keyvault:problem:" + code, "title": http.StatusText(status),
		"status": status, "detail": "fake vault: " + code, "code": code,
	}
	if attempts >= 0 {
		p["attempts_remaining"] = attempts
	}
	if code == "rate_limited" || code == "unavailable" {
		w.Header().Set("Retry-After", "1")
	}
	var buf bytes.Buffer
	_ = json.NewEncoder(&buf).Encode(p)
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}
