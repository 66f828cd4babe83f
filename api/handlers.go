package api

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/keyvault/keyvault/vault"
)

type handlers struct {
	b         Backups
	limits    Limiter  // nil: no limits
	admission Admitter // nil: admit all
	shareHSM  bool     // hold each client to its share of the HSM admission
	auditLog  *slog.Logger
}

// admit reserves HSM capacity for a request that will use the HSMs, after
// everything that can refuse it cheaply has passed. The client's share
// comes first: a client at its cap is refused at once and never waits in
// the admission queue ahead of other clients' requests.
func (h *handlers) admit(r *http.Request) (release func(), err error) {
	releaseShare := func() {}
	if h.shareHSM && h.limits != nil {
		if releaseShare, err = h.limits.HoldHSM(clientOf(r.Context()).Name); err != nil {
			return nil, err
		}
	}
	if h.admission == nil {
		return releaseShare, nil
	}
	releaseHSM, err := h.admission.Admit(r.Context())
	if err != nil {
		releaseShare()
		return nil, err
	}
	return func() { releaseHSM(); releaseShare() }, nil
}

// admitGuess lets a guess whose request is otherwise valid through the
// cheap refusals first (no backup, locked, precondition, escalating delay),
// then the per-user and per-client limits, then HSM admission. done must be
// called with the vault's outcome: it releases HSM capacity, gives the
// user's token back if the guess checked nothing, and charges the client
// for a wrong one.
func (h *handlers) admitGuess(r *http.Request, op, ns, id string, pre vault.Precondition) (done func(error), err error) {
	defer func() {
		if err != nil {
			o := classify(err)
			h.b.CountRefused(op, o.Result)
			if o.Delayed && h.limits != nil {
				h.limits.EscalatingDelayRejected()
			}
		}
	}()
	if err := h.b.Precheck(r.Context(), ns, id, pre); err != nil {
		return nil, err
	}
	undo := func() {}
	client := clientOf(r.Context()).Name
	if h.limits != nil {
		if undo, err = h.limits.ReserveGuess(client, ns, id); err != nil {
			return nil, err
		}
	}
	release, err := h.admit(r)
	if err != nil {
		undo()
		return nil, err
	}
	return func(err error) {
		release()
		o := classify(err)
		if !o.Checked {
			undo()
		}
		h.settleGuess(r, o)
	}, nil
}

// errPanicked is the outcome of a guess whose vault call never returned.
var errPanicked = errors.New("the vault call panicked")

// settleGuess charges the client for a guess the vault checked and found
// wrong, and counts a refusal by the vault's escalating delay.
func (h *handlers) settleGuess(r *http.Request, o outcome) {
	if h.limits == nil {
		return
	}
	switch {
	case o.Wrong:
		h.limits.WrongGuess(clientOf(r.Context()).Name)
	case o.Delayed:
		h.limits.EscalatingDelayRejected()
	}
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

// target reads the path's user_id and the caller's namespace. The vault
// validates the ID too; checking here keeps a bad one from reaching anything.
// The namespace is returned with a refused ID too, for its audit event.
func target(r *http.Request) (ns, userID string, err error) {
	ns = clientOf(r.Context()).Namespace
	id := chi.URLParam(r, "user_id")
	if !vault.ValidUserID(id) {
		return ns, "", badRequest("user_id: must be 1 to 128 characters from [A-Za-z0-9._~:@-]")
	}
	return ns, id, nil
}

// handle adapts a handler that returns its error: writeError answers it.
func handle(f func(http.ResponseWriter, *http.Request) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := f(w, r); err != nil {
			writeError(w, r, err)
		}
	}
}

func (h *handlers) enroll(w http.ResponseWriter, r *http.Request) (err error) {
	ns, id, err := target(r)
	ev := h.audit(r, "enroll", ns, id)
	defer ev.finish(&err)
	if err != nil {
		return err
	}
	pre, err := preconditions(r, true)
	if err != nil {
		return err
	}
	var req enrollRequest
	defer func() { req.Secret.wipe(); req.PIN.wipe() }()
	if err := decodeBody(r, w, &req); err != nil {
		return err
	}
	maxAttempts := 0 // the configured default
	if req.MaxAttempts != nil {
		if maxAttempts = *req.MaxAttempts; maxAttempts == 0 {
			maxAttempts = -1 // an explicit 0 is invalid, not "the default"
		}
	}
	secret, err := decodeSecret(req.Secret)
	if err != nil {
		return err
	}
	defer clear(secret)
	// What can only ever be a 400 is answered before HSM admission, which
	// could shed it with a 503 the client would retry.
	if err := errors.Join(vault.CheckSecret(secret), vault.CheckPIN("pin", req.PIN)); err != nil {
		return err
	}
	release, err := h.admit(r)
	if err != nil {
		return err
	}
	defer release()
	b, created, err := h.b.Enroll(r.Context(), ns, id, secret, req.PIN, maxAttempts, pre)
	if err != nil {
		return err
	}
	status := http.StatusOK
	ev.onSuccess = "replaced"
	if created {
		status, ev.onSuccess = http.StatusCreated, "created"
	}
	writeBackup(w, status, b, false)
	return nil
}

func (h *handlers) status(w http.ResponseWriter, r *http.Request) error {
	ns, id, err := target(r)
	if err != nil {
		return err
	}
	b, err := h.b.Status(r.Context(), ns, id)
	if err != nil {
		return err
	}
	writeBackup(w, http.StatusOK, b, true)
	return nil
}

func (h *handlers) delete(w http.ResponseWriter, r *http.Request) (err error) {
	ns, id, err := target(r)
	ev := h.audit(r, "delete", ns, id)
	defer ev.finish(&err)
	if err != nil {
		return err
	}
	pre, err := preconditions(r, false)
	if err != nil {
		return err
	}
	if err := h.b.Delete(r.Context(), ns, id, pre); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

func (h *handlers) recover(w http.ResponseWriter, r *http.Request) (err error) {
	ns, id, err := target(r)
	ev := h.audit(r, "recover", ns, id)
	defer ev.finish(&err)
	if err != nil {
		return err
	}
	var req recoverRequest
	defer req.PIN.wipe()
	if err := decodeBody(r, w, &req); err != nil {
		return err
	}
	if err := vault.CheckPIN("pin", req.PIN); err != nil {
		return err
	}
	done, err := h.admitGuess(r, vault.OpRecover, ns, id, vault.Precondition{})
	if err != nil {
		return err
	}
	guess := errPanicked
	defer func() { done(guess) }()
	secret, remaining, err := h.b.Recover(r.Context(), ns, id, req.PIN)
	guess = err
	if err != nil {
		return err
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
	return nil
}

func (h *handlers) changePIN(w http.ResponseWriter, r *http.Request) (err error) {
	ns, id, err := target(r)
	ev := h.audit(r, "change_pin", ns, id)
	defer ev.finish(&err)
	if err != nil {
		return err
	}
	pre, err := preconditions(r, false)
	if err != nil {
		return err
	}
	var req changePINRequest
	defer func() { req.PIN.wipe(); req.NewPIN.wipe() }()
	if err := decodeBody(r, w, &req); err != nil {
		return err
	}
	if err := errors.Join(vault.CheckPIN("pin", req.PIN), vault.CheckPIN("new_pin", req.NewPIN)); err != nil {
		return err
	}
	done, err := h.admitGuess(r, vault.OpChangePIN, ns, id, pre)
	if err != nil {
		return err
	}
	guess := errPanicked
	defer func() { done(guess) }()
	b, err := h.b.ChangePIN(r.Context(), ns, id, req.PIN, req.NewPIN, pre)
	guess = err
	if err != nil {
		return err
	}
	writeBackup(w, http.StatusOK, b, false)
	return nil
}
