package main

import (
	"bytes"
	"flag"
	"go/parser"
	"go/token"
	"os/exec"
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
// and the man page are made of, parses its flags through newFlags, and
// belongs to a described group.
func TestCommandTable(t *testing.T) {
	t.Parallel()
	seen := map[string]bool{}
	for _, c := range commands {
		if seen[c.name] {
			t.Errorf("%q twice in the table", c.name)
		}
		seen[c.name] = true
		if c.summary == "" || c.desc == "" || c.run == nil {
			t.Errorf("%q lacks a summary, a description or a run function", c.name)
		}
		if c.name != "help" && commandFlags(c) == nil {
			t.Errorf("%q does not parse its flags with newFlags: its --help would not be the uniform one", c.name)
		}
		if top, _, ok := strings.Cut(c.name, " "); ok && groups[top] == "" {
			t.Errorf("%q: group %q has no description in groups", c.name, top)
		}
	}
	for g := range groups {
		if len(subcommands(g)) == 0 {
			t.Errorf("group %q has no subcommands", g)
		}
	}
}

// TestHelp: every command's --help, and help COMMAND, exits 0 with the
// uniform first line; so do the groups' and the top-level help.
func TestHelp(t *testing.T) {
	t.Parallel()
	cases := map[string]string{"": "Usage: keyvault <command> [<subcommand>] FLAGS"}
	for _, c := range commands {
		cases[c.name] = usageLine(c.name, c.synopsis)
	}
	for g := range groups {
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
	} {
		if code, out := runCmd(args...); code != 2 {
			t.Errorf("keyvault %s: exit %d, want 2:\n%s", strings.Join(args, " "), code, out)
		}
	}
}

// TestCompletion: each script names every command, subcommand and flag of
// the table; bash (and zsh, fish where installed) parse it.
func TestCompletion(t *testing.T) {
	t.Parallel()
	for shell, flagWord := range map[string]string{"bash": "--", "zsh": "--", "fish": "-l "} {
		code, script := runCmd("completion", shell)
		if code != 0 {
			t.Fatalf("completion %s: exit %d:\n%s", shell, code, script)
		}
		for _, c := range commands {
			for _, w := range strings.Fields(c.name) {
				if !strings.Contains(script, w) {
					t.Errorf("completion %s does not name %q (of %q)", shell, w, c.name)
				}
			}
			if fs := commandFlags(c); fs != nil {
				fs.VisitAll(func(f *flag.Flag) {
					if !strings.Contains(script, flagWord+f.Name+" ") {
						t.Errorf("completion %s lacks --%s of %q", shell, f.Name, c.name)
					}
				})
			}
		}
		bin, err := exec.LookPath(shell)
		if err != nil {
			if shell == "bash" {
				t.Fatalf("bash is needed to check the bash script: %v", err)
			}
			t.Logf("%s not installed: its script's syntax is not checked", shell)
			continue
		}
		cmd := exec.Command(bin, "-n")
		cmd.Stdin = strings.NewReader(script)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%s -n on the %s completion: %v\n%s", shell, shell, err, out)
		}
	}
}

// TestManPage: the page has the man(7) structure, a section per command
// with each of its flags, and renders without warnings where groff is
// installed.
func TestManPage(t *testing.T) {
	t.Parallel()
	code, page := runCmd("man")
	if code != 0 {
		t.Fatalf("man: exit %d:\n%s", code, page)
	}
	if !strings.HasPrefix(page, ".TH KEYVAULT 1 ") {
		t.Errorf("the page does not start with .TH KEYVAULT 1:\n%.200s", page)
	}
	for _, sh := range []string{".SH NAME", ".SH SYNOPSIS", ".SH DESCRIPTION", ".SH COMMANDS", ".SH EXIT STATUS"} {
		if !strings.Contains(page, "\n"+sh+"\n") {
			t.Errorf("the page lacks %s", sh)
		}
	}
	for _, c := range commands {
		if !strings.Contains(page, "\n.SS \"keyvault "+c.name+"\"\n") {
			t.Errorf("the page has no section for %q", c.name)
		}
		if fs := commandFlags(c); fs != nil {
			fs.VisitAll(func(f *flag.Flag) {
				if !strings.Contains(page, `\-\-`+roffWord(f.Name)) {
					t.Errorf("the page lacks --%s of %q", f.Name, c.name)
				}
			})
		}
	}
	groff, err := exec.LookPath("groff")
	if err != nil {
		t.Log("groff not installed: the page is not rendered")
		return
	}
	// -P-cbou: plain text, without bold or underline sequences.
	cmd := exec.Command(groff, "-man", "-Tutf8", "-ww", "-P-cbou")
	cmd.Stdin = strings.NewReader(page)
	var out, errs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errs
	if err := cmd.Run(); err != nil || errs.Len() > 0 {
		t.Fatalf("groff: %v\n%s", err, errs.String())
	}
	text := out.String()
	for _, c := range commands {
		// groff may break the line or hyphenate; the name alone is kept.
		if !strings.Contains(text, "keyvault "+c.name) {
			t.Errorf("the rendered page does not name %q", "keyvault "+c.name)
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
	for _, top := range topNames() {
		if !strings.Contains(doc, "keyvault "+top+" ") {
			t.Errorf("the package doc does not list %q", "keyvault "+top)
		}
	}
	for g := range groups {
		for _, sub := range subNames(g) {
			if !strings.Contains(doc, sub) {
				t.Errorf("the package doc does not name %s %s", g, sub)
			}
		}
	}
}
