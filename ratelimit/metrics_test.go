package ratelimit

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetrics(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	l := New(Config{
		GuessesPerUser:        perMinute(5, 1),
		RequestsPerClient:     perSecond(1, 2),
		WrongGuessesPerClient: perMinute(1, 1),
	}, Options{Now: func() time.Time { return now }, Registerer: reg})

	// All five series exist, at 0, before any refusal.
	if n := testutil.CollectAndCount(l.metrics.rejections); n != 5 {
		t.Fatalf("%d rejection series before any refusal, want 5", n)
	}
	type call struct {
		err      error
		admitted bool
	}
	calls := []call{
		{l.Request("messenger"), true},
		{l.Request("messenger"), true},
		{l.Request("messenger"), false},
		{l.Request("messenger"), false},
		{l.Request("messenger"), false},
		{guess(l, "messenger", "ns", "alice"), true},
		{guess(l, "messenger", "ns", "alice"), false}, // the user's bucket
	}
	l.WrongGuess("messenger")
	for range 4 {
		calls = append(calls, call{guess(l, "messenger", "ns", "bob"), false}) // the client's wrong-guess bucket
	}
	for i, c := range calls {
		if (c.err == nil) != c.admitted {
			t.Fatalf("call %d: %v, want admitted %v", i, c.err, c.admitted)
		}
	}
	l.EscalatingDelayRejected()
	for limiter, want := range map[string]float64{
		LimiterRequestsPerClient:     3,
		LimiterGuessesPerUser:        1,
		LimiterWrongGuessesPerClient: 4,
		LimiterEscalatingDelay:       1,
	} {
		if got := testutil.ToFloat64(l.metrics.rejections.WithLabelValues(limiter)); got != want {
			t.Errorf("rejections{limiter=%q} = %v, want %v", limiter, got, want)
		}
	}
	if got := testutil.ToFloat64(l.metrics.userStates); got != 1 {
		t.Errorf("user states = %v, want 1 (alice; refused bob holds none)", got)
	}
	for _, c := range []prometheus.Collector{l.metrics.rejections, l.metrics.userStates} {
		if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
			t.Errorf("lint: %v %v", problems, err)
		}
	}
	want := `
# HELP keyvault_ratelimit_user_states Per-user guess buckets held in memory; at most the configured maximum.
# TYPE keyvault_ratelimit_user_states gauge
keyvault_ratelimit_user_states 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "keyvault_ratelimit_user_states"); err != nil {
		t.Error(err)
	}
	// No label but the limiter: never a user, namespace or client.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if lp.GetName() != "limiter" {
					t.Errorf("%s has a label %q", mf.GetName(), lp.GetName())
				}
			}
		}
	}
}

// perMinute is a Rate of n tokens a minute, with the given burst.
func perMinute(n float64, burst int) Rate {
	return Rate{PerSecond: n / 60, Burst: burst}
}

// perSecond is a Rate of n tokens a second, with the given burst.
func perSecond(n float64, burst int) Rate {
	return Rate{PerSecond: n, Burst: burst}
}

// guess admits one guess and keeps its token, as a guess the vault checks.
func guess(l *Limits, client, ns, userID string) error {
	_, err := l.ReserveGuess(client, ns, userID)
	return err
}
