// Package adminconn connects the keys commands to a running vault's
// admin listener as the vault's config describes it: the base URL to dial,
// an HTTP client that speaks the listener's TLS and the admin token (For,
// Admin); what the listener's refusals mean for an operator (Refusal); and
// waiting for the re-wrap job to end (WaitRewrap).
package adminconn

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/keyvault/keyvault/config"
)

// For is how the keys commands reach the running vault of cfg on its
// admin listener: the default base URL and the client to send with. With
// admin_tls it speaks HTTPS, trusting the system roots and the vault's own
// certificate (the CLI runs with the vault's config), and shows the client
// certificate named by $KEYVAULT_ADMIN_CERT and $KEYVAULT_ADMIN_KEY, which
// admin_tls.client_ca_file requires.
func For(cfg *config.Config) (base string, hc *http.Client, err error) {
	hc = &http.Client{Timeout: 2 * time.Minute}
	if cfg.AdminTLS == nil {
		return "http://" + Dialable(cfg.AdminListen), hc, nil
	}
	roots, err := x509.SystemCertPool()
	if err != nil {
		roots = x509.NewCertPool()
	}
	pem, err := os.ReadFile(cfg.AdminTLS.CertFile)
	if err != nil {
		return "", nil, fmt.Errorf("admin_tls.cert_file: %w", err)
	}
	if !roots.AppendCertsFromPEM(pem) {
		return "", nil, errors.New("admin_tls.cert_file: no PEM certificate in it")
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
	certs, err := ClientCert()
	switch {
	case err != nil:
		return "", nil, err
	case certs == nil && cfg.AdminTLS.ClientCAFile != "":
		return "", nil, errors.New("admin_tls.client_ca_file requires a client certificate: set KEYVAULT_ADMIN_CERT and KEYVAULT_ADMIN_KEY")
	}
	tc.Certificates = certs
	hc.Transport = &http.Transport{TLSClientConfig: tc, Proxy: http.ProxyFromEnvironment}
	return "https://" + Dialable(cfg.AdminListen), hc, nil
}

// ClientCert loads the client certificate for an admin listener under
// mTLS from the files $KEYVAULT_ADMIN_CERT and $KEYVAULT_ADMIN_KEY: nil
// when neither is set, an error when one is.
func ClientCert() ([]tls.Certificate, error) {
	certFile, keyFile := os.Getenv("KEYVAULT_ADMIN_CERT"), os.Getenv("KEYVAULT_ADMIN_KEY")
	switch {
	case certFile == "" && keyFile == "":
		return nil, nil
	case certFile == "" || keyFile == "":
		return nil, errors.New("set both KEYVAULT_ADMIN_CERT and KEYVAULT_ADMIN_KEY, or neither")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("KEYVAULT_ADMIN_CERT, KEYVAULT_ADMIN_KEY: %w", err)
	}
	return []tls.Certificate{cert}, nil
}

// Dialable turns a listen address into one to connect to: a wildcard
// host becomes the loopback address.
func Dialable(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}
