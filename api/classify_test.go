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
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/ratelimit"
	"github.com/keyvault/keyvault/vault"
)

// TestClassifyRefusals: the API's own refusals come before the vault's
// outcome, and the metric result, the audit result and the limits' view
// (checked, wrong, delayed) agree for each.
func TestClassifyRefusals(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name                   string
		err                    error
		result, audit          string
		checked, wrong, delayd bool
	}{
		{"rate limit", fmt.Errorf("admit: %w", &ratelimit.Error{Limiter: ratelimit.LimiterGuessesPerUser, RetryAfter: time.Second}), "rate_limited", "rate_limited", false, false, false},
		{"escalating delay", fmt.Errorf("precheck: %w", &vault.DelayedError{RetryAfter: time.Second}), "rate_limited", "rate_limited", false, false, true},
		{"api problem", badRequest("pin: missing"), codeInvalid, codeInvalid, false, false, false},
		{"vault invalid", fmt.Errorf("%w: pin: too short", vault.ErrInvalid), "invalid", codeInvalid, false, false, false},
		{"own lockout", &vault.LockedError{Checked: true}, "locked", "lockout", true, true, false},
		{"found locked", vault.ErrLocked, "locked", "locked", false, false, false},
		{"wrong PIN", &vault.WrongPINError{Remaining: 2}, "wrong_pin", "wrong_pin", true, true, false},
		{"admission shed", fmt.Errorf("%w: no healthy HSM member", vault.ErrUnavailable), "unavailable", "unavailable", false, false, false},
		{"internal", errors.New("boom"), "error", codeInternal, false, false, false},
	}
	for _, c := range cases {
		o := classify(c.err)
		if o.Result != c.result || auditResult(o) != c.audit || o.Checked != c.checked || o.Wrong != c.wrong || o.Delayed != c.delayd {
			t.Errorf("%s: result %q audit %q checked %v wrong %v delayed %v; want %q %q %v %v %v", c.name,
				o.Result, auditResult(o), o.Checked, o.Wrong, o.Delayed, c.result, c.audit, c.checked, c.wrong, c.delayd)
		}
	}
}

type failingKeyAdmin struct {
	fakeKeyAdmin
	reload, retire error
}

func (f *failingKeyAdmin) Reload(context.Context) (map[vault.KeyRole]uint32, error) {
	return nil, f.reload
}

func (f *failingKeyAdmin) Retire(context.Context, uint32) (map[string][]string, error) {
	return nil, f.retire
}

// TestAdminRefusals: key lifecycle refusals are problem documents of
// writeError; a cause the API did not write goes to the log, not the body.
func TestAdminRefusals(t *testing.T) {
	t.Parallel()
	const secretish = "CKR_PIN_INCORRECT on slot 7 with label keyvault-wrap-v3"
	lagging := &vault.LaggingNodesError{Version: 1, Nodes: []vault.NodeLag{{Node: "node-b", Wrap: 1, PIN: 1, Silent: 2 * time.Second}}}
	cases := []struct {
		name, path, body string
		ka               *failingKeyAdmin
		code, detail     string
		logged           bool
	}{
		{"reload", "/admin/keys/reload", "", &failingKeyAdmin{reload: errors.New(secretish)}, "reload_refused", "server log", true},
		{"retire failed", "/admin/keys/retire", `{"version":1}`, &failingKeyAdmin{retire: fmt.Errorf("destroy: %s", secretish)}, "retire_failed", "server log", true},
		{"nodes lagging", "/admin/keys/retire", `{"version":1}`, &failingKeyAdmin{retire: fmt.Errorf("retire: %w", lagging)}, "nodes_lagging", "node-b (seals under wrap v1, PIN v1", true},
		{"invalid", "/admin/keys/retire", `{"version":9}`, &failingKeyAdmin{retire: fmt.Errorf("%w: version: must be older", vault.ErrInvalid)}, "invalid_request", "version: must be older", false},
	}
	for _, c := range cases {
		var log bytes.Buffer
		h := NewAdminRouterWith(prometheus.NewRegistry(), func() error { return nil }, AdminOptions{
			TokenHashes: [][32]byte{sha256.Sum256([]byte("admin-token"))}, Keys: c.ka,
			Logger: slog.New(slog.NewJSONHandler(&log, nil)), Audit: slog.New(slog.DiscardHandler)})
		req := httptest.NewRequest("POST", c.path, strings.NewReader(c.body))
		req.Header.Set("Authorization", "Bearer admin-token")
		if c.body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		var p problem
		if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil {
			t.Fatalf("%s: %v: %s", c.name, err, rec.Body)
		}
		want := http.StatusConflict
		if c.code == codeInvalid {
			want = http.StatusBadRequest
		}
		if rec.Code != want || p.Status != want || p.Code != c.code || p.Type != "urn:keyvault:problem:"+c.code || p.Title == "" ||
			p.RequestID == "" || !strings.Contains(p.Detail, c.detail) || rec.Header().Get("Content-Type") != "application/problem+json" {
			t.Errorf("%s: %d %+v", c.name, rec.Code, p)
		}
		if strings.Contains(rec.Body.String(), secretish) {
			t.Errorf("%s: the cause's text reached the body: %s", c.name, rec.Body)
		}
		if got := strings.Contains(log.String(), "key lifecycle request refused"); got != c.logged {
			t.Errorf("%s: cause logged %v, want %v: %s", c.name, got, c.logged, log.String())
		}
	}
}
