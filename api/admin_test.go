package api

import (
	"context"
	"crypto/sha256"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// slowKeyAdmin counts usage slowly, as a large store does.
type slowKeyAdmin struct {
	fakeKeyAdmin
	delay time.Duration
}

func (s *slowKeyAdmin) Usage(ctx context.Context) (vault.KeyUsage, error) {
	time.Sleep(s.delay)
	return s.fakeKeyAdmin.Usage(ctx)
}

// TestKeyAdminOutlastsWriteTimeout serves the admin router behind a write
// timeout shorter than a usage count takes: the key lifecycle endpoints
// get their own deadline, the rest of the listener keeps the server's.
func TestKeyAdminOutlastsWriteTimeout(t *testing.T) {
	t.Parallel()
	admin := sha256.Sum256([]byte("admin-token"))
	h := NewAdminRouterWith(prometheus.NewRegistry(), func() error { return nil },
		AdminOptions{TokenHashes: [][32]byte{admin}, Keys: &slowKeyAdmin{delay: 600 * time.Millisecond}})
	srv := httptest.NewUnstartedServer(h)
	srv.Config.WriteTimeout = 200 * time.Millisecond
	srv.Start()
	defer srv.Close()

	req, _ := http.NewRequest(http.MethodGet, srv.URL+"/admin/keys/usage", nil)
	req.Header.Set("Authorization", "Bearer admin-token")
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatalf("usage behind a %v write timeout: %v", srv.Config.WriteTimeout, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("usage: %d %q %v", resp.StatusCode, body, err)
	}
}
