package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/internal/server"
)

func cmdServe(args []string, stderr io.Writer) error {
	fs := newFlags("serve", stderr)
	path := fs.String("config", "", "the YAML config `file` (required)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *path == "" {
		return usageError{errors.New("--config is required")}
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	return serve(cfg, stderr, nil)
}

// serveGCPercent is the garbage collector's growth target while serving,
// unless GOGC is set. The vault's live heap is a few MB, so at Go's
// default of 100 a loaded vault collects dozens of times a second and
// spends about a tenth of its CPU on it; at 400 the heap may grow to five
// times its live size, a few tens of MB, for a fraction of that cost.
const serveGCPercent = 400

// tuneGC sets the garbage collector's target for serving, leaving it to
// the environment when GOGC is set there. It returns the target now in
// force.
func tuneGC() int {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(serveGCPercent)
	}
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	return int(s[0].Value.Uint64())
}

// serve runs the vault until SIGINT or SIGTERM. bound is server.Options.Bound.
func serve(cfg *config.Config, stderr io.Writer, bound func(api, admin string) error) error {
	tuneGC()
	// The log and, by default, the audit events share one stream; whole
	// lines from either must not interleave.
	out := &syncWriter{w: stderr}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// So that dashboards and alerts can tell which build each instance runs.
	buildInfo := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "keyvault_build_info",
		Help: "Always 1, labelled with this binary's version and the Go release that built it.",
	}, []string{"version", "goversion"})
	buildInfo.WithLabelValues(buildVersion(), runtime.Version()).Set(1)
	reg.MustRegister(buildInfo)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	srv := server.New(cfg, newLogger(cfg, out), reg, server.Options{AuditOut: out, Bound: bound, Version: versionString()})
	return srv.Run(ctx)
}

// loadConfig reads and validates a config; its errors are usage errors.
func loadConfig(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if err != nil {
		return nil, usageError{err}
	}
	return cfg, nil
}

func newLogger(cfg *config.Config, w io.Writer) *slog.Logger {
	o := &slog.HandlerOptions{Level: cfg.Log.SlogLevel()}
	if cfg.Log.Format == "text" {
		return slog.New(slog.NewTextHandler(w, o))
	}
	return slog.New(slog.NewJSONHandler(w, o))
}

// syncWriter serializes writes to w, so that two loggers can share it.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
