package api

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// BenchmarkRecoverRequest measures what the API adds to one recovery: the
// middleware chain, auth, decoding, the problem and JSON writers, the
// audit event and the request log (both to a discarding JSON handler), in
// process, over a vault that answers at once.
func BenchmarkRecoverRequest(b *testing.B) {
	benchRecover(b, &stubBackups{secretOut: []byte("0123456789abcdef0123456789abcdef")}, http.StatusOK)
}

// BenchmarkRecoverWrongPIN is BenchmarkRecoverRequest for a guess the
// vault finds wrong: the refusal's classification, audit result and
// problem document.
func BenchmarkRecoverWrongPIN(b *testing.B) {
	benchRecover(b, &stubBackups{err: &vault.WrongPINError{Remaining: 3}}, http.StatusForbidden)
}

// benchRecover sends recover requests through the router over s, each
// answered with status want.
func benchRecover(b *testing.B, s *stubBackups, want int) {
	h := newTestRouterWith(s, Options{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewJSONHandler(io.Discard, nil))})
	body := []byte(`{"pin":"1234-5678"}`)
	b.ReportAllocs()
	for b.Loop() {
		r := httptest.NewRequestWithContext(context.Background(), http.MethodPost, "/v1/backups/user-1/recover", bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("Authorization", "Bearer token-a")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != want {
			b.Fatalf("status %d, want %d: %s", w.Code, want, w.Body)
		}
	}
}
