package api

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

type fakeKeyAdmin struct {
	retired []uint32
	running bool
}

func (f *fakeKeyAdmin) Reload(context.Context) (map[vault.KeyRole]uint32, error) {
	return map[vault.KeyRole]uint32{vault.RoleWrap: 2, vault.RolePIN: 2, vault.RoleRoot: 1}, nil
}

func (f *fakeKeyAdmin) Usage(context.Context) (vault.KeyUsage, error) {
	return vault.KeyUsage{Wrap: map[uint32]int{1: 3, 2: 4}, PIN: map[uint32]int{1: 7}}, nil
}

func (f *fakeKeyAdmin) Retire(_ context.Context, v uint32) (map[string][]string, error) {
	if v == 1 {
		return nil, &vault.KeysInUseError{Version: 1, WrapRecords: 3, PINRecords: 7}
	}
	f.retired = append(f.retired, v)
	return map[string][]string{"hsm-a": {"keyvault-wrap-v3"}}, nil
}

func (f *fakeKeyAdmin) StartRewrap(float64) (vault.RewrapStatus, bool) {
	was := f.running
	f.running = true
	return vault.RewrapStatus{Running: true, Target: 2}, !was
}

func (f *fakeKeyAdmin) RewrapStatus() vault.RewrapStatus {
	return vault.RewrapStatus{Running: f.running, Target: 2, Total: 10, Done: 4}
}

func TestAdminKeyEndpoints(t *testing.T) {
	t.Parallel()
	admin := sha256.Sum256([]byte("admin-token"))
	ka := &fakeKeyAdmin{}
	h := NewAdminRouterWith(prometheus.NewRegistry(), func() error { return nil }, AdminOptions{TokenHashes: [][32]byte{admin}, Keys: ka})
	call := func(method, path, token, body string) (int, map[string]any) {
		req := httptest.NewRequest(method, path, strings.NewReader(body))
		if body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var out map[string]any
		_ = json.Unmarshal(rec.Body.Bytes(), &out)
		return rec.Code, out
	}
	for _, tok := range []string{"", "wrong", "admin-token "} {
		if code, _ := call("GET", "/admin/keys/usage", tok, ""); code != http.StatusUnauthorized {
			t.Errorf("token %q: %d, want 401", tok, code)
		}
	}
	if code, out := call("GET", "/admin/keys/usage", "admin-token", ""); code != 200 || out["wrap"].(map[string]any)["2"] != 4.0 || out["pin"].(map[string]any)["1"] != 7.0 {
		t.Errorf("usage: %d %v", code, out)
	}
	if code, out := call("POST", "/admin/keys/reload", "admin-token", ""); code != 200 || out["versions"].(map[string]any)["wrap"] != 2.0 {
		t.Errorf("reload: %d %v", code, out)
	}
	if code, out := call("POST", "/admin/keys/retire", "admin-token", `{"version":1}`); code != http.StatusConflict || out["code"] != "keys_in_use" || out["wrap_records"] != 3.0 || out["pin_records"] != 7.0 {
		t.Errorf("retire in use: %d %v", code, out)
	}
	if code, _ := call("POST", "/admin/keys/retire", "admin-token", `{"versoin":3}`); code != http.StatusBadRequest {
		t.Errorf("retire with a misspelt field: %d", code)
	}
	if code, out := call("POST", "/admin/keys/retire", "admin-token", `{"version":3}`); code != 200 || out["retired"] != 3.0 || len(ka.retired) != 1 {
		t.Errorf("retire: %d %v", code, out)
	}
	if code, _ := call("POST", "/admin/rewrap", "admin-token", `{"per_second":50}`); code != http.StatusAccepted {
		t.Errorf("start rewrap: %d", code)
	}
	if code, _ := call("POST", "/admin/rewrap", "admin-token", ""); code != http.StatusOK {
		t.Errorf("start a running rewrap: %d, want 200", code)
	}
	if code, out := call("GET", "/admin/rewrap", "admin-token", ""); code != 200 || out["done"] != 4.0 || out["running"] != true {
		t.Errorf("rewrap status: %d %v", code, out)
	}

	// Without an admin token configured, the endpoints do not exist.
	off := NewAdminRouterWith(prometheus.NewRegistry(), func() error { return nil }, AdminOptions{Keys: ka})
	rec := httptest.NewRecorder()
	off.ServeHTTP(rec, httptest.NewRequest("GET", "/admin/keys/usage", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("without a token configured: %d, want 404", rec.Code)
	}
}
