package api

import (
	"net/http"
	"net/http/pprof"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// NewAdminRouter serves the operator endpoints: /metrics from gatherer,
// /healthz (the process answers), and /readyz (ready returns nil: the
// store is open and at least one HSM member is healthy; else 503 with the
// reason, which names components, never data). An error from ready that
// reports Degraded() true (itself, not an error it wraps) leaves the
// service ready: 200, with its text (an HSM member refused while others
// serve).
func NewAdminRouter(gatherer prometheus.Gatherer, ready func() error) http.Handler {
	return NewAdminRouterWith(gatherer, ready, AdminOptions{})
}

// NewAdminRouterWith is NewAdminRouter plus, when opts names an admin
// token and a KeyAdmin, the key lifecycle endpoints (see mountKeyAdmin).
func NewAdminRouterWith(gatherer prometheus.Gatherer, ready func() error, opts AdminOptions) http.Handler {
	r := chi.NewRouter()
	mountKeyAdmin(r, opts)
	r.Handle("/metrics", promhttp.HandlerFor(gatherer, promhttp.HandlerOpts{}))
	r.Get("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	r.Get("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		err := ready()
		// Only the error itself, not one it wraps: "not ready, because of
		// something degraded" stays not ready.
		if d, ok := err.(degraded); ok && d.Degraded() {
			_, _ = w.Write([]byte("ready, degraded: " + err.Error() + "\n"))
			return
		}
		if err != nil {
			w.WriteHeader(http.StatusServiceUnavailable)
			_, _ = w.Write([]byte("not ready: " + err.Error() + "\n"))
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	return r
}

// degraded is an error that leaves the service ready (see NewAdminRouter).
type degraded interface {
	error
	Degraded() bool
}

// WithProfiler adds Go's profiler under /debug/pprof/ in front of admin
// (the config's admin_pprof). It is mounted explicitly rather than through
// net/http/pprof's side effect on http.DefaultServeMux, which nothing here
// serves.
func WithProfiler(admin http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("/", admin)
	return mux
}
