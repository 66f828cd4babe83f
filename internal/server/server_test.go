package server

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// SoftHSM reads SOFTHSM2_CONF once per process: every test's token lives
// in the one token directory set up here.
var (
	hsmOnce            sync.Once
	hsmModule, hsmConf string
	hsmDir             string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if hsmDir != "" {
		os.RemoveAll(hsmDir)
	}
	os.Exit(code)
}

// kit is one test's vault: its SoftHSM token with key version 1, a bbolt
// store with rollback anchoring on, and an audit file, all in t.TempDir().
type kit struct {
	dir, auditPath, storePath string
	cfg                       *config.Config
}

func newKit(t *testing.T, label string) *kit {
	t.Helper()
	hsmOnce.Do(func() {
		var err error
		if hsmDir, err = os.MkdirTemp("", "server-softhsm-"); err != nil {
			t.Fatal(err)
		}
		hsmModule, hsmConf = softhsmtest.Setup(t, hsmDir)
	})
	if hsmModule == "" {
		t.Fatal("SoftHSM set-up failed in an earlier test")
	}
	const pin = "1234"
	softhsmtest.Token(t, hsmConf, label, pin)
	k := &kit{dir: t.TempDir()}
	k.auditPath = filepath.Join(k.dir, "audit.log")
	k.storePath = filepath.Join(k.dir, "keyvault.db")
	pinFile := filepath.Join(k.dir, "hsm-pin")
	if err := os.WriteFile(pinFile, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte("client-token"))
	yaml := fmt.Sprintf(`listen: 127.0.0.1:0
admin_listen: 127.0.0.1:0
store:
  path: %s
  rollback_anchor: true
hsm:
  module_env:
    SOFTHSM2_CONF: %s
  members:
    - name: a
      module: %s
      token_label: %s
      pin_file: %s
      max_sessions: 4
clients:
  - name: test
    namespace: test
    token_sha256: %s
log:
  level: info
  audit: %s
`, k.storePath, hsmConf, hsmModule, label, pinFile, hex.EncodeToString(sum[:]), k.auditPath)
	cfg, err := config.Parse([]byte(yaml))
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	k.cfg = cfg
	members, err := MemberConfigs(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mods := hsmpool.NewModules()
	defer mods.Close()
	if _, err := mods.Provision(members, ""); err != nil {
		t.Fatalf("provision: %v", err)
	}
	return k
}

// logBuffer is the server's log, safe to read while the server writes.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// find returns the first JSON log line whose msg is msg.
func (l *logBuffer) find(msg string) map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	sc := bufio.NewScanner(bytes.NewReader(l.b.Bytes()))
	for sc.Scan() {
		var line map[string]any
		if json.Unmarshal(sc.Bytes(), &line) == nil && line["msg"] == msg {
			return line
		}
	}
	return nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// running is a Server started by start.
type running struct {
	log        *logBuffer
	api, admin string // set once bound; empty if the store was refused
	stop       context.CancelFunc
	done       chan error
}

const refusalMsg = "refusing to serve the store: rollback check failed"

// start runs a Server for k.cfg and waits until it serves, refuses its
// store, or ends.
func (k *kit) start(t *testing.T) *running {
	t.Helper()
	r := &running{log: &logBuffer{}, done: make(chan error, 1)}
	ctx, stop := context.WithCancel(context.Background())
	r.stop = stop
	bound := make(chan [2]string, 1)
	srv := New(k.cfg, slog.New(slog.NewJSONHandler(r.log, nil)), prometheus.NewRegistry(), Options{
		AuditOut: io.Discard,
		Bound: func(api, admin string) error {
			bound <- [2]string{api, admin}
			return nil
		},
	})
	go func() { r.done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		stop()
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
			t.Error("Run did not return within 30s of its context ending")
		}
	})
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case a := <-bound:
			r.api, r.admin = a[0], a[1]
			return r
		case err := <-r.done:
			r.done <- err
			return r
		case <-tick.C:
			if r.log.find(refusalMsg) != nil {
				return r
			}
		case <-timeout:
			t.Fatalf("the server neither served, refused nor ended within 30s:\n%s", r.log)
		}
	}
}

// shutdown ends Run and returns its error.
func (r *running) shutdown(t *testing.T) error {
	t.Helper()
	r.stop()
	select {
	case err := <-r.done:
		r.done <- err // for the cleanup
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("Run did not return within 30s of its context ending:\n%s", r.log)
		return nil
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 15s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A store changed behind the rollback anchors is never served: the API
// listener does not open, the admin listener alone answers, /readyz with
// 503 and the reason, the refusal gauge is 1 for that reason, and Run
// returns the refusal once its context ends.
func TestRefusedStoreServesOnlyAdmin(t *testing.T) {
	k := newKit(t, "server-refused")
	first := k.start(t)
	if first.api == "" {
		t.Fatalf("a fresh store was not served: %v\n%s", <-first.done, first.log)
	}
	if code, body := get(t, "http://"+first.admin+"/readyz"); code != http.StatusOK {
		t.Fatalf("fresh store: /readyz %d %q", code, body)
	}
	if err := first.shutdown(t); err != nil {
		t.Fatalf("first run: %v", err)
	}

	// A write that bypasses the anchors: the store no longer matches them.
	st, err := boltstore.Open(boltstore.Options{Path: k.storePath})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CompareAndSwap(context.Background(), []byte("r/test/spliced"), 0, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	r := k.start(t)
	if r.api != "" {
		t.Fatalf("the refused store was served on %s", r.api)
	}
	line := r.log.find(refusalMsg)
	if line == nil {
		t.Fatalf("Run ended without refusing: %v\n%s", <-r.done, r.log)
	}
	admin, _ := line["admin"].(string)
	reason, _ := line["reason"].(string)
	if admin == "" || reason == "" {
		t.Fatalf("refusal log line without admin address or reason: %v", line)
	}
	code, body := get(t, "http://"+admin+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "("+reason+")") {
		t.Errorf("/readyz: %d %q, want 503 naming %s", code, body, reason)
	}
	_, metrics := get(t, "http://"+admin+"/metrics")
	if want := fmt.Sprintf("keyvault_anchor_refused{reason=%q} 1", reason); !strings.Contains(metrics, want) {
		t.Errorf("/metrics lacks %s", want)
	}
	if code, _ := get(t, "http://"+admin+"/admin/keys/usage"); code != http.StatusNotFound {
		t.Errorf("the refused admin listener serves the key endpoints: %d", code)
	}
	err = r.shutdown(t)
	if got, ok := anchor.IsRefused(err); !ok || string(got) != reason {
		t.Errorf("Run returned %v, want the refusal %s", err, reason)
	}
	if _, err := http.Get("http://" + admin + "/readyz"); err == nil {
		t.Error("the refused admin listener still answers after Run returned")
	}
}

// SIGHUP takes a new key version into use and reopens the audit file
// (logrotate renames it first).
func TestSIGHUPReloadsKeysAndReopensAudit(t *testing.T) {
	k := newKit(t, "server-sighup")
	r := k.start(t)
	if r.api == "" {
		t.Fatalf("not served: %v\n%s", <-r.done, r.log)
	}
	members, err := MemberConfigs(k.cfg)
	if err != nil {
		t.Fatal(err)
	}
	mods := hsmpool.NewModules()
	version, _, err := mods.Rotate(members, "")
	mods.Close()
	if err != nil || version != 2 {
		t.Fatalf("rotate: version %d, %v", version, err)
	}
	if err := os.Rename(k.auditPath, k.auditPath+".1"); err != nil {
		t.Fatal(err)
	}
	if line := r.log.find("keys reloaded on SIGHUP"); line != nil {
		t.Fatalf("keys reloaded before any SIGHUP: %v", line)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	var line map[string]any
	waitFor(t, "the key reload on SIGHUP", func() bool {
		line = r.log.find("keys reloaded on SIGHUP")
		return line != nil
	})
	if line["wrap_version"] != float64(2) || line["pin_version"] != float64(2) {
		t.Errorf("reload on SIGHUP: %v, want wrap and PIN version 2", line)
	}
	waitFor(t, "the audit file reopened", func() bool {
		_, err := os.Stat(k.auditPath)
		return err == nil
	})
	if r.log.find("audit log reopened on SIGHUP") == nil {
		t.Errorf("no log line for the audit reopen:\n%s", r.log)
	}
	if err := r.shutdown(t); err != nil {
		t.Errorf("Run: %v", err)
	}
}
