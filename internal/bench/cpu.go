package bench

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/procfs"
)

// CPUReader reads the CPU time (user and system) a process has used since
// it started. loadgen reads it as the measured window opens and once its
// last operation has ended.
type CPUReader func() (time.Duration, error)

// ProcCPU reads the CPU time of process pid from procRoot/pid/stat
// (procRoot is /proc but in tests): its utime and stime, in the kernel's
// clock ticks (10 ms). The process must run on this machine.
func ProcCPU(procRoot string, pid int) (CPUReader, error) {
	fs, err := procfs.NewFS(procRoot)
	if err != nil {
		return nil, err
	}
	read := func() (time.Duration, error) {
		p, err := fs.Proc(pid)
		if err != nil {
			return 0, fmt.Errorf("process %d: %w", pid, err)
		}
		st, err := p.Stat()
		if err != nil {
			return 0, fmt.Errorf("process %d: %w", pid, err)
		}
		return time.Duration(st.CPUTime() * float64(time.Second)), nil
	}
	if _, err := read(); err != nil {
		return nil, err
	}
	return read, nil
}

// cpuMetric is the process collector's counter of CPU seconds, which the
// vault's admin listener exports (with the kernel's 10 ms resolution).
const cpuMetric = "process_cpu_seconds_total"

// MetricsCPU reads the CPU time of the process behind a Prometheus
// /metrics endpoint (metricsURL, such as http://127.0.0.1:9090/metrics)
// from its process_cpu_seconds_total. tc, when not nil, is the TLS set-up
// of an https:// URL: the CAs its certificate chains to, and a client
// certificate for an admin listener under mTLS. The process may run on
// another machine.
func MetricsCPU(metricsURL string, tc *tls.Config) (CPUReader, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	if tc != nil {
		tr.TLSClientConfig = tc
	}
	hc := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	read := func() (time.Duration, error) {
		req, err := http.NewRequestWithContext(context.Background(), http.MethodGet, metricsURL, nil)
		if err != nil {
			return 0, err
		}
		// The text format, which every Prometheus client library serves.
		req.Header.Set("Accept", "text/plain;version=0.0.4")
		resp, err := hc.Do(req)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("%s: %s", metricsURL, resp.Status)
		}
		s, err := parseCPUMetric(resp.Body)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", metricsURL, err)
		}
		return time.Duration(s * float64(time.Second)), nil
	}
	if _, err := read(); err != nil {
		return nil, err
	}
	return read, nil
}

// parseCPUMetric reads process_cpu_seconds_total from the Prometheus text
// format.
func parseCPUMetric(r io.Reader) (float64, error) {
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(r)
	if err != nil {
		return 0, fmt.Errorf("not the Prometheus text format: %w", err)
	}
	f, ok := families[cpuMetric]
	if !ok || len(f.GetMetric()) != 1 || f.GetMetric()[0].GetCounter() == nil {
		return 0, errors.New("no " + cpuMetric + " counter (is it the vault's admin listener?)")
	}
	return f.GetMetric()[0].GetCounter().GetValue(), nil
}

// AdminMetricsURL is the /metrics URL of an admin listener's base URL
// (http://127.0.0.1:9090), or the URL itself when it names a path.
func AdminMetricsURL(admin string) string {
	if i := strings.Index(admin, "://"); i >= 0 && strings.Contains(admin[i+3:], "/") && !strings.HasSuffix(admin, "/") {
		return admin
	}
	return strings.TrimRight(admin, "/") + "/metrics"
}
