package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// fileLimit is the RLIMIT_NOFILE TestAdminListenerLimits gives the vault:
// small, so that a flood of admin connections on an uncapped listener
// would take every file descriptor within a second.
const fileLimit = 512

// adminConfig writes the dev config of dir with kernel-picked ports and
// extra appended, as name, and returns its path.
func adminConfig(t *testing.T, dir, name, extra string) string {
	t.Helper()
	base, err := os.ReadFile(filepath.Join(dir, "keyvault.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(portZero(t, string(base))+"\n"+extra), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// limitedServe is the argument list that runs `keyvault serve --config
// cfg` under sh with RLIMIT_NOFILE lowered to n (soft and hard, so the Go
// runtime cannot raise it again).
func limitedServe(n int, cfg string) []string {
	return []string{"-c", fmt.Sprintf(`ulimit -n %d && exec "$0" "$@"`, n), keyvaultBin, "serve", "--config", cfg}
}

// TestAdminListenerLimits serves a vault whose RLIMIT_NOFILE is 512 with
// short http_timeouts and a cap of 8 admin connections, and checks that
// the admin listener closes idle and stalled connections, that a profile
// longer than the write timeout still arrives, and that while a client
// without any token holds a thousand connections to the admin port, the
// vault keeps at most 8 of them and the API keeps enrolling and recovering.
func TestAdminListenerLimits(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop()
	const adminCap = 8
	cfg := adminConfig(t, dir, "limits.yaml", fmt.Sprintf(`http_timeouts:
  read_header: 1s
  read: 2s
  write: 2s
  idle: 1s
max_connections: 64
admin_max_connections: %d
`, adminCap))
	data, _ := os.ReadFile(cfg)
	if err := os.WriteFile(cfg, regexp.MustCompile(`(?m)^admin_pprof: false.*$`).ReplaceAll(data, []byte("admin_pprof: true")), 0o600); err != nil {
		t.Fatal(err)
	}
	v := kvproc.Start(t, "/bin/sh", dir, startTimeout, limitedServe(fileLimit, cfg)...)
	limits, err := os.ReadFile(fmt.Sprintf("/proc/%d/limits", v.Pid()))
	if err != nil || !regexp.MustCompile(fmt.Sprintf(`Max open files\s+%d\s+%d`, fileLimit, fileLimit)).Match(limits) {
		t.Fatalf("the vault runs without RLIMIT_NOFILE %d: %v\n%s", fileLimit, err, limits)
	}
	adminAddr := strings.TrimPrefix(v.Admin, "http://")

	// closedWithin reads from c until the server closes it; it fails if
	// that takes longer than limit.
	closedWithin := func(t *testing.T, c net.Conn, limit time.Duration) {
		t.Helper()
		began := time.Now()
		_ = c.SetReadDeadline(began.Add(limit))
		_, err := io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("the admin listener kept the connection open for %v", limit)
		}
		t.Logf("closed by the vault after %v", time.Since(began).Round(10*time.Millisecond))
	}

	t.Run("idle connection closed", func(t *testing.T) {
		c, err := net.Dial("tcp", adminAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: keyvault\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /healthz: %v %v", resp, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		closedWithin(t, c, 5*time.Second) // idle 1s
	})

	t.Run("stalled body closed", func(t *testing.T) {
		c, err := net.Dial("tcp", adminAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// A body is announced and never sent.
		if _, err := io.WriteString(c, "POST /healthz HTTP/1.1\r\nHost: keyvault\r\nContent-Length: 1000\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		closedWithin(t, c, 6*time.Second) // read 2s
	})

	t.Run("profile outlasts the write timeout", func(t *testing.T) {
		hc := &http.Client{Timeout: 15 * time.Second}
		resp, err := hc.Get(v.Admin + "/debug/pprof/profile?seconds=3") // write 2s
		if err != nil {
			t.Fatalf("a 3 s profile behind a 2 s write timeout: %v", err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK || len(body) == 0 {
			t.Fatalf("profile: %d, %d bytes, %v", resp.StatusCode, len(body), err)
		}
	})

	t.Run("API serves through an admin flood", func(t *testing.T) {
		// More connections than the vault may hold file descriptors, each
		// with a request sent, then left idle: an uncapped listener would
		// accept them until its accept fails, and the HSM module with it.
		const flood = 1000
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for range flood {
			c, err := net.DialTimeout("tcp", adminAddr, 2*time.Second)
			if err != nil {
				break
			}
			conns = append(conns, c)
			_, _ = io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: keyvault\r\n\r\n")
		}
		if len(conns) < fileLimit {
			t.Fatalf("opened only %d admin connections, want more than %d", len(conns), fileLimit)
		}
		// Keep the flood up: whatever the vault closes is opened again.
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var mu sync.Mutex
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i = (i + 1) % len(conns) {
				select {
				case <-stop:
					return
				default:
				}
				mu.Lock()
				c := conns[i]
				mu.Unlock()
				_ = c.SetReadDeadline(time.Now().Add(time.Millisecond))
				if _, err := c.Read(make([]byte, 512)); err != nil && !errors.Is(err, os.ErrDeadlineExceeded) {
					c.Close()
					if nc, err := net.DialTimeout("tcp", adminAddr, time.Second); err == nil {
						_, _ = io.WriteString(nc, "GET /healthz HTTP/1.1\r\nHost: keyvault\r\n\r\n")
						mu.Lock()
						conns[i] = nc
						mu.Unlock()
					}
				}
			}
		}()
		defer func() { close(stop); wg.Wait() }()

		cl := newClient(t, v.API, v.Token)
		secret := []byte("history key of a flooded vault")
		maxSockets := 0
		for i := 0; i < 10; i++ {
			user := fmt.Sprintf("flood-%d", i)
			if r, err := cl.call(http.MethodPut, backupPath(user), map[string]any{"secret": b64(secret), "pin": "2468"}); err != nil || r.Status != http.StatusCreated {
				t.Fatalf("enroll %s during the admin flood: %v %v", user, r, err)
			}
			if r, err := cl.call(http.MethodPost, backupPath(user)+"/recover", map[string]string{"pin": "2468"}); err != nil || r.Status != http.StatusOK {
				t.Fatalf("recover %s during the admin flood: %v %v", user, r, err)
			}
			maxSockets = max(maxSockets, sockets(t, v.Pid()))
			time.Sleep(200 * time.Millisecond)
		}
		// The cap, the two listening sockets and the API client's few
		// connections; an uncapped listener holds hundreds.
		if maxSockets > adminCap+16 {
			t.Fatalf("the vault held up to %d sockets during the flood; the admin cap is %d", maxSockets, adminCap)
		}
		t.Logf("%d admin connections open from the client, at most %d sockets in the vault", len(conns), maxSockets)
	})

	// Released, the admin listener answers again.
	hc := &http.Client{Timeout: 10 * time.Second}
	resp, err := hc.Get(v.Admin + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("/healthz after the flood: %v %v", resp, err)
	}
	resp.Body.Close()
	v.Stop()
}

// sockets counts the open sockets of process pid.
func sockets(t *testing.T, pid int) int {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join(dir, fd.Name())); err == nil && strings.HasPrefix(target, "socket:") {
			n++
		}
	}
	return n
}

// TestAdminTLS serves the admin listener over TLS with the admin token,
// then with client certificates required: Prometheus-style scrapes and the
// keys CLI work over it, plain HTTP and clients without a certificate do
// not.
func TestAdminTLS(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop()
	pki := newTestPKI(t, dir)
	adminToken := "admin-" + hex.EncodeToString([]byte(t.Name()))
	sum := sha256.Sum256([]byte(adminToken))
	clientCert := filepath.Join(dir, "admin-client.crt")
	clientKey := filepath.Join(dir, "admin-client.key")
	keyDER, err := x509.MarshalPKCS8PrivateKey(pki.client.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	for path, block := range map[string]*pem.Block{
		clientCert: {Type: "CERTIFICATE", Bytes: pki.client.Certificate[0]},
		clientKey:  {Type: "PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}

	serve := func(name string, mtls bool) (*vault, string) {
		extra := fmt.Sprintf("admin_token_sha256: %x\nadmin_tls:\n  cert_file: %s\n  key_file: %s\n", sum, pki.certFile, pki.keyFile)
		if mtls {
			extra += "  client_ca_file: " + pki.caFile + "\n"
		}
		cfg := adminConfig(t, dir, name, extra)
		v := startServe(t, dir, cfg)
		v.Admin = strings.Replace(v.Admin, "http://", "https://", 1)
		return v, cfg
	}
	scrape := func(v *vault, tc *tls.Config) (int, string, error) {
		hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
		resp, err := hc.Get(v.Admin + "/metrics")
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), err
	}
	// run runs the binary with args and env added to this process's.
	run := func(env []string, args ...string) (int, string) {
		cmd := exec.Command(keyvaultBin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			return exit.ExitCode(), string(out)
		} else if err != nil {
			t.Fatal(err)
		}
		return 0, string(out)
	}
	// keys runs `keyvault keys usage` against v with env added.
	keys := func(v *vault, cfg string, env ...string) (int, string) {
		return run(append(env, "KEYVAULT_ADMIN_TOKEN="+adminToken), "keys", "usage", "--config", cfg, "--admin-url", v.Admin)
	}

	t.Run("tls", func(t *testing.T) {
		v, cfg := serve("admin-tls.yaml", false)
		defer v.Stop()
		if code, body, err := scrape(v, &tls.Config{RootCAs: pki.pool}); err != nil || code != http.StatusOK || !strings.Contains(body, "keyvault_") {
			t.Fatalf("scrape over TLS: %d %v", code, err)
		}
		if _, _, err := scrape(v, &tls.Config{}); err == nil {
			t.Fatal("a client that does not trust the admin certificate was served")
		}
		plain := strings.Replace(v.Admin, "https://", "http://", 1)
		if resp, err := http.Get(plain + "/metrics"); err == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Fatalf("plain HTTP to the admin TLS port: %d", resp.StatusCode)
			}
		}
		if code, out := keys(v, cfg); code != 0 {
			t.Fatalf("keys usage over admin TLS: exit %d:\n%s", code, out)
		}
	})
	t.Run("mtls", func(t *testing.T) {
		v, cfg := serve("admin-mtls.yaml", true)
		defer v.Stop()
		if _, _, err := scrape(v, &tls.Config{RootCAs: pki.pool}); err == nil {
			t.Fatal("a scrape without a client certificate was served under admin mTLS")
		}
		if code, _, err := scrape(v, &tls.Config{RootCAs: pki.pool, Certificates: []tls.Certificate{pki.client}}); err != nil || code != http.StatusOK {
			t.Fatalf("scrape with a client certificate: %d %v", code, err)
		}
		if code, out := keys(v, cfg); code != 2 || !strings.Contains(out, "KEYVAULT_ADMIN_CERT") {
			t.Fatalf("keys usage under admin mTLS without a client certificate: exit %d, want 2 naming KEYVAULT_ADMIN_CERT:\n%s", code, out)
		}
		if code, out := keys(v, cfg, "KEYVAULT_ADMIN_CERT="+clientCert, "KEYVAULT_ADMIN_KEY="+clientKey); code != 0 {
			t.Fatalf("keys usage with a client certificate: exit %d:\n%s", code, out)
		}
		// keyvault bench reads the vault's CPU from the admin listener
		// with the same client certificate.
		bench := func(env ...string) (int, string) {
			return run(env, "bench", "--url", v.API, "--token-file", filepath.Join(dir, "token"),
				"--admin-url", v.Admin, "--ca-file", pki.caFile, "--duration", "1s", "--warmup", "0s",
				"--concurrency", "2", "--users", "40", "--max-errors", "100")
		}
		if code, out := bench(); code != 2 || !strings.Contains(out, "--admin-url") {
			t.Fatalf("bench --admin-url under admin mTLS without a client certificate: exit %d, want 2:\n%s", code, out)
		}
		if code, out := bench("KEYVAULT_ADMIN_CERT="+clientCert, "KEYVAULT_ADMIN_KEY="+clientKey); code != 0 || !strings.Contains(out, "cpu_us/op") {
			t.Fatalf("bench --admin-url with a client certificate: exit %d, want 0 with the vault's CPU:\n%s", code, out)
		}
	})
}

// TestListenerRefusals starts `keyvault serve` on configs it must refuse
// at start, with exit status 2 and a message naming the key: an admin
// token on a non-loopback plain-HTTP admin listener, a plain http:// etcd
// endpoint on the network, and connection caps that do not fit in
// RLIMIT_NOFILE.
func TestListenerRefusals(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop()
	sum := sha256.Sum256([]byte("admin token"))

	adminPlain := adminConfig(t, dir, "admin-plain.yaml", fmt.Sprintf("admin_token_sha256: %x\n", sum))
	data, _ := os.ReadFile(adminPlain)
	if err := os.WriteFile(adminPlain, bytes.Replace(data, []byte("admin_listen: 127.0.0.1:0"), []byte("admin_listen: 0.0.0.0:0"), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	etcdPlain := adminConfig(t, dir, "etcd-plain.yaml", "")
	kvproc.SetSection(t, etcdPlain, "store", "store:\n  driver: etcd\n  etcd:\n    endpoints: [https://10.0.0.6:2379, http://10.0.0.7:2379]\n")
	fits := adminConfig(t, dir, "fits.yaml", "")

	for _, c := range []struct {
		name string
		args []string
		want string
	}{
		{"admin token in plain HTTP", []string{"serve", "--config", adminPlain},
			"admin_listen: plain HTTP on a non-loopback address with admin_token_sha256 set needs admin_tls or admin_insecure_plaintext: true"},
		{"admin token in plain HTTP, config check", []string{"config", "check", "--config", adminPlain}, "admin_listen: plain HTTP"},
		{"plain etcd", []string{"serve", "--config", etcdPlain},
			"store.etcd.endpoints[1]: plain http:// to a non-loopback host needs https:// or store.etcd.insecure_plaintext: true"},
	} {
		code, out := runCLI(t, c.args...)
		if code != 2 || !strings.Contains(out, c.want) {
			t.Errorf("%s: exit %d, want 2 with %q:\n%s", c.name, code, c.want, out)
		}
	}

	// The default caps (4096 API and 32 admin connections) do not fit in
	// 512 file descriptors.
	cmd := exec.Command("/bin/sh", limitedServe(fileLimit, fits)...)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || !strings.Contains(string(out), "max_connections: 4096, plus admin_max_connections 32") {
		t.Errorf("serve with RLIMIT_NOFILE %d and the default caps: %v, want exit 2 naming max_connections:\n%s", fileLimit, err, out)
	}
}
