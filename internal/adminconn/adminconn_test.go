package adminconn

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyvault/keyvault/config"
)

func TestDialable(t *testing.T) {
	for addr, want := range map[string]string{
		"0.0.0.0:9090":   "127.0.0.1:9090",
		"[::]:9090":      "127.0.0.1:9090",
		":9090":          "127.0.0.1:9090",
		"10.0.0.1:9090":  "10.0.0.1:9090",
		"[::1]:9090":     "[::1]:9090",
		"localhost:9090": "localhost:9090",
		"not an address": "not an address",
	} {
		if got := Dialable(addr); got != want {
			t.Errorf("Dialable(%q) = %q, want %q", addr, got, want)
		}
	}
}

// writeCert writes a self-signed certificate and its key as PEM files in
// dir and returns their paths.
func writeCert(t *testing.T, dir string) (certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// For speaks plain HTTP without admin_tls and HTTPS with it, trusting the
// vault's certificate and showing the client certificate of the
// environment, which admin_tls.client_ca_file requires.
func TestFor(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := writeCert(t, dir)
	tlsCfg := func(clientCA string) *config.Config {
		return &config.Config{AdminListen: "0.0.0.0:9090", AdminTLS: &config.TLS{CertFile: certFile, KeyFile: keyFile, ClientCAFile: clientCA}}
	}
	for _, tc := range []struct {
		name             string
		cfg              *config.Config
		envCert, envKey  string
		wantBase, errHas string
		wantClientCert   bool
	}{
		{name: "plain", cfg: &config.Config{AdminListen: "[::]:9090"}, wantBase: "http://127.0.0.1:9090"},
		{name: "TLS", cfg: tlsCfg(""), wantBase: "https://127.0.0.1:9090"},
		{name: "mTLS", cfg: tlsCfg(certFile), envCert: certFile, envKey: keyFile, wantBase: "https://127.0.0.1:9090", wantClientCert: true},
		{name: "mTLS without a client certificate", cfg: tlsCfg(certFile), errHas: "admin_tls.client_ca_file requires a client certificate"},
		{name: "half the client certificate", cfg: tlsCfg(""), envCert: certFile, errHas: "set both KEYVAULT_ADMIN_CERT and KEYVAULT_ADMIN_KEY"},
		{name: "a client key that is no key", cfg: tlsCfg(""), envCert: certFile, envKey: certFile, errHas: "KEYVAULT_ADMIN_CERT, KEYVAULT_ADMIN_KEY:"},
		{name: "no certificate file", cfg: &config.Config{AdminListen: ":1", AdminTLS: &config.TLS{CertFile: filepath.Join(dir, "none")}}, errHas: "admin_tls.cert_file:"},
		{name: "a certificate file without PEM", cfg: &config.Config{AdminListen: ":1", AdminTLS: &config.TLS{CertFile: filepath.Join(dir, "key.pem")}},
			errHas: "admin_tls.cert_file: no PEM certificate in it"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("KEYVAULT_ADMIN_CERT", tc.envCert)
			t.Setenv("KEYVAULT_ADMIN_KEY", tc.envKey)
			base, hc, err := For(tc.cfg)
			if tc.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errHas) {
					t.Fatalf("err %v, want one with %q", err, tc.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if base != tc.wantBase {
				t.Errorf("base %q, want %q", base, tc.wantBase)
			}
			if hc.Timeout <= 0 {
				t.Error("the client has no timeout")
			}
			if tc.cfg.AdminTLS == nil {
				return
			}
			tr, ok := hc.Transport.(*http.Transport)
			if !ok || tr.TLSClientConfig == nil || tr.TLSClientConfig.RootCAs == nil {
				t.Fatalf("transport %#v: no TLS roots", hc.Transport)
			}
			if got := len(tr.TLSClientConfig.Certificates) == 1; got != tc.wantClientCert {
				t.Errorf("client certificate shown: %v, want %v", got, tc.wantClientCert)
			}
		})
	}
}
