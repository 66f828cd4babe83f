package adminconn

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/config"
)

// The token comes from the file, else from $KEYVAULT_ADMIN_TOKEN; with
// neither there is no client, and --admin-url replaces the config's.
func TestAdmin(t *testing.T) {
	cfg := &config.Config{AdminListen: "0.0.0.0:9090"}
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte("  from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("KEYVAULT_ADMIN_TOKEN", "")
	if ac, err := Admin(cfg, "", ""); ac != nil || err != nil {
		t.Errorf("no token: %v, %v; want no client and no error", ac, err)
	}
	if tok, err := Token(file); tok != "from-file" || err != nil {
		t.Errorf("Token(file) = %q, %v", tok, err)
	}
	if _, err := Token(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, fs.ErrNotExist) || !strings.HasPrefix(err.Error(), "--admin-token-file: ") {
		t.Errorf("Token of a missing file: %v", err)
	}
	t.Setenv("KEYVAULT_ADMIN_TOKEN", " from-env ")
	if tok, err := Token(""); tok != "from-env" || err != nil {
		t.Errorf("Token(\"\") = %q, %v", tok, err)
	}
	ac, err := Admin(cfg, "", "")
	if err != nil || ac.URL() != "http://127.0.0.1:9090" {
		t.Errorf("Admin from the config: %v, %v; want http://127.0.0.1:9090", ac, err)
	}
	if ac, err := Admin(cfg, "https://10.0.0.1:9999", file); err != nil || ac.URL() != "https://10.0.0.1:9999" {
		t.Errorf("Admin with a URL: %v, %v", ac, err)
	}
	// Plain http:// off loopback carries the token in the clear: only with
	// admin_insecure_plaintext, as the vault itself.
	if ac, err := Admin(cfg, "http://10.0.0.1:9999", file); err == nil || !strings.Contains(err.Error(), "admin_insecure_plaintext") {
		t.Errorf("Admin with a plain http:// URL off loopback: %v, %v; want refused, naming admin_insecure_plaintext", ac, err)
	}
	remote := &config.Config{AdminListen: "10.0.0.1:9090", AdminInsecurePlaintext: true}
	if ac, err := Admin(remote, "", file); err != nil || ac.URL() != "http://10.0.0.1:9090" {
		t.Errorf("Admin from a config with admin_insecure_plaintext: %v, %v", ac, err)
	}
}

func TestRefusal(t *testing.T) {
	t.Parallel()
	other := errors.New("dial tcp: connection refused")
	for _, tc := range []struct {
		err  error
		want string
	}{
		{other, other.Error()},
		{&client.Error{Op: "POST /admin/keys/reload", Status: 404}, "http://vault:9090 answered 404: is admin_token_sha256 set in the running vault's config?"},
		{&client.Error{Op: "POST /admin/keys/retire", Status: 409, Detail: "3 backups use version 1"}, "refused (409): 3 backups use version 1"},
		{&client.Error{Op: "GET /admin/rewrap", Status: 502}, "GET /admin/rewrap: status 502"},
	} {
		if got := Refusal("http://vault:9090", tc.err); got.Error() != tc.want {
			t.Errorf("Refusal(%v) = %q, want %q", tc.err, got, tc.want)
		}
	}
}

// WaitRewrap reports every status until the job no longer runs, and
// stops at a failed call.
func TestWaitRewrap(t *testing.T) {
	t.Parallel()
	var calls, fail atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/admin/rewrap" || r.Method != http.MethodGet || r.Header.Get("Authorization") != "Bearer tok" {
			http.Error(w, "unexpected", http.StatusTeapot)
			return
		}
		if fail.Load() != 0 {
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusConflict)
			w.Write([]byte(`{"type":"urn:keyvault:problem:conflict","title":"Conflict","status":409,"detail":"no"}`))
			return
		}
		n := calls.Add(1)
		json.NewEncoder(w).Encode(client.RewrapStatus{Running: n < 3, Target: 2, Done: int(n)})
	}))
	defer srv.Close()
	ac, err := client.NewAdmin(srv.URL, "tok", nil)
	if err != nil {
		t.Fatal(err)
	}
	var seen []int
	st, err := WaitRewrap(context.Background(), ac, time.Millisecond, func(s client.RewrapStatus) { seen = append(seen, s.Done) })
	if err != nil || st.Running || st.Done != 3 || len(seen) != 3 {
		t.Errorf("WaitRewrap: %+v, %v, progress %v; want the finished status after 3 calls", st, err, seen)
	}
	fail.Store(1)
	if _, err := WaitRewrap(context.Background(), ac, time.Millisecond, func(client.RewrapStatus) {}); Refusal(ac.URL(), err).Error() != "refused (409): no" {
		t.Errorf("WaitRewrap on a refusal: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := WaitRewrap(ctx, ac, time.Hour, func(client.RewrapStatus) {}); !errors.Is(err, context.Canceled) {
		t.Errorf("WaitRewrap with an ended context: %v", err)
	}
}
