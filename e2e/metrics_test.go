package e2e

import (
	"io/fs"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestMetricFamilies runs traffic over every endpoint and error path, then
// checks that every metric family docs/operating.md lists is exported with the
// labels it promises, that the exposition passes the Prometheus linter,
// and that no label value holds a user ID or the bearer token.
func TestMetricFamilies(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	v := startDev(t, t.TempDir())
	c := newClient(t, v.API, v.Token)
	user, pin, secret := randID("metrics"), randPIN("metrics"), randBytes(32)
	c.mustEnroll(t, http.StatusCreated, user, secret, pin, 2)
	c.mustEnroll(t, http.StatusOK, user, secret, pin, 2)
	c.mustRecover(t, user, pin, secret)
	c.recover(t, user, "wrong-1")
	c.changePIN(t, user, pin, pin+"-new")
	c.recover(t, user, "wrong-2")
	c.recover(t, user, "wrong-3") // locks
	c.recover(t, user, pin+"-new")
	c.status(t, user)
	c.status(t, randID("missing"))
	c.delete(t, user)
	c.recover(t, "bad id", pin)
	newClient(t, v.API, "not-a-token").status(t, user)

	_, text := metrics(t, v.Admin)
	parser := expfmt.NewTextParser(model.LegacyValidation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(text))
	if err != nil {
		t.Fatal(err)
	}
	// keyvault_build_info names the version `keyvault version` prints.
	out, err := exec.Command(keyvaultBin, "version").Output()
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(string(out)); len(f) < 2 || !strings.Contains(text, `keyvault_build_info{goversion="`) || !strings.Contains(text, `version="`+f[1]+`"} 1`) {
		t.Errorf("keyvault_build_info does not name the version %q prints:\n%s", strings.TrimSpace(string(out)), grepLines(text, "keyvault_build_info"))
	}
	gatherer := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		var out []*dto.MetricFamily
		for _, mf := range families {
			out = append(out, mf)
		}
		return out, nil
	})
	if problems, err := testutil.GatherAndLint(gatherer); err != nil || len(problems) > 0 {
		t.Fatalf("metric lint: %v %+v", err, problems)
	}
	for name, labels := range map[string][]string{
		"keyvault_http_requests_total":                {"route", "method", "code"},
		"keyvault_http_request_duration_seconds":      {"route", "method"},
		"keyvault_recoveries_total":                   {"result"},
		"keyvault_pin_changes_total":                  {"result"},
		"keyvault_enrollments_total":                  {"result"},
		"keyvault_deletes_total":                      nil,
		"keyvault_lockouts_total":                     nil,
		"keyvault_integrity_failures_total":           nil,
		"keyvault_hsm_operations_total":               {"member", "op"},
		"keyvault_hsm_operation_duration_seconds":     {"member", "op"},
		"keyvault_hsm_in_flight_operations":           {"member"},
		"keyvault_hsm_member_up":                      {"member"},
		"keyvault_store_transaction_duration_seconds": {"op"},
		"keyvault_ratelimit_rejections_total":         {"limiter"},
		"keyvault_wrap_key_seals":                     {"key_version"},
		"go_goroutines":                               nil,
		"process_cpu_seconds_total":                   nil,
	} {
		mf := families[name]
		if mf == nil || len(mf.GetMetric()) == 0 {
			t.Errorf("metric family %s is missing", name)
			continue
		}
		for _, l := range labels {
			found := false
			for _, lp := range mf.GetMetric()[0].GetLabel() {
				found = found || lp.GetName() == l
			}
			if !found {
				t.Errorf("%s has no label %s", name, l)
			}
		}
	}
	for _, mf := range families {
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if strings.Contains(l.GetValue(), "metrics-") || strings.Contains(l.GetValue(), v.Token) || !model.LabelValue(l.GetValue()).IsValid() {
					t.Errorf("%s{%s=%q}: a user ID or token in a label", mf.GetName(), l.GetName(), l.GetValue())
				}
			}
		}
	}
	want := map[string]float64{
		`keyvault_recoveries_total{result="success"}`:   1,
		`keyvault_recoveries_total{result="wrong_pin"}`: 2,
		`keyvault_recoveries_total{result="locked"}`:    2,
		`keyvault_enrollments_total{result="created"}`:  1,
		`keyvault_enrollments_total{result="replaced"}`: 1,
		`keyvault_lockouts_total`:                       1,
		`keyvault_deletes_total`:                        1,
		`keyvault_pin_changes_total{result="success"}`:  1,
	}
	checkMetricDocs(t, families)
	samples, _ := metrics(t, v.Admin)
	for series, n := range want {
		name, sel, _ := strings.Cut(strings.TrimSuffix(series, "}"), "{")
		labels := map[string]string{}
		if k, val, ok := strings.Cut(sel, "="); ok {
			labels[k] = strings.Trim(val, `"`)
		}
		if got, _ := metricSum(samples, name, labels); got != n {
			t.Errorf("%s = %v, want %v", series, got, n)
		}
	}
	v.Stop()
}

// checkMetricDocs holds the metric list of docs/operating.md (its "Health
// and metrics" section) to the families a served vault exports: every exported
// keyvault_ family is listed, and every listed one is exported or, if it
// only appears on an event (a labelled family with no series yet, the etcd
// driver's), defined in the code.
func checkMetricDocs(t *testing.T, live map[string]*dto.MetricFamily) {
	t.Helper()
	doc, err := os.ReadFile(filepath.Join(moduleRoot, "docs", "operating.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(doc), "\n## Health and metrics\n")
	if !ok {
		t.Fatal(`docs/operating.md has no "## Health and metrics" section`)
	}
	if i := strings.Index(section, "\n#"); i >= 0 {
		section = section[:i]
	}
	familyName := regexp.MustCompile(`keyvault_[a-z0-9_]+`)
	documented := map[string]bool{}
	for _, n := range familyName.FindAllString(section, -1) {
		documented[n] = true
	}
	defined := definedMetricFamilies(t)
	for _, name := range slices.Sorted(maps.Keys(live)) {
		if strings.HasPrefix(name, "keyvault_") && !documented[name] {
			t.Errorf("metric family %s is exported on /metrics but missing from docs/operating.md's metric list (## Health and metrics)", name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(defined)) {
		if !documented[name] && live[name] == nil {
			t.Errorf("metric family %s is defined in the code but missing from docs/operating.md's metric list (## Health and metrics)", name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(documented)) {
		if live[name] == nil && !defined[name] {
			t.Errorf("docs/operating.md's metric list (## Health and metrics) names %s, which the vault neither exports nor defines", name)
		}
	}
	if len(documented) < 30 {
		t.Errorf("docs/operating.md's metric list (## Health and metrics) names only %d families", len(documented))
	}
}

// definedMetricFamilies lists the keyvault_ families the module's non-test
// Go files name in a metric's options (Name: "keyvault_...").
func definedMetricFamilies(t *testing.T) map[string]bool {
	t.Helper()
	nameField := regexp.MustCompile(`Name:\s*"(keyvault_[a-z0-9_]+)"`)
	out := map[string]bool{}
	err := filepath.WalkDir(moduleRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") && path != moduleRoot) {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, m := range nameField.FindAllSubmatch(b, -1) {
			out[string(m[1])] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(out) < 30 {
		t.Fatalf("found only %d metric families in the code: %v", len(out), out)
	}
	return out
}
