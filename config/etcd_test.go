package config

import (
	"strings"
	"testing"
	"time"
)

func TestStoreDriverEtcd(t *testing.T) {
	t.Parallel()
	fx := newFixture(t)
	cfg, err := Parse(render(t, fx, "store:\n  driver: etcd\n  etcd:\n    endpoints: [https://10.0.0.1:2379, https://etcd-2.internal:2379]\n    tls:\n      ca_file: {{.CA}}\n      cert_file: {{.Cert}}\n      key_file: {{.Key}}\n"+hsmBlock+clientsBlock))
	if err != nil {
		t.Fatal(err)
	}
	e := cfg.Store.Etcd
	if cfg.Store.Driver != DriverEtcd || e == nil || len(e.Endpoints) != 2 || e.KeyPrefix != DefaultEtcdKeyPrefix ||
		e.DialTimeout != DefaultEtcdDialTimeout || e.RequestTimeout != DefaultEtcdRequestTimeout || e.TLS == nil || e.TLS.CAFile != fx.CA {
		t.Fatalf("etcd store: %+v %+v", cfg.Store, e)
	}
	cfg, err = Parse(render(t, fx, "store:\n  driver: etcd\n  etcd:\n    endpoints: [http://127.0.0.1:2379]\n    key_prefix: /kv-eu/\n    dial_timeout: 2s\n    request_timeout: 750ms\n"+hsmBlock+clientsBlock))
	if err != nil || cfg.Store.Etcd.KeyPrefix != "/kv-eu/" || cfg.Store.Etcd.DialTimeout != 2*time.Second || cfg.Store.Etcd.RequestTimeout != 750*time.Millisecond {
		t.Fatalf("explicit settings: %v %+v", err, cfg)
	}
	if cfg.Store.Anchored() {
		t.Error("rollback anchoring is on with driver etcd")
	}
	if cfg, err := Parse(render(t, fx, minimalYAML)); err != nil || cfg.Store.Driver != DriverBolt || !cfg.Store.Anchored() {
		t.Fatalf("default driver: %v, or rollback anchoring off by default on bolt", err)
	}
	if cfg, err := Parse(render(t, fx, "store:\n  path: {{.Store}}\n  rollback_anchor: false\n"+hsmBlock+clientsBlock)); err != nil || cfg.Store.Anchored() {
		t.Fatalf("rollback_anchor false: %v, or still on", err)
	}
	if cfg, err := Parse(render(t, fx, "store:\n  driver: etcd\n  rollback_anchor: false\n  etcd:\n    endpoints: [http://127.0.0.1:2379]\n"+hsmBlock+clientsBlock)); err != nil || cfg.Store.Anchored() {
		t.Fatalf("rollback_anchor false on etcd: %v", err)
	}

	// Plain http:// is allowed where it cannot leave the machine, or where
	// the operator says so.
	for _, store := range []string{
		"store:\n  driver: etcd\n  etcd:\n    endpoints: [http://127.0.0.1:2379, http://localhost:2379, 'http://[::1]:2379']\n",
		"store:\n  driver: etcd\n  etcd:\n    endpoints: [http://10.0.0.7:2379, http://etcd-1:2379]\n    insecure_plaintext: true\n",
	} {
		cfg, err := Parse(render(t, fx, store+hsmBlock+clientsBlock))
		if err != nil {
			t.Errorf("%q: %v", store, err)
		} else if want := strings.Contains(store, "insecure_plaintext"); cfg.Store.Etcd.InsecurePlaintext != want {
			t.Errorf("%q: insecure_plaintext %v", store, cfg.Store.Etcd.InsecurePlaintext)
		}
	}

	for _, c := range []struct {
		name, store string
		want        []string
	}{
		{"unknown driver", "store:\n  driver: redis\n  path: {{.Store}}\n", []string{"store.driver: must be bolt or etcd"}},
		{"etcd without settings", "store:\n  driver: etcd\n", []string{"store.etcd: required with driver etcd"}},
		{"etcd settings with bolt", "store:\n  path: {{.Store}}\n  etcd:\n    endpoints: [http://127.0.0.1:2379]\n", []string{"store.etcd: only with driver etcd"}},
		{"anchoring on etcd", "store:\n  driver: etcd\n  rollback_anchor: true\n  path: {{.Store}}\n  etcd:\n    endpoints: [http://127.0.0.1:2379]\n",
			[]string{"store.rollback_anchor: not available with driver etcd", "store.path: not used with driver etcd"}},
		{"bad endpoints", "store:\n  driver: etcd\n  etcd:\n    endpoints: [127.0.0.1:2379, http://h, ftp://h:1]\n",
			[]string{"store.etcd.endpoints[0]: want", "store.etcd.endpoints[1]: want", "store.etcd.endpoints[2]: want"}},
		{"no endpoints and zero timeouts", "store:\n  driver: etcd\n  etcd:\n    endpoints: []\n    key_prefix: \"\"\n    dial_timeout: 0s\n    request_timeout: 0s\n",
			[]string{"store.etcd.endpoints: at least one", "store.etcd.key_prefix: must not be empty", "store.etcd.dial_timeout: must be positive", "store.etcd.request_timeout: must be positive"}},
		{"half a client certificate", "store:\n  driver: etcd\n  etcd:\n    endpoints: [https://h:2379]\n    tls:\n      cert_file: {{.Cert}}\n", []string{"store.etcd.tls: cert_file and key_file go together"}},
		{"missing CA file", "store:\n  driver: etcd\n  etcd:\n    endpoints: [https://h:2379]\n    tls:\n      ca_file: {{.Missing}}\n", []string{"store.etcd.tls.ca_file"}},
		{"typo", "store:\n  driver: etcd\n  etcd:\n    endpoint: [http://h:1]\n", []string{"store.etcd.endpoint: unknown key"}},
		{"plain http to a network address", "store:\n  driver: etcd\n  etcd:\n    endpoints: [https://etcd-0:2379, http://10.0.0.7:2379]\n",
			[]string{"store.etcd.endpoints[1]: plain http:// to a non-loopback host needs https:// or store.etcd.insecure_plaintext: true"}},
		{"plain http to a host name, tls set", "store:\n  driver: etcd\n  etcd:\n    endpoints: [http://etcd-0.internal:2379]\n    tls:\n      ca_file: {{.CA}}\n",
			[]string{"store.etcd.endpoints[0]: plain http:// to a non-loopback host"}},
		{"insecure_plaintext not a bool", "store:\n  driver: etcd\n  etcd:\n    endpoints: [http://10.0.0.7:2379]\n    insecure_plaintext: yes\n",
			[]string{"store.etcd.insecure_plaintext: expected a boolean"}},
	} {
		_, err := Parse(render(t, fx, c.store+hsmBlock+clientsBlock))
		for _, w := range c.want {
			if err == nil || !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %v does not contain %q", c.name, err, w)
			}
		}
	}
}
