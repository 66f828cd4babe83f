package e2e

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestAuditSink: with log.level warn, the audit events still arrive, one
// JSON object per decision, in the file log.audit names; after logrotate's
// rename and SIGHUP the vault writes to a new file at that path; and no
// event holds the PIN, the secret or the raw user_id. Without log.audit,
// the events go to the log's stream, still at warn.
func TestAuditSink(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop()
	cfg := filepath.Join(dir, "keyvault.yaml")
	auditPath := filepath.Join(dir, "audit.log")
	kvproc.SetSection(t, cfg, "log", "log:\n  level: warn\n  audit: "+auditPath+"\n")

	const user, pin, newPIN = "alice-raw-user-id", "pin-7391-secret", "pin-8402-secret"
	secret := []byte("history-key-0123456789abcdef-audit")
	v := startQuiet(t, dir, cfg)
	c := newClient(t, v.API, v.Token)
	c.mustEnroll(t, http.StatusCreated, user, secret, pin, 5)
	wantProblem(t, user, c.recover(t, user, "pin-0000-wrong"), http.StatusForbidden, "wrong_pin")
	c.mustRecover(t, user, pin, secret)

	// logrotate: rename, then SIGHUP; the reopen is asynchronous.
	if err := os.Rename(auditPath, auditPath+".1"); err != nil {
		t.Fatal(err)
	}
	if err := v.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the audit log reopened after SIGHUP", func() bool {
		_, err := os.Stat(auditPath)
		return err == nil
	})
	if r := c.changePIN(t, user, pin, newPIN); r.Status != http.StatusOK {
		t.Fatalf("change PIN: %v", r)
	}
	if r := c.delete(t, user); r.Status != http.StatusNoContent {
		t.Fatalf("delete: %v", r)
	}
	v.Stop()

	rotated := auditOps(t, readFile(t, auditPath+".1"))
	current := auditOps(t, readFile(t, auditPath))
	if want := "enroll:created recover:wrong_pin recover:success"; rotated != want {
		t.Errorf("rotated audit log: %q, want %q", rotated, want)
	}
	if want := "change_pin:success delete:success"; current != want {
		t.Errorf("reopened audit log: %q, want %q", current, want)
	}
	if bytes.Contains(v.Logs(), []byte(`"msg":"audit"`)) {
		t.Errorf("audit events in the main log although log.audit is a file:\n%s", v.Logs())
	}
	all := bytes.Join([][]byte{readFile(t, auditPath+".1"), readFile(t, auditPath), v.Logs()}, nil)
	for _, s := range []string{pin, newPIN, user, string(secret), base64.StdEncoding.EncodeToString(secret), v.Token} {
		if bytes.Contains(all, []byte(s)) {
			t.Errorf("the audit events or the log hold %q", s)
		}
	}

	// Without log.audit: the log's stream, whatever its level.
	kvproc.SetSection(t, cfg, "log", "log:\n  level: warn\n")
	v = startQuiet(t, dir, cfg)
	c = newClient(t, v.API, v.Token)
	c.mustEnroll(t, http.StatusCreated, "bob", secret, pin, 0)
	v.Stop()
	if got := auditOps(t, v.Logs()); got != "enroll:created" {
		t.Errorf("audit events on the log's stream at level warn: %q, want enroll:created\n%s", got, v.Logs())
	}
}

// startQuiet serves cfg on two free ports and waits for /healthz: at log
// level warn the vault does not log "keyvault serving", which startServe
// waits for.
func startQuiet(t *testing.T, dir, cfg string) *vault {
	t.Helper()
	api, admin := freeAddr(t), freeAddr(t)
	setTopLevel(t, cfg, "listen", api)
	setTopLevel(t, cfg, "admin_listen", admin)
	v := kvproc.Launch(t, keyvaultBin, dir, "serve", "--config", cfg)
	v.API, v.Admin = "http://"+api, "http://"+admin
	waitFor(t, startTimeout, "/healthz", func() bool {
		select {
		case <-v.Exited():
			t.Fatalf("keyvault serve exited: %v\n%s", v.Err(), v.Logs())
		default:
		}
		r, err := http.Get(v.Admin + "/readyz")
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == http.StatusOK
	})
	tok, err := os.ReadFile(filepath.Join(dir, "token"))
	if err != nil {
		t.Fatal(err)
	}
	v.Token = strings.TrimSpace(string(tok))
	return v
}

// setTopLevel sets the top-level scalar key of a config file.
func setTopLevel(t *testing.T, path, key, value string) {
	t.Helper()
	data := string(readFile(t, path))
	lines, n := strings.SplitAfter(data, "\n"), 0
	for i, l := range lines {
		if strings.HasPrefix(l, key+": ") {
			lines[i], n = fmt.Sprintf("%s: %s\n", key, value), n+1
		}
	}
	if n != 1 {
		t.Fatalf("%d %s lines in %s, want 1", n, key, path)
	}
	if err := os.WriteFile(path, []byte(strings.Join(lines, "")), 0o600); err != nil {
		t.Fatal(err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return data
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// auditOps lists the audit events in out as "op:result", checking each is
// one JSON object with the fields docs/audit.md promises.
func auditOps(t *testing.T, out []byte) string {
	t.Helper()
	var ops []string
	for _, line := range bytes.Split(out, []byte("\n")) {
		var ev map[string]any
		if json.Unmarshal(line, &ev) != nil || ev["msg"] != "audit" {
			continue
		}
		for _, k := range []string{"time", "request_id", "client", "op", "namespace", "user", "result", "duration_ms"} {
			if _, ok := ev[k]; !ok {
				t.Errorf("audit event without %s: %s", k, line)
			}
		}
		ops = append(ops, fmt.Sprintf("%v:%v", ev["op"], ev["result"]))
	}
	return strings.Join(ops, " ")
}
