package client

import (
	"fmt"
	"os"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

// The client's types follow api/openapi.yaml, which the vault is tested
// against: a problem code, a problem field or a backup field the document
// gains fails here until the client knows it.

// problemFields maps each property of the document's Problem to the field
// of Error that carries it.
var problemFields = map[string]string{
	"type":               "Type",
	"title":              "Title",
	"status":             "Status",
	"detail":             "Detail",
	"code":               "Code",
	"attempts_remaining": "AttemptsRemaining",
	"request_id":         "RequestID",
}

// statusOnly are the BackupStatus properties the document's Backup (the
// answer of Enroll and ChangePIN) lacks; decodeBackup gives them their
// meaning there: not locked, updated when created.
var statusOnly = []string{"locked", "updated_at"}

func loadDocument(t *testing.T) map[string]any {
	t.Helper()
	raw, err := os.ReadFile("../api/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

func TestDocument(t *testing.T) {
	for _, m := range documentMismatches(loadDocument(t)) {
		t.Error(m)
	}
}

// The comparison notices what a document could grow.
func TestDocumentMismatchesNoticeGrowth(t *testing.T) {
	doc := loadDocument(t)
	schemas := dig(doc, "components", "schemas")
	pc := schemas["ProblemCode"].(map[string]any)
	pc["enum"] = append(pc["enum"].([]any), "new_code")
	props := dig(schemas, "BackupStatus", "properties")
	props["new_field"] = map[string]any{"type": "string"}
	dig(schemas, "Problem", "properties")["new_member"] = map[string]any{"type": "string"}
	dig(schemas, "Backup", "properties")["generation"] = map[string]any{"type": "string"}
	got := strings.Join(documentMismatches(doc), "\n")
	for _, want := range []string{`"new_code"`, `"new_field"`, `"new_member"`, `Backup.generation`} {
		if !strings.Contains(got, want) {
			t.Errorf("mismatches do not name %s:\n%s", want, got)
		}
	}
}

// documentMismatches lists where the client's types differ from doc.
func documentMismatches(doc map[string]any) []string {
	var out []string
	schemas := dig(doc, "components", "schemas")

	// Problem codes: the ProblemCode enum and every code a response
	// declares, against the sentinels.
	codes := map[string]bool{}
	for _, c := range schemas["ProblemCode"].(map[string]any)["enum"].([]any) {
		codes[c.(string)] = true
	}
	walk(dig(doc, "components", "responses"), func(m map[string]any) {
		code, ok := m["code"].(map[string]any)
		if !ok {
			return
		}
		if c, ok := code["const"].(string); ok {
			codes[c] = true
		}
		for _, c := range asSlice(code["enum"]) {
			codes[c.(string)] = true
		}
	})
	for _, c := range sortedKeys(codes) {
		if sentinels[c] == nil {
			out = append(out, fmt.Sprintf("problem code %q of the document has no sentinel error", c))
		}
	}
	for c := range sentinels {
		if !codes[c] {
			out = append(out, fmt.Sprintf("problem code %q of the client is not in the document", c))
		}
	}

	// Problem fields, against Error.
	errType := reflect.TypeFor[Error]()
	for _, p := range sortedKeys(dig(schemas, "Problem", "properties")) {
		f, ok := problemFields[p]
		if !ok {
			out = append(out, fmt.Sprintf("Problem property %q of the document is not carried by Error", p))
			continue
		}
		if _, ok := errType.FieldByName(f); !ok {
			out = append(out, fmt.Sprintf("Problem property %q: Error has no field %s", p, f))
		}
	}

	// Backup fields: BackupStatus's properties are backupJSON's, with the
	// document's types; Backup's are those less statusOnly.
	fields := jsonFields(reflect.TypeFor[backupJSON]())
	status := dig(schemas, "BackupStatus", "properties")
	out = append(out, compareFields("BackupStatus", status, fields, schemas)...)
	backup := dig(schemas, "Backup", "properties")
	out = append(out, compareFields("Backup", backup, fields, schemas)...)
	var missing []string
	for _, p := range sortedKeys(status) {
		if _, ok := backup[p]; !ok {
			missing = append(missing, p)
		}
	}
	if !slices.Equal(missing, statusOnly) {
		out = append(out, fmt.Sprintf("BackupStatus properties missing from Backup are %q, the client fills in %q", missing, statusOnly))
	}
	for _, r := range asSlice(dig(schemas, "Backup")["required"]) {
		if slices.Contains(statusOnly, r.(string)) {
			out = append(out, fmt.Sprintf("Backup requires %q, which the client fills in when absent", r))
		}
	}

	// Recovered: what Recover decodes.
	rec := sortedKeys(dig(schemas, "Recovered", "properties"))
	if want := []string{"attempts_remaining", "secret"}; !slices.Equal(rec, want) {
		out = append(out, fmt.Sprintf("Recovered properties are %q, Recover decodes %q", rec, want))
	}
	return out
}

// compareFields checks that each property of a schema is a field of the
// wire type, of the Go type its JSON Schema type calls for.
func compareFields(schema string, props map[string]any, fields map[string]reflect.Type, schemas map[string]any) []string {
	var out []string
	for _, p := range sortedKeys(props) {
		got, ok := fields[p]
		if !ok {
			out = append(out, fmt.Sprintf("%s property %q of the document is not in the client's Backup", schema, p))
			continue
		}
		want, err := goType(resolve(props[p].(map[string]any), schemas))
		if err != nil {
			out = append(out, fmt.Sprintf("%s.%s: %v", schema, p, err))
		} else if got != want {
			out = append(out, fmt.Sprintf("%s.%s is %v in the client, %v in the document", schema, p, got, want))
		}
	}
	if schema == "BackupStatus" {
		for f := range fields {
			if _, ok := props[f]; !ok {
				out = append(out, fmt.Sprintf("the client's Backup field %q is not in the document's BackupStatus", f))
			}
		}
	}
	return out
}

// goType is the Go type of a JSON Schema scalar, as the client uses them.
func goType(s map[string]any) (reflect.Type, error) {
	switch t, f := s["type"], s["format"]; {
	case t == "integer" && f == "int64":
		return reflect.TypeFor[int64](), nil
	case t == "integer" && f == nil:
		return reflect.TypeFor[int](), nil
	case t == "boolean":
		return reflect.TypeFor[bool](), nil
	case t == "string" && f == "date-time":
		return reflect.TypeFor[time.Time](), nil
	case t == "string" && f == nil:
		return reflect.TypeFor[string](), nil
	default:
		return nil, fmt.Errorf("type %v format %v has no Go type in the client", t, f)
	}
}

func resolve(s map[string]any, schemas map[string]any) map[string]any {
	if ref, ok := s["$ref"].(string); ok {
		return schemas[strings.TrimPrefix(ref, "#/components/schemas/")].(map[string]any)
	}
	return s
}

func jsonFields(t reflect.Type) map[string]reflect.Type {
	m := map[string]reflect.Type{}
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		m[name] = f.Type
	}
	return m
}

func dig(m map[string]any, keys ...string) map[string]any {
	for _, k := range keys {
		m = m[k].(map[string]any)
	}
	return m
}

func walk(v any, f func(map[string]any)) {
	switch v := v.(type) {
	case map[string]any:
		f(v)
		for _, x := range v {
			walk(x, f)
		}
	case []any:
		for _, x := range v {
			walk(x, f)
		}
	}
}

func asSlice(v any) []any {
	s, _ := v.([]any)
	return s
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
