package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
)

// command is one leaf of the command tree: "serve" or "keys rotate". The
// dispatch, every usage text, the shell completions and the man page are
// all made from the commands table, so none of them can miss a command.
type command struct {
	name     string // "serve", "keys rotate"
	synopsis string // the flags after the name in the usage line
	summary  string // one line, for lists and completions
	desc     string // the description paragraph(s) of --help and the man page
	run      func(args []string, stdout, stderr io.Writer) error
}

// groups describes the commands that only hold subcommands.
var groups = map[string]string{
	"keys":       "Key versions on the HSM members: create and list them, and rotate, reload, rewrap and retire them through the running vault's admin listener.",
	"hsm":        "Check the HSM members a config names.",
	"config":     "Check a config file.",
	"anchor":     "The rollback anchors of a bbolt store.",
	"completion": "Print a shell completion script for bash, zsh or fish.",
}

// commands is filled in init: its run functions refer back to it.
var commands []command

const adminHelp = "\n\nThe admin token comes from --admin-token-file or KEYVAULT_ADMIN_TOKEN; its SHA-256 is admin_token_sha256 in the config."

func init() {
	lifecycle := func(sub string) func([]string, io.Writer, io.Writer) error {
		return func(a []string, o, e io.Writer) error { return cmdKeysLifecycle(sub, a, o, e) }
	}
	admin := "--config FILE [--admin-url URL] [--admin-token-file FILE]"
	commands = []command{
		{"serve", "--config FILE", "run the service",
			"Runs the vault with the config FILE until SIGINT or SIGTERM; SIGHUP reloads the key versions and reopens the audit file.",
			func(a []string, _, e io.Writer) error { return cmdServe(a, e) }},
		{"dev", "[--dir DIR] [--listen ADDR] [--admin-listen ADDR]", "set up SoftHSM, keys and a config in DIR, then serve", devHelp, cmdDev},
		{"keys init", "--config FILE", "create key version 1 on every HSM member",
			"Creates key version 1 on every HSM member of the config, after checking that every member can serve and take the keys, then lists the keys as keys list does.",
			func(a []string, o, e io.Writer) error { return cmdKeys("init", a, o, e) }},
		{"keys list", "--config FILE", "key versions and check values per member",
			"Lists every HSM member's key versions with their check values, and the members the pool refused.",
			func(a []string, o, e io.Writer) error { return cmdKeys("list", a, o, e) }},
		{"keys rotate", admin, "create the next key version and take it into use",
			"Creates the next wrap and PIN key version on every HSM member, prints the check values, and has the running vault take it into use." + adminHelp, lifecycle("rotate")},
		{"keys reload", admin, "have the running vault reload its key versions",
			"Has the running vault reload the key versions from its HSM members." + adminHelp, lifecycle("reload")},
		{"keys usage", admin, "count backups by key version",
			"Prints how many backups the running vault holds under each key version." + adminHelp, lifecycle("usage")},
		{"keys rewrap", "--config FILE [--rate N] [--status] [--wait] [--admin-url URL] [--admin-token-file FILE]", "re-wrap backups under the current key version",
			"Starts the running vault's job that re-wraps every backup under the current key version at --rate records per second; --status reports its progress, --wait waits for its end." + adminHelp, lifecycle("rewrap")},
		{"keys retire", "--config FILE --version V [--admin-url URL] [--admin-token-file FILE]", "destroy an old key version",
			"Has the running vault destroy key version V on every HSM member." + adminHelp, lifecycle("retire")},
		{"hsm check", "--config FILE", "what each member's token can do; exit 2 if one cannot serve",
			"Shows each member's token: what it can do of what the vault needs, and whether it can serve. Exit 0: every member can; 2: not.", cmdHSM},
		{"config check", "--config FILE", "validate a config without starting",
			"Validates a config file as serve does at start (strict keys, types, paths, addresses) and reports every problem by its key path; exit 2 on any.", cmdConfig},
		{"anchor status", "--config FILE", "the rollback anchors and the start-up check", anchorStatusHelp,
			func(a []string, o, e io.Writer) error { return cmdAnchor("status", a, o, e) }},
		{"anchor accept", "--config FILE --reason TEXT", "accept a restored store (audited)", anchorAcceptHelp,
			func(a []string, o, e io.Writer) error { return cmdAnchor("accept", a, o, e) }},
		{"bench", "--hsm --config FILE | --url URL --token-file FILE [flags]", "measure the HSM ceiling or load a running vault", benchHelp, cmdBench},
		{"version", "", "print the version (also --version, -v)", "Prints the version and the Go version it was built with.", cmdVersion},
		{"completion bash", "", "print the bash completion script",
			`Prints a bash completion script: source <(keyvault completion bash).`, completionCmd("bash", bashCompletion)},
		{"completion zsh", "", "print the zsh completion script",
			`Prints a zsh completion script: keyvault completion zsh > "${fpath[1]}/_keyvault".`, completionCmd("zsh", zshCompletion)},
		{"completion fish", "", "print the fish completion script",
			`Prints a fish completion script: keyvault completion fish > ~/.config/fish/completions/keyvault.fish.`, completionCmd("fish", fishCompletion)},
		{"man", "", "print the keyvault(1) man page",
			"Prints the keyvault(1) man page in roff: keyvault man > keyvault.1; man -l keyvault.1.", cmdMan},
		{"help", "[COMMAND [SUBCOMMAND]]", "a command's usage, as COMMAND --help",
			"Prints the usage of COMMAND, as keyvault COMMAND --help does, or without COMMAND the list of commands.", cmdHelp},
	}
}

// lookup returns the command named name.
func lookup(name string) (command, bool) {
	i := slices.IndexFunc(commands, func(c command) bool { return c.name == name })
	if i < 0 {
		return command{}, false
	}
	return commands[i], true
}

// subcommands returns the leaves of group in table order.
func subcommands(group string) []command {
	var out []command
	for _, c := range commands {
		if strings.HasPrefix(c.name, group+" ") {
			out = append(out, c)
		}
	}
	return out
}

// topNames returns the first words of the commands, in table order, once each.
func topNames() []string {
	var out []string
	for _, c := range commands {
		top, _, _ := strings.Cut(c.name, " ")
		if !slices.Contains(out, top) {
			out = append(out, top)
		}
	}
	return out
}

func isHelp(arg string) bool { return arg == "-h" || arg == "--help" || arg == "help" }

// dispatch runs the command args name.
func dispatch(args []string, stdout, stderr io.Writer) error {
	top := args[0]
	if _, ok := groups[top]; ok {
		if len(args) < 2 || isHelp(args[1]) {
			if len(args) < 2 {
				groupUsage(stderr, top)
				return usageError{fmt.Errorf("%s needs a subcommand: %s", top, strings.Join(subNames(top), ", "))}
			}
			groupUsage(stdout, top)
			return flag.ErrHelp
		}
		c, ok := lookup(top + " " + args[1])
		if !ok {
			groupUsage(stderr, top)
			return usageError{fmt.Errorf("unknown %s subcommand %q", top, args[1])}
		}
		return c.run(args[2:], stdout, stderr)
	}
	c, ok := lookup(top)
	if !ok {
		return unknownCommand(top)
	}
	return c.run(args[1:], stdout, stderr)
}

// unknownCommand is the error of a command name not in the table.
type unknownCommand string

func (u unknownCommand) Error() string { return fmt.Sprintf("unknown command %q", string(u)) }

func subNames(group string) []string {
	var out []string
	for _, c := range subcommands(group) {
		out = append(out, strings.TrimPrefix(c.name, group+" "))
	}
	return out
}

// usageLine is the first line of every usage text.
func usageLine(name, synopsis string) string {
	return strings.TrimRight("Usage: keyvault "+name+" "+synopsis, " ")
}

// topUsage is the usage of keyvault itself.
func topUsage(w io.Writer) {
	fmt.Fprintln(w, usageLine("<command> [<subcommand>]", "FLAGS"))
	fmt.Fprint(w, "\nkeyvault is a PIN-protected key-backup vault in front of PKCS#11 HSMs.\nExit status: 0 on success, 2 on a usage or config error, 1 otherwise.\n\nCommands:\n")
	listCommands(w, commands, "")
	fmt.Fprint(w, "\nRun \"keyvault help COMMAND\" or \"keyvault COMMAND --help\" for a command's flags.\n")
}

func groupUsage(w io.Writer, group string) {
	fmt.Fprintln(w, usageLine(group+" <subcommand>", "FLAGS"))
	fmt.Fprintf(w, "\n%s\n\nSubcommands:\n", groups[group])
	listCommands(w, subcommands(group), group+" ")
}

func listCommands(w io.Writer, cs []command, prefix string) {
	for _, c := range cs {
		head := strings.TrimRight(strings.TrimPrefix(c.name, prefix)+" "+c.synopsis, " ")
		if len(head) > 34 {
			fmt.Fprintf(w, "  %s\n  %-34s %s\n", head, "", c.summary)
		} else {
			fmt.Fprintf(w, "  %-34s %s\n", head, c.summary)
		}
	}
}

// leafUsage prints a command's usage: the usage line, the description and
// the flags of fs.
func leafUsage(w io.Writer, c command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "%s\n\n%s\n", usageLine(c.name, c.synopsis), wrap(c.desc, 79))
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	if n > 0 {
		fmt.Fprint(w, "\nFlags:\n")
		fs.PrintDefaults()
	}
}

// flagCapture is the stderr that commandFlags hands a command: newFlags
// records the command's flag set in it.
type flagCapture struct{ fs *flag.FlagSet }

func (*flagCapture) Write(p []byte) (int, error) { return len(p), nil }

// commandFlags returns the flags c parses, by running c --help with a
// capturing stderr: completions and the man page take the flags from the
// flag set the command itself parses. Nil for a command without flags.
func commandFlags(c command) *flag.FlagSet {
	capture := &flagCapture{}
	_ = c.run([]string{"--help"}, io.Discard, capture)
	return capture.fs
}

// newFlags returns the flag set of the command name, whose errors are
// usage errors and whose usage is the command's.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	c, ok := lookup(name)
	if !ok {
		panic("newFlags: no command " + name)
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { leafUsage(stderr, c, fs) }
	if capture, ok := stderr.(*flagCapture); ok {
		capture.fs = fs
	}
	return fs
}

// parseFlags parses args and refuses positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
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

func cmdVersion(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("version", stderr)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "keyvault", versionString())
	return nil
}

// cmdHelp is keyvault help [COMMAND [SUBCOMMAND]].
func cmdHelp(args []string, stdout, stderr io.Writer) error {
	switch {
	case len(args) == 0:
		topUsage(stdout)
		return nil
	case args[0] == "-h" || args[0] == "--help":
		c, _ := lookup("help")
		leafUsage(stdout, c, flag.NewFlagSet("help", flag.ContinueOnError))
		return flag.ErrHelp
	}
	return dispatch(append(slices.Clone(args), "--help"), stdout, stderr)
}

// completionCmd is keyvault completion SHELL.
func completionCmd(shell string, script func(io.Writer)) func([]string, io.Writer, io.Writer) error {
	return func(args []string, stdout, stderr io.Writer) error {
		fs := newFlags("completion "+shell, stderr)
		if err := parseFlags(fs, args); err != nil {
			return err
		}
		script(stdout)
		return nil
	}
}

// wrap breaks the lines of s longer than width at spaces; shorter lines,
// such as those of an indented list, stay as they are.
func wrap(s string, width int) string {
	var b strings.Builder
	for i, line := range strings.Split(s, "\n") {
		if i > 0 {
			b.WriteByte('\n')
		}
		n := 0
		for j, word := range strings.Fields(line) {
			if len(line) <= width {
				b.WriteString(line)
				break
			}
			if j > 0 && n+1+len(word) > width {
				b.WriteByte('\n')
				n = 0
			} else if j > 0 {
				b.WriteByte(' ')
				n++
			}
			b.WriteString(word)
			n += len(word)
		}
	}
	return b.String()
}
