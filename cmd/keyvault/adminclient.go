package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/keyvault/keyvault/config"
)

// adminHTTP is how the keys CLI reaches the running vault's admin
// listener: its default base URL and the client to send with. With
// admin_tls it speaks HTTPS, trusting the system roots and the vault's own
// certificate (the CLI runs with the vault's config), and shows the client
// certificate named by $KEYVAULT_ADMIN_CERT and $KEYVAULT_ADMIN_KEY, which
// admin_tls.client_ca_file requires.
func adminHTTP(cfg *config.Config) (base string, hc *http.Client, err error) {
	hc = &http.Client{Timeout: 2 * time.Minute}
	if cfg.AdminTLS == nil {
		return "http://" + dialable(cfg.AdminListen), hc, nil
	}
	roots, err := x509.SystemCertPool()
	if err != nil {
		roots = x509.NewCertPool()
	}
	pem, err := os.ReadFile(cfg.AdminTLS.CertFile)
	if err != nil {
		return "", nil, usageError{fmt.Errorf("admin_tls.cert_file: %w", err)}
	}
	if !roots.AppendCertsFromPEM(pem) {
		return "", nil, usageError{errors.New("admin_tls.cert_file: no PEM certificate in it")}
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots}
	certFile, keyFile := os.Getenv("KEYVAULT_ADMIN_CERT"), os.Getenv("KEYVAULT_ADMIN_KEY")
	switch {
	case certFile != "" && keyFile != "":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return "", nil, usageError{fmt.Errorf("KEYVAULT_ADMIN_CERT, KEYVAULT_ADMIN_KEY: %w", err)}
		}
		tc.Certificates = []tls.Certificate{cert}
	case certFile != "" || keyFile != "":
		return "", nil, usageError{errors.New("set both KEYVAULT_ADMIN_CERT and KEYVAULT_ADMIN_KEY, or neither")}
	case cfg.AdminTLS.ClientCAFile != "":
		return "", nil, usageError{errors.New("admin_tls.client_ca_file requires a client certificate: set KEYVAULT_ADMIN_CERT and KEYVAULT_ADMIN_KEY")}
	}
	hc.Transport = &http.Transport{TLSClientConfig: tc, Proxy: http.ProxyFromEnvironment}
	return "https://" + dialable(cfg.AdminListen), hc, nil
}
