package config

import (
	"strings"
	"testing"
	"time"
)

// TestListenerDefaults checks the defaults of the connection caps and the
// timeouts both listeners share, and that a partial http_timeouts keeps
// the defaults of the keys it leaves out.
func TestListenerDefaults(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	cfg, err := Parse(render(t, fx, minimalYAML))
	if err != nil {
		t.Fatal(err)
	}
	want := HTTPTimeouts{ReadHeader: 10 * time.Second, Read: 30 * time.Second, Write: 30 * time.Second, Idle: 2 * time.Minute}
	if cfg.HTTPTimeouts != want || cfg.MaxConnections != 4096 || cfg.AdminMaxConnections != 32 ||
		cfg.AdminTLS != nil || cfg.AdminInsecurePlaintext {
		t.Errorf("defaults: timeouts %+v, max_connections %d, admin_max_connections %d, admin_tls %+v, admin_insecure_plaintext %v",
			cfg.HTTPTimeouts, cfg.MaxConnections, cfg.AdminMaxConnections, cfg.AdminTLS, cfg.AdminInsecurePlaintext)
	}
	cfg, err = Parse(render(t, fx, "http_timeouts:\n  idle: 5s\n  read: 2s\n  read_header: 1s\nmax_connections: 100\nadmin_max_connections: 4\n"+minimalYAML))
	if err != nil {
		t.Fatal(err)
	}
	want = HTTPTimeouts{ReadHeader: time.Second, Read: 2 * time.Second, Write: 30 * time.Second, Idle: 5 * time.Second}
	if cfg.HTTPTimeouts != want || cfg.MaxConnections != 100 || cfg.AdminMaxConnections != 4 {
		t.Errorf("explicit: timeouts %+v, max_connections %d, admin_max_connections %d", cfg.HTTPTimeouts, cfg.MaxConnections, cfg.AdminMaxConnections)
	}
}

// TestAdminListenerRules covers the plaintext rule of the admin listener:
// an admin token may cross the network only over TLS, unless the config
// says otherwise; without a token, plain HTTP anywhere is fine.
func TestAdminListenerRules(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	const (
		token    = "admin_token_sha256: {{.Hash3}}\n"
		adminTLS = "admin_tls:\n  cert_file: {{.Cert}}\n  key_file: {{.Key}}\n"
	)
	for _, tt := range []struct {
		name, yaml string
		want       string // "" for accepted, else a substring of the error
	}{
		{"token on loopback", "admin_listen: 127.0.0.1:9090\n" + token, ""},
		{"token on localhost", "admin_listen: localhost:9090\n" + token, ""},
		{"no token on every interface", "admin_listen: 0.0.0.0:9090\n", ""},
		{"token over TLS", "admin_listen: 0.0.0.0:9090\n" + token + adminTLS, ""},
		{"token over mTLS", "admin_listen: 10.0.0.5:9090\n" + token + adminTLS + "  client_ca_file: {{.CA}}\n", ""},
		{"token in plaintext, said so", "admin_listen: 0.0.0.0:9090\nadmin_insecure_plaintext: true\n" + token, ""},

		{"token in plaintext on every interface", "admin_listen: 0.0.0.0:9090\n" + token,
			"admin_listen: plain HTTP on a non-loopback address with admin_token_sha256 set needs admin_tls or admin_insecure_plaintext: true"},
		{"token in plaintext, empty host", "admin_listen: ':9090'\n" + token, "admin_listen: plain HTTP"},
		{"api insecure_plaintext is not the admin's", "admin_listen: 10.0.0.5:9090\ninsecure_plaintext: true\n" + token, "admin_listen: plain HTTP"},
		{"admin tls without key", "admin_tls:\n  cert_file: {{.Cert}}\n", "admin_tls.key_file: required"},
		{"admin tls missing files", "admin_tls:\n  cert_file: {{.Missing}}\n  key_file: {{.Key}}\n  client_ca_file: {{.Missing}}\n", "admin_tls.cert_file: file"},
		{"admin tls missing CA", "admin_tls:\n  cert_file: {{.Cert}}\n  key_file: {{.Key}}\n  client_ca_file: {{.Missing}}\n", "admin_tls.client_ca_file: file"},
		{"admin tls unknown key", "admin_tls:\n  cert: {{.Cert}}\n", "admin_tls.cert: unknown key"},
		{"admin_insecure_plaintext not a bool", "admin_insecure_plaintext: yes\n", "admin_insecure_plaintext: expected a boolean"},

		{"max_connections zero", "max_connections: 0\n", "max_connections: must be from 1 to 1048576"},
		{"admin_max_connections negative", "admin_max_connections: -1\n", "admin_max_connections: must be from 1 to 1048576"},
		{"max_connections too many", "max_connections: 2000000\n", "max_connections: must be from 1"},
		{"timeout zero", "http_timeouts:\n  idle: 0s\n", "http_timeouts.idle: must be positive and at most 1h0m0s"},
		{"timeout negative", "http_timeouts:\n  write: -1s\n", "http_timeouts.write: must be positive"},
		{"timeout too long", "http_timeouts:\n  read: 2h\n", "http_timeouts.read: must be positive and at most"},
		{"header timeout past read", "http_timeouts:\n  read_header: 40s\n", "http_timeouts.read_header: must not exceed http_timeouts.read (30s)"},
		{"timeout not a duration", "http_timeouts:\n  read: 30\n", "http_timeouts.read: expected a duration"},
		{"timeout unknown key", "http_timeouts:\n  read_timeout: 30s\n", "http_timeouts.read_timeout: unknown key"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := Parse(render(t, fx, tt.yaml+minimalYAML))
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Parse: %v", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("Parse: %v\nwant an error containing %q", err, tt.want)
			}
		})
	}
}
