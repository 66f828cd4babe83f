package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/api"
	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/audit"
	"github.com/keyvault/keyvault/ratelimit"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

func cmdServe(args []string, stderr io.Writer) error {
	fs := newFlags("serve", stderr, "serve --config FILE")
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

// openPool sets the modules' environment and opens every HSM member.
func openPool(cfg *config.Config, reg prometheus.Registerer, log *slog.Logger) (*hsmpool.Pool, error) {
	members, err := memberConfigs(cfg)
	if err != nil {
		return nil, err
	}
	return hsmpool.Open(members, hsmpool.Options{
		Registerer: reg, Logger: log, Profile: vault.Profile(cfg.HSM.Profile),
		QueueTimeout: cfg.RateLimit.HSMQueueTimeout, AdmitPerSession: cfg.RateLimit.AdmittedPerHSMSession,
	})
}

// memberConfigs reads each member's PIN and sets hsm.module_env, which
// PKCS#11 modules such as SoftHSM read when first initialised.
func memberConfigs(cfg *config.Config) ([]hsmpool.MemberConfig, error) {
	for k, v := range cfg.HSM.ModuleEnv {
		if err := os.Setenv(k, v); err != nil {
			return nil, fmt.Errorf("hsm.module_env.%s: %w", k, err)
		}
	}
	var out []hsmpool.MemberConfig
	for _, m := range cfg.HSM.Members {
		pin, err := m.PIN()
		if err != nil {
			return nil, usageError{err}
		}
		out = append(out, hsmpool.MemberConfig{
			Name: m.Name, Module: m.Module, TokenLabel: m.TokenLabel, PIN: pin, MaxSessions: m.MaxSessions,
		})
	}
	return out, nil
}

// serve runs the vault until SIGINT or SIGTERM, then shuts down within a
// deadline: in-flight requests finish (their guesses are already counted
// before any answer), then the HSMs and the store close. bound, if set, is
// called with the addresses both listeners are bound to (the kernel's
// choice where port 0 was asked), before they serve; its error stops the
// vault.
func serve(cfg *config.Config, stderr io.Writer, bound func(api, admin string) error) error {
	if err := checkFileLimit(cfg); err != nil {
		return err
	}
	// The log and, by default, the audit events share one stream; whole
	// lines from either must not interleave.
	out := &syncWriter{w: stderr}
	log := newLogger(cfg, out)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	sink, err := audit.Open(cfg.Log.Audit, out, audit.Options{Registerer: reg, Log: log})
	if err != nil {
		return err
	}
	defer sink.Close()
	auditLog := sink.Logger()

	store, err := openStore(cfg, reg)
	if err != nil {
		return err
	}
	defer store.Close()
	pool, err := openPool(cfg, reg, log)
	if err != nil {
		return err
	}
	defer pool.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	reopenOnHUP(ctx, sink, cfg.Log.Audit, log)
	// Always exported, so an alert on it works whether anchoring is on.
	refused := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "keyvault_anchor_refused",
		Help: "1 while the vault refuses to serve its store because the rollback check failed, by reason.",
	}, []string{"reason"})
	reg.MustRegister(refused)
	for _, r := range anchor.Reasons {
		refused.WithLabelValues(string(r))
	}
	if cfg.Store.Anchored() && store.bolt != nil { // never on etcd
		if err := anchorStore(ctx, cfg, store.bolt, pool, reg, refused, log); err != nil {
			return err
		}
	}
	rl := cfg.RateLimit
	v, err := vault.New(ctx, store, pool, vault.Options{
		DefaultMaxAttempts: cfg.Budget.DefaultMaxAttempts,
		MaxAttemptsLimit:   cfg.Budget.MaxAttemptsLimit,
		Registerer:         reg,
		Logger:             log,
		EscalatingDelay:    vault.EscalatingDelay{FreeGuesses: rl.EscalatingDelay.FreeGuesses, Base: rl.EscalatingDelay.Base},
		Keys:               pool,
		Cluster:            clusterOptions(cfg),
	})
	if err != nil {
		return err
	}
	clients := make([]api.Client, 0, len(cfg.Clients))
	for _, c := range cfg.Clients {
		clients = append(clients, api.Client{Name: c.Name, Namespace: c.Namespace, TokenHashes: c.TokenHashes()})
	}
	apiHandler := api.NewRouter(v, api.Options{Clients: clients, Registerer: reg, Logger: log, Audit: auditLog, Admission: pool, Limits: ratelimit.New(ratelimit.Config{
		GuessesPerUser:           bucket(rl.GuessesPerUser),
		RequestsPerClient:        bucket(rl.RequestsPerClient),
		WrongGuessesPerClient:    bucket(rl.WrongGuessesPerClient),
		HSMSharePerClientPercent: rl.HSMSharePerClientPercent,
	}, ratelimit.Options{Registerer: reg, HSMCapacity: hsmCapacity(cfg, pool)})})
	keys := &keyAdmin{ctx: ctx, pool: pool, v: v}
	watchKeys(ctx, keys, log)
	admin := api.NewAdminRouterWith(reg, func() error {
		if err := store.Ping(ctx); err != nil {
			return fmt.Errorf("store: %w", err)
		}
		return pool.Ready()
	}, api.AdminOptions{TokenHashes: cfg.AdminTokenHashes(), Keys: keys, Logger: log, Audit: auditLog})
	if cfg.AdminPprof {
		admin = api.WithProfiler(admin)
	}
	apiL, err := openAPI(cfg, apiHandler, log)
	if err != nil {
		return err
	}
	adminL, err := openAdmin(cfg, admin, log)
	if err != nil {
		apiL.ln.Close()
		return err
	}
	if bound != nil {
		if err := bound(apiL.addr(), adminL.addr()); err != nil {
			apiL.ln.Close()
			adminL.ln.Close()
			return err
		}
	}
	errs := make(chan error, 2)
	go func() { errs <- apiL.serve() }()
	go func() { errs <- adminL.serve() }()
	log.Info("keyvault serving", "version", versionString(), "api", apiL.addr(), "admin", adminL.addr(),
		"tls", cfg.TLS != nil, "admin_tls", cfg.AdminTLS != nil, "hsm_members_healthy", pool.Healthy(),
		"hsm_profile", pool.WrapProfile(pool.KeyVersion(vault.RoleWrap)), "store", store.desc)

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-errs:
		return fmt.Errorf("server: %w", err)
	}
	shutdown, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	err = errors.Join(apiL.srv.Shutdown(shutdown), adminL.srv.Shutdown(shutdown))
	log.Info("stopped")
	return err
}

// reopenOnHUP reopens a file audit sink on SIGHUP, for logrotate; the key
// reload (watchKeys) gets the same signal through its own channel.
func reopenOnHUP(ctx context.Context, sink *audit.Sink, dest string, log *slog.Logger) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				// A failure is counted and logged by the sink.
				if err := sink.Reopen(); err == nil && dest != audit.Stdout && dest != audit.Stderr && dest != "" {
					log.Info("audit log reopened on SIGHUP", "path", dest)
				}
			}
		}
	}()
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

// anchorStore runs the rollback check. A refused store is never served:
// the admin listener alone answers, /readyz with the reason, until the
// process is stopped (see "keyvault anchor" for the way out).
func anchorStore(ctx context.Context, cfg *config.Config, store *boltstore.Store, pool *hsmpool.Pool, reg *prometheus.Registry, refused *prometheus.GaugeVec, log *slog.Logger) error {
	keys, err := vault.DeriveAnchorKeys(ctx, pool)
	if err != nil {
		return err
	}
	members, err := anchorMembers(ctx, pool, log)
	if err != nil {
		return err
	}
	dec, err := store.Anchor(ctx, keys, members, reg, log)
	reason, isRefused := anchor.IsRefused(err)
	switch {
	case err == nil && dec.Adopted:
		log.Warn("rollback anchoring: adopting a store kept with anchoring off, as it is; from now on a rollback behind this point is refused",
			"epoch", dec.Meta.Epoch, "seq", dec.Meta.Seq)
		return nil
	case err == nil:
		log.Info("rollback check passed", "epoch", dec.Meta.Epoch, "seq", dec.Meta.Seq, "fresh", dec.Fresh,
			"one_batch_past_anchor", dec.Past, "ignored_anchor_objects", dec.Ignored)
		return nil
	case !isRefused:
		return err
	}
	refused.WithLabelValues(string(reason)).Set(1)
	adminL, lerr := openAdmin(cfg, api.NewAdminRouter(reg, func() error { return err }), log)
	if lerr != nil {
		return errors.Join(err, lerr)
	}
	log.Error("refusing to serve the store: rollback check failed", "reason", string(reason), "error", err.Error(),
		"admin", adminL.addr())
	go adminL.serve()
	<-ctx.Done()
	adminL.srv.Close()
	return err
}

// clusterOptions: on etcd the nodes share the key lifecycle through the
// store; a write passes the fence at most one request timeout before its
// last send, so twice that bounds how long it takes to land.
func clusterOptions(cfg *config.Config) vault.ClusterOptions {
	e := cfg.Store.Etcd
	if cfg.Store.Driver != config.DriverEtcd || e == nil {
		return vault.ClusterOptions{}
	}
	return vault.ClusterOptions{Shared: true, Heartbeat: e.HeartbeatInterval, WriteBound: 2 * e.RequestTimeout}
}

func bucket(b config.Bucket) ratelimit.Rate {
	return ratelimit.Rate{PerSecond: b.Rate(), Burst: b.Burst}
}

// hsmCapacity is the pool's admission capacity as the per-client HSM share
// sees it: admitted_per_hsm_session times the members' sessions, scaled to
// the members in service (exact when they have the same max_sessions).
func hsmCapacity(cfg *config.Config, pool *hsmpool.Pool) func() int {
	sessions := 0
	for _, m := range cfg.HSM.Members {
		sessions += max(m.MaxSessions, 1)
	}
	all := sessions * cfg.RateLimit.AdmittedPerHSMSession
	n := len(cfg.HSM.Members)
	return func() int { return all * pool.Healthy() / n }
}
