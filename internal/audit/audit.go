// Package audit is the sink of the audit trail: one JSON object per line
// for each decision the vault takes (docs/audit.md lists the events and
// their fields), written whatever the log level, to stdout, stderr, the
// log's own stream or a file.
//
// A file is opened for appending and reopened by [Sink.Reopen] (on SIGHUP),
// so logrotate can rename it and signal the vault. Writes are plain appends,
// one write(2) per event, not fsynced: a written event survives a crash of
// the process, not necessarily of the machine. A write that fails is never
// silent: it is counted in keyvault_audit_write_errors_total and reported
// in the main log.
package audit

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

// Destinations of [Open] besides a file path.
const (
	Stdout = "stdout"
	Stderr = "stderr"
)

// errorReportEvery bounds how often a failing sink reports to the main log:
// a full disk fails every event, and the counter has them all.
const errorReportEvery = 10 * time.Second

// Options configure a Sink.
type Options struct {
	Registerer prometheus.Registerer // default: a private registry
	// Log receives the sink's own failures. Default slog.Default().
	Log *slog.Logger
}

// Sink is where audit events are written. It is an io.Writer that takes
// one event per Write, safe for concurrent use.
type Sink struct {
	path   string // the file, or "" for a stream
	errors prometheus.Counter
	log    *slog.Logger

	mu         sync.Mutex
	w          io.Writer
	f          *os.File // w when path != ""
	lastReport time.Time
}

// Open returns the sink for dest: Stdout, Stderr, "" for stream (the main
// log's, which the caller must then not write concurrently except through
// this sink or a writer that serializes whole lines), or the path of a file
// to append to, created 0600 if absent.
func Open(dest string, stream io.Writer, opts Options) (*Sink, error) {
	if opts.Registerer == nil {
		opts.Registerer = prometheus.NewRegistry()
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	s := &Sink{
		log: opts.Log,
		errors: promauto.With(opts.Registerer).NewCounter(prometheus.CounterOpts{
			Name: "keyvault_audit_write_errors_total",
			Help: "Audit events that could not be written to the audit sink (log.audit), or a reopen of its file that failed.",
		}),
	}
	switch dest {
	case "":
		s.w = stream
	case Stdout:
		s.w = os.Stdout
	case Stderr:
		s.w = os.Stderr
	default:
		f, err := openFile(dest)
		if err != nil {
			return nil, err
		}
		s.path, s.w, s.f = dest, f, f
	}
	return s, nil
}

func openFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	return f, nil
}

// Logger returns the logger of audit events: JSON, every level.
func (s *Sink) Logger() *slog.Logger {
	return slog.New(slog.NewJSONHandler(s, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// Write writes one event. A failure is counted and reported, and the
// event's bytes are reported written, so that the logger goes on with the
// next event (slog drops a handler's error anyway).
func (s *Sink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.w.Write(p)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	if err != nil {
		s.failed("audit event not written", err)
	}
	return len(p), nil
}

// failed counts a failure and reports it to the main log, at most every
// errorReportEvery. s.mu is held.
func (s *Sink) failed(msg string, err error) {
	s.errors.Inc()
	if now := time.Now(); now.Sub(s.lastReport) >= errorReportEvery {
		s.lastReport = now
		s.log.Error(msg, "sink", s.desc(), "error", err.Error())
	}
}

func (s *Sink) desc() string {
	if s.path != "" {
		return s.path
	}
	return "stream"
}

// Reopen opens the file again by its path, for logrotate: events written
// after it go to a file at the path, created if it was renamed away. If
// the open fails, events keep going to the file open before, and the
// failure is counted and reported. A stream sink has nothing to reopen.
func (s *Sink) Reopen() error {
	if s.path == "" {
		return nil
	}
	f, err := openFile(s.path)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err != nil {
		s.failed("audit log not reopened; writing on to the file open before", err)
		return err
	}
	old := s.f
	s.w, s.f = f, f
	if err := old.Close(); err != nil {
		return fmt.Errorf("close the audit log open before: %w", err)
	}
	return nil
}

// Close closes a file sink.
func (s *Sink) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f, s.w = nil, errWriter{}
	return err
}

type errWriter struct{}

func (errWriter) Write([]byte) (int, error) { return 0, errors.New("audit sink closed") }
