package vault

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

type metrics struct {
	recoveries        *prometheus.CounterVec
	pinChanges        *prometheus.CounterVec
	enrollments       *prometheus.CounterVec
	deletes           prometheus.Counter
	lockouts          prometheus.Counter
	untold            prometheus.Counter
	earlyResetsLost   prometheus.Counter
	integrityFailures prometheus.Counter
	storeConflicts    prometheus.Counter
	ambiguous         *prometheus.CounterVec
	sealsReserved     *prometheus.GaugeVec
	recordsByWrap     *prometheus.GaugeVec
	recordsByPIN      *prometheus.GaugeVec
	rewrapRunning     prometheus.Gauge
	rewrapPending     prometheus.Gauge
	rewrapped         prometheus.Counter
	rewrapErrors      prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	f := promauto.With(reg)
	m := &metrics{
		recoveries: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_recoveries_total",
			Help: "Recover requests by result, those refused before the vault (rate limits, admission) included.",
		}, []string{"result"}),
		pinChanges: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_pin_changes_total",
			Help: "PIN change requests by result, those refused before the vault (rate limits, admission) included.",
		}, []string{"result"}),
		enrollments: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_enrollments_total",
			Help: "Enrollments, by result (created, replaced, error).",
		}, []string{"result"}),
		deletes: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_deletes_total",
			Help: "Backups deleted (tombstoned).",
		}),
		lockouts: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_lockouts_total",
			Help: "Guesses that used a backup's last attempt and removed its secret.",
		}),
		untold: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_guess_outcomes_untold_total",
			Help: "Guesses answered unavailable after their PIN check, because a later success or a new generation took their count away and it could not be counted again.",
		}),
		earlyResetsLost: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_early_resets_lost_total",
			Help: "Resets after a right PIN at the first try, answered before they were durable, that did not become durable: each leaves that guess counted, one attempt.",
		}),
		integrityFailures: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_integrity_failures_total",
			Help: "Stored records or sealed secrets that failed authentication.",
		}),
		storeConflicts: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_store_conflicts_total",
			Help: "Compare-and-swap writes retried because the record changed since it was read.",
		}),
		ambiguous: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_store_ambiguous_writes_total",
			Help: "Record writes whose outcome the store left unknown (an error, not a conflict), by how they resolved: " +
				"applied (the write's operation ID was found), resent (unchanged revision: the identical write was sent again and landed), " +
				"not_applied (the record moved on without it: the operation runs again on the new record), " +
				"unresolved (no answer in time, or the ID fell out of the record's window: 503, nothing checked).",
		}, []string{"resolution"}),
		sealsReserved: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keyvault_wrap_key_seals",
			Help: "Seals reserved under each wrap key version (an upper bound of seals done); the limit is 2^32.",
		}, []string{"key_version"}),
		recordsByWrap: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keyvault_records_by_wrap_key_version",
			Help: "Live backups by the wrap key version that seals them, as of the latest count (at start, after a re-wrap, on keys usage or retire).",
		}, []string{"key_version"}),
		recordsByPIN: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keyvault_records_by_pin_key_version",
			Help: "Live backups by the PIN key version that checks them, as of the latest count.",
		}, []string{"key_version"}),
		rewrapRunning: f.NewGauge(prometheus.GaugeOpts{
			Name: "keyvault_rewrap_running",
			Help: "1 while the re-wrap job runs.",
		}),
		rewrapPending: f.NewGauge(prometheus.GaugeOpts{
			Name: "keyvault_rewrap_pending_records",
			Help: "Records the running re-wrap job has still to visit.",
		}),
		rewrapped: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_rewrap_records_total",
			Help: "Records whose outer layer the re-wrap job moved to the newest wrap key.",
		}),
		rewrapErrors: f.NewCounter(prometheus.CounterOpts{
			Name: "keyvault_rewrap_errors_total",
			Help: "Records the re-wrap job could not move, and runs that ended early; a later run retries.",
		}),
	}
	// Known results start at zero so that rates and alerts see them.
	for _, r := range []string{"success", "wrong_pin", "locked", "not_found", "invalid", "precondition_failed", "rate_limited", "unavailable", "integrity_error"} {
		m.recoveries.WithLabelValues(r)
		m.pinChanges.WithLabelValues(r)
	}
	for _, r := range []string{"created", "replaced", "error"} {
		m.enrollments.WithLabelValues(r)
	}
	for _, r := range []string{resApplied, resResent, resNotApplied, resUnresolved} {
		m.ambiguous.WithLabelValues(r)
	}
	return m
}
