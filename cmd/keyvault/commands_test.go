package main

import (
	"bytes"
	"go/parser"
	"go/token"
	"slices"
	"strings"
	"testing"
)

func runCmd(args ...string) (int, string) {
	var out bytes.Buffer
	code := run(args, &out, &out)
	return code, out.String()
}

// TestCommandTable: every command in the table has what help, completion
// and the man page are made of, in one style, and parses its flags
// through newFlags.
func TestCommandTable(t *testing.T) {
	t.Parallel()
	if err := table.Check(); err != nil {
		t.Error(err)
	}
}

// TestHelp: every command's --help, and help COMMAND, exits 0 with the
// uniform first line; so do the groups' and the top-level help.
func TestHelp(t *testing.T) {
	t.Parallel()
	cases := map[string]string{"": "Usage: keyvault <command> [<subcommand>] FLAGS"}
	for _, c := range table.Commands {
		cases[c.Name] = strings.TrimRight("Usage: keyvault "+c.Name+" "+c.Synopsis, " ")
	}
	for g := range table.Groups {
		cases[g] = "Usage: keyvault " + g + " <subcommand> FLAGS"
	}
	for name, first := range cases {
		words := strings.Fields(name)
		for _, args := range [][]string{append(slices.Clone(words), "--help"), append([]string{"help"}, words...)} {
			code, out := runCmd(args...)
			line, _, _ := strings.Cut(out, "\n")
			if code != 0 || line != first {
				t.Errorf("keyvault %s: exit %d, first line %q; want 0 and %q", strings.Join(args, " "), code, line, first)
			}
			if strings.Contains(out, "keyvault keyvault") {
				t.Errorf("keyvault %s: %q in\n%s", strings.Join(args, " "), "keyvault keyvault", out)
			}
		}
	}
}

// TestUsageErrors: usage errors exit 2.
func TestUsageErrors(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{},
		{"nosuch"},
		{"help", "nosuch"},
		{"keys"},
		{"keys", "nosuch"},
		{"anchor"},
		{"completion"},
		{"completion", "tcsh"},
		{"serve"},
		{"serve", "--nosuch"},
		{"keys", "list", "extra"},
		{"version", "extra"},
		{"man", "extra"},
		{"anchor", "accept", "--config", "x.yaml"},
		{"keys", "retire", "--config", "x.yaml"},
	} {
		if code, out := runCmd(args...); code != 2 {
			t.Errorf("keyvault %s: exit %d, want 2:\n%s", strings.Join(args, " "), code, out)
		}
	}
}

// TestPackageDoc: go doc ./cmd/keyvault lists every command.
func TestPackageDoc(t *testing.T) {
	t.Parallel()
	f, err := parser.ParseFile(token.NewFileSet(), "main.go", nil, parser.ParseComments|parser.PackageClauseOnly)
	if err != nil {
		t.Fatal(err)
	}
	doc := f.Doc.Text()
	for _, c := range table.Commands {
		top, sub, _ := strings.Cut(c.Name, " ")
		if !strings.Contains(doc, "keyvault "+top+" ") {
			t.Errorf("the package doc does not list %q", "keyvault "+top)
		}
		if !strings.Contains(doc, sub) {
			t.Errorf("the package doc does not name %s", c.Name)
		}
	}
}
