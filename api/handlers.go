package api

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/keyvault/keyvault/vault"
)

type handlers struct {
	b Backups
}

// backupJSON is the public view of a backup: never its secret.
type backupJSON struct {
	UserID            string `json:"user_id"`
	Generation        uint64 `json:"generation"`
	MaxAttempts       int    `json:"max_attempts"`
	AttemptsRemaining int    `json:"attempts_remaining"`
	Locked            *bool  `json:"locked,omitempty"`
	KeyVersion        uint32 `json:"key_version"`
	PINKeyVersion     uint32 `json:"pin_key_version"`
	CreatedAt         string `json:"created_at"`
	UpdatedAt         string `json:"updated_at,omitempty"`
}

func toJSON(b vault.Backup, full bool) backupJSON {
	out := backupJSON{
		UserID:            b.UserID,
		Generation:        b.Generation,
		MaxAttempts:       b.MaxAttempts,
		AttemptsRemaining: b.AttemptsRemaining,
		KeyVersion:        b.KeyVersion,
		PINKeyVersion:     b.PINKeyVersion,
		CreatedAt:         b.CreatedAt.Format(time.RFC3339Nano),
	}
	if full {
		locked := b.Locked
		out.Locked = &locked
		out.UpdatedAt = b.UpdatedAt.Format(time.RFC3339Nano)
	}
	return out
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// writeBackup answers with a backup and its generation as the ETag, for
// If-Match on the next write.
func writeBackup(w http.ResponseWriter, status int, b vault.Backup, full bool) {
	w.Header().Set("ETag", `"`+strconv.FormatUint(b.Generation, 10)+`"`)
	writeJSON(w, status, toJSON(b, full))
}

// userID reads the path's user_id. The vault validates it too; checking
// here keeps a bad ID from reaching anything.
func userID(r *http.Request) (string, error) {
	id := chi.URLParam(r, "user_id")
	if !vault.ValidUserID(id) {
		return "", badRequest("user_id: must be 1 to 128 characters from [A-Za-z0-9._~:@-]")
	}
	return id, nil
}

func (h *handlers) enroll(w http.ResponseWriter, r *http.Request) {
	id, err := userID(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	pre, err := preconditions(r, true)
	if err != nil {
		writeError(w, r, err)
		return
	}
	var req enrollRequest
	defer func() { req.Secret.wipe(); req.PIN.wipe() }()
	if err := decodeBody(r, w, &req); err != nil {
		writeError(w, r, err)
		return
	}
	maxAttempts := 0 // the configured default
	if req.MaxAttempts != nil {
		if maxAttempts = *req.MaxAttempts; maxAttempts == 0 {
			maxAttempts = -1 // an explicit 0 is invalid, not "the default"
		}
	}
	secret, err := decodeSecret(req.Secret)
	if err != nil {
		writeError(w, r, err)
		return
	}
	defer clear(secret)
	b, created, err := h.b.Enroll(r.Context(), clientOf(r.Context()).Namespace, id, secret, req.PIN, maxAttempts, pre)
	if err != nil {
		writeError(w, r, err)
		return
	}
	status := http.StatusOK
	if created {
		status = http.StatusCreated
	}
	writeBackup(w, status, b, false)
}

func (h *handlers) status(w http.ResponseWriter, r *http.Request) {
	id, err := userID(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	b, err := h.b.Status(r.Context(), clientOf(r.Context()).Namespace, id)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeBackup(w, http.StatusOK, b, true)
}

func (h *handlers) delete(w http.ResponseWriter, r *http.Request) {
	id, err := userID(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	pre, err := preconditions(r, false)
	if err != nil {
		writeError(w, r, err)
		return
	}
	if err := h.b.Delete(r.Context(), clientOf(r.Context()).Namespace, id, pre); err != nil {
		writeError(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (h *handlers) recover(w http.ResponseWriter, r *http.Request) {
	id, err := userID(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	var req recoverRequest
	defer req.PIN.wipe()
	if err := decodeBody(r, w, &req); err != nil {
		writeError(w, r, err)
		return
	}
	secret, remaining, err := h.b.Recover(r.Context(), clientOf(r.Context()).Namespace, id, req.PIN)
	if err != nil {
		writeError(w, r, err)
		return
	}
	defer clear(secret)
	// Built by hand so that every copy of the secret is a slice we wipe.
	body := make([]byte, 0, 64+base64.StdEncoding.EncodedLen(len(secret)))
	defer func() { clear(body) }()
	body = append(body, `{"secret":"`...)
	body = base64.StdEncoding.AppendEncode(body, secret)
	body = append(body, `","attempts_remaining":`...)
	body = strconv.AppendInt(body, int64(remaining), 10)
	body = append(body, "}\n"...)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

func (h *handlers) changePIN(w http.ResponseWriter, r *http.Request) {
	id, err := userID(r)
	if err != nil {
		writeError(w, r, err)
		return
	}
	pre, err := preconditions(r, false)
	if err != nil {
		writeError(w, r, err)
		return
	}
	var req changePINRequest
	defer func() { req.PIN.wipe(); req.NewPIN.wipe() }()
	if err := decodeBody(r, w, &req); err != nil {
		writeError(w, r, err)
		return
	}
	b, err := h.b.ChangePIN(r.Context(), clientOf(r.Context()).Namespace, id, req.PIN, req.NewPIN, pre)
	if err != nil {
		writeError(w, r, err)
		return
	}
	writeBackup(w, http.StatusOK, b, false)
}
