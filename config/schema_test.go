package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"go.yaml.in/yaml/v3"
)

// compileSchema compiles keyvault.schema.json, checking it against the
// draft 2020-12 meta-schema on the way.
func compileSchema(t testing.TB) *jsonschema.Schema {
	t.Helper()
	sch, err := jsonschema.NewCompiler().Compile("keyvault.schema.json")
	if err != nil {
		t.Fatalf("compile keyvault.schema.json: %v", err)
	}
	return sch
}

// schemaCheck validates a YAML config against the schema, as an editor
// would: YAML to JSON values, then the schema.
func schemaCheck(sch *jsonschema.Schema, data []byte) error {
	var v any
	if err := yaml.Unmarshal(data, &v); err != nil {
		return err
	}
	j, err := json.Marshal(v)
	if err != nil {
		return err
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(j))
	if err != nil {
		return err
	}
	return sch.Validate(inst)
}

// shippedConfigs returns every keyvault config shipped under deploy/: the
// files that are configs, and the keyvault.yaml embedded in a Kubernetes
// ConfigMap.
func shippedConfigs(t *testing.T) map[string][]byte {
	t.Helper()
	out := map[string][]byte{}
	err := filepath.WalkDir("../deploy", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if ext := filepath.Ext(path); d.IsDir() || ext != ".yaml" && ext != ".yml" {
			return nil
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		if !bytes.HasPrefix(data, []byte(notAConfig)) {
			out[path] = data
			return nil
		}
		dec := yaml.NewDecoder(bytes.NewReader(data))
		for {
			var m struct {
				Kind string            `yaml:"kind"`
				Data map[string]string `yaml:"data"`
			}
			if err := dec.Decode(&m); err != nil {
				if errors.Is(err, io.EOF) {
					return nil
				}
				return nil // another tool's YAML (a template, a rule file)
			}
			if m.Kind == "ConfigMap" && m.Data["keyvault.yaml"] != "" {
				out[path+":keyvault.yaml"] = []byte(m.Data["keyvault.yaml"])
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, must := range []string{"../deploy/keyvault.example.yaml", "../deploy/keyvault-etcd.example.yaml"} {
		if out[must] == nil {
			t.Fatalf("%s was not found by the walk", must)
		}
	}
	return out
}

// TestSchemaAcceptsShippedConfigs: every config the repository ships, and
// the configs the tests here build, pass the schema an editor checks them
// with; the dev config is checked in e2e (TestConfigCheck).
func TestSchemaAcceptsShippedConfigs(t *testing.T) {
	t.Parallel()
	sch := compileSchema(t)
	fx := newFixture(t)
	configs := shippedConfigs(t)
	configs["fullYAML"] = render(t, fx, fullYAML)
	configs["minimalYAML"] = render(t, fx, minimalYAML)
	for name, data := range configs {
		if _, err := ParseNoFS(data); err != nil {
			t.Errorf("%s: refused by the vault: %v", name, err)
		}
		if err := schemaCheck(sch, data); err != nil {
			t.Errorf("%s: refused by keyvault.schema.json: %v", name, err)
		}
	}
}

// TestSchemaRefuses: the schema refuses what the vault refuses for its
// keys, types and allowed values.
func TestSchemaRefuses(t *testing.T) {
	t.Parallel()
	sch := compileSchema(t)
	fx := newFixture(t)
	for _, tc := range []struct{ name, doc, want string }{
		{"unknown top-level key", "lisen: x\n" + minimalYAML, "lisen"},
		{"unknown nested key", strings.Replace(minimalYAML, "store:\n", "store:\n  pth: x\n", 1), "pth"},
		{"inline PIN", strings.Replace(minimalYAML, "      pin_env: KEYVAULT_HSM_A_PIN\n", "      pin: \"1234\"\n", 1), "pin"},
		{"both PIN sources", strings.Replace(minimalYAML, "      pin_env: KEYVAULT_HSM_A_PIN\n", "      pin_env: A\n      pin_file: /p\n", 1), "oneOf"},
		{"no hsm", storeBlock + clientsBlock, "hsm"},
		{"ill-typed integer", strings.Replace(minimalYAML, "      pin_env: KEYVAULT_HSM_A_PIN\n", "      pin_env: KEYVAULT_HSM_A_PIN\n      max_sessions: eight\n", 1), "max_sessions"},
		{"log level", minimalYAML + "log:\n  level: loud\n", "level"},
		{"duration", minimalYAML + "ratelimit:\n  hsm_queue_timeout: 50\n", "hsm_queue_timeout"},
		{"short token hash", strings.Replace(minimalYAML, "{{.Hash1}}", "abc", 1), "token_sha256"},
		{"hsm profile", strings.Replace(minimalYAML, "hsm:\n", "hsm:\n  profile: rsa\n", 1), "profile"},
	} {
		err := schemaCheck(sch, render(t, fx, tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: schema check gave %v; want a refusal naming %q", tc.name, err, tc.want)
		}
	}
	// Every profile the Go validation takes, the schema takes.
	for _, profile := range []string{"gcm", "hmac", "gcm-hsm-iv"} {
		doc := render(t, fx, strings.Replace(minimalYAML, "hsm:\n", "hsm:\n  profile: "+profile+"\n", 1))
		if err := schemaCheck(sch, doc); err != nil {
			t.Errorf("hsm.profile %s: schema: %v", profile, err)
		}
		if _, err := Parse(doc); err != nil {
			t.Errorf("hsm.profile %s: %v", profile, err)
		}
	}
}
