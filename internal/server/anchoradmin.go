package server

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/audit"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// AnchorAdmin is what the anchor commands work on, with the vault
// stopped: the bbolt store of a config, opened without anchoring so that
// a store the check refuses opens too, and the rollback anchor keys and
// members of its HSM pool.
type AnchorAdmin struct {
	cfg     *config.Config
	log     *slog.Logger
	store   *boltstore.Store
	pool    *hsmpool.Pool
	keys    anchor.Keys
	members *hsmpool.AnchorMembers
}

// OpenAnchorAdmin opens the store of cfg, then its HSM pool, derives the
// anchor keys from the root key and finds the members that keep anchors
// (logging each left out to log). A store that another process holds is a
// StoreInUseError; an etcd store is a config error: anchoring is bbolt
// only.
func OpenAnchorAdmin(ctx context.Context, cfg *config.Config, log *slog.Logger) (_ *AnchorAdmin, err error) {
	if cfg.Store.Driver == config.DriverEtcd {
		return nil, configError{errors.New("rollback anchoring is bbolt only; this config uses store.driver etcd")}
	}
	a := &AnchorAdmin{cfg: cfg, log: log}
	defer func() {
		if err != nil {
			a.Close()
		}
	}()
	if a.store, err = OpenBolt(boltstore.Options{Path: cfg.Store.Path}); err != nil {
		return nil, err
	}
	if a.pool, err = OpenPool(cfg, prometheus.NewRegistry(), slog.New(slog.DiscardHandler)); err != nil {
		return nil, err
	}
	if a.keys, err = vault.DeriveAnchorKeys(ctx, a.pool); err != nil {
		return nil, err
	}
	if a.members, err = AnchorMembers(ctx, a.pool, log); err != nil {
		return nil, err
	}
	return a, nil
}

// Close closes the store, then the pool.
func (a *AnchorAdmin) Close() error {
	var errs []error
	if a.store != nil {
		errs = append(errs, a.store.Close())
	}
	if a.pool != nil {
		errs = append(errs, a.pool.Close())
	}
	return errors.Join(errs...)
}

// Status runs the start-up check without changing anything: each member's
// anchors, the store's position and the verdict (Status.Err).
func (a *AnchorAdmin) Status(ctx context.Context) (boltstore.Status, error) {
	return a.store.AnchorStatus(ctx, a.keys, a.members)
}

// Accept makes the restored store the vault's truth
// (boltstore.Store.AcceptRestore) and writes the accept, made or failed,
// with reason to the config's audit trail; auditOut is the trail's stream
// when log.audit names the log's. The trail opens first: an accept it
// cannot record is not made.
func (a *AnchorAdmin) Accept(ctx context.Context, reason string, auditOut io.Writer) (boltstore.Accepted, error) {
	sink, err := audit.Open(a.cfg.Log.Audit, auditOut, audit.Options{Log: a.log})
	if err != nil {
		return boltstore.Accepted{}, err
	}
	defer sink.Close()
	acc, err := a.store.AcceptRestore(ctx, a.keys, a.members)
	if err != nil {
		sink.Logger().Info("audit", "client", "cli", "op", "rollback_accept", "result", "failed", "reason", reason)
		return acc, err
	}
	refused, _ := anchor.IsRefused(acc.Before.Err)
	sink.Logger().Info("audit", "client", "cli", "op", "rollback_accept", "result", "success", "reason", reason,
		"epoch", acc.Epoch, "seq", acc.Seq, "batches_lost", acc.BatchesLost, "refused_for", string(refused),
		"members", strings.Join(acc.Members, ","))
	if a.cfg.Log.Audit != "" {
		// The trail is elsewhere: the log says it too.
		a.log.Warn("anchor accept: the restored store is now the vault's truth",
			"epoch", acc.Epoch, "seq", acc.Seq, "batches_lost", acc.BatchesLost, "audit_log", a.cfg.Log.Audit)
	}
	return acc, nil
}
