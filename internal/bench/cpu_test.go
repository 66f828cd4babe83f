package bench

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeStat writes a /proc/PID/stat line under root, for a process whose
// command name holds spaces and parentheses, as a renamed thread's may.
func writeStat(t *testing.T, root string, pid int, utime, stime int) {
	t.Helper()
	dir := filepath.Join(root, fmt.Sprint(pid))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Fields after the command: state, ppid, pgrp, session, tty_nr,
	// tpgid, flags, minflt, cminflt, majflt, cmajflt, utime, stime, ...
	line := fmt.Sprintf("%d (key vault) (x) S 1 %d %d 0 -1 4194560 1000 0 0 0 %d %d 0 0 20 0 12 0 12345 1000000 500 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n",
		pid, pid, pid, utime, stime)
	if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestProcCPU(t *testing.T) {
	root := t.TempDir()
	writeStat(t, root, 4242, 150, 25)
	read, err := ProcCPU(root, 4242)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := read(); err != nil || got != 1750*time.Millisecond {
		t.Fatalf("CPU %v, %v; want 1.75s (175 ticks of 10 ms)", got, err)
	}
	writeStat(t, root, 4242, 400, 100)
	if got, err := read(); err != nil || got != 5*time.Second {
		t.Fatalf("CPU after more work %v, %v; want 5s", got, err)
	}
	if _, err := ProcCPU(root, 4243); err == nil || !strings.Contains(err.Error(), "process 4243") {
		t.Fatalf("a process that is not there: %v", err)
	}
	if err := os.RemoveAll(filepath.Join(root, "4242")); err != nil {
		t.Fatal(err)
	}
	if _, err := read(); err == nil {
		t.Fatal("a process that exited still reads")
	}
}

// The bench's own process, read from the real /proc, has used some CPU.
func TestProcCPUSelf(t *testing.T) {
	read, err := ProcCPU("/proc", os.Getpid())
	if err != nil {
		t.Fatalf("read this process's CPU from /proc: %v", err)
	}
	if _, err := read(); err != nil {
		t.Fatal(err)
	}
}

const metricsText = `# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 42
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.34
# HELP keyvault_http_requests_total Requests.
# TYPE keyvault_http_requests_total counter
keyvault_http_requests_total{code="200",method="POST",route="/v1/backups/{user_id}/recover"} 1234
`

func TestParseCPUMetric(t *testing.T) {
	if got, err := parseCPUMetric(strings.NewReader(metricsText)); err != nil || got != 12.34 {
		t.Fatalf("parse: %v, %v; want 12.34", got, err)
	}
	for name, text := range map[string]string{
		"absent":     "# TYPE go_goroutines gauge\ngo_goroutines 42\n",
		"not a text": "<html>admin</html>\n",
	} {
		if _, err := parseCPUMetric(strings.NewReader(text)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestMetricsCPU(t *testing.T) {
	cpu := 12.34
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprint(w, strings.Replace(metricsText, "12.34", fmt.Sprint(cpu), 1))
	}))
	defer srv.Close()
	read, err := MetricsCPU(AdminMetricsURL(srv.URL), nil)
	if err != nil {
		t.Fatal(err)
	}
	cpu = 20.5
	if got, err := read(); err != nil || got != 20500*time.Millisecond {
		t.Fatalf("CPU %v, %v; want 20.5s", got, err)
	}
	if _, err := MetricsCPU(srv.URL+"/elsewhere", nil); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("a URL that is not /metrics: %v", err)
	}
}

func TestAdminMetricsURL(t *testing.T) {
	for in, want := range map[string]string{
		"http://127.0.0.1:9090":          "http://127.0.0.1:9090/metrics",
		"http://127.0.0.1:9090/":         "http://127.0.0.1:9090/metrics",
		"https://admin:9443/metrics":     "https://admin:9443/metrics",
		"http://127.0.0.1:9090/prom/all": "http://127.0.0.1:9090/prom/all",
	} {
		if got := AdminMetricsURL(in); got != want {
			t.Errorf("AdminMetricsURL(%q) = %q, want %q", in, got, want)
		}
	}
}
