package ratelimit

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// metrics are the package's Prometheus metrics. The label sets are fixed and
// small: never a user ID, a namespace or a client.
type metrics struct {
	rejections *prometheus.CounterVec
	userStates prometheus.GaugeFunc
	// The children of rejections, resolved once.
	guessesPerUser, requestsPerClient, wrongGuessesPerClient, escalatingDelay, hsmSharePerClient prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, userStates func() float64) *metrics {
	f := promauto.With(reg)
	m := &metrics{
		rejections: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_ratelimit_rejections_total",
			Help: "Requests and PIN guesses refused by a rate limit (429), by limiter.",
		}, []string{"limiter"}),
		userStates: f.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "keyvault_ratelimit_user_states",
			Help: "Per-user guess buckets held in memory; at most the configured maximum.",
		}, userStates),
	}
	// Resolving the children creates every series at 0.
	m.guessesPerUser = m.rejections.WithLabelValues(LimiterGuessesPerUser)
	m.requestsPerClient = m.rejections.WithLabelValues(LimiterRequestsPerClient)
	m.wrongGuessesPerClient = m.rejections.WithLabelValues(LimiterWrongGuessesPerClient)
	m.escalatingDelay = m.rejections.WithLabelValues(LimiterEscalatingDelay)
	m.hsmSharePerClient = m.rejections.WithLabelValues(LimiterHSMSharePerClient)
	return m
}

func (m *metrics) rejected(limiter string) {
	switch limiter {
	case LimiterGuessesPerUser:
		m.guessesPerUser.Inc()
	case LimiterRequestsPerClient:
		m.requestsPerClient.Inc()
	case LimiterWrongGuessesPerClient:
		m.wrongGuessesPerClient.Inc()
	case LimiterEscalatingDelay:
		m.escalatingDelay.Inc()
	case LimiterHSMSharePerClient:
		m.hsmSharePerClient.Inc()
	}
}
