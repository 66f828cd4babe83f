package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	bolterrors "go.etcd.io/bbolt/errors"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
	"github.com/keyvault/keyvault/vault/etcdstore"
)

// driver is what Run needs of a store driver beside the vault.Store: a
// readiness check for /readyz and a close at shutdown.
type driver interface {
	vault.Store
	Ping(ctx context.Context) error
	Close() error
}

var (
	_ driver = (*boltstore.Store)(nil)
	_ driver = (*etcdstore.Store)(nil)
)

// openedStore is the configured store driver.
type openedStore struct {
	driver
	desc string // for the start log: a path or the endpoints, never a secret
}

// openStore opens the driver store.driver names, the bbolt one with
// rollback anchoring when anc is set. An unknown name is a config error: a
// store must never be opened in a place it was not asked for.
func openStore(cfg *config.Config, reg prometheus.Registerer, anc *boltstore.Anchoring) (*openedStore, error) {
	switch cfg.Store.Driver {
	case config.DriverBolt, "":
		st, err := OpenBolt(boltstore.Options{Path: cfg.Store.Path, Registerer: reg, Anchoring: anc})
		if err != nil {
			return nil, err
		}
		return &openedStore{driver: st, desc: cfg.Store.Path}, nil
	case config.DriverEtcd:
		return openEtcd(cfg.Store.Etcd, reg)
	default:
		return nil, configError{fmt.Errorf("store.driver: unknown driver %q (bolt or etcd)", cfg.Store.Driver)}
	}
}

// openEtcd opens the etcd driver.
func openEtcd(e *config.Etcd, reg prometheus.Registerer) (*openedStore, error) {
	if e == nil {
		return nil, configError{errors.New("store.etcd: required with driver etcd")}
	}
	var tc *tls.Config
	if e.TLS != nil {
		var err error
		if tc, err = etcdTLS(e.TLS); err != nil {
			return nil, configError{err}
		}
	} else if slices.ContainsFunc(e.Endpoints, func(ep string) bool { return strings.HasPrefix(ep, "https://") }) {
		// https:// without a tls section: the system roots, no client certificate.
		tc = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	st, err := etcdstore.Open(etcdstore.Options{
		Endpoints: e.Endpoints, KeyPrefix: e.KeyPrefix, TLS: tc,
		DialTimeout: e.DialTimeout, RequestTimeout: e.RequestTimeout, Registerer: reg,
	})
	if err != nil {
		return nil, err
	}
	return &openedStore{driver: st, desc: fmt.Sprintf("etcd %v", e.Endpoints)}, nil
}

// OpenBolt opens a bbolt store for every command that needs it. bbolt
// holds an exclusive lock on the file while it is open, so a second
// process waits for it and times out: that is said as it is, with the way
// out.
func OpenBolt(opts boltstore.Options) (*boltstore.Store, error) {
	st, err := boltstore.Open(opts)
	if errors.Is(err, bolterrors.ErrTimeout) {
		return nil, StoreInUseError{Path: opts.Path, err: err}
	}
	return st, err
}

// StoreInUseError is a bbolt store locked by another process.
type StoreInUseError struct {
	Path string
	err  error
}

func (e StoreInUseError) Error() string {
	return fmt.Sprintf("store %s is in use by another process (bbolt lets one process open it at a time): "+
		"stop the other process (a keyvault serve, dev or anchor command on this store), "+
		"or point this one at another store (store.path in the config, or keyvault dev --dir DIR)", e.Path)
}

func (e StoreInUseError) Unwrap() error { return e.err }

// etcdTLS builds the client side of TLS to etcd: the members' CA (or the
// system roots) and, if given, a client certificate.
func etcdTLS(t *config.EtcdTLS) (*tls.Config, error) {
	c := &tls.Config{MinVersion: tls.VersionTLS12}
	if t.CAFile != "" {
		pem, err := os.ReadFile(t.CAFile)
		if err != nil {
			return nil, fmt.Errorf("store.etcd.tls.ca_file: %w", err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return nil, errors.New("store.etcd.tls.ca_file: no PEM certificate in it")
		}
	}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("store.etcd.tls: %w", err)
		}
		c.Certificates = []tls.Certificate{cert}
	}
	return c, nil
}
