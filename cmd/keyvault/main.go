// Command keyvault is the PIN-protected key-backup vault: one binary with
// these commands.
//
//	keyvault serve --config FILE        run the service
//	keyvault dev [--dir DIR] [--listen ADDR] [--admin-listen ADDR]
//	                                    set up SoftHSM, keys and a config in DIR, then serve
//	keyvault keys init|list --config FILE
//	                                    create key version 1; list key versions per member
//	keyvault keys rotate|reload|usage|rewrap|retire --config FILE
//	                                    key rotation through the running vault's admin listener
//	keyvault hsm check --config FILE    what each member's token can do
//	keyvault config check --config FILE validate a config without starting
//	keyvault anchor status|accept --config FILE
//	                                    the rollback anchors; accept a restored store
//	keyvault bench --hsm --config FILE | --url URL --token-file FILE
//	                                    measure the HSM ceiling or load a running vault
//	keyvault version                    print the version (also --version, -v)
//	keyvault completion bash|zsh|fish   print a shell completion script
//	keyvault man                        print the keyvault(1) man page
//	keyvault help [COMMAND]             a command's usage, as COMMAND --help
//
// Every command prints its usage with --help. The command table in
// commands.go (a cli.Table) drives the dispatch, the usage texts, the
// completions and the man page. Exit status: 0 on success and for --help,
// 2 on a usage or config error, 1 otherwise.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"

	"github.com/keyvault/keyvault/internal/cli"
	"github.com/keyvault/keyvault/internal/server"
)

// version is set at build time with -ldflags "-X main.version=..." (make
// build stamps git describe); without it, the module version Go records.
var version = ""

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		table.Usage(stderr)
		return 2
	}
	var err error
	switch args[0] {
	case "--version", "-v":
		err = cmdVersion(nil, stdout, stderr)
	case "-h", "--help":
		table.Usage(stdout)
	default:
		err = table.Dispatch(args, stdout, stderr)
	}
	if u, ok := errors.AsType[cli.UnknownCommandError](err); ok {
		fmt.Fprintf(stderr, "keyvault: unknown command %q\n\n", string(u))
		table.Usage(stderr)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, cli.ErrUsage), errors.Is(err, server.ErrConfig):
		fmt.Fprintf(stderr, "keyvault %s: %v\n", args[0], err)
		return 2
	default:
		fmt.Fprintf(stderr, "keyvault %s: %v\n", args[0], err)
		return 1
	}
}

func versionString() string {
	return buildVersion() + " (" + runtime.Version() + ")"
}

// buildVersion is the version make build stamped, the module's version,
// or "dev".
func buildVersion() string {
	v := version
	if bi, ok := debug.ReadBuildInfo(); v == "" && ok {
		v = bi.Main.Version
	}
	if v == "" || v == "(devel)" {
		v = "dev"
	}
	return v
}
