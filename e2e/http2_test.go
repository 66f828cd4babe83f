package e2e

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/keyvault/keyvault/api"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestHTTP2Limits serves the API over TLS, where clients negotiate
// HTTP/2, and plays what one HTTP/2 client can do to it. With the HSM
// admission at one request (one session) and a 10 ms queue:
//   - api.MaxConcurrentStreams streams whose bodies never come hold one
//     connection full: the client's next request has to open another;
//   - while they stall, another client's recoveries all succeed, since a
//     body is read before the HSM admission and a stalled one holds no
//     place;
//   - a header list past MaxHeaderBytes is refused over HTTP/2 too.
func TestHTTP2Limits(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop()
	pki := newTestPKI(t, dir)
	cfg := filepath.Join(dir, "keyvault.yaml")
	setRateLimits(t, cfg, `ratelimit:
  guesses_per_user: {per_second: 0}
  requests_per_client: {per_second: 0}
  wrong_guesses_per_client: {per_second: 0}
  hsm_queue_timeout: 10ms
  admitted_per_hsm_session: 1
`)
	b, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "max_sessions: 8") {
		t.Fatalf("dev config has no \"max_sessions: 8\" to lower:\n%s", b)
	}
	text := strings.Replace(portZero(t, string(b)), "max_sessions: 8", "max_sessions: 1", 1) +
		"tls:\n  cert_file: " + pki.certFile + "\n  key_file: " + pki.keyFile + "\n"
	tlsCfg := filepath.Join(dir, "tls.yaml")
	if err := os.WriteFile(tlsCfg, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	v := startServe(t, dir, tlsCfg)
	defer v.Stop()
	base := strings.Replace(v.API, "http://", "https://", 1)
	newH2 := func() *http.Client {
		return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pki.pool}, ForceAttemptHTTP2: true,
		}}
	}
	// send makes one request on hc, reporting the connection it used, and
	// holds the answer to api/openapi.yaml as the e2e client does; a 431
	// is net/http's own answer to an oversized header list, before the API.
	send := func(hc *http.Client, method, path string, body io.Reader, hdr ...string) (*http.Response, net.Conn, error) {
		var conn net.Conn
		trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { conn = i.Conn }}
		req, err := http.NewRequestWithContext(httptrace.WithClientTrace(t.Context(), trace), method, base+path, body)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+v.Token)
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		for i := 0; i+1 < len(hdr); i += 2 {
			req.Header.Set(hdr[i], hdr[i+1])
		}
		resp, err := hc.Do(req)
		if err == nil {
			b, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			r := response{Status: resp.StatusCode, Header: resp.Header, Body: b}
			if rerr == nil && resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
				if bad := checkAgainstDoc(method, path, r); bad != nil {
					t.Errorf("%s %s answered %s, which breaks api/openapi.yaml: %v", method, path, r, bad)
				}
			}
		}
		return resp, conn, err
	}

	user, pin, secret := randID("h2"), randPIN("h2"), randBytes(32)
	enroll := `{"secret":"` + b64(secret) + `","pin":"` + pin + `"}`
	attacker, other := newH2(), newH2()
	resp, first, err := send(attacker, http.MethodPut, backupPath(user), strings.NewReader(enroll))
	if err != nil || resp.StatusCode != http.StatusCreated || resp.ProtoMajor != 2 {
		t.Fatalf("enroll over TLS: %v %v, want 201 over HTTP/2", resp, err)
	}

	// Streams whose bodies never come: each handler waits in the body read.
	var stalled sync.WaitGroup
	var writers []*io.PipeWriter
	for range api.MaxConcurrentStreams {
		pr, pw := io.Pipe()
		writers = append(writers, pw)
		stalled.Go(func() {
			resp, conn, err := send(attacker, http.MethodPost, backupPath(user)+"/recover", pr)
			if err == nil && resp.StatusCode != http.StatusBadRequest {
				t.Errorf("a stalled stream, its body cut: %d, want 400 or a reset", resp.StatusCode)
			}
			if conn != first {
				t.Errorf("a stalled stream went on another connection than the first: the client opened one early")
			}
		})
	}
	defer func() {
		for _, pw := range writers {
			pw.CloseWithError(errors.New("test over"))
		}
		stalled.Wait()
	}()
	waitInFlight(t, v.Admin, api.MaxConcurrentStreams)

	// The connection is full: the next request has to open another.
	resp, next, err := send(attacker, http.MethodGet, backupPath(user), nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET beside the stalled streams: %v %v", resp, err)
	}
	if next == first {
		t.Fatalf("a request beyond %d streams went on the full connection: the server allows more streams than api.MaxConcurrentStreams", api.MaxConcurrentStreams)
	}
	// The stalled streams hold no HSM place: recoveries are admitted.
	for i := range 10 {
		resp, _, err := send(other, http.MethodPost, backupPath(user)+"/recover", strings.NewReader(`{"pin":"`+pin+`"}`))
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("recovery %d beside %d stalled streams: %v %v, want 200", i, api.MaxConcurrentStreams, resp, err)
		}
	}
	// MaxHeaderBytes (16 KiB) bounds an HTTP/2 header list too.
	resp, _, err = send(other, http.MethodGet, backupPath(user), nil, "X-Padding", strings.Repeat("a", 20<<10))
	if err == nil && resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("a 20 KiB header over HTTP/2: %d, want 431 or a refusal", resp.StatusCode)
	}
}

// waitInFlight waits until the vault serves at least n API requests at
// once.
func waitInFlight(t *testing.T, admin string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		samples, _ := metrics(t, admin)
		got, _ := metricSum(samples, "keyvault_http_requests_in_flight", nil)
		if got >= float64(n) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%v API requests in flight after 20s, want %d", got, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
