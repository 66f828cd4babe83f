package api

import (
	"context"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// Backups is what the API needs from the vault. *vault.Vault implements it;
// every method is safe for concurrent use and may block on the HSM and the
// store.
type Backups interface {
	Enroll(ctx context.Context, ns, userID string, secret, pin []byte, maxAttempts int, pre vault.Precondition) (vault.Backup, bool, error)
	Recover(ctx context.Context, ns, userID string, pin []byte) ([]byte, int, error)
	Status(ctx context.Context, ns, userID string) (vault.Backup, error)
	Delete(ctx context.Context, ns, userID string, pre vault.Precondition) error
	ChangePIN(ctx context.Context, ns, userID string, pin, newPIN []byte, pre vault.Precondition) (vault.Backup, error)
	// CountRefused counts a recovery or PIN change refused before the vault
	// (vault.OpRecover, vault.OpChangePIN) in the vault's metrics, under the
	// refusal's result (outcome.Result).
	CountRefused(op, result string)
	// Precheck refuses a guess that would check nothing (404, 410, 412, or
	// 429 for the escalating delay), counting nothing.
	Precheck(ctx context.Context, ns, userID string, pre vault.Precondition) error
}

var _ Backups = (*vault.Vault)(nil)

// Limiter is what the API needs from the rate limits; *ratelimit.Limits
// implements it. Errors it returns are *ratelimit.Error. Safe for
// concurrent use; never blocks.
type Limiter interface {
	// Request admits one /v1 request of the client.
	Request(client string) error
	// ReserveGuess admits one PIN guess on a user, taking nothing if it
	// refuses; undo gives the user's token back.
	ReserveGuess(client, ns, userID string) (undo func(), err error)
	// WrongGuess charges the client for a guess that was checked and wrong.
	WrongGuess(client string)
	// EscalatingDelayRejected counts a guess the vault's delay refused.
	EscalatingDelayRejected()
	// HoldHSM admits one HSM-bound request of the client if it holds less
	// than its share of the HSM admission; release gives the place back.
	HoldHSM(client string) (release func(), err error)
}

// Client is one configured API client: its name, the namespace its
// backups live in, and the SHA-256 of each of its bearer tokens (several
// during a rotation).
type Client struct {
	Name        string
	Namespace   string
	TokenHashes [][32]byte
}

// Options configure the API.
type Options struct {
	Clients    []Client
	Registerer prometheus.Registerer // default: a private registry
	Logger     *slog.Logger          // default: slog.Default()
	// Audit receives one event per decision (docs/audit.md); give it a
	// logger no level filters. Default: Logger.
	Audit *slog.Logger
	// RequestTimeout bounds each request's time in the vault (default
	// 25s). Keep it under the server's write timeout, so that a guess the
	// vault counted is answered.
	RequestTimeout time.Duration
	// Limits are the rate limits (default: none).
	Limits Limiter
	// Admission admits requests that will use the HSMs (default: all).
	Admission Admitter
}

// Admitter is admission control in front of the HSMs; *hsmpool.Pool
// implements it. Admit blocks at most its queue timeout or ctx; an error
// wraps vault.ErrUnavailable (503).
type Admitter interface {
	Admit(ctx context.Context) (release func(), err error)
}

// NewRouter returns the /v1 API.
func NewRouter(b Backups, opts Options) http.Handler {
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Audit == nil {
		opts.Audit = opts.Logger
	}
	if opts.RequestTimeout == 0 {
		opts.RequestTimeout = 25 * time.Second
	}
	h := &handlers{b: b, limits: opts.Limits, admission: opts.Admission, auditLog: opts.Audit,
		// One client alone has no other client to starve: its share would
		// only idle HSM capacity.
		shareHSM: len(opts.Clients) > 1}
	m := newMetrics(opts.Registerer)

	r := chi.NewRouter()
	// The recoverer sits inside the metrics, so a panic counts as the 500
	// it answers.
	r.Use(withRequest(opts.Logger, opts.RequestTimeout), m.instrument, recoverer)
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, &apiError{http.StatusNotFound, codeNotFound, "No such route."})
	})
	mux := r
	r.MethodNotAllowed(func(w http.ResponseWriter, r *http.Request) {
		// RFC 9110 asks a 405 to list the methods the route does allow.
		var allowed []string
		for _, m := range []string{http.MethodGet, http.MethodPut, http.MethodPost, http.MethodDelete} {
			if mux.Match(chi.NewRouteContext(), m, r.URL.Path) {
				allowed = append(allowed, m)
			}
		}
		w.Header().Set("Allow", strings.Join(allowed, ", "))
		writeError(w, r, &apiError{http.StatusMethodNotAllowed, codeInvalid, "Method not allowed on this route; see the Allow header."})
	})
	r.Route("/v1", func(r chi.Router) {
		r.Use(authenticate(opts.Clients, opts.Limits))
		r.Put("/backups/{user_id}", handle(h.enroll))
		r.Get("/backups/{user_id}", handle(h.status))
		r.Delete("/backups/{user_id}", handle(h.delete))
		r.Post("/backups/{user_id}/recover", handle(h.recover))
		r.Post("/backups/{user_id}/pin", handle(h.changePIN))
	})
	r.Get("/openapi.yaml", serveOpenAPI)
	return r
}
