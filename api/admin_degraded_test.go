package api

import (
	"errors"
	"fmt"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

type degradedErr struct{}

func (degradedErr) Error() string  { return "member oc refused: lacks CKM_AES_GCM" }
func (degradedErr) Degraded() bool { return true }

// A degraded pool is ready and says why; not ready because of it is not.
func TestReadyzShowsDegradedDetail(t *testing.T) {
	for _, c := range []struct {
		err  error
		code int
		body string
	}{
		{nil, 200, "ready\n"},
		{degradedErr{}, 200, "ready, degraded: member oc refused: lacks CKM_AES_GCM\n"},
		{fmt.Errorf("no healthy HSM member: %w", degradedErr{}), 503, "not ready: no healthy HSM member: member oc refused"},
		{errors.New("store: closed"), 503, "not ready: store: closed"},
	} {
		h := NewAdminRouter(prometheus.NewRegistry(), func() error { return c.err })
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest("GET", "/readyz", nil))
		if w.Code != c.code || !strings.HasPrefix(w.Body.String(), c.body) {
			t.Errorf("ready() = %v: %d %q, want %d %q", c.err, w.Code, w.Body, c.code, c.body)
		}
	}
}
