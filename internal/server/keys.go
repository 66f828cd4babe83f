package server

import (
	"context"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/vault"
)

// keyAdmin joins the pool and the vault for the admin listener's key
// lifecycle endpoints (api.KeyAdmin).
type keyAdmin struct {
	ctx  context.Context // the process's lifetime: it ends the re-wrap job
	pool *hsmpool.Pool
	v    *vault.Vault
}

// Reload reloads this node's keys and announces a newer version to the
// nodes sharing the store, which reload within a heartbeat or two.
func (k *keyAdmin) Reload(ctx context.Context) (map[vault.KeyRole]uint32, error) {
	return k.v.ReloadKeys(ctx)
}

func (k *keyAdmin) Usage(ctx context.Context) (vault.KeyUsage, error) { return k.v.KeyUsage(ctx) }

func (k *keyAdmin) Retire(ctx context.Context, version uint32) (map[string][]string, error) {
	var destroyed map[string][]string
	err := k.v.RetireKeys(ctx, version, func(version uint32) error {
		var err error
		destroyed, err = k.pool.Retire(version)
		return err
	})
	return destroyed, err
}

func (k *keyAdmin) StartRewrap(perSecond float64) (vault.RewrapStatus, bool) {
	return k.v.StartRewrap(k.ctx, perSecond)
}

func (k *keyAdmin) RewrapStatus() vault.RewrapStatus { return k.v.RewrapStatus() }

// watchKeys runs the key lifecycle of this node: one round before
// serving (the key state read, the heartbeat published), then one every
// heartbeat (vault.RunKeySync); it reloads the HSM keys on SIGHUP (the
// other trigger is POST /admin/keys/reload), and counts records by key
// version for the records-by-version gauges: once before serving, so that
// the first scrape has them, then every minute.
func watchKeys(ctx context.Context, k *keyAdmin, log *slog.Logger) {
	if err := k.v.SyncKeys(ctx); err != nil {
		// On etcd the node seals nothing new until a round succeeds.
		log.Warn("first key sync round failed; retrying every heartbeat", "error", err.Error())
	}
	go k.v.RunKeySync(ctx)
	count := func() {
		if _, err := k.v.KeyUsage(ctx); err != nil && ctx.Err() == nil {
			log.Warn("counting records by key version", "error", err.Error())
		}
	}
	count()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	go func() {
		defer signal.Stop(hup)
		tick := time.NewTicker(time.Minute)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				count()
			case <-hup:
				if vs, err := k.v.ReloadKeys(ctx); err != nil {
					log.Error("key reload on SIGHUP refused", "error", err.Error())
				} else {
					log.Info("keys reloaded on SIGHUP", "wrap_version", vs[vault.RoleWrap], "pin_version", vs[vault.RolePIN])
				}
			}
		}
	}()
}
