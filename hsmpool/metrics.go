package hsmpool

import (
	"maps"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

type metrics struct {
	ops          *prometheus.CounterVec
	errors       *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	inFlight     *prometheus.GaugeVec
	up           *prometheus.GaugeVec
	ejections    *prometheus.CounterVec
	readmissions *prometheus.CounterVec
	keyMismatch  *prometheus.GaugeVec
	shed         *prometheus.CounterVec
	refused      *prometheus.GaugeVec
	capProbes    *prometheus.CounterVec
	sessionsMax  *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	f := promauto.With(reg)
	return &metrics{
		ops: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_hsm_operations_total",
			Help: "HSM operations attempted, by member and operation.",
		}, []string{"member", "op"}),
		errors: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_hsm_errors_total",
			Help: "HSM operations that failed on a member, by member, operation and reason (a PKCS#11 return code, stalled, no_token or other).",
		}, []string{"member", "op", "reason"}),
		duration: f.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "keyvault_hsm_operation_duration_seconds",
			Help:    "Duration of HSM operations, by member and operation.",
			Buckets: prometheus.ExponentialBuckets(0.00005, 2, 16),
		}, []string{"member", "op"}),
		inFlight: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keyvault_hsm_in_flight_operations",
			Help: "HSM operations running now, by member.",
		}, []string{"member"}),
		up: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keyvault_hsm_member_up",
			Help: "1 if the member is in service, 0 if it is out.",
		}, []string{"member"}),
		ejections: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_hsm_member_ejections_total",
			Help: "Times a member was taken out of service after a failure.",
		}, []string{"member"}),
		readmissions: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_hsm_member_readmissions_total",
			Help: "Times a probe put a member back in service.",
		}, []string{"member"}),
		shed: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_hsm_shed_total",
			Help: "Requests (stage admission) and HSM operations (stage session) refused because nothing came free within the queue timeout.",
		}, []string{"stage"}),
		refused: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keyvault_hsm_member_refused",
			Help: "1 while the member is refused because its token lacks what the vault needs, by member and reason (the missing mechanism or the failed known-answer test).",
		}, []string{"member", "reason"}),
		capProbes: f.NewCounterVec(prometheus.CounterOpts{
			Name: "keyvault_hsm_capability_probes_total",
			Help: "Times a member's token was probed for the mechanisms the vault needs.",
		}, []string{"member"}),
		sessionsMax: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keyvault_hsm_member_sessions_max",
			Help: "Concurrent operations the member serves: its max_sessions, or fewer once its token refused a session (CKR_SESSION_COUNT).",
		}, []string{"member"}),
		keyMismatch: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "keyvault_hsm_member_key_mismatch",
			Help: "1 if the member was refused because its key check values differ from the pool's.",
		}, []string{"member"}),
	}
}

// memberMetrics keeps a member's children of the metric vectors that every
// operation updates: finding one in its vector hashes its labels and takes
// a lock. Each child is found at its first use, when a lookup at every use
// would first have made it, so that the pool exports the same series.
type memberMetrics struct {
	inFlight func() prometheus.Gauge
	mu       sync.Mutex                            // serialises additions to ops
	ops      atomic.Pointer[map[string]*opMetrics] // replaced whole by each addition
}

// opMetrics are a member's children for one operation.
type opMetrics struct {
	ops      prometheus.Counter
	duration prometheus.Observer
}

func newMemberMetrics(pm *metrics, name string) *memberMetrics {
	return &memberMetrics{inFlight: sync.OnceValue(func() prometheus.Gauge { return pm.inFlight.WithLabelValues(name) })}
}

// op returns the member's children for op, found in pm's vectors at its
// first use.
func (mm *memberMetrics) op(pm *metrics, name, op string) *opMetrics {
	if ops := mm.ops.Load(); ops != nil {
		if om := (*ops)[op]; om != nil {
			return om
		}
	}
	mm.mu.Lock()
	defer mm.mu.Unlock()
	var ops map[string]*opMetrics
	if old := mm.ops.Load(); old != nil {
		if om := (*old)[op]; om != nil {
			return om
		}
		ops = maps.Clone(*old)
	} else {
		ops = map[string]*opMetrics{}
	}
	om := &opMetrics{ops: pm.ops.WithLabelValues(name, op), duration: pm.duration.WithLabelValues(name, op)}
	ops[op] = om
	mm.ops.Store(&ops)
	return om
}
