package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/api"
	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/audit"
	"github.com/keyvault/keyvault/ratelimit"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// Options configure a Server beside its config.
type Options struct {
	// AuditOut is the stream audit events go to when log.audit is "" (the
	// log's stream): the caller serializes its writes with the log's, so
	// that whole lines from either never interleave. Default os.Stderr.
	AuditOut io.Writer
	// Bound, if set, is called with the addresses both listeners are bound
	// to (the kernel's choice where port 0 was asked), before they serve;
	// its error stops the vault. It is not called when the store is
	// refused.
	Bound func(api, admin string) error
	// Version is logged at start.
	Version string
}

// Server is one keyvault process's service: the store, the HSM pool, the
// vault and its two listeners, wired from a config.
type Server struct {
	cfg  *config.Config
	log  *slog.Logger
	reg  *prometheus.Registry
	opts Options
}

// New returns a Server for cfg, which must be validated (config.Load).
// log is the service log; reg receives every metric and is what the admin
// listener's /metrics serves. Nothing is opened until Run.
func New(cfg *config.Config, log *slog.Logger, reg *prometheus.Registry, opts Options) *Server {
	if opts.AuditOut == nil {
		opts.AuditOut = os.Stderr
	}
	return &Server{cfg: cfg, log: log, reg: reg, opts: opts}
}

// Run opens the HSMs and the store and serves until ctx ends, then shuts
// down within a deadline: in-flight requests finish (their guesses are
// already counted before any answer), then the store and the HSMs close.
// SIGHUP reloads the HSM keys and reopens a file audit sink while it runs.
//
// A store the rollback check refuses is never served: the admin listener
// alone answers, /readyz with the reason, until ctx ends; Run then
// returns the refusal (see "keyvault anchor" for the way out).
func (s *Server) Run(ctx context.Context) error {
	cfg, log, reg := s.cfg, s.log, s.reg
	// logrotate and "systemctl reload" send SIGHUP at any time. From here
	// until Run returns, a start-up and a drain included, it never takes
	// its default action, which would end the process mid-request.
	held := make(chan os.Signal, 1)
	signal.Notify(held, syscall.SIGHUP)
	defer signal.Stop(held)
	if err := checkFileLimit(cfg); err != nil {
		return err
	}
	sink, err := audit.Open(cfg.Log.Audit, s.opts.AuditOut, audit.Options{Registerer: reg, Log: log})
	if err != nil {
		return err
	}
	defer sink.Close()
	auditLog := sink.Logger()

	reopenCtx, stopReopen := context.WithCancel(ctx)
	defer stopReopen()
	reopenOnHUP(reopenCtx, sink, cfg.Log.Audit, log)

	pool, err := OpenPool(cfg, reg, log)
	if err != nil {
		return err
	}
	defer pool.Close()

	// The goroutines started below end with ctx, before the pool closes.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Always exported, so an alert on it works whether anchoring is on.
	refused := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "keyvault_anchor_refused",
		Help: "1 while the vault refuses to serve its store because the rollback check failed, by reason.",
	}, []string{"reason"})
	reg.MustRegister(refused)
	for _, r := range anchor.Reasons {
		refused.WithLabelValues(string(r))
	}
	anc, err := anchoring(ctx, cfg, pool, log)
	if err != nil {
		return err
	}
	store, err := openStore(cfg, reg, anc)
	if reason, ok := anchor.IsRefused(err); ok {
		return refuseStore(ctx, cfg, reg, refused, reason, err, log)
	}
	if err != nil {
		return err
	}
	// Closed before the pool: writes it finishes still anchor.
	defer store.Close()
	rl := cfg.RateLimit
	// The driver itself, not its wrapper: the vault looks for what it can
	// do beyond vault.Store (vault.EarlyStore).
	v, err := vault.New(ctx, store.driver, pool, vault.Options{
		Budget:     budget(cfg.Budget),
		Registerer: reg,
		Logger:     log,
		Keys:       pool,
		Cluster:    clusterOptions(cfg),
	})
	if err != nil {
		return err
	}
	clients := make([]api.Client, 0, len(cfg.Clients))
	for _, c := range cfg.Clients {
		clients = append(clients, api.Client{Name: c.Name, Namespace: c.Namespace, TokenHashes: c.TokenHashes()})
	}
	limits := ratelimit.New(ratelimit.Config{
		GuessesPerUser:           bucket(rl.GuessesPerUser),
		RequestsPerClient:        bucket(rl.RequestsPerClient),
		WrongGuessesPerClient:    bucket(rl.WrongGuessesPerClient),
		HSMSharePerClientPercent: rl.HSMSharePerClientPercent,
	}, ratelimit.Options{Registerer: reg, HSMCapacity: hsmCapacity(cfg, pool)})
	apiHandler := api.NewRouter(v, api.Options{Clients: clients, Registerer: reg, Logger: log, Audit: auditLog, Admission: pool,
		Limits: limits, RequestTimeout: requestTimeout(cfg.HTTPTimeouts.Write)})
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
	if s.opts.Bound != nil {
		if err := s.opts.Bound(apiL.addr(), adminL.addr()); err != nil {
			apiL.ln.Close()
			adminL.ln.Close()
			return err
		}
	}
	errs := make(chan error, 2)
	go func() { errs <- apiL.serve() }()
	go func() { errs <- adminL.serve() }()
	log.Info("keyvault serving", "version", s.opts.Version, "api", apiL.addr(), "admin", adminL.addr(),
		"tls", cfg.TLS != nil, "admin_tls", cfg.AdminTLS != nil, "hsm_members_healthy", pool.Healthy(),
		"hsm_profile", pool.WrapProfile(pool.KeyVersion(vault.RoleWrap)), "store", store.desc)

	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case err := <-errs:
		apiL.srv.Close()
		adminL.srv.Close()
		return fmt.Errorf("server: %w", err)
	}
	shutdown, stopShutdown := context.WithTimeout(context.Background(), 20*time.Second)
	defer stopShutdown()
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

// anchoring is what the bbolt store needs for rollback anchoring: the
// keys derived from the HSM root key and the members that keep anchors.
// It is nil when anchoring is off (always on etcd).
func anchoring(ctx context.Context, cfg *config.Config, pool *hsmpool.Pool, log *slog.Logger) (*boltstore.Anchoring, error) {
	if !cfg.Store.Anchored() {
		return nil, nil
	}
	keys, err := vault.DeriveAnchorKeys(ctx, pool)
	if err != nil {
		return nil, err
	}
	members, err := AnchorMembers(ctx, pool, log)
	if err != nil {
		return nil, err
	}
	return &boltstore.Anchoring{Keys: keys, Members: members, Log: log}, nil
}

// refuseStore keeps a store the rollback check refused from being
// served: the admin listener alone answers, /readyz with the reason,
// until ctx ends; then the refusal is returned.
func refuseStore(ctx context.Context, cfg *config.Config, reg *prometheus.Registry, refused *prometheus.GaugeVec, reason anchor.Reason, err error, log *slog.Logger) error {
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

// budget is the vault's guess budget as the config's budget section sets it.
func budget(b config.Budget) vault.Budget {
	return vault.Budget{
		DefaultMaxAttempts: b.DefaultMaxAttempts,
		MaxAttemptsLimit:   b.MaxAttemptsLimit,
		EscalatingDelay:    vault.EscalatingDelay{FreeGuesses: b.EscalatingDelay.FreeGuesses, Base: b.EscalatingDelay.Base},
	}
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

// requestTimeout bounds an API request's work in the vault: five sixths of
// the write timeout, at most 25 s, so that its answer, a counted guess's
// included, is written before the connection's write deadline.
func requestTimeout(write time.Duration) time.Duration {
	return min(25*time.Second, write*5/6)
}
