package e2e

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// benchJSON is the result object of keyvault bench --json.
type benchJSON struct {
	Op                 string           `json:"op"`
	Concurrency        int              `json:"concurrency"`
	DurationS          float64          `json:"duration_s"`
	Requests           int64            `json:"requests"`
	PerSecond          float64          `json:"requests_per_second"`
	Succeeded          int64            `json:"succeeded"`
	SucceededPerSecond float64          `json:"succeeded_per_second"`
	P50                *float64         `json:"p50_ms"`
	P90                *float64         `json:"p90_ms"`
	P99                *float64         `json:"p99_ms"`
	Max                *float64         `json:"max_ms"`
	Errors             map[string]int64 `json:"errors"`
}

func runBench(t *testing.T, args ...string) benchJSON {
	t.Helper()
	code, out := runCLI(t, append([]string{"bench", "--json", "--duration", "1s", "--warmup", "0s"}, args...)...)
	if code != 0 {
		t.Fatalf("bench %v: exit %d:\n%s", args, code, out)
	}
	// stderr (progress) and stdout (the object) come back together.
	line := out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:]
	var r benchJSON
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		t.Fatalf("bench %v: output is not one JSON object: %v\n%s", args, err, out)
	}
	if r.Requests == 0 || r.PerSecond <= 0 || r.P50 == nil || r.P90 == nil || r.P99 == nil || r.Max == nil ||
		*r.P50 > *r.P90 || *r.P90 > *r.P99 || *r.P99 > *r.Max || r.Errors == nil {
		t.Fatalf("bench %v: %+v", args, r)
	}
	return r
}

// keyvault bench against the real binary: each HTTP workload gets the
// answers it expects (a wrong PIN is a 403, a recovered secret is the
// enrolled one), and the raw HSM ceiling runs on the vault's own config.
func TestBench(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	v := startDev(t, dir)
	token := filepath.Join(dir, "token")
	for _, op := range []string{"recover", "enroll", "wrong", "mixed"} {
		r := runBench(t, "--url", v.API, "--token-file", token, "--op", op, "--concurrency", "4", "--users", "40")
		if r.Op != op || r.Concurrency != 4 || len(r.Errors) != 0 || r.Succeeded != r.Requests {
			t.Errorf("bench --op %s: %+v", op, r)
		}
	}
	// An open-loop run at a fixed rate sends about that many requests.
	if r := runBench(t, "--url", v.API, "--token-file", token, "--concurrency", "4", "--users", "40", "--rate", "100"); r.Requests < 90 || r.Requests > 110 {
		t.Errorf("bench --rate 100 for 1s sent %d requests", r.Requests)
	}
	v.Stop()
	// The raw ceiling opens the token itself: the vault must be stopped.
	for _, op := range []string{"recover", "enroll"} {
		if r := runBench(t, "--hsm", "--config", filepath.Join(dir, "keyvault.yaml"), "--op", op, "--concurrency", "4"); r.Op != "hsm-"+op || len(r.Errors) != 0 {
			t.Errorf("bench --hsm --op %s: %+v", op, r)
		}
	}
	for _, args := range [][]string{
		{"bench"},
		{"bench", "--url", v.API},
		{"bench", "--url", v.API, "--token-file", token, "--op", "bogus"},
		{"bench", "--url", v.API, "--token-file", token, "--users", "2", "--concurrency", "4"},
		{"bench", "--hsm", "--url", v.API},
		{"bench", "--hsm", "--config", filepath.Join(dir, "keyvault.yaml"), "--op", "wrong"},
		{"bench", "--url", v.API, "--token-file", token, "--duration", "0s"},
	} {
		if code, out := runCLI(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2:\n%s", args, code, out)
		}
	}
}
