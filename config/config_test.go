package config

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"text/template"
	"time"

	"go.yaml.in/yaml/v3"
)

// fixture holds real files for the paths a config names, so that Parse's
// existence checks pass.
type fixture struct {
	Dir, Module, PinFile, Cert, Key, CA, Store string
	Hash1, Hash2, Hash3                        string // hex SHA-256 of three tokens
	Hash1Upper                                 string // Hash1 in uppercase
	Missing                                    string // a path that does not exist
}

func newFixture(t testing.TB) fixture {
	t.Helper()
	dir := t.TempDir()
	fx := fixture{
		Dir:        dir,
		Module:     filepath.Join(dir, "libsofthsm2.so"),
		PinFile:    filepath.Join(dir, "hsm-b.pin"),
		Cert:       filepath.Join(dir, "server.crt"),
		Key:        filepath.Join(dir, "server.key"),
		CA:         filepath.Join(dir, "clients.crt"),
		Store:      filepath.Join(dir, "keyvault.db"),
		Hash1:      hashOf("token-1"),
		Hash2:      hashOf("token-2"),
		Hash3:      strings.ToUpper(hashOf("token-3")), // uppercase is allowed
		Hash1Upper: strings.ToUpper(hashOf("token-1")),
		Missing:    filepath.Join(dir, "missing", "nothing-here"),
	}
	for _, p := range []string{fx.Module, fx.Cert, fx.Key, fx.CA} {
		writeFile(t, p, "not empty")
	}
	writeFile(t, fx.PinFile, "1234\n")
	return fx
}

func hashOf(token string) string {
	h := sha256.Sum256([]byte(token))
	return hex.EncodeToString(h[:])
}

func writeFile(t testing.TB, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// render fills a config template with the fixture's paths and hashes.
func render(t testing.TB, fx fixture, text string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := template.Must(template.New("config").Parse(text)).Execute(&buf, fx); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

const fullYAML = `
listen: 127.0.0.1:8443
admin_listen: 127.0.0.1:9443
tls:
  cert_file: {{.Cert}}
  key_file: {{.Key}}
  client_ca_file: {{.CA}}
store:
  path: {{.Store}}
hsm:
  module_env:
    SOFTHSM2_CONF: /etc/softhsm2.conf
  members:
    - name: hsm-a
      module: {{.Module}}
      token_label: keyvault-a
      pin_env: KEYVAULT_HSM_A_PIN
      max_sessions: 4
    - name: hsm-b
      module: {{.Module}}
      token_label: keyvault-b
      pin_file: {{.PinFile}}
budget:
  default_max_attempts: 5
  max_attempts_limit: 50
  escalating_delay: {free_guesses: 3, base: 30s}
clients:
  - name: messenger
    token_sha256: {{.Hash1}}
  - name: backup
    namespace: messenger-backup
    token_sha256:
      - {{.Hash2}}
      - {{.Hash3}}
log:
  level: debug
  format: text
`

// The blocks of the smallest valid config; cases below replace one of them.
const (
	storeBlock   = "store:\n  path: {{.Store}}\n"
	membersHead  = "hsm:\n  members:\n"
	memberA      = "    - name: hsm-a\n      module: {{.Module}}\n      token_label: keyvault-a\n      pin_env: KEYVAULT_HSM_A_PIN\n"
	hsmBlock     = membersHead + memberA
	clientsHead  = "clients:\n"
	clientA      = "  - name: messenger\n    token_sha256: {{.Hash1}}\n"
	clientsBlock = clientsHead + clientA
	minimalYAML  = storeBlock + hsmBlock + clientsBlock
)

func TestParseFull(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	cfg, err := Parse(render(t, fx, fullYAML))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if cfg.Listen != "127.0.0.1:8443" || cfg.AdminListen != "127.0.0.1:9443" || cfg.InsecurePlaintext {
		t.Errorf("listeners: got %q %q %v", cfg.Listen, cfg.AdminListen, cfg.InsecurePlaintext)
	}
	if cfg.TLS == nil || *cfg.TLS != (TLS{CertFile: fx.Cert, KeyFile: fx.Key, ClientCAFile: fx.CA}) {
		t.Errorf("tls: got %+v", cfg.TLS)
	}
	if cfg.Store.Path != fx.Store {
		t.Errorf("store.path: got %q", cfg.Store.Path)
	}
	if got := cfg.HSM.ModuleEnv["SOFTHSM2_CONF"]; got != "/etc/softhsm2.conf" || len(cfg.HSM.ModuleEnv) != 1 {
		t.Errorf("module_env: got %v", cfg.HSM.ModuleEnv)
	}
	wantMembers := []Member{
		{Name: "hsm-a", Module: fx.Module, TokenLabel: "keyvault-a", PinEnv: "KEYVAULT_HSM_A_PIN", MaxSessions: 4},
		{Name: "hsm-b", Module: fx.Module, TokenLabel: "keyvault-b", PinFile: fx.PinFile, MaxSessions: DefaultMaxSessions},
	}
	if len(cfg.HSM.Members) != len(wantMembers) {
		t.Fatalf("members: got %+v", cfg.HSM.Members)
	}
	for i, want := range wantMembers {
		if cfg.HSM.Members[i] != want {
			t.Errorf("members[%d]: got %+v, want %+v", i, cfg.HSM.Members[i], want)
		}
	}
	if cfg.Budget != (Budget{DefaultMaxAttempts: 5, MaxAttemptsLimit: 50, EscalatingDelay: EscalatingDelay{FreeGuesses: 3, Base: 30 * time.Second}}) {
		t.Errorf("budget: got %+v", cfg.Budget)
	}
	if len(cfg.Clients) != 2 {
		t.Fatalf("clients: got %+v", cfg.Clients)
	}
	if c := cfg.Clients[0]; c.Name != "messenger" || c.Namespace != "messenger" || len(c.TokenSHA256) != 1 || c.ShareNamespace {
		t.Errorf("clients[0]: got %+v", c)
	}
	if c := cfg.Clients[1]; c.Namespace != "messenger-backup" || len(c.TokenSHA256) != 2 {
		t.Errorf("clients[1]: got %+v", c)
	}
	if cfg.Log != (Log{Level: "debug", Format: "text"}) || cfg.Log.SlogLevel() != slog.LevelDebug {
		t.Errorf("log: got %+v", cfg.Log)
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("Validate of a parsed config: %v", err)
	}
}

func TestParseDefaults(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	cfg, err := Parse(render(t, fx, minimalYAML))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if cfg.Listen != DefaultListen || cfg.AdminListen != DefaultAdminListen {
		t.Errorf("listeners: got %q %q", cfg.Listen, cfg.AdminListen)
	}
	if cfg.InsecurePlaintext || cfg.TLS != nil {
		t.Errorf("got insecure_plaintext %v, tls %+v; want false, nil", cfg.InsecurePlaintext, cfg.TLS)
	}
	if cfg.HSM.ModuleEnv != nil {
		t.Errorf("module_env: got %v, want none", cfg.HSM.ModuleEnv)
	}
	if got := cfg.HSM.Members[0].MaxSessions; got != DefaultMaxSessions {
		t.Errorf("max_sessions: got %d, want %d", got, DefaultMaxSessions)
	}
	if cfg.Budget != (Budget{DefaultMaxAttempts: 10, MaxAttemptsLimit: 20, EscalatingDelay: EscalatingDelay{FreeGuesses: 5, Base: time.Minute}}) {
		t.Errorf("budget: got %+v", cfg.Budget)
	}
	if c := cfg.Clients[0]; c.Namespace != c.Name || c.ShareNamespace {
		t.Errorf("client: got %+v, want namespace = name, no sharing", c)
	}
	if cfg.Log != (Log{Level: "info", Format: "json"}) {
		t.Errorf("log: got %+v", cfg.Log)
	}
}

// TestParseAccepts covers configs that look unusual but are fine.
func TestParseAccepts(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	tests := []struct {
		name string
		yaml string
		// check, if set, inspects the result.
		check func(t *testing.T, cfg *Config)
	}{
		{name: "port 0 on both listeners", yaml: "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n" + minimalYAML},
		{name: "ipv6 loopback", yaml: "listen: '[::1]:8080'\n" + minimalYAML},
		{name: "localhost", yaml: "listen: localhost:8080\n" + minimalYAML},
		{name: "other 127/8 address", yaml: "listen: 127.0.0.2:8080\n" + minimalYAML},
		{name: "non-loopback with insecure_plaintext", yaml: "listen: 0.0.0.0:8080\ninsecure_plaintext: true\n" + minimalYAML},
		{name: "non-loopback with tls", yaml: "listen: :8443\ntls:\n  cert_file: {{.Cert}}\n  key_file: {{.Key}}\n" + minimalYAML},
		{name: "same port on different hosts", yaml: "listen: 127.0.0.1:8080\nadmin_listen: 127.0.0.2:8080\n" + minimalYAML},
		{
			name: "empty values keep defaults",
			yaml: "listen:\nlog:\n  level:\n" + minimalYAML,
			check: func(t *testing.T, cfg *Config) {
				if cfg.Listen != DefaultListen || cfg.Log.Level != DefaultLogLevel {
					t.Errorf("got listen %q, level %q; want the defaults", cfg.Listen, cfg.Log.Level)
				}
			},
		},
		{
			name: "shared namespace, both agree",
			yaml: storeBlock + hsmBlock + clientsHead +
				"  - name: a\n    namespace: shared\n    share_namespace: true\n    token_sha256: {{.Hash1}}\n" +
				"  - name: b\n    namespace: shared\n    share_namespace: true\n    token_sha256: {{.Hash2}}\n",
		},
		{
			name: "anchors and merge keys",
			yaml: storeBlock + membersHead +
				"    - &base\n      name: hsm-a\n      module: {{.Module}}\n      token_label: keyvault-a\n      pin_env: PIN_A\n" +
				"    - <<: *base\n      name: hsm-b\n      token_label: keyvault-b\n" + clientsBlock,
			check: func(t *testing.T, cfg *Config) {
				m := cfg.HSM.Members[1]
				if m.Name != "hsm-b" || m.Module != fx.Module || m.PinEnv != "PIN_A" || m.MaxSessions != DefaultMaxSessions {
					t.Errorf("merged member: got %+v", m)
				}
			},
		},
		{
			name: "token of digits only stays a string",
			yaml: storeBlock + hsmBlock + clientsHead + "  - name: a\n    token_sha256: " + strings.Repeat("0", 64) + "\n",
			check: func(t *testing.T, cfg *Config) {
				if got := cfg.Clients[0].TokenSHA256; len(got) != 1 || got[0] != strings.Repeat("0", 64) {
					t.Errorf("token_sha256: got %q", got)
				}
			},
		},
		{name: "comments and document marker", yaml: "# keyvault\n---\n" + minimalYAML + "# end\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := Parse(render(t, fx, tt.yaml))
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if tt.check != nil {
				tt.check(t, cfg)
			}
		})
	}
}

// secretPIN appears in inline-PIN cases; no error message may contain it.
const secretPIN = "s3cr3t-pin-9876"

func TestParseRejects(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	member := func(lines string) string { // a member with hsm-a's name, then lines
		return storeBlock + membersHead + "    - name: hsm-a\n" + lines + clientsBlock
	}
	const okMember = "      module: {{.Module}}\n      token_label: keyvault-a\n"
	client := func(lines string) string {
		return storeBlock + hsmBlock + clientsHead + lines
	}
	tests := []struct {
		name string
		yaml string
		want []string // substrings of the error
	}{
		// Structure.
		{"empty file", "", []string{"config is empty"}},
		{"only comments", "# nothing\n", []string{"config is empty"}},
		{"null document", "~\n", []string{"config is empty"}},
		{"syntax error", "listen: [\n", []string{"parse config", "line"}},
		{"top level is a list", "- listen: x\n", []string{"config must be a YAML mapping", "got a list"}},
		{"two documents", minimalYAML + "---\nlisten: x\n", []string{"single YAML document"}},
		{"unknown top-level key", "lisen: 127.0.0.1:1\n" + minimalYAML, []string{"lisen: unknown key (line 1)"}},
		{"two members on one token", storeBlock + hsmBlock + strings.Replace(memberA, "hsm-a", "hsm-b", 1) + clientsBlock,
			[]string{"hsm.members[1].token_label: hsm.members[0] already uses this module and token"}},
		{"module_env sets the PIN variable", storeBlock + "hsm:\n  module_env:\n    KEYVAULT_HSM_A_PIN: " + secretPIN + "\n  members:\n" + memberA + clientsBlock,
			[]string{"hsm.members[0].pin_env: names a variable that hsm.module_env sets"}},
		{"admin token not a hash", "admin_token_sha256: my-admin-token\n" + minimalYAML, []string{"admin_token_sha256[0]: must be the hex SHA-256", "got 14 characters"}},
		{"admin token is a client's", "admin_token_sha256: [{{.Hash2}}, {{.Hash1}}]\n" + minimalYAML, []string{"admin_token_sha256[1]: is also a client's token hash"}},
		{"unknown member key", member(okMember + "      pin_env: P\n      pni: x\n"), []string{"hsm.members[0].pni: unknown key"}},
		{"unknown nested key", "log:\n  levle: info\n" + minimalYAML, []string{"log.levle: unknown key"}},
		{"inline pin", member(okMember + "      pin: " + secretPIN + "\n"), []string{"hsm.members[0].pin: the HSM PIN must not be inline; use pin_env or pin_file"}},
		{"inline password", member(okMember + "      password: " + secretPIN + "\n"), []string{"hsm.members[0].password: the HSM PIN must not be inline"}},
		{"inline pin_value", member(okMember + "      pin_value: " + secretPIN + "\n"), []string{"hsm.members[0].pin_value: the HSM PIN must not be inline"}},
		{"duplicate key", "listen: 127.0.0.1:1\nlisten: 127.0.0.1:2\n" + minimalYAML, []string{"listen: duplicate key (first at line 1) (line 2)"}},
		{"duplicate nested key", member(okMember + "      pin_env: P\n      token_label: again\n"), []string{"hsm.members[0].token_label: duplicate key"}},
		{"string for int", member(okMember + "      pin_env: P\n      max_sessions: eight\n"), []string{"hsm.members[0].max_sessions: expected an integer, got a string"}},
		{"float for int", "budget:\n  default_max_attempts: 2.5\n" + minimalYAML, []string{"budget.default_max_attempts: expected an integer"}},
		{"huge int", "budget:\n  default_max_attempts: 99999999999999999999999\n" + minimalYAML, []string{"budget.default_max_attempts:"}},
		{"yes for bool", "insecure_plaintext: yes\n" + minimalYAML, []string{"insecure_plaintext: expected a boolean"}},
		{"scalar for list", storeBlock + hsmBlock + "clients: messenger\n", []string{"clients: expected a list, got a string"}},
		{"list for mapping", "store: [a]\n" + hsmBlock + clientsBlock, []string{"store: expected a mapping, got a list"}},
		{"mapping for string", "listen: {a: b}\n" + minimalYAML, []string{"listen: expected a string, got a mapping"}},
		{"empty list item", storeBlock + membersHead + "    -\n" + clientsBlock, []string{"hsm.members[0]: expected a mapping, got no value"}},
		{"token as mapping", client("  - name: a\n    token_sha256: {x: y}\n"), []string{"clients[0].token_sha256: expected a string or a list of strings"}},
		{"token list with mapping", client("  - name: a\n    token_sha256:\n      - {{.Hash1}}\n      - {x: y}\n"), []string{"clients[0].token_sha256[1]: expected a string, got a mapping"}},
		{"custom tag", "listen: !env LISTEN\n" + minimalYAML, []string{"listen: unsupported YAML tag !env"}},
		{"module_env not a mapping", "hsm:\n  module_env: [A]\n  members:\n" + memberA + storeBlock + clientsBlock, []string{"hsm.module_env: expected a mapping"}},
		{"unknown profile", "hsm:\n  profile: aes\n  members:\n" + memberA + storeBlock + clientsBlock, []string{`hsm.profile: must be gcm, hmac or gcm-hsm-iv, not "aes"`}},

		// Required keys.
		{"no store", hsmBlock + clientsBlock, []string{"store.path: required"}},
		{"no members", storeBlock + "hsm:\n  members: []\n" + clientsBlock, []string{"hsm.members: at least one member required"}},
		{"no hsm", storeBlock + clientsBlock, []string{"hsm.members: at least one member required"}},
		{"no clients", storeBlock + hsmBlock, []string{"clients: at least one client required"}},
		{"client without token", client(clientA + "  - name: other\n"), []string{"clients[1].token_sha256: required"}},
		{"member fields missing", storeBlock + membersHead + "    - max_sessions: 2\n" + clientsBlock, []string{
			"hsm.members[0].name: required", "hsm.members[0].module: required",
			"hsm.members[0].token_label: required", "hsm.members[0].pin_env: required (or pin_file)",
		}},

		// Addresses.
		{"listen without port", "listen: localhost\n" + minimalYAML, []string{"listen: invalid address"}},
		{"listen named port", "listen: localhost:http\n" + minimalYAML, []string{"listen: invalid port"}},
		{"listen port too large", "listen: localhost:65536\n" + minimalYAML, []string{"listen: invalid port"}},
		{"listen empty", "listen: ''\n" + minimalYAML, []string{"listen: required"}},
		{"admin_listen bad", "admin_listen: 127.0.0.1:-1\n" + minimalYAML, []string{"admin_listen: invalid port"}},
		{"same address twice", "listen: 127.0.0.1:7000\nadmin_listen: 127.0.0.1:7000\n" + minimalYAML, []string{"admin_listen: must differ from listen"}},
		{"same port, admin on all interfaces", "listen: 127.0.0.1:7000\nadmin_listen: :7000\n" + minimalYAML, []string{"admin_listen: must differ from listen"}},
		{"plain HTTP on all interfaces", "listen: 0.0.0.0:8080\n" + minimalYAML, []string{"listen: plain HTTP on a non-loopback address needs tls or insecure_plaintext: true"}},
		{"plain HTTP on empty host", "listen: :8080\n" + minimalYAML, []string{"listen: plain HTTP on a non-loopback address"}},
		{"plain HTTP on a public name", "listen: vault.example.com:8080\n" + minimalYAML, []string{"listen: plain HTTP on a non-loopback address"}},

		// Paths.
		{"store directory missing", "store:\n  path: {{.Missing}}\n" + hsmBlock + clientsBlock, []string{"store.path: directory", "does not exist"}},
		{"store path is a directory", "store:\n  path: {{.Dir}}\n" + hsmBlock + clientsBlock, []string{"store.path:", "is a directory"}},
		{"tls cert without key", "tls:\n  cert_file: {{.Cert}}\n" + minimalYAML, []string{"tls.key_file: required"}},
		{"tls empty", "tls: {}\n" + minimalYAML, []string{"tls.cert_file: required", "tls.key_file: required"}},
		{"tls cert missing", "tls:\n  cert_file: {{.Missing}}\n  key_file: {{.Key}}\n" + minimalYAML, []string{"tls.cert_file: file", "does not exist"}},
		{"tls key is a directory", "tls:\n  cert_file: {{.Cert}}\n  key_file: {{.Dir}}\n" + minimalYAML, []string{"tls.key_file:", "is a directory"}},
		{"client ca missing", "tls:\n  cert_file: {{.Cert}}\n  key_file: {{.Key}}\n  client_ca_file: {{.Missing}}\n" + minimalYAML, []string{"tls.client_ca_file: file"}},
		{"module missing", member("      module: {{.Missing}}\n      token_label: t\n      pin_env: P\n"), []string{"hsm.members[0].module: file", "does not exist"}},
		{"pin file missing", member(okMember + "      pin_file: {{.Missing}}\n"), []string{"hsm.members[0].pin_file: file", "does not exist"}},

		// HSM members.
		{"pin_env and pin_file", member(okMember + "      pin_env: P\n      pin_file: {{.PinFile}}\n"), []string{"hsm.members[0]: set exactly one of pin_env and pin_file"}},
		{"pin_env bad name", member(okMember + "      pin_env: 1-BAD\n"), []string{"hsm.members[0].pin_env: not a valid environment variable name"}},
		{"member name bad", storeBlock + membersHead + "    - name: HSM_A\n" + okMember + "      pin_env: P\n" + clientsBlock, []string{"hsm.members[0].name: must match"}},
		{"member name too long", storeBlock + membersHead + "    - name: " + strings.Repeat("a", 33) + "\n" + okMember + "      pin_env: P\n" + clientsBlock, []string{"hsm.members[0].name: must match"}},
		{"member names duplicate", storeBlock + hsmBlock + memberA + clientsBlock, []string{"hsm.members[1].name: \"hsm-a\" is already the name of hsm.members[0]"}},
		{"max_sessions zero", member(okMember + "      pin_env: P\n      max_sessions: 0\n"), []string{"hsm.members[0].max_sessions: must be between 1 and 1024"}},
		{"max_sessions too large", member(okMember + "      pin_env: P\n      max_sessions: 1025\n"), []string{"hsm.members[0].max_sessions: must be between 1 and 1024"}},
		{"module_env bad name", "hsm:\n  module_env:\n    BAD-NAME: x\n  members:\n" + memberA + storeBlock + clientsBlock, []string{"hsm.module_env.BAD-NAME: not a valid environment variable name"}},

		// Budget.
		{"budget default above limit", "budget:\n  default_max_attempts: 30\n" + minimalYAML, []string{"budget.default_max_attempts: must not exceed budget.max_attempts_limit (20)"}},
		{"budget default zero", "budget:\n  default_max_attempts: 0\n" + minimalYAML, []string{"budget.default_max_attempts: must be at least 1"}},
		{"budget limit too large", "budget:\n  max_attempts_limit: 1001\n" + minimalYAML, []string{"budget.max_attempts_limit: must be at most 1000"}},
		{"escalating delay negative", "budget:\n  escalating_delay: {base: -1m}\n" + minimalYAML, []string{"budget.escalating_delay.base: must be from 0s (off) to 24h"}},
		{"escalating delay too long", "budget:\n  escalating_delay: {base: 25h}\n" + minimalYAML, []string{"budget.escalating_delay.base: must be from 0s (off) to 24h"}},
		{"escalating delay free guesses negative", "budget:\n  escalating_delay: {free_guesses: -1}\n" + minimalYAML, []string{"budget.escalating_delay.free_guesses: must not be negative"}},
		{"escalating delay under ratelimit", "ratelimit:\n  escalating_delay: {base: 0s}\n" + minimalYAML, []string{"ratelimit.escalating_delay: moved to budget.escalating_delay, with the same fields (line 2)"}},

		// Clients.
		{"client name bad", client("  - name: Messenger\n    token_sha256: {{.Hash1}}\n"), []string{"clients[0].name: must match"}},
		{"client name missing", client("  - namespace: ns\n    token_sha256: {{.Hash1}}\n"), []string{"clients[0].name: required"}},
		{"client names duplicate", client(clientA + "  - name: messenger\n    namespace: other\n    token_sha256: {{.Hash2}}\n"), []string{"clients[1].name: \"messenger\" is already the name of clients[0]"}},
		{"namespace bad", client("  - name: a\n    namespace: a/b\n    token_sha256: {{.Hash1}}\n"), []string{"clients[0].namespace: must match"}},
		{"namespace shared by default", client(clientA + "  - name: b\n    namespace: messenger\n    token_sha256: {{.Hash2}}\n"), []string{"clients[1].namespace: \"messenger\" is also used by clients[0]; both need share_namespace: true"}},
		{"namespace shared by one side only", client(clientA + "  - name: b\n    namespace: messenger\n    share_namespace: true\n    token_sha256: {{.Hash2}}\n"), []string{"clients[1].namespace:", "both need share_namespace"}},
		{"token not hex", client("  - name: a\n    token_sha256: my-bearer-token\n"), []string{"clients[0].token_sha256[0]: must be the hex SHA-256", "got 15 characters"}},
		{"token too short", client("  - name: a\n    token_sha256: abcd\n"), []string{"clients[0].token_sha256[0]:"}},
		{"token twice across clients", client(clientA + "  - name: b\n    token_sha256: [{{.Hash2}}, {{.Hash1}}]\n"), []string{"clients[1].token_sha256[1]: same token hash as clients[0].token_sha256[0]"}},
		{"token twice, case differs", client(clientA + "  - name: b\n    token_sha256: {{.Hash1Upper}}\n"), []string{"clients[1].token_sha256[0]: same token hash"}},

		// Log.
		{"log level bad", "log:\n  level: verbose\n" + minimalYAML, []string{"log.level: must be one of debug, info, warn, error"}},
		{"log format bad", "log:\n  format: xml\n" + minimalYAML, []string{"log.format: must be json or text"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := Parse(render(t, fx, tt.yaml))
			if err == nil {
				t.Fatalf("Parse succeeded with %+v; want an error containing %q", cfg, tt.want)
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q\ndoes not contain %q", err, want)
				}
			}
			if strings.Contains(err.Error(), secretPIN) {
				t.Errorf("error %q contains the PIN", err)
			}
		})
	}
}

func TestParseReportsAllProblems(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	doc := `
listen: 0.0.0.0
admin_listen: 127.0.0.1:99999
store:
  path: {{.Missing}}
hsm:
  members:
    - name: hsm-a
      module: {{.Missing}}
      token_label: keyvault-a
      pin_env: A
      pin_file: {{.PinFile}}
      max_sessions: 0
budget:
  default_max_attempts: 0
clients:
  - name: messenger
    token_sha256: abc
  - name: other
log:
  level: loud
ratelimit:
  escalating_delay: {free_guesses: 5, base: 1m}
`
	_, err := Parse(render(t, fx, doc))
	if err == nil {
		t.Fatal("Parse succeeded; want many problems")
	}
	want := []string{
		"listen: invalid address",
		"admin_listen: invalid port",
		"store.path: directory",
		"hsm.members[0].module: file",
		"hsm.members[0]: set exactly one of pin_env and pin_file",
		"hsm.members[0].max_sessions: must be between",
		"budget.default_max_attempts: must be at least 1",
		"clients[0].token_sha256[0]: must be the hex SHA-256",
		"clients[1].token_sha256: required",
		"log.level: must be one of",
		"ratelimit.escalating_delay: moved to budget.escalating_delay",
	}
	wantProblems(t, err, want)
	// One problem per line, each starting with its key path.
	for line := range strings.SplitSeq(err.Error(), "\n") {
		if !strings.Contains(line, ": ") {
			t.Errorf("line %q does not start with a key path", line)
		}
	}
}

func TestParseReportsAllUnknownKeys(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	doc := "lisen: x\nlog:\n  levle: info\n  fromat: json\n" + storeBlock + membersHead + memberA +
		"      pni: 1\n" + clientsHead + clientA + "    shared_namespace: true\n"
	_, err := Parse(render(t, fx, doc))
	if err == nil {
		t.Fatal("Parse succeeded; want unknown keys")
	}
	want := []string{
		"lisen: unknown key (line 1)",
		"log.levle: unknown key (line 3)",
		"log.fromat: unknown key (line 4)",
		"hsm.members[0].pni: unknown key (line 13)",
		"clients[0].shared_namespace: unknown key (line 17)",
	}
	wantProblems(t, err, want)
}

// TestParseReportsStructureAndValues: unknown, duplicate and ill-typed keys
// are pruned and reported, and the rest of the file is still validated, so
// one pass lists every kind of problem; a pruned value is not reported
// again as missing.
func TestParseReportsStructureAndValues(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	doc := `
listen: 0.0.0.0
lisen: 127.0.0.1:8080
store:
  path: [a, b]
hsm:
  members:
    - name: hsm-a
      module: {{.Module}}
      token_label: keyvault-a
      pin_env: KEYVAULT_HSM_A_PIN
      max_sessions: eight
    - name: hsm-b
      module: {{.Module}}
      token_label: keyvault-b
      pin: "1234"
budget:
  default_max_attempts: 0
  default_max_attempts: 3
clients:
  - name: messenger
    token_sha256: abc
log:
  level: loud
`
	_, err := Parse(render(t, fx, doc))
	if err == nil {
		t.Fatal("Parse succeeded; want many problems")
	}
	want := []string{
		"lisen: unknown key (line 3)",
		"store.path: expected a string, got a list (line 5)",
		"hsm.members[0].max_sessions: expected an integer, got a string (line 12)",
		"hsm.members[1].pin: the HSM PIN must not be inline; use pin_env or pin_file (line 16)",
		"budget.default_max_attempts: duplicate key (first at line 18) (line 19)",
		"listen: invalid address",
		"hsm.members[1].pin_env: required (or pin_file)",
		"budget.default_max_attempts: must be at least 1",
		"clients[0].token_sha256[0]: must be the hex SHA-256",
		"log.level: must be one of",
	}
	wantProblems(t, err, want)
	if strings.Contains(err.Error(), "store.path: required") {
		t.Errorf("a pruned value is reported again as missing:\n%v", err)
	}
	if strings.Contains(err.Error(), "1234") {
		t.Errorf("error %q contains the inline PIN", err)
	}
}

// wantProblems requires err to report exactly the problems in want, each
// found by a substring.
func wantProblems(t *testing.T, err error, want []string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error does not contain %q:\n%v", w, err)
		}
	}
	if n := countProblems(err); n != len(want) {
		t.Errorf("got %d problems, want %d:\n%v", n, len(want), err)
	}
}

func countProblems(err error) int {
	if multi, ok := err.(interface{ Unwrap() []error }); ok {
		return len(multi.Unwrap())
	}
	return 1
}

// TestValidateAppliesNoDefaults shows that a hand-built Config is checked as
// it is: Validate does not fill in defaults.
func TestValidateAppliesNoDefaults(t *testing.T) {
	t.Parallel()
	err := (&Config{}).Validate()
	if err == nil {
		t.Fatal("Validate of an empty Config succeeded")
	}
	for _, w := range []string{
		"listen: required", "admin_listen: required", "store.path: required",
		"hsm.members: at least one member required", "clients: at least one client required",
		"budget.default_max_attempts: must be at least 1", "log.level:", "log.format:",
	} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error does not contain %q:\n%v", w, err)
		}
	}
}

func TestParseNoFS(t *testing.T) {
	t.Parallel()
	// Every path points nowhere, as in a config shipped for another machine.
	doc := []byte(`
listen: 127.0.0.1:8443
tls:
  cert_file: /nonexistent/server.crt
  key_file: /nonexistent/server.key
  client_ca_file: /nonexistent/clients.crt
store:
  path: /nonexistent/dir/keyvault.db
hsm:
  members:
    - name: hsm-a
      module: /nonexistent/libsofthsm2.so
      token_label: keyvault-a
      pin_file: /nonexistent/pin
clients:
  - name: messenger
    token_sha256: ` + hashOf("t") + "\n")
	if _, err := ParseNoFS(doc); err != nil {
		t.Errorf("ParseNoFS: %v", err)
	}
	_, err := Parse(doc)
	if n := countProblems(err); err == nil || n != 6 {
		t.Errorf("Parse: got %d problems, want 6 missing paths:\n%v", n, err)
	}
	// Everything else is still checked.
	if _, err := ParseNoFS(append([]byte("lisen: x\n"), doc...)); err == nil || !strings.Contains(err.Error(), "lisen: unknown key") {
		t.Errorf("ParseNoFS with an unknown key: got %v", err)
	}
	if _, err := ParseNoFS(bytes.Replace(doc, []byte("127.0.0.1:8443"), []byte("127.0.0.1"), 1)); err == nil || !strings.Contains(err.Error(), "listen: invalid address") {
		t.Errorf("ParseNoFS with a bad address: got %v", err)
	}
}

func TestLoad(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	good := filepath.Join(fx.Dir, "good.yaml")
	writeFile(t, good, string(render(t, fx, minimalYAML)))
	if _, err := Load(good); err != nil {
		t.Errorf("Load: %v", err)
	}

	missing := filepath.Join(fx.Dir, "missing.yaml")
	if _, err := Load(missing); err == nil || !strings.Contains(err.Error(), missing) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load of a missing file: got %v; want an fs.ErrNotExist naming the path", err)
	}

	one := filepath.Join(fx.Dir, "one.yaml")
	writeFile(t, one, string(render(t, fx, "listen: x\n"+minimalYAML)))
	if _, err := Load(one); err == nil || !strings.HasPrefix(err.Error(), "config "+one+": listen: invalid address") {
		t.Errorf("Load with one problem: got %v", err)
	}

	two := filepath.Join(fx.Dir, "two.yaml")
	writeFile(t, two, string(render(t, fx, "listen: x\nadmin_listen: y\n"+minimalYAML)))
	_, err := Load(two)
	want := "config " + two + ": 2 problems:\nlisten: invalid address"
	if err == nil || !strings.HasPrefix(err.Error(), want) || !strings.Contains(err.Error(), "\nadmin_listen: invalid address") {
		t.Errorf("Load with two problems: got %v; want it to start with %q", err, want)
	}
}

func TestStringList(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		yaml    string
		want    StringList
		wantErr bool
	}{
		{name: "scalar", yaml: "l: abc", want: StringList{"abc"}},
		{name: "flow list", yaml: "l: [a, b]", want: StringList{"a", "b"}},
		{name: "block list", yaml: "l:\n  - a\n  - b\n  - c", want: StringList{"a", "b", "c"}},
		{name: "digits keep leading zeros", yaml: "l: 0123", want: StringList{"0123"}},
		{name: "empty list", yaml: "l: []", want: StringList{}},
		{name: "alias", yaml: "x: &h abc\nl: *h", want: StringList{"abc"}},
		{name: "mapping", yaml: "l: {a: b}", wantErr: true},
		{name: "nested list", yaml: "l: [[a]]", wantErr: true},
		{name: "null item", yaml: "l: [a, ~]", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var v struct {
				L StringList `yaml:"l"`
			}
			err := yaml.Unmarshal([]byte(tt.yaml), &v)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("got %q, want an error", v.L)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(v.L, tt.want) {
				t.Errorf("got %q, want %q", v.L, tt.want)
			}
		})
	}
}

// TestMemberPINFromEnv is not parallel: t.Setenv changes the process.
func TestMemberPINFromEnv(t *testing.T) {
	t.Setenv("KEYVAULT_CONFIG_TEST_PIN", "2468")
	pin, err := Member{Name: "hsm-a", PinEnv: "KEYVAULT_CONFIG_TEST_PIN"}.PIN()
	if err != nil || pin != "2468" {
		t.Errorf("PIN: got %q, %v; want 2468", pin, err)
	}
	t.Setenv("KEYVAULT_CONFIG_TEST_PIN", "")
	if _, err := (Member{Name: "hsm-a", PinEnv: "KEYVAULT_CONFIG_TEST_PIN"}).PIN(); err == nil || !strings.Contains(err.Error(), "is empty") {
		t.Errorf("PIN from an empty variable: got %v", err)
	}
}

func TestMemberPIN(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		writeFile(t, p, content)
		return p
	}
	const unset = "KEYVAULT_CONFIG_TEST_PIN_NEVER_SET"
	if _, ok := os.LookupEnv(unset); ok {
		t.Fatalf("%s is set in the environment", unset)
	}
	tests := []struct {
		name    string
		m       Member
		want    string
		wantErr []string
	}{
		{name: "file with newline", m: Member{PinFile: file("nl", "1234\n")}, want: "1234"},
		{name: "file with CRLF", m: Member{PinFile: file("crlf", "1234\r\n")}, want: "1234"},
		{name: "file without newline", m: Member{PinFile: file("plain", "1234")}, want: "1234"},
		{name: "spaces are kept", m: Member{PinFile: file("spaces", " 12 34 \n")}, want: " 12 34 "},
		{name: "env unset", m: Member{PinEnv: unset}, wantErr: []string{`hsm member "hsm-x"`, unset, "not set"}},
		{name: "file missing", m: Member{PinFile: filepath.Join(dir, "none")}, wantErr: []string{`hsm member "hsm-x"`, "no such file"}},
		{name: "file empty", m: Member{PinFile: file("empty", "\n")}, wantErr: []string{`hsm member "hsm-x"`, "is empty"}},
		{name: "file too large", m: Member{PinFile: file("large", strings.Repeat(secretPIN, 100))}, wantErr: []string{`hsm member "hsm-x"`, "larger than"}},
		{name: "both", m: Member{PinEnv: unset, PinFile: file("both", "1234")}, wantErr: []string{"only one of pin_env and pin_file"}},
		{name: "neither", m: Member{}, wantErr: []string{"no pin_env or pin_file"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.m.Name = "hsm-x"
			pin, err := tt.m.PIN()
			if tt.wantErr == nil {
				if err != nil || pin != tt.want {
					t.Errorf("got %q, %v; want %q", pin, err, tt.want)
				}
				return
			}
			if err == nil {
				t.Fatalf("got PIN %q, want an error", pin)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
			if strings.Contains(err.Error(), secretPIN) || strings.Contains(err.Error(), "1234") {
				t.Errorf("error %q contains a PIN", err)
			}
		})
	}
}

func TestSlogLevel(t *testing.T) {
	t.Parallel()
	for level, want := range map[string]slog.Level{
		"debug": slog.LevelDebug, "info": slog.LevelInfo, "warn": slog.LevelWarn,
		"error": slog.LevelError, "": slog.LevelInfo, "bogus": slog.LevelInfo,
	} {
		if got := (Log{Level: level}).SlogLevel(); got != want {
			t.Errorf("SlogLevel(%q) = %v, want %v", level, got, want)
		}
	}
}

func TestTokenHashes(t *testing.T) {
	t.Parallel()
	want := sha256.Sum256([]byte("token-1"))
	c := Client{TokenSHA256: StringList{hashOf("token-1"), strings.ToUpper(hashOf("token-1")), "not-a-hash"}}
	got := c.TokenHashes()
	if len(got) != 2 || got[0] != want || got[1] != want {
		t.Errorf("TokenHashes: got %x; want the hash twice and the invalid entry skipped", got)
	}
}

// notAConfig, as the first line of a YAML file under deploy/, marks a file
// that is not a keyvault config (a compose file, a manifest) so that
// TestShippedConfigs leaves it alone.
const notAConfig = "# not a keyvault config"

// TestShippedConfigs lints every YAML file shipped under deploy/, so that a
// change to this package cannot silently break a shipped config. Paths in
// them are for the target machine, hence ParseNoFS.
func TestShippedConfigs(t *testing.T) {
	t.Parallel()
	const deploy = "../deploy"
	var files []string
	err := filepath.WalkDir(deploy, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if ext := filepath.Ext(path); !d.IsDir() && (ext == ".yaml" || ext == ".yml") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The example config ships, so the walk must find it at least.
	example := filepath.Join(deploy, "keyvault.example.yaml")
	if !slices.Contains(files, example) {
		t.Fatalf("%s was not found by the walk (found %q)", example, files)
	}
	for _, path := range files {
		t.Run(path, func(t *testing.T) {
			t.Parallel()
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.HasPrefix(data, []byte(notAConfig)) {
				return // another tool's YAML (a manifest, a rule file)
			}
			if _, err := ParseNoFS(data); err != nil {
				t.Errorf("%s: %v\n(if this file is not a keyvault config, make its first line %q)", path, err, notAConfig)
			}
		})
	}
}

// FuzzParse checks that Parse never panics and that whatever it accepts
// also passes Validate.
func FuzzParse(f *testing.F) {
	fx := newFixture(f)
	for _, seed := range []string{
		fullYAML,
		minimalYAML,
		"listen: :8080\ninsecure_plaintext: true\n" + minimalYAML,
		storeBlock + membersHead + "    - &b\n      name: a\n      module: {{.Module}}\n      token_label: t\n      pin_env: P\n    - <<: *b\n      name: b\n" + clientsBlock,
		"lisen: x\n" + minimalYAML,
		"listen: [\n",
		"hsm:\n  members:\n    - pin: 1234\n",
		"clients:\n  - token_sha256: [a, {b: c}, ~]\n",
		"a: &a [*a]\n",
		"<<: {listen: x}\n",
		"---\n---\n",
		"",
	} {
		f.Add(render(f, fx, seed))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if cfg, err := Parse(data); err == nil {
			if err := cfg.Validate(); err != nil {
				t.Fatalf("Parse accepted a config that Validate refuses: %v", err)
			}
		} else if err.Error() == "" {
			t.Fatal("empty error message")
		}
		if cfg, err := ParseNoFS(data); err == nil {
			if err := cfg.validate(false); err != nil {
				t.Fatalf("ParseNoFS accepted a config that validate refuses: %v", err)
			}
		}
	})
}

func TestRateLimitSection(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	cfg, err := Parse(render(t, fx, minimalYAML))
	if err != nil {
		t.Fatal(err)
	}
	want := RateLimit{
		GuessesPerUser:           Bucket{PerMinute: 5, Burst: 5},
		RequestsPerClient:        Bucket{PerSecond: 500, Burst: 1000},
		WrongGuessesPerClient:    Bucket{PerMinute: 600, Burst: 600},
		HSMQueueTimeout:          50 * time.Millisecond,
		AdmittedPerHSMSession:    4,
		HSMSharePerClientPercent: 50,
	}
	if cfg.RateLimit != want {
		t.Fatalf("defaults: %+v", cfg.RateLimit)
	}
	cfg, err = Parse(render(t, fx, minimalYAML+`ratelimit:
  guesses_per_user: {per_second: 2, burst: 3}
  requests_per_client: {per_second: 0}
  hsm_queue_timeout: 20ms
  admitted_per_hsm_session: 2
  hsm_share_per_client_percent: 25
`))
	if err != nil {
		t.Fatal(err)
	}
	r := cfg.RateLimit
	if r.GuessesPerUser != (Bucket{PerSecond: 2, Burst: 3}) || r.GuessesPerUser.Rate() != 2 ||
		r.RequestsPerClient.Rate() != 0 || r.WrongGuessesPerClient.Rate() != 10 ||
		r.HSMQueueTimeout != 20*time.Millisecond || r.AdmittedPerHSMSession != 2 || r.HSMSharePerClientPercent != 25 {
		t.Fatalf("overrides: %+v", r)
	}
	for _, c := range []struct{ yaml, want string }{
		{"ratelimit:\n  guesses_per_user: {per_second: 1, per_minute: 1, burst: 1}\n", "ratelimit.guesses_per_user: set per_second or per_minute, not both"},
		{"ratelimit:\n  guesses_per_user: {per_minute: 5}\n", "ratelimit.guesses_per_user.burst: must be at least 1"},
		{"ratelimit:\n  requests_per_client: {per_second: -1, burst: 1}\n", "ratelimit.requests_per_client: must not be negative"},
		{"ratelimit:\n  hsm_queue_timeout: 50\n", "ratelimit.hsm_queue_timeout: expected a duration"},
		{"ratelimit:\n  hsm_queue_timeout: soon\n", "ratelimit.hsm_queue_timeout: expected a duration"},
		{"ratelimit:\n  admitted_per_hsm_session: 0\n", "ratelimit.admitted_per_hsm_session: must be from 1 to 1000"},
		{"ratelimit:\n  hsm_share_per_client_percent: 0\n", "ratelimit.hsm_share_per_client_percent: must be from 1 to 100"},
		{"ratelimit:\n  hsm_share_per_client_percent: 101\n", "ratelimit.hsm_share_per_client_percent: must be from 1 to 100"},
		{"ratelimit:\n  hsm_share_per_client_percent: 0.5\n", "ratelimit.hsm_share_per_client_percent: expected an integer"},
		{"ratelimit:\n  guesses_per_user: {per_hour: 1}\n", "ratelimit.guesses_per_user.per_hour: unknown key"},
	} {
		if _, err := Parse(render(t, fx, minimalYAML+c.yaml)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.yaml, err, c.want)
		}
	}
}

func TestAdminTokenHashes(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	cfg, err := Parse(render(t, fx, "admin_token_sha256: {{.Hash3}}\n"+minimalYAML))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	got := cfg.AdminTokenHashes()
	if len(got) != 1 || hex.EncodeToString(got[0][:]) != strings.ToLower(fx.Hash3) {
		t.Fatalf("admin token hashes %x, want %s", got, fx.Hash3)
	}
	if cfg, err = Parse(render(t, fx, minimalYAML)); err != nil || len(cfg.AdminTokenHashes()) != 0 {
		t.Fatalf("without admin_token_sha256: %v %v", cfg.AdminTokenHashes(), err)
	}
}
