package cli

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// newTable is a small program, "tool": a leaf with flags, a group of two,
// and the help, completion and man commands.
func newTable() *Table {
	t := &Table{
		Program: "tool",
		About:   "tool does little.",
		Groups: map[string]Group{
			"db":         {Summary: "the database", Desc: "The database: open and close it."},
			"completion": {Summary: "print a shell completion script", Desc: "Print a shell completion script."},
		},
		Man: Man{
			Version:     "v1.2-3",
			Name:        "a small tool",
			Description: "It does little.\n",
			Sections:    ".SH EXIT STATUS\n0 on success.\n",
		},
	}
	leaf := func(name string, flags func(*flag.FlagSet)) func([]string, io.Writer, io.Writer) error {
		return func(args []string, stdout, stderr io.Writer) error {
			fs := t.NewFlags(name, stderr)
			flags(fs)
			if err := ParseFlags(fs, args); err != nil {
				return err
			}
			fmt.Fprintln(stdout, "ran", name)
			return nil
		}
	}
	t.Commands = []Command{
		{Name: "run", Synopsis: "--config FILE [--fast]", Summary: "run it", Desc: "Runs it.", Run: leaf("run", func(fs *flag.FlagSet) {
			fs.String("config", "", "the config `file`")
			fs.Bool("fast", false, "go fast")
			fs.Int("n", 3, "how many")
		})},
		{Name: "db open", Synopsis: "--path FILE", Summary: "open the database with a very long summary", Desc: "Opens the database at FILE.",
			Run: leaf("db open", func(fs *flag.FlagSet) { fs.String("path", "", "the database `file`") })},
		{Name: "db close", Summary: "close the database", Desc: "Closes it.", Run: leaf("db close", func(*flag.FlagSet) {})},
		{Name: "completion bash", Summary: "print the bash script", Desc: "Prints the bash script.", Run: t.Completion("bash")},
		{Name: "completion zsh", Summary: "print the zsh script", Desc: "Prints the zsh script.", Run: t.Completion("zsh")},
		{Name: "completion fish", Summary: "print the fish script", Desc: "Prints the fish script.", Run: t.Completion("fish")},
		{Name: "man", Summary: "print the man page", Desc: "Prints the man page.", Run: t.ManPage},
		{Name: "help", Synopsis: "[COMMAND]", Summary: "a command's usage", Desc: "Prints a command's usage.", Run: t.Help},
	}
	return t
}

func runTable(tb *Table, args ...string) (string, string, error) {
	var stdout, stderr bytes.Buffer
	err := tb.Dispatch(args, &stdout, &stderr)
	return stdout.String(), stderr.String(), err
}

func TestCheck(t *testing.T) {
	t.Parallel()
	if err := newTable().Check(); err != nil {
		t.Fatalf("the test table: %v", err)
	}
	bad := newTable()
	bad.Commands = append(bad.Commands,
		Command{Name: "run", Summary: "again", Desc: "Again.", Run: bad.Commands[0].Run},
		Command{Name: "noflags", Summary: "no flag set", Desc: "None.", Run: func([]string, io.Writer, io.Writer) error { return nil }},
		Command{Name: "orphan leaf", Summary: "a leaf of no group", Desc: "Orphan.", Run: bad.Commands[0].Run},
		Command{Name: "nodesc", Summary: "no description"},
		Command{Name: "capital", Summary: "Runs it", Desc: "Runs it.", Run: bad.Commands[0].Run},
		Command{Name: "period", Summary: "runs it.", Desc: "Runs it.", Run: bad.Commands[0].Run},
		Command{Name: "acronym", Summary: "HSM ceiling, measured", Desc: "Measures it.", Run: bad.Commands[0].Run},
	)
	bad.Groups["empty"] = Group{Summary: "nothing", Desc: "Nothing."}
	bad.Groups["db"] = Group{Summary: "The database.", Desc: "The database."}
	err := bad.Check()
	for _, want := range []string{`"run" twice`, `"noflags" does not parse its flags`, `group "orphan" is not in Groups`,
		`"nodesc" lacks`, `group "empty" has no subcommands`, `"capital": summary`, `"period": summary`, `"db": summary`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Check of a bad table: %v; want %q", err, want)
		}
	}
	if strings.Contains(err.Error(), `"acronym"`) {
		t.Errorf("Check refuses a summary that starts with an acronym: %v", err)
	}
}

func TestUsage(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	newTable().Usage(&b)
	want := `Usage: tool <command> [<subcommand>] FLAGS

tool does little.

Commands:
  run --config FILE [--fast]         run it
  db open --path FILE                open the database with a very long summary
  db close                           close the database
  completion bash                    print the bash script
  completion zsh                     print the zsh script
  completion fish                    print the fish script
  man                                print the man page
  help [COMMAND]                     a command's usage

Run "tool help COMMAND" or "tool COMMAND --help" for a command's flags.
`
	if b.String() != want {
		t.Errorf("Usage:\n%s\nwant\n%s", b.String(), want)
	}
}

// TestDispatch: leaves by path, --help and help COMMAND print the same
// usage to stdout, and the usage errors.
func TestDispatch(t *testing.T) {
	t.Parallel()
	tb := newTable()
	if out, _, err := runTable(tb, "db", "open", "--path", "x"); err != nil || out != "ran db open\n" {
		t.Errorf("db open: %q, %v", out, err)
	}
	leafHelp := "Usage: tool run --config FILE [--fast]\n\nRuns it.\n\nFlags:\n" +
		"  -config file\n    \tthe config file\n  -fast\n    \tgo fast\n  -n int\n    \thow many (default 3)\n"
	groupHelp := "Usage: tool db <subcommand> FLAGS\n\nThe database: open and close it.\n\nSubcommands:\n" +
		"  open --path FILE                   open the database with a very long summary\n" +
		"  close                              close the database\n"
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"run", "--help"}, leafHelp},
		{[]string{"help", "run"}, leafHelp},
		{[]string{"db", "--help"}, groupHelp},
		{[]string{"help", "db"}, groupHelp},
		{[]string{"help", "--help"}, "Usage: tool help [COMMAND]\n\nPrints a command's usage.\n"},
	} {
		out, errOut, err := runTable(tb, tc.args...)
		if !errors.Is(err, flag.ErrHelp) || out+errOut != tc.want {
			t.Errorf("tool %s: %v, stdout\n%s\nstderr\n%s\nwant flag.ErrHelp and stdout\n%s", strings.Join(tc.args, " "), err, out, errOut, tc.want)
		}
	}
	if out, _, err := runTable(tb, "help"); err != nil || !strings.HasPrefix(out, "Usage: tool <command>") {
		t.Errorf("help: %v\n%s", err, out)
	}
	for _, args := range [][]string{{"db"}, {"db", "nosuch"}, {"run", "--nosuch"}, {"run", "extra"}, {"help", "db", "nosuch"}} {
		if _, _, err := runTable(tb, args...); !errors.Is(err, ErrUsage) {
			t.Errorf("tool %s: %v; want a usage error", strings.Join(args, " "), err)
		}
	}
	for _, args := range [][]string{{"nosuch"}, {"help", "nosuch"}} {
		if _, _, err := runTable(tb, args...); !errors.As(err, new(UnknownCommandError)) || err.Error() != `unknown command "nosuch"` {
			t.Errorf("tool %s: %v; want UnknownCommandError", strings.Join(args, " "), err)
		}
	}
}

// TestCompletion: each script names every command, subcommand and flag;
// its shell parses it where installed; bash and fish complete with it.
func TestCompletion(t *testing.T) {
	t.Parallel()
	tb := newTable()
	for _, shell := range []string{"bash", "zsh", "fish"} {
		script, _, err := runTable(tb, "completion", shell)
		if err != nil {
			t.Fatalf("completion %s: %v", shell, err)
		}
		flagWord := map[string]string{"bash": "--", "zsh": "--", "fish": "-l "}[shell]
		for _, w := range []string{"run", "db", "open", "close", "completion", "man", "help", flagWord + "config", flagWord + "fast", flagWord + "path"} {
			if !strings.Contains(script, w) {
				t.Errorf("completion %s does not name %q", shell, w)
			}
		}
		bin, err := exec.LookPath(shell)
		if err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("CI=true and %s is not installed (make test-deps installs it): %v", shell, err)
			}
			t.Logf("%s not installed: its script is not run", shell)
			continue
		}
		file := filepath.Join(t.TempDir(), "tool."+shell)
		if err := os.WriteFile(file, []byte(script), 0o600); err != nil {
			t.Fatal(err)
		}
		check := exec.Command(bin, "-n", file)
		if shell == "fish" {
			check = exec.Command(bin, "--no-execute", file)
		}
		if out, err := check.CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", strings.Join(check.Args, " "), err, out)
		}
		for line, want := range map[string][]string{
			"tool d":             {"db"},
			"tool db ":           {"open", "close", "--help"},
			"tool run --f":       {"--fast"},
			"tool db open --":    {"--path", "--help"},
			"tool help ":         {"run", "db", "completion", "man", "help", "--help"},
			"tool run --config ": nil, // a flag's value: the shell's file names
		} {
			var got []string
			switch shell {
			case "bash":
				words := strings.Fields(line)
				if strings.HasSuffix(line, " ") {
					words = append(words, "")
				}
				quoted := make([]string, len(words))
				for i, w := range words {
					quoted[i] = fmt.Sprintf("%q", w)
				}
				out, err := exec.Command(bin, "-c", "source "+file+"; COMP_WORDS=("+strings.Join(quoted, " ")+
					"); COMP_CWORD="+fmt.Sprint(len(words)-1)+`; _tool; echo "${COMPREPLY[*]}"`).CombinedOutput()
				if err != nil {
					t.Errorf("bash completion of %q: %v\n%s", line, err, out)
					continue
				}
				got = strings.Fields(string(out))
			case "fish":
				if want == nil {
					continue // fish offers files
				}
				out, err := exec.Command(bin, "--no-config", "-c", "source "+file+"; complete -C '"+line+"'").CombinedOutput()
				if err != nil {
					t.Errorf("fish completion of %q: %v\n%s", line, err, out)
					continue
				}
				for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
					word, _, _ := strings.Cut(l, "\t")
					got = append(got, word)
				}
				slices.Sort(got)
				want = slices.Sorted(slices.Values(slices.DeleteFunc(slices.Clone(want), func(w string) bool { return w == "--help" })))
			default:
				continue // zsh completes only inside its line editor
			}
			if !slices.Equal(got, want) {
				t.Errorf("%s completion of %q: %q, want %q", shell, line, got, want)
			}
		}
	}
}

// TestManPage: the page has the man(7) structure, Man's text, a section
// per command with each of its flags, and renders without warnings where
// groff is installed.
func TestManPage(t *testing.T) {
	t.Parallel()
	page, _, err := runTable(newTable(), "man")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		".TH TOOL 1 \"\" \"tool v1.2\\-3\" \"User Commands\"\n.SH NAME\ntool \\- a small tool\n.SH SYNOPSIS\n.B tool\n",
		"\n.SH DESCRIPTION\nIt does little.\n.SH COMMANDS\n.SS \"tool run\"\n.B tool run\n\\-\\-config FILE [\\-\\-fast]\n.PP\nRuns it.\n" +
			".TP\n.BR \\-\\-config \" \\fIfile\\fR\"\nthe config file\n.TP\n.BR \\-\\-fast\ngo fast\n.TP\n.BR \\-\\-n \" \\fIint\\fR\"\nhow many\n.br\nDefault: 3\n",
		"\n.SS \"tool db close\"\nCloses it.\n.SS",
		"\n.SS \"tool help\"\n.B tool help\n[COMMAND]\n.PP\nPrints a command's usage.\n.SH EXIT STATUS\n0 on success.\n",
	} {
		if !strings.Contains(page, want) {
			t.Errorf("the page lacks\n%s\nin\n%s", want, page)
		}
	}
	if !strings.HasSuffix(page, ".SH EXIT STATUS\n0 on success.\n") {
		t.Errorf("the page does not end with Man.Sections:\n%s", page)
	}
	groff, err := exec.LookPath("groff")
	if err != nil {
		t.Log("groff not installed: the page is not rendered")
		return
	}
	cmd := exec.Command(groff, "-man", "-Tutf8", "-ww", "-P-cbou")
	cmd.Stdin = strings.NewReader(page)
	var out, errs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errs
	if err := cmd.Run(); err != nil || errs.Len() > 0 {
		t.Fatalf("groff: %v\n%s", err, errs.String())
	}
	if !strings.Contains(out.String(), "tool db open") {
		t.Errorf("the rendered page does not name tool db open:\n%s", out.String())
	}
}

func TestRoff(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"a-b":          "a\\-b\n",
		`back\slash`:   "back\\eslash\n",
		".dot\n'quote": "\\&.dot\n\\&'quote\n",
	} {
		if got := roff(in); got != want {
			t.Errorf("roff(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestWrap(t *testing.T) {
	t.Parallel()
	in := "one two three four five\n  short\nsix seven"
	want := "one two\nthree four\nfive\n  short\nsix seven"
	if got := wrap(in, 10); got != want {
		t.Errorf("wrap:\n%q\nwant\n%q", got, want)
	}
}
