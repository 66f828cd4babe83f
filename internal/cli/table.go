package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Command is one leaf of the command tree.
type Command struct {
	Name     string // "serve", "keys rotate"
	Synopsis string // the flags after the name in the usage line
	Summary  string // one line, for lists and completions: lower-case, no final period
	Desc     string // the description paragraph(s) of --help and the man page
	Run      func(args []string, stdout, stderr io.Writer) error
}

// Group is a command that only holds subcommands: "keys" of "keys rotate".
type Group struct {
	Summary string // one line, for completions: lower-case, no final period
	Desc    string // the paragraph of the group's usage
}

// Table is a program's commands.
type Table struct {
	Program  string           // the program's name, as typed: "keyvault"; it names the completion function
	About    string           // the paragraph(s) of the top-level usage before the list
	Groups   map[string]Group // by name
	Commands []Command        // in the order of every list
	Man      Man
}

// Man is the man page's text beside the commands, in section 1.
type Man struct {
	Version     string // in the page's footer
	Name        string // the NAME line after "program \-", as plain text
	Description string // the DESCRIPTION section, in roff
	Sections    string // the sections after COMMANDS (.SH EXIT STATUS ...), in roff
}

// ErrUsage is matched by every usage error: a bad flag or argument, a
// missing or unknown subcommand.
var ErrUsage = errors.New("usage")

// usageError is a usage error; errors.Is matches it to ErrUsage.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return ErrUsage }

// UnknownCommandError is a command name not in the table.
type UnknownCommandError string

func (u UnknownCommandError) Error() string { return fmt.Sprintf("unknown command %q", string(u)) }

// lookup returns the command named name.
func (t *Table) lookup(name string) (Command, bool) {
	i := slices.IndexFunc(t.Commands, func(c Command) bool { return c.Name == name })
	if i < 0 {
		return Command{}, false
	}
	return t.Commands[i], true
}

// subcommands returns the leaves of group in table order.
func (t *Table) subcommands(group string) []Command {
	var out []Command
	for _, c := range t.Commands {
		if strings.HasPrefix(c.Name, group+" ") {
			out = append(out, c)
		}
	}
	return out
}

// subNames returns the second words of group's leaves.
func (t *Table) subNames(group string) []string {
	var out []string
	for _, c := range t.subcommands(group) {
		out = append(out, strings.TrimPrefix(c.Name, group+" "))
	}
	return out
}

// topNames returns the first words of the commands, in table order, once each.
func (t *Table) topNames() []string {
	var out []string
	for _, c := range t.Commands {
		top, _, _ := strings.Cut(c.Name, " ")
		if !slices.Contains(out, top) {
			out = append(out, top)
		}
	}
	return out
}

func isHelp(arg string) bool { return arg == "-h" || arg == "--help" || arg == "help" }

// Dispatch runs the command args names: a leaf, or a group's leaf. A
// group without a subcommand is a usage error; with --help (or -h, help)
// its usage goes to stdout and the error is flag.ErrHelp.
func (t *Table) Dispatch(args []string, stdout, stderr io.Writer) error {
	top := args[0]
	if _, ok := t.Groups[top]; ok {
		if len(args) < 2 || isHelp(args[1]) {
			if len(args) < 2 {
				t.groupUsage(stderr, top)
				return usageError{fmt.Errorf("%s needs a subcommand: %s", top, strings.Join(t.subNames(top), ", "))}
			}
			t.groupUsage(stdout, top)
			return flag.ErrHelp
		}
		c, ok := t.lookup(top + " " + args[1])
		if !ok {
			t.groupUsage(stderr, top)
			return usageError{fmt.Errorf("unknown %s subcommand %q", top, args[1])}
		}
		return c.Run(args[2:], stdout, stderr)
	}
	c, ok := t.lookup(top)
	if !ok {
		return UnknownCommandError(top)
	}
	return c.Run(args[1:], stdout, stderr)
}

// Help is the Run of the help command: help [COMMAND [SUBCOMMAND]] prints
// COMMAND's usage as COMMAND --help does, or without COMMAND the
// top-level usage.
func (t *Table) Help(args []string, stdout, stderr io.Writer) error {
	switch {
	case len(args) == 0:
		t.Usage(stdout)
		return nil
	case args[0] == "-h" || args[0] == "--help":
		c, _ := t.lookup("help")
		leafUsage(t.Program, stdout, c, flag.NewFlagSet("help", flag.ContinueOnError))
		return flag.ErrHelp
	}
	return t.Dispatch(append(slices.Clone(args), "--help"), stdout, stderr)
}

// NewFlags returns the flag set of the command name, whose usage is the
// command's. name must be in the table.
func (t *Table) NewFlags(name string, stderr io.Writer) *flag.FlagSet {
	c, ok := t.lookup(name)
	if !ok {
		panic("cli: NewFlags: no command " + name)
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { leafUsage(t.Program, stderr, c, fs) }
	if capture, ok := stderr.(*flagCapture); ok {
		capture.fs = fs
	}
	return fs
}

// ParseFlags parses args, and refuses positional arguments. Its errors
// are usage errors, except flag.ErrHelp after --help.
func ParseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("unexpected argument %q", fs.Arg(0))}
	}
	return nil
}

// flagCapture is the stderr that commandFlags hands a command: NewFlags
// records the command's flag set in it.
type flagCapture struct{ fs *flag.FlagSet }

func (*flagCapture) Write(p []byte) (int, error) { return len(p), nil }

// commandFlags returns the flags c parses, by running c --help with a
// capturing stderr. Nil for a command that does not call NewFlags.
func commandFlags(c Command) *flag.FlagSet {
	capture := &flagCapture{}
	_ = c.Run([]string{"--help"}, io.Discard, capture)
	return capture.fs
}

// flagWords returns "--name" for every flag c parses.
func flagWords(c Command) []string {
	var out []string
	if fs := commandFlags(c); fs != nil {
		fs.VisitAll(func(f *flag.Flag) { out = append(out, "--"+f.Name) })
	}
	return out
}

// Check reports what would make the usage texts, the completions or the
// man page wrong or uneven: a name twice, a leaf without a summary,
// description or Run, a leaf other than help that does not parse its
// flags with NewFlags, a group without a summary, a description or
// leaves, and a summary that is not lower-case without a final period.
func (t *Table) Check() error {
	var errs []error
	seen := map[string]bool{}
	for _, c := range t.Commands {
		if seen[c.Name] {
			errs = append(errs, fmt.Errorf("%q twice in the table", c.Name))
		}
		seen[c.Name] = true
		if c.Summary == "" || c.Desc == "" || c.Run == nil {
			errs = append(errs, fmt.Errorf("%q lacks a summary, a description or a run function", c.Name))
			continue
		}
		errs = append(errs, summaryStyle(c.Name, c.Summary))
		if c.Name != "help" && commandFlags(c) == nil {
			errs = append(errs, fmt.Errorf("%q does not parse its flags with NewFlags: its --help would not be the uniform one", c.Name))
		}
		if top, _, ok := strings.Cut(c.Name, " "); ok {
			if _, ok := t.Groups[top]; !ok {
				errs = append(errs, fmt.Errorf("%q: group %q is not in Groups", c.Name, top))
			}
		}
	}
	for name, g := range t.Groups {
		if g.Summary == "" || g.Desc == "" {
			errs = append(errs, fmt.Errorf("group %q lacks a summary or a description", name))
		} else {
			errs = append(errs, summaryStyle(name, g.Summary))
		}
		if len(t.subcommands(name)) == 0 {
			errs = append(errs, fmt.Errorf("group %q has no subcommands", name))
		}
	}
	return errors.Join(errs...)
}

// summaryStyle refuses a summary that starts with a capitalised word or
// ends with a period; an acronym ("HSM") may start one.
func summaryStyle(name, s string) error {
	first, n := utf8.DecodeRuneInString(s)
	second, _ := utf8.DecodeRuneInString(s[n:])
	if unicode.IsUpper(first) && !unicode.IsUpper(second) || strings.HasSuffix(s, ".") {
		return fmt.Errorf("%q: summary %q: lower-case, no final period", name, s)
	}
	return nil
}
