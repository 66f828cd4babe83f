package loadgen_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/internal/bench"
	"github.com/keyvault/keyvault/internal/loadgen"
)

// countConns counts the connections a test server accepts.
func countConns(srv *httptest.Server) *atomic.Int64 {
	var n atomic.Int64
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			n.Add(1)
		}
	}
	return &n
}

func TestHTTPConn(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		var b bytes.Buffer
		b.ReadFrom(r.Body)
		w.Header().Set("X-Seen", r.Header.Get("X-Test"))
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, "%s %s %s", r.Host, r.Header.Get("X-Test"), b.String())
	})
	mux.HandleFunc("POST /chunked", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("first,"))
		w.(http.Flusher).Flush() // no Content-Length: chunked
		w.Write(bytes.Repeat([]byte("x"), 5000))
	})
	mux.HandleFunc("POST /close", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		w.Write([]byte("bye"))
	})
	mux.HandleFunc("POST /empty", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("POST /huge", func(w http.ResponseWriter, r *http.Request) {
		w.Write(make([]byte, loadgen.MaxResponseBytes+1))
	})
	mux.HandleFunc("POST /stall", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	})
	srv := httptest.NewUnstartedServer(mux)
	conns := countConns(srv)
	srv.Start()
	defer srv.Close()

	c, err := loadgen.NewHTTPConn(srv.URL, nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	host := srv.Listener.Addr().String()
	head := []byte("Host: " + host + "\r\nX-Test: yes\r\n")
	do := func(path string, body string) (int, string, error) {
		t.Helper()
		status, b, err := c.Do(ctx, loadgen.AppendRequest(nil, "POST", path, []byte(body), head))
		return status, string(b), err
	}
	for i := range 3 {
		status, body, err := do("/echo", fmt.Sprint("hello ", i))
		if want := fmt.Sprintf("%s yes hello %d", host, i); err != nil || status != 201 || body != want {
			t.Fatalf("echo %d: %d %q %v, want 201 %q", i, status, body, err, want)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("%d connections for three requests, want one kept alive", n)
	}
	if status, body, err := do("/chunked", ""); err != nil || status != 200 || body != "first,"+string(bytes.Repeat([]byte("x"), 5000)) {
		t.Fatalf("chunked: %d, %d bytes, %v", status, len(body), err)
	}
	if status, body, err := do("/empty", ""); err != nil || status != 204 || body != "" {
		t.Fatalf("no content: %d %q %v", status, body, err)
	}
	// An answer with "Connection: close" ends the connection; the next
	// request dials again.
	if status, body, err := do("/close", ""); err != nil || status != 200 || body != "bye" {
		t.Fatalf("close: %d %q %v", status, body, err)
	}
	if status, _, err := do("/echo", "again"); err != nil || status != 201 || conns.Load() != 2 {
		t.Fatalf("after a close: %d %v, %d connections, want 2", status, err, conns.Load())
	}
	if _, _, err := do("/huge", ""); err == nil {
		t.Fatal("a body above MaxResponseBytes was read")
	}
	if status, _, err := do("/missing", ""); err != nil || status != 404 {
		t.Fatalf("missing: %d %v", status, err)
	}

	// A cancelled context breaks off a request under way.
	cctx, cancel := context.WithCancel(ctx)
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, _, err := c.Do(cctx, loadgen.AppendRequest(nil, "POST", "/stall", nil, head)); !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled request: %v", err)
	}
	// An ended context's watch does not break the next context's request.
	if status, _, err := do("/echo", "after"); err != nil || status != 201 {
		t.Fatalf("after a cancelled context: %d %v", status, err)
	}
	// A request not answered in time fails.
	slow, err := loadgen.NewHTTPConn(srv.URL, nil, 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	if _, _, err := slow.Do(ctx, loadgen.AppendRequest(nil, "POST", "/stall", nil, head)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a stalled answer: %v", err)
	}
}

func TestHTTPConnTLS(t *testing.T) {
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, r.Proto)
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	defer srv.Close()
	roots := x509.NewCertPool()
	roots.AddCert(srv.Certificate())
	c, err := loadgen.NewHTTPConn(srv.URL, &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	status, body, err := c.Do(context.Background(), loadgen.AppendRequest(nil, "POST", "/", nil, []byte("Host: example.com\r\n")))
	if err != nil || status != 200 || string(body) != "HTTP/1.1" {
		t.Fatalf("over TLS: %d %q %v", status, body, err)
	}
	// The server's certificate must chain to the roots given.
	other, err := loadgen.NewHTTPConn(srv.URL, nil, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := other.Do(context.Background(), loadgen.AppendRequest(nil, "POST", "/", nil, []byte("Host: example.com\r\n"))); err == nil {
		t.Fatal("an untrusted certificate was accepted")
	}
}

func TestNewHTTPConnRefusesOtherSchemes(t *testing.T) {
	if _, err := loadgen.NewHTTPConn("ftp://127.0.0.1/", nil, time.Second); err == nil {
		t.Fatal("ftp:// accepted")
	}
}

// recoverAnswer is the fixed answer of the benchmark's server.
var recoverAnswer = []byte(`{"secret":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","attempts_remaining":10}`)

// TestMain serves the benchmark's server when the test binary runs as
// it (see benchServer), and runs the tests otherwise.
func TestMain(m *testing.M) {
	if os.Getenv("LOADGEN_BENCH_SERVER") != "1" {
		os.Exit(m.Run())
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr())
	go func() { // ends with the benchmark, which holds stdin open
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(recoverAnswer)
	}))
}

// benchServer starts this test binary again as a server that answers
// every request at once with recoverAnswer, in a process of its own so
// that the benchmark's CPU time is the client's alone. It returns the
// server's base URL and a reader of its CPU time.
func benchServer(b *testing.B) (string, bench.CPUReader) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "LOADGEN_BENCH_SERVER=1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { stdin.Close(); cmd.Wait() })
	addr, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		b.Fatalf("the benchmark's server: %v", err)
	}
	cpu, err := bench.ProcCPU("/proc", cmd.Process.Pid)
	if err != nil {
		b.Fatalf("the benchmark's server: %v", err)
	}
	return "http://" + strings.TrimSpace(addr), cpu
}

// BenchmarkHTTPRequest is the load generator's cost of one recover
// request, from 32 goroutines as keyvault bench's 32 workers, against a
// server in another process that answers at once with a fixed small body:
// "client" is the keyvault Go client over net/http, "conn" a request
// written whole on an HTTPConn per worker. Beside ns/op and (with
// -benchmem) allocs/op, all the client's, it reports cpu-us/op: this
// process's CPU time per request, which is what the generator takes from
// a vault on the same machine; and server-cpu-us/op, the server's, which
// is the least a Go HTTP server spends on a request on this machine
// (net/http, loopback TCP, nothing else), the floor of the vault's own
// cost per operation.
func BenchmarkHTTPRequest(b *testing.B) {
	base, serverCPU := benchServer(b)
	ctx := context.Background()
	const user, pin = "bench-0000001", "123456"
	want := []byte(`"secret":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="`)
	// run runs op from 32 goroutines, each with its own state, and
	// reports the CPU time per operation.
	run := func(b *testing.B, op func() func() error) {
		b.SetParallelism(32 / runtime.GOMAXPROCS(0))
		b.ReportAllocs()
		cpu0 := loadgen.SelfCPU()
		server0, err := serverCPU()
		if err != nil {
			b.Fatal(err)
		}
		b.RunParallel(func(pb *testing.PB) {
			do := op()
			for pb.Next() {
				if err := do(); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64((loadgen.SelfCPU()-cpu0).Microseconds())/float64(b.N), "cpu-us/op")
		server1, err := serverCPU()
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(float64((server1-server0).Microseconds())/float64(b.N), "server-cpu-us/op")
	}

	b.Run("client", func(b *testing.B) {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.MaxIdleConnsPerHost = 64
		defer tr.CloseIdleConnections()
		c, err := client.New(base, "token", client.WithHTTPClient(&http.Client{Transport: tr, Timeout: 30 * time.Second}),
			client.WithRetry(0, 0), client.WithUserAgent("keyvault-bench/1"))
		if err != nil {
			b.Fatal(err)
		}
		run(b, func() func() error {
			return func() error {
				_, _, err := c.Recover(ctx, user, pin)
				return err
			}
		})
	})
	b.Run("conn", func(b *testing.B) {
		head := []byte("Host: " + strings.TrimPrefix(base, "http://") + "\r\nAuthorization: Bearer token\r\nContent-Type: application/json\r\n" +
			"Accept: application/json, application/problem+json\r\nUser-Agent: keyvault-bench/1\r\n")
		target, body := "/v1/backups/"+user+"/recover", []byte(`{"pin":"`+pin+`"}`)
		var conns []*loadgen.HTTPConn
		var mu sync.Mutex
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		run(b, func() func() error {
			c, err := loadgen.NewHTTPConn(base, nil, 30*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			var req []byte
			return func() error {
				req = loadgen.AppendRequest(req[:0], "POST", target, body, head)
				status, got, err := c.Do(ctx, req)
				if err == nil && (status != 200 || !bytes.Contains(got, want)) {
					err = fmt.Errorf("%d %q", status, got)
				}
				return err
			}
		})
	})
}
