package e2e

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// testPKI is a CA, a server certificate for 127.0.0.1 and a client
// certificate, made for the test and written as PEM files in dir.
type testPKI struct {
	pool                      *x509.CertPool
	caFile, certFile, keyFile string
	client                    tls.Certificate
}

func newTestPKI(t *testing.T, dir string) *testPKI {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "keyvault test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(name string, serial int64, usage x509.ExtKeyUsage, ips []net.IP) ([]byte, *ecdsa.PrivateKey) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage}, IPAddresses: ips,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der, key
	}
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	p := &testPKI{pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	p.caFile = write("ca.crt", "CERTIFICATE", caDER)
	srvDER, srvKey := issue("127.0.0.1", 2, x509.ExtKeyUsageServerAuth, []net.IP{net.IPv4(127, 0, 0, 1)})
	p.certFile = write("server.crt", "CERTIFICATE", srvDER)
	keyDER, _ := x509.MarshalECPrivateKey(srvKey)
	p.keyFile = write("server.key", "EC PRIVATE KEY", keyDER)
	cliDER, cliKey := issue("messenger", 3, x509.ExtKeyUsageClientAuth, nil)
	p.client = tls.Certificate{Certificate: [][]byte{cliDER}, PrivateKey: cliKey}
	return p
}

// TestTLS serves the API over TLS, then with client certificates required
// (mTLS), from the config's tls section: the vault answers over TLS 1.2 and
// later only, and with mTLS only to a client that shows a certificate from
// the configured CA.
func TestTLS(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop()
	pki := newTestPKI(t, dir)
	base, err := os.ReadFile(filepath.Join(dir, "keyvault.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	serveTLS := func(name string, mtls bool) *vault {
		tlsSection := "tls:\n  cert_file: " + pki.certFile + "\n  key_file: " + pki.keyFile + "\n"
		if mtls {
			tlsSection += "  client_ca_file: " + pki.caFile + "\n"
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(portZero(t, string(base))+tlsSection), 0o600); err != nil {
			t.Fatal(err)
		}
		v := startServe(t, dir, path)
		v.API = strings.Replace(v.API, "http://", "https://", 1)
		return v
	}
	get := func(v *vault, cfg *tls.Config) (*http.Response, error) {
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		req, _ := http.NewRequest(http.MethodGet, v.API+"/v1/backups/nobody", nil)
		req.Header.Set("Authorization", "Bearer "+v.Token)
		resp, err := hc.Do(req)
		if err == nil {
			b, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			r := response{Status: resp.StatusCode, Header: resp.Header, Body: b}
			if bad := checkAgainstDoc(req.Method, req.URL.Path, r); rerr == nil && bad != nil {
				t.Errorf("GET /v1/backups/nobody answered %s, which breaks api/openapi.yaml: %v", r, bad)
			}
		}
		return resp, err
	}

	t.Run("tls", func(t *testing.T) {
		v := serveTLS("tls.yaml", false)
		defer v.Stop()
		if resp, err := get(v, &tls.Config{RootCAs: pki.pool}); err != nil || resp.StatusCode != http.StatusNotFound {
			t.Fatalf("HTTPS request: %v %v, want a 404 answer", resp, err)
		}
		if _, err := get(v, &tls.Config{RootCAs: pki.pool, MinVersion: tls.VersionTLS10, MaxVersion: tls.VersionTLS11}); err == nil || !strings.Contains(err.Error(), "protocol version") {
			t.Fatalf("a TLS 1.1 client: %v, want the server to refuse the protocol version", err)
		}
		plain := strings.Replace(v.API, "https://", "http://", 1)
		if resp, err := http.Get(plain + "/v1/backups/nobody"); err == nil && resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("plain HTTP to the TLS port: %d", resp.StatusCode)
		}
	})
	t.Run("mtls", func(t *testing.T) {
		v := serveTLS("mtls.yaml", true)
		defer v.Stop()
		if _, err := get(v, &tls.Config{RootCAs: pki.pool}); err == nil {
			t.Fatal("a client without a certificate was served under mTLS")
		}
		resp, err := get(v, &tls.Config{RootCAs: pki.pool, Certificates: []tls.Certificate{pki.client}})
		if err != nil || resp.StatusCode != http.StatusNotFound {
			t.Fatalf("mTLS request with a client certificate: %v %v", resp, err)
		}
	})
}
