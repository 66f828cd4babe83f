package audit

import (
	"bytes"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func readEvents(t *testing.T, path string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var ev map[string]any
		if err := json.Unmarshal(line, &ev); err != nil {
			t.Fatalf("%s: line %q: %v", path, line, err)
		}
		out = append(out, ev)
	}
	return out
}

// TestFileSinkReopen: logrotate renames the file and signals; the events
// before go to the renamed file, the events after to a new one.
func TestFileSinkReopen(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	s, err := Open(path, nil, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	log := s.Logger()
	log.Info("audit", "op", "enroll")
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	log.Info("audit", "op", "recover") // still the renamed file, until reopened
	if err := s.Reopen(); err != nil {
		t.Fatal(err)
	}
	log.Debug("audit", "op", "delete") // every level is written
	old, cur := readEvents(t, path+".1"), readEvents(t, path)
	if len(old) != 2 || old[0]["op"] != "enroll" || old[1]["op"] != "recover" {
		t.Errorf("renamed file: %v", old)
	}
	if len(cur) != 1 || cur[0]["op"] != "delete" {
		t.Errorf("reopened file: %v", cur)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("reopened file: %v, mode %v; want 0600", err, fi.Mode())
	}
}

type failingWriter struct{}

func (failingWriter) Write([]byte) (int, error) { return 0, errors.New("no space left on device") }

// TestWriteErrorsAreCounted: an event that cannot be written is counted
// and reported in the main log, never dropped silently.
func TestWriteErrorsAreCounted(t *testing.T) {
	t.Parallel()
	reg := prometheus.NewRegistry()
	var mainLog bytes.Buffer
	s, err := Open("", failingWriter{}, Options{Registerer: reg, Log: slog.New(slog.NewJSONHandler(&mainLog, nil))})
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		s.Logger().Info("audit", "op", "enroll")
	}
	if n := testutil.ToFloat64(s.errors); n != 3 {
		t.Errorf("keyvault_audit_write_errors_total = %v, want 3", n)
	}
	// Reported once per interval, not once per event.
	if n := strings.Count(mainLog.String(), "audit event not written"); n != 1 || !strings.Contains(mainLog.String(), "no space left on device") {
		t.Errorf("main log:\n%s", mainLog.String())
	}
	if err := testutil.CollectAndCompare(reg, strings.NewReader(`
# HELP keyvault_audit_write_errors_total Audit events that could not be written to the audit sink (log.audit), or a reopen of its file that failed.
# TYPE keyvault_audit_write_errors_total counter
keyvault_audit_write_errors_total 3
`)); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(reg); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

// TestReopenFailureKeepsOldFile: when the path cannot be opened again, the
// events go on to the file open before, and the failure is counted.
func TestReopenFailureKeepsOldFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	sub := filepath.Join(dir, "logs")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(sub, "audit.log")
	s, err := Open(path, nil, Options{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := os.Rename(sub, filepath.Join(dir, "moved")); err != nil {
		t.Fatal(err)
	}
	if err := s.Reopen(); err == nil {
		t.Fatal("Reopen into a directory that is gone succeeded")
	}
	s.Logger().Info("audit", "op", "enroll")
	if evs := readEvents(t, filepath.Join(dir, "moved", "audit.log")); len(evs) != 1 {
		t.Errorf("events in the file open before: %v", evs)
	}
	if n := testutil.ToFloat64(s.errors); n != 1 {
		t.Errorf("keyvault_audit_write_errors_total = %v, want 1", n)
	}
}

func TestStreams(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	s, err := Open("", &buf, Options{})
	if err != nil {
		t.Fatal(err)
	}
	s.Logger().Info("audit", "op", "enroll")
	if !strings.Contains(buf.String(), `"op":"enroll"`) {
		t.Errorf("stream sink wrote %q", buf.String())
	}
	if err := s.Reopen(); err != nil {
		t.Errorf("Reopen of a stream: %v", err)
	}
	for _, d := range []string{Stdout, Stderr} {
		if s, err := Open(d, nil, Options{}); err != nil || s.w == nil {
			t.Errorf("Open(%q): %v", d, err)
		}
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing", "audit.log"), nil, Options{}); err == nil {
		t.Error("Open in a missing directory succeeded")
	}
}
