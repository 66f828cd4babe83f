package devsetup

import (
	"os"
	"path/filepath"
	"testing"

	"go.yaml.in/yaml/v3"
)

func TestBoundAddr(t *testing.T) {
	for _, tc := range []struct{ requested, bound, want string }{
		{"127.0.0.1:0", "127.0.0.1:41234", "127.0.0.1:41234"},
		{"[::1]:0", "[::1]:41234", "[::1]:41234"},
		{"0.0.0.0:0", "[::]:41234", "0.0.0.0:41234"},
		{":0", "[::]:41234", ":41234"},
		{"localhost:8080", "127.0.0.1:8080", "localhost:8080"},
		{"127.0.0.1:8080", "127.0.0.1:8080", "127.0.0.1:8080"},
	} {
		if got := BoundAddr(tc.requested, tc.bound); got != tc.want {
			t.Errorf("BoundAddr(%q, %q) = %q, want %q", tc.requested, tc.bound, got, tc.want)
		}
	}
}

// SetListenAddrs edits only the two top-level keys, keeps comments and
// the file's mode, adds a key the file lacks, and quotes what YAML would
// misread; the result is YAML that says what was written.
func TestSetListenAddrs(t *testing.T) {
	for _, tc := range []struct{ name, in, listen, want string }{
		{"both", "# listen: in a comment\nlisten: 127.0.0.1:8080   # the API\nadmin_listen: 127.0.0.1:9090\nlog:\n  level: info\n", "127.0.0.1:1",
			"# listen: in a comment\nlisten: 127.0.0.1:1   # the API\nadmin_listen: 127.0.0.1:2\nlog:\n  level: info\n"},
		{"missing", "log:\n  level: info", "127.0.0.1:1", "log:\n  level: info\nlisten: 127.0.0.1:1\nadmin_listen: 127.0.0.1:2\n"},
		{"IPv6", "listen: 127.0.0.1:8080\nadmin_listen: 127.0.0.1:9090\n", "[::1]:1", "listen: \"[::1]:1\"\nadmin_listen: 127.0.0.1:2\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "keyvault.yaml")
			if err := os.WriteFile(path, []byte(tc.in), 0o640); err != nil {
				t.Fatal(err)
			}
			if err := SetListenAddrs(path, tc.listen, "127.0.0.1:2"); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != tc.want {
				t.Errorf("got\n%s\nwant\n%s", got, tc.want)
			}
			var doc struct {
				Listen      string `yaml:"listen"`
				AdminListen string `yaml:"admin_listen"`
			}
			if err := yaml.Unmarshal(got, &doc); err != nil || doc.Listen != tc.listen || doc.AdminListen != "127.0.0.1:2" {
				t.Errorf("as YAML: %+v, %v; want listen %s, admin_listen 127.0.0.1:2", doc, err, tc.listen)
			}
			if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o640 {
				t.Errorf("mode after the edit: %v, %v; want 0640", fi.Mode(), err)
			}
			if entries, _ := os.ReadDir(filepath.Dir(path)); len(entries) != 1 {
				t.Errorf("files left beside the config: %v", entries)
			}
		})
	}
}
