package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"syscall"

	"golang.org/x/net/netutil"

	"github.com/keyvault/keyvault/api"
	"github.com/keyvault/keyvault/config"
)

// fdReserve is the part of RLIMIT_NOFILE that the listeners' connection
// caps leave to everything else: SoftHSM and other PKCS#11 modules open
// files on every operation, the store its file or etcd connections, and the
// process its logs and libraries.
const fdReserve = 256

// listener is one of the vault's HTTP listeners: its server and its socket.
type listener struct {
	srv *http.Server
	ln  net.Listener
}

// openAPI opens the API listener.
func openAPI(cfg *config.Config, h http.Handler, log *slog.Logger) (*listener, error) {
	return openListener(cfg, "listen", cfg.Listen, cfg.MaxConnections, "tls", cfg.TLS, h, log)
}

// openAdmin opens the admin listener. The serving vault and the one that
// refuses its store (refuseStore) both build it here, so the two cannot
// differ in their limits or TLS.
func openAdmin(cfg *config.Config, h http.Handler, log *slog.Logger) (*listener, error) {
	return openListener(cfg, "admin_listen", cfg.AdminListen, cfg.AdminMaxConnections, "admin_tls", cfg.AdminTLS, h, log)
}

// openListener listens on addr (the config key addrKey) and builds its
// server with the limits every listener has: the config's http_timeouts,
// so idle and stalled clients are let go, and at most maxConns connections
// at once. Past that, new connections wait in the kernel's accept queue,
// where they hold none of the process's file descriptors. With t set, it
// serves HTTPS (the config key tlsKey).
func openListener(cfg *config.Config, addrKey, addr string, maxConns int, tlsKey string, t *config.TLS, h http.Handler, log *slog.Logger) (*listener, error) {
	to := cfg.HTTPTimeouts
	srv := &http.Server{
		Handler:           h,
		ReadHeaderTimeout: to.ReadHeader,
		ReadTimeout:       to.Read,
		WriteTimeout:      to.Write,
		IdleTimeout:       to.Idle,
		MaxHeaderBytes:    16 << 10,
		HTTP2:             api.HTTP2Config(),
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	if t != nil {
		var err error
		if srv.TLSConfig, err = tlsConfig(tlsKey, t); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", addrKey, err)
	}
	return &listener{srv: srv, ln: netutil.LimitListener(ln, maxConns)}, nil
}

// serve serves until the server is shut down or closed.
func (l *listener) serve() error {
	if l.srv.TLSConfig != nil {
		return l.srv.ServeTLS(l.ln, "", "")
	}
	return l.srv.Serve(l.ln)
}

func (l *listener) addr() string { return l.ln.Addr().String() }

// checkFileLimit refuses connection caps that could take every file
// descriptor the process may open: the HSM modules and the store would
// then fail on every operation while connections are held open.
func checkFileLimit(cfg *config.Config) error {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return fmt.Errorf("read RLIMIT_NOFILE: %w", err)
	}
	need := uint64(cfg.MaxConnections) + uint64(cfg.AdminMaxConnections) + fdReserve
	if need > rl.Cur { // RLIM_INFINITY is the largest uint64
		return configError{fmt.Errorf("max_connections: %d, plus admin_max_connections %d and %d file descriptors kept for the HSM modules and the store, need %d; the process may open %d (RLIMIT_NOFILE): lower max_connections or raise the limit (systemd LimitNOFILE=, ulimit -n)",
			cfg.MaxConnections, cfg.AdminMaxConnections, fdReserve, need, rl.Cur)}
	}
	return nil
}

// tlsConfig loads a listener's certificate and, if configured, the CA that
// client certificates must chain to (mTLS). TLS 1.2 at least. key is the
// config section (tls or admin_tls), for errors.
func tlsConfig(key string, t *config.TLS) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, configError{fmt.Errorf("%s: %w", key, err)}
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	if t.ClientCAFile != "" {
		pem, err := os.ReadFile(t.ClientCAFile)
		if err != nil {
			return nil, configError{fmt.Errorf("%s.client_ca_file: %w", key, err)}
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, configError{errors.New(key + ".client_ca_file: no PEM certificate in it")}
		}
		c.ClientCAs, c.ClientAuth = pool, tls.RequireAndVerifyClientCert
	}
	return c, nil
}
