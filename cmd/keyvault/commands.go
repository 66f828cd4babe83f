package main

import (
	"flag"
	"fmt"
	"io"

	"github.com/keyvault/keyvault/internal/cli"
)

// table is keyvault's commands: the dispatch, every usage text, the shell
// completions and the man page are made from it. Its entries are filled
// in init: their run functions refer back to it.
var table = &cli.Table{
	Program: "keyvault",
	About:   "keyvault is a PIN-protected key-backup vault in front of PKCS#11 HSMs.\nExit status: 0 on success, 2 on a usage or config error, 1 otherwise.",
	Groups: map[string]cli.Group{
		"keys": {Summary: "key versions on the HSM members, and their rotation",
			Desc: "Key versions on the HSM members: create and list them, and rotate, reload, rewrap and retire them through the running vault's admin listener."},
		"hsm":        {Summary: "check the HSM members a config names", Desc: "Check the HSM members a config names."},
		"config":     {Summary: "check a config file", Desc: "Check a config file."},
		"anchor":     {Summary: "the rollback anchors of a bbolt store", Desc: "The rollback anchors of a bbolt store."},
		"completion": {Summary: "print a shell completion script for bash, zsh or fish", Desc: "Print a shell completion script for bash, zsh or fish."},
	},
	Man: cli.Man{
		Name: "a PIN-protected key-backup vault in front of PKCS#11 HSMs",
		Description: `One binary runs the vault, sets up a development instance, manages the key
versions on the HSM members, checks HSMs and configs, handles the rollback
anchors and measures throughput.
Every command prints its usage with \fB\-\-help\fR, as does
\fBkeyvault help\fR \fIcommand\fR.
`,
		Sections: `.SH EXIT STATUS
0 on success (and for \fB\-\-help\fR), 2 on a usage or config error, 1 otherwise.
.SH ENVIRONMENT
.TP
.B KEYVAULT_ADMIN_TOKEN
the admin bearer token of the keys commands that speak to the running vault
.TP
.BR KEYVAULT_ADMIN_CERT ", " KEYVAULT_ADMIN_KEY
the client certificate and key for an admin listener with admin_tls
.SH SEE ALSO
The docs directory of the keyvault repository: operating.md, hsm.md.
`,
	},
}

const adminHelp = "\n\nThe admin token comes from --admin-token-file or KEYVAULT_ADMIN_TOKEN; its SHA-256 is admin_token_sha256 in the config."

func init() {
	lifecycle := func(sub string) func([]string, io.Writer, io.Writer) error {
		return func(a []string, o, e io.Writer) error { return cmdKeysLifecycle(sub, a, o, e) }
	}
	admin := "--config FILE [--admin-url URL] [--admin-token-file FILE]"
	table.Man.Version = versionString()
	table.Commands = []cli.Command{
		{Name: "serve", Synopsis: "--config FILE", Summary: "run the service",
			Desc: "Runs the vault with the config FILE until SIGINT or SIGTERM; SIGHUP reloads the key versions and reopens the audit file.",
			Run:  func(a []string, _, e io.Writer) error { return cmdServe(a, e) }},
		{Name: "dev", Synopsis: "[--dir DIR] [--listen ADDR] [--admin-listen ADDR]", Summary: "set up SoftHSM, keys and a config in DIR, then serve",
			Desc: devHelp, Run: cmdDev},
		{Name: "keys init", Synopsis: "--config FILE", Summary: "create key version 1 on every HSM member",
			Desc: "Creates key version 1 on every HSM member of the config, after checking that every member can serve and take the keys, then lists the keys as keys list does.",
			Run:  func(a []string, o, e io.Writer) error { return cmdKeys("init", a, o, e) }},
		{Name: "keys list", Synopsis: "--config FILE", Summary: "key versions and check values per member",
			Desc: "Lists every HSM member's key versions with their check values, and the members the pool refused.",
			Run:  func(a []string, o, e io.Writer) error { return cmdKeys("list", a, o, e) }},
		{Name: "keys rotate", Synopsis: admin, Summary: "create the next key version and take it into use",
			Desc: "Creates the next wrap and PIN key version on every HSM member, prints the check values, and has the running vault take it into use." + adminHelp,
			Run:  lifecycle("rotate")},
		{Name: "keys reload", Synopsis: admin, Summary: "have the running vault reload its key versions",
			Desc: "Has the running vault reload the key versions from its HSM members." + adminHelp,
			Run:  lifecycle("reload")},
		{Name: "keys usage", Synopsis: admin, Summary: "count backups by key version",
			Desc: "Prints how many backups the running vault holds under each key version." + adminHelp,
			Run:  lifecycle("usage")},
		{Name: "keys rewrap", Synopsis: "--config FILE [--rate N] [--status] [--wait] [--admin-url URL] [--admin-token-file FILE]", Summary: "re-wrap backups under the current key version",
			Desc: "Starts the running vault's job that re-wraps every backup under the current key version at --rate records per second; --status reports its progress, --wait waits for its end." + adminHelp,
			Run:  lifecycle("rewrap")},
		{Name: "keys retire", Synopsis: "--config FILE --version V [--admin-url URL] [--admin-token-file FILE]", Summary: "destroy an old key version",
			Desc: "Has the running vault destroy key version V on every HSM member." + adminHelp,
			Run:  lifecycle("retire")},
		{Name: "hsm check", Synopsis: "--config FILE", Summary: "what each member's token can do; exit 2 if one cannot serve",
			Desc: "Shows each member's token: what it can do of what the vault needs, and whether it can serve. Exit 0: every member can; 2: not.",
			Run:  cmdHSM},
		{Name: "config check", Synopsis: "--config FILE", Summary: "validate a config without starting",
			Desc: "Validates a config file as serve does at start (strict keys, types, paths, addresses) and reports every problem by its key path; exit 2 on any.",
			Run:  cmdConfig},
		{Name: "anchor status", Synopsis: "--config FILE", Summary: "the rollback anchors and the start-up check",
			Desc: anchorStatusHelp, Run: func(a []string, o, e io.Writer) error { return cmdAnchor("status", a, o, e) }},
		{Name: "anchor accept", Synopsis: "--config FILE --reason TEXT", Summary: "accept a restored store (audited)",
			Desc: anchorAcceptHelp, Run: func(a []string, o, e io.Writer) error { return cmdAnchor("accept", a, o, e) }},
		{Name: "bench", Synopsis: "--hsm --config FILE | --url URL --token-file FILE [flags]", Summary: "measure the HSM ceiling or load a running vault",
			Desc: benchHelp, Run: cmdBench},
		{Name: "version", Summary: "print the version (also --version, -v)",
			Desc: "Prints the version and the Go version it was built with.", Run: cmdVersion},
		{Name: "completion bash", Summary: "print the bash completion script",
			Desc: `Prints a bash completion script: source <(keyvault completion bash).`, Run: table.Completion("bash")},
		{Name: "completion zsh", Summary: "print the zsh completion script",
			Desc: `Prints a zsh completion script: keyvault completion zsh > "${fpath[1]}/_keyvault".`, Run: table.Completion("zsh")},
		{Name: "completion fish", Summary: "print the fish completion script",
			Desc: `Prints a fish completion script: keyvault completion fish > ~/.config/fish/completions/keyvault.fish.`, Run: table.Completion("fish")},
		{Name: "man", Summary: "print the keyvault(1) man page",
			Desc: "Prints the keyvault(1) man page in roff: keyvault man > keyvault.1; man -l keyvault.1.", Run: table.ManPage},
		{Name: "help", Synopsis: "[COMMAND [SUBCOMMAND]]", Summary: "a command's usage, as COMMAND --help",
			Desc: "Prints the usage of COMMAND, as keyvault COMMAND --help does, or without COMMAND the list of commands.", Run: table.Help},
	}
}

// usageError is a usage error of a command: exit status 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return cli.ErrUsage }

// newFlags returns the flag set of the command name, whose usage is the
// command's.
func newFlags(name string, stderr io.Writer) *flag.FlagSet { return table.NewFlags(name, stderr) }

// parseFlags parses args and refuses positional arguments; its errors are
// usage errors, but flag.ErrHelp.
func parseFlags(fs *flag.FlagSet, args []string) error { return cli.ParseFlags(fs, args) }

func cmdVersion(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("version", stderr)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	fmt.Fprintln(stdout, "keyvault", versionString())
	return nil
}
