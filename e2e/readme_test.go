package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestREADMEWalkThrough runs the README's curl walk-through, as written,
// against a vault served by `keyvault dev` with the default limits (its
// addresses and token file swapped for the test's), and requires what its
// comments promise: every JSON answer shown (the parts between "...", in
// order) and every row of statuses printed. Every curl that sends a body
// sends Content-Type: application/json.
func TestREADMEWalkThrough(t *testing.T) {
	softhsmtest.Module(t)
	curl, err := exec.LookPath("curl")
	needTool(t, "the README walk-through (curl)", err)
	t.Parallel()
	readme, err := os.ReadFile(filepath.Join(moduleRoot, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	script := walkThrough(t, string(readme))
	want := walkThroughPromises(t, script)

	dir := t.TempDir()
	v := startDevLimited(t, dir)
	defer v.Stop()
	run := strings.NewReplacer("http://127.0.0.1:8080", v.API, "http://127.0.0.1:9090", v.Admin,
		".keyvault-dev/token", filepath.Join(dir, "token")).Replace(script)
	if run == script {
		t.Fatal("the walk-through names none of the dev addresses")
	}
	cmd := exec.Command("bash", "-c", run)
	cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(curl)+":"+os.Getenv("PATH"))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("the walk-through failed: %v\n%s", err, out)
	}
	rest := string(out)
	for _, w := range want {
		i := strings.Index(rest, w)
		if i < 0 {
			t.Fatalf("the walk-through's output lacks %q (in order, after the promises before it):\n%s", w, out)
		}
		rest = rest[i+len(w):]
	}
}

// walkThrough is the sh block under "## Walk-through with curl".
func walkThrough(t *testing.T, readme string) string {
	t.Helper()
	_, after, ok := strings.Cut(readme, "\n## Walk-through with curl\n")
	if !ok {
		t.Fatal(`README.md has no "## Walk-through with curl" section`)
	}
	_, block, ok := strings.Cut(after, "```sh\n")
	if !ok {
		t.Fatal("the walk-through has no sh block")
	}
	block, _, ok = strings.Cut(block, "```")
	if !ok {
		t.Fatal("the walk-through's sh block is not closed")
	}
	return block
}

// walkThroughPromises reads what the script's comments promise, in order:
// a comment line holding a JSON answer gives its parts between "...", and
// a trailing comment of statuses ("# 403 403 429") gives that row. It also
// requires the Content-Type header on every curl with a body.
func walkThroughPromises(t *testing.T, script string) []string {
	t.Helper()
	statuses := regexp.MustCompile(`#\s+([0-9]{3}(?: [0-9]{3})*)\s*$`)
	var want []string
	for _, line := range strings.Split(script, "\n") {
		trimmed := strings.TrimSpace(line)
		if strings.HasPrefix(trimmed, "curl ") && strings.Contains(trimmed, " -d ") &&
			!strings.Contains(trimmed, "-H 'Content-Type: application/json'") {
			t.Errorf("a curl with a body does not send Content-Type: application/json: %s", trimmed)
		}
		if j, ok := strings.CutPrefix(trimmed, "# {"); ok {
			for _, part := range strings.Split("{"+j, "...") {
				if part != "" {
					want = append(want, part)
				}
			}
			continue
		}
		if m := statuses.FindStringSubmatch(line); m != nil && !strings.HasPrefix(trimmed, "#") {
			want = append(want, m[1])
		}
	}
	if len(want) < 10 {
		t.Fatalf("the walk-through promises only %q", want)
	}
	return want
}
