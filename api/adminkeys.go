package api

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"log/slog"
	"maps"
	"net/http"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/vault"
)

// Problem codes of the key lifecycle refusals (docs/keys.md). They are the
// admin listener's, not the /v1 API's ProblemCode enum.
const (
	adminReloadRefused = "reload_refused"
	adminKeysInUse     = "keys_in_use"
	adminNodesLagging  = "nodes_lagging"
	adminRetireFailed  = "retire_failed"
)

var adminTitles = map[string]string{
	adminReloadRefused: "Refused",
	adminKeysInUse:     "The key version is still in use",
	adminNodesLagging:  "Refused",
	adminRetireFailed:  "Refused",
}

// KeyAdmin is what the key lifecycle endpoints call: the HSM pool's reload
// and retire, and the vault's usage count and re-wrap job.
type KeyAdmin interface {
	// Reload looks every HSM member's keys up again and uses new versions
	// once every member holds them; it returns the newest versions.
	Reload(ctx context.Context) (map[vault.KeyRole]uint32, error)
	// Usage counts backups by key version.
	Usage(ctx context.Context) (vault.KeyUsage, error)
	// Retire destroys a key version on every member unless a backup uses
	// it (a *vault.KeysInUseError); it returns the labels destroyed by
	// member.
	Retire(ctx context.Context, version uint32) (map[string][]string, error)
	// StartRewrap starts the re-wrap job unless it runs (started false).
	StartRewrap(perSecond float64) (st vault.RewrapStatus, started bool)
	RewrapStatus() vault.RewrapStatus
}

// AdminOptions configure the admin listener beyond /metrics and health.
type AdminOptions struct {
	// TokenHashes are the SHA-256 of the admin bearer tokens. Without any,
	// or without Keys, the key lifecycle endpoints are not served (404).
	TokenHashes [][32]byte
	Keys        KeyAdmin
	Logger      *slog.Logger // default slog.Default()
	// Audit receives one event per reload, retire and re-wrap start
	// (docs/audit.md). Default: Logger.
	Audit *slog.Logger
}

// mountKeyAdmin adds the key lifecycle endpoints to the admin router:
//
//	POST /admin/keys/reload   use the key versions every HSM member holds
//	GET  /admin/keys/usage    backups by wrap and PIN key version
//	POST /admin/keys/retire   {"version": N}: destroy version N, or 409 keys_in_use
//	POST /admin/rewrap        {"per_second": R}: start the re-wrap job (202), or 200 if it runs
//	GET  /admin/rewrap        the job's progress
//
// Each needs the admin bearer token. Nothing they answer is secret (key
// versions, counts, check values), but they change what protects every
// backup, so no API client's token opens them.
func mountKeyAdmin(r chi.Router, opts AdminOptions) {
	if opts.Keys == nil || len(opts.TokenHashes) == 0 {
		return
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	audit := opts.Audit
	if audit == nil {
		audit = log
	}
	k := opts.Keys
	r.Route("/admin", func(r chi.Router) {
		r.Use(withRequest(log, 0), recoverer, adminAuth(opts.TokenHashes), writeDeadline(keyAdminWriteTimeout))
		r.Post("/keys/reload", func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			vs, err := k.Reload(r.Context())
			if err != nil {
				adminAudit(audit, r, "keys_reload", start, adminReloadRefused)
				refuse(w, r, err, &apiError{http.StatusConflict, adminReloadRefused,
					"Not every HSM member could take the new key versions; nothing changed. The server log says why under this request ID."})
				return
			}
			adminAudit(audit, r, "keys_reload", start, "success",
				"wrap_version", vs[vault.RoleWrap], "pin_version", vs[vault.RolePIN])
			versions := make(map[string]uint32, len(vs))
			for role, v := range vs {
				versions[string(role)] = v
			}
			writeJSON(w, http.StatusOK, client.KeyVersions{Versions: versions})
		})
		r.Get("/keys/usage", func(w http.ResponseWriter, r *http.Request) {
			u, err := k.Usage(r.Context())
			if err != nil {
				writeError(w, r, err)
				return
			}
			writeJSON(w, http.StatusOK, usageJSON(u))
		})
		r.Post("/keys/retire", func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			var req retireRequest
			if err := decodeBody(r, w, &req); err != nil {
				adminAudit(audit, r, "keys_retire", start, codeInvalid)
				writeError(w, r, err)
				return
			}
			destroyed, err := k.Retire(r.Context(), req.Version)
			refusal := retireRefusal(err)
			adminAudit(audit, r, "keys_retire", start, retireResult(refusal), "key_version", req.Version)
			if refusal != nil {
				refuse(w, r, err, refusal)
				return
			}
			writeJSON(w, http.StatusOK, client.Retired{Version: req.Version, Destroyed: destroyed})
		})
		r.Post("/rewrap", func(w http.ResponseWriter, r *http.Request) {
			var req rewrapRequest
			start := time.Now()
			if r.ContentLength != 0 {
				if err := decodeBody(r, w, &req); err != nil {
					adminAudit(audit, r, "rewrap_start", start, codeInvalid)
					writeError(w, r, err)
					return
				}
			}
			if req.PerSecond < 0 {
				adminAudit(audit, r, "rewrap_start", start, codeInvalid)
				writeError(w, r, badRequest("per_second: must be 0 (no limit) or more"))
				return
			}
			st, started := k.StartRewrap(req.PerSecond)
			code, result := http.StatusOK, "already_running"
			if started {
				code, result = http.StatusAccepted, "started"
			}
			adminAudit(audit, r, "rewrap_start", start, result, "key_version", st.Target, "per_second", req.PerSecond)
			writeJSON(w, code, rewrapJSON(st))
		})
		r.Get("/rewrap", func(w http.ResponseWriter, _ *http.Request) {
			writeJSON(w, http.StatusOK, rewrapJSON(k.RewrapStatus()))
		})
	})
}

// retireRefusal is the problem that answers a retire's error, nil for
// none. Its detail is a text of this package or of a vault error type made
// of versions, node names and counts; any other cause gets a fixed text.
func retireRefusal(err error) error {
	var inUse *vault.KeysInUseError
	var lagging *vault.LaggingNodesError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &inUse):
		// Joined so that writeError adds the counts to the body.
		return errors.Join(&apiError{http.StatusConflict, adminKeysInUse,
			inUse.Error() + "; run keyvault keys rewrap, and wait for users to recover or delete their backups"}, inUse)
	case errors.Is(err, vault.ErrInvalid):
		return err
	case errors.As(err, &lagging):
		return &apiError{http.StatusConflict, adminNodesLagging, lagging.Error()}
	default:
		return &apiError{http.StatusConflict, adminRetireFailed,
			"The key version was not retired. The server log says why under this request ID."}
	}
}

// retireResult names a retire's outcome in its audit event: the code of
// the problem that answers it.
func retireResult(refusal error) string {
	if refusal == nil {
		return "success"
	}
	return auditResult(classify(refusal))
}

// keyAdminWriteTimeout is how long a key lifecycle request may take to
// answer, past the listener's write timeout: a usage count or a retire
// reads every backup, which on a large store takes longer. The keys CLI
// waits as long. Only a request with the admin token gets it.
const keyAdminWriteTimeout = 2 * time.Minute

// writeDeadline gives each request d to answer, from now.
func writeDeadline(d time.Duration) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			// An error means the writer cannot move its deadline (a test
			// recorder); the server's own deadline then stands.
			_ = http.NewResponseController(w).SetWriteDeadline(time.Now().Add(d))
			next.ServeHTTP(w, r)
		})
	}
}

// The admin bodies are the Go client's types, so that the two cannot
// drift apart.
type (
	retireRequest = client.RetireRequest
	rewrapRequest = client.RewrapRequest
)

// adminAuth accepts a bearer token whose SHA-256 is one of hashes,
// compared in constant time with every one.
func adminAuth(hashes [][32]byte) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
			found := 0
			if ok && strings.EqualFold(scheme, "Bearer") && token != "" {
				sum := sha256.Sum256([]byte(token))
				for _, h := range hashes {
					found |= subtle.ConstantTimeCompare(sum[:], h[:])
				}
			}
			if found != 1 {
				writeError(w, r, &apiError{http.StatusUnauthorized, codeUnauthorized, "Send Authorization: Bearer <token> with the admin token."})
				return
			}
			next.ServeHTTP(w, r)
		})
	}
}

// refuse answers an operator's request that the key lifecycle refused
// with problem. A refusal whose detail is written here logs its cause,
// which may name HSM internals, under the request ID; the body never
// holds it.
func refuse(w http.ResponseWriter, r *http.Request, cause, problem error) {
	if o := classify(problem); o.api != nil && o.inUse == nil {
		logger(r.Context()).Warn("key lifecycle request refused", "path", r.URL.Path, "error", cause.Error())
	}
	writeError(w, r, problem)
}

func usageJSON(u vault.KeyUsage) client.KeyUsage {
	out := client.KeyUsage{Wrap: map[uint32]int{}, PIN: map[uint32]int{}}
	maps.Copy(out.Wrap, u.Wrap)
	maps.Copy(out.PIN, u.PIN)
	return out
}

func rewrapJSON(s vault.RewrapStatus) client.RewrapStatus {
	out := client.RewrapStatus{
		Running: s.Running, Target: s.Target, Total: s.Total, Done: s.Done,
		Skipped: s.Skipped, Errors: s.Errors, LastError: s.LastError,
	}
	if !s.StartedAt.IsZero() {
		out.StartedAt = &s.StartedAt
	}
	if !s.FinishedAt.IsZero() {
		out.FinishedAt = &s.FinishedAt
	}
	return out
}
