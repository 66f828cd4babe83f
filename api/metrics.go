package api

import (
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

type metrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	inFlight prometheus.Gauge
	series   sync.Map // seriesKey → *series
}

// series is the request counter and duration histogram of one route,
// method and status.
type series struct {
	route    string
	requests prometheus.Counter
	duration prometheus.Observer
}

// seriesKey names a series by what its labels are made of: chi's route
// patterns, whose join is the route (or, if there are more, the route
// itself), the method and the status. Finding it needs neither chi's
// RoutePattern nor WithLabelValues, which allocate on every call.
type seriesKey struct {
	patterns [3]string
	joined   bool
	method   string
	status   int
}

func (m *metrics) seriesOf(rc *chi.Context, method string, status int) *series {
	k := seriesKey{method: method, status: status}
	if rc != nil && len(rc.RoutePatterns) <= len(k.patterns) {
		copy(k.patterns[:], rc.RoutePatterns)
	} else {
		k.patterns[0], k.joined = routeOf(rc), true
	}
	if s, ok := m.series.Load(k); ok {
		return s.(*series)
	}
	route := routeOf(rc)
	s, _ := m.series.LoadOrStore(k, &series{
		route:    route,
		requests: m.requests.WithLabelValues(route, method, strconv.Itoa(status)),
		duration: m.duration.WithLabelValues(route, method),
	})
	return s.(*series)
}

// routeOf is the route label: the route pattern, never the path, which
// holds the user_id.
func routeOf(rc *chi.Context) string {
	if p := rc.RoutePattern(); p != "" {
		return p
	}
	return "unmatched"
}

func newMetrics(reg prometheus.Registerer) *metrics {
	f := promauto.With(reg)
	return &metrics{
		requests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_http_requests_total",
			Help: "API requests, by route pattern, method and status code.",
		}, []string{"route", "method", "code"}),
		duration: f.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "keyvault_http_request_duration_seconds",
			Help:    "API request durations, by route pattern and method.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}, []string{"route", "method"}),
		inFlight: f.NewGauge(prometheus.GaugeOpts{
			Name: "keyvault_http_requests_in_flight",
			Help: "API requests being served now.",
		}),
	}
}

// statusWriter remembers the status code a handler wrote.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(code int) {
	if s.status == 0 {
		s.status = code
	}
	s.ResponseWriter.WriteHeader(code)
}

func (s *statusWriter) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriter.Write(b)
}

// instrument counts and times requests by route pattern (never the path,
// which holds the user_id) and writes one log line per request.
func (m *metrics) instrument(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		m.inFlight.Inc()
		sw := &statusWriter{ResponseWriter: w}
		defer func() {
			m.inFlight.Dec()
			if sw.status == 0 {
				sw.status = http.StatusOK
			}
			method := r.Method
			switch method {
			case http.MethodGet, http.MethodPut, http.MethodPost, http.MethodDelete, http.MethodHead:
			default:
				method = "other" // bounded label values
			}
			d := time.Since(start)
			s := m.seriesOf(chi.RouteContext(r.Context()), method, sw.status)
			s.requests.Inc()
			s.duration.Observe(d.Seconds())
			info(r.Context()).logRequest(slog.String("method", method), slog.String("route", s.route), slog.Int("status", sw.status), slog.Float64("duration_ms", float64(d.Microseconds())/1000))
		}()
		next.ServeHTTP(sw, r)
	})
}
