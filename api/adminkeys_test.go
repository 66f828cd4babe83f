package api

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/client"
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
	var audit bytes.Buffer
	h := NewAdminRouterWith(prometheus.NewRegistry(), func() error { return nil }, AdminOptions{TokenHashes: [][32]byte{admin}, Keys: ka,
		Audit: slog.New(slog.NewJSONHandler(&audit, nil))})
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

	// One audit event per change requested, none for the reads.
	var got []string
	for _, line := range bytes.Split(bytes.TrimSpace(audit.Bytes()), []byte("\n")) {
		var ev map[string]any
		if err := json.Unmarshal(line, &ev); err != nil || ev["msg"] != "audit" || ev["client"] != "admin" || ev["request_id"] == "" {
			t.Fatalf("audit event %q: %v", line, err)
		}
		s := ev["op"].(string) + ":" + ev["result"].(string)
		if v, ok := ev["key_version"]; ok {
			s += ":" + fmt.Sprint(v)
		}
		got = append(got, s)
	}
	want := []string{"keys_reload:success", "keys_retire:keys_in_use:1", "keys_retire:invalid_request", "keys_retire:success:3", "rewrap_start:started:2", "rewrap_start:already_running:2"}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("audit events %q, want %q", got, want)
	}

	// Without an admin token configured, the endpoints do not exist.
	off := NewAdminRouterWith(prometheus.NewRegistry(), func() error { return nil }, AdminOptions{Keys: ka})
	rec := httptest.NewRecorder()
	off.ServeHTTP(rec, httptest.NewRequest("GET", "/admin/keys/usage", nil))
	if rec.Code != http.StatusNotFound {
		t.Errorf("without a token configured: %d, want 404", rec.Code)
	}
}

// client.Admin speaks to the admin router over HTTP: every answer decodes
// into the shared types, a refusal is a *client.Error with the vault's
// code and detail, and a wrong token is a 401.
func TestAdminKeyEndpointsThroughClient(t *testing.T) {
	t.Parallel()
	hash := sha256.Sum256([]byte("admin-token"))
	srv := httptest.NewServer(NewAdminRouterWith(prometheus.NewRegistry(), func() error { return nil },
		AdminOptions{TokenHashes: [][32]byte{hash}, Keys: &fakeKeyAdmin{}, Logger: slog.New(slog.DiscardHandler)}))
	defer srv.Close()
	ac, err := client.NewAdmin(srv.URL+"/", "admin-token", srv.Client())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if vs, err := ac.ReloadKeys(ctx); err != nil || vs.Versions["wrap"] != 2 || vs.Versions["pin"] != 2 || vs.Versions["root"] != 1 {
		t.Errorf("reload: %+v, %v", vs, err)
	}
	if u, err := ac.KeyUsage(ctx); err != nil || u.Wrap[1] != 3 || u.Wrap[2] != 4 || u.PIN[1] != 7 || len(u.PIN) != 1 {
		t.Errorf("usage: %+v, %v", u, err)
	}
	_, err = ac.RetireKeys(ctx, 1)
	var e *client.Error
	if !errors.As(err, &e) || e.Status != http.StatusConflict || e.Code != "keys_in_use" || !strings.Contains(e.Detail, "keyvault keys rewrap") ||
		e.Op != "POST /admin/keys/retire" {
		t.Errorf("retire in use: %#v", err)
	}
	if r, err := ac.RetireKeys(ctx, 3); err != nil || r.Version != 3 || r.Destroyed["hsm-a"][0] != "keyvault-wrap-v3" {
		t.Errorf("retire: %+v, %v", r, err)
	}
	if st, started, err := ac.StartRewrap(ctx, 50); err != nil || !started || !st.Running || st.Target != 2 {
		t.Errorf("start rewrap: %+v %v %v", st, started, err)
	}
	if _, started, err := ac.StartRewrap(ctx, 50); err != nil || started {
		t.Errorf("start a running rewrap: started %v, %v", started, err)
	}
	if st, err := ac.RewrapStatus(ctx); err != nil || st.Done != 4 || st.Total != 10 || st.StartedAt != nil {
		t.Errorf("rewrap status: %+v, %v", st, err)
	}
	wrong, err := client.NewAdmin(srv.URL, "wrong", srv.Client())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := wrong.KeyUsage(ctx); !errors.As(err, &e) || e.Status != http.StatusUnauthorized {
		t.Errorf("wrong token: %v", err)
	}
}
