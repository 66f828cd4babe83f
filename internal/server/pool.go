package server

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/vault"
)

// OpenPool sets the modules' environment and opens every HSM member.
func OpenPool(cfg *config.Config, reg prometheus.Registerer, log *slog.Logger) (*hsmpool.Pool, error) {
	members, err := MemberConfigs(cfg)
	if err != nil {
		return nil, err
	}
	return hsmpool.Open(members, hsmpool.Options{
		Registerer: reg, Logger: log, Profile: vault.Profile(cfg.HSM.Profile),
		QueueTimeout: cfg.RateLimit.HSMQueueTimeout, AdmitPerSession: cfg.RateLimit.AdmittedPerHSMSession,
	})
}

// MemberConfigs reads each member's PIN and sets hsm.module_env, which
// PKCS#11 modules such as SoftHSM read when first initialised.
func MemberConfigs(cfg *config.Config) ([]hsmpool.MemberConfig, error) {
	for k, v := range cfg.HSM.ModuleEnv {
		if err := os.Setenv(k, v); err != nil {
			return nil, fmt.Errorf("hsm.module_env.%s: %w", k, err)
		}
	}
	var out []hsmpool.MemberConfig
	for _, m := range cfg.HSM.Members {
		pin, err := m.PIN()
		if err != nil {
			return nil, configError{err}
		}
		out = append(out, hsmpool.MemberConfig{
			Name: m.Name, Module: m.Module, TokenLabel: m.TokenLabel, PIN: pin, MaxSessions: m.MaxSessions,
		})
	}
	return out, nil
}

// AnchorMembers are the members whose tokens keep the rollback anchors;
// each member left out is logged with the reason.
func AnchorMembers(ctx context.Context, pool *hsmpool.Pool, log *slog.Logger) (*hsmpool.AnchorMembers, error) {
	members, err := pool.AnchorMembers(ctx)
	if err != nil {
		return nil, err
	}
	for _, r := range members.Refused {
		log.Warn("HSM member keeps no rollback anchors; the anchors live on the other members", "member", r.Member, "error", r.Error(),
			"anchor_members", strings.Join(members.Members(), ","))
	}
	return members, nil
}
