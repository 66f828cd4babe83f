package etcdstore

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

type metrics struct {
	durations *prometheus.HistogramVec
	errors    *prometheus.CounterVec
	conflicts prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	f := promauto.With(reg)
	return &metrics{
		// The same name as boltstore's, so dashboards work on either driver.
		durations: f.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "keyvault_store_transaction_duration_seconds",
			Help:    "Duration of store operations as callers see them (get, cas, scan), here etcd requests.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18),
		}, []string{"op"}),
		errors: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_etcd_request_errors_total",
			Help: "etcd requests that returned an error, by operation (a cas error leaves its outcome unknown).",
		}, []string{"op"}),
		conflicts: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_etcd_cas_conflicts_total",
			Help: "Compare-and-swaps etcd refused because the revision had moved.",
		}),
	}
}

func (m *metrics) observe(op string, start time.Time, err error) {
	m.durations.WithLabelValues(op).Observe(time.Since(start).Seconds())
	if err != nil {
		m.errors.WithLabelValues(op).Inc()
	}
}
