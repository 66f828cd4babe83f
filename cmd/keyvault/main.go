// Command keyvault is the PIN-protected key-backup vault: one binary with
// the subcommands serve, dev, keys, bench and version. Exit status: 0 on
// success, 2 on a usage or config error, 1 otherwise.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"

	"github.com/keyvault/keyvault/internal/server"
)

// version is set at build time with -ldflags "-X main.version=..." (make
// build stamps git describe); without it, the module version Go records.
var version = ""

const usage = `keyvault: a PIN-protected key-backup vault in front of PKCS#11 HSMs.

Usage:
  keyvault serve --config FILE       run the service
  keyvault dev [--dir DIR] [--listen ADDR] [--admin-listen ADDR]
                                     set up SoftHSM, keys and a config in DIR, then serve
                                     (the addresses are kept in DIR/keyvault.yaml)
  keyvault keys init --config FILE   create key version 1 on every HSM member
  keyvault keys list --config FILE   key versions and check values per member
  keyvault keys rotate|reload|usage|rewrap|retire --config FILE
                                     key rotation (see keyvault keys --help)
  keyvault hsm check --config FILE   what each member's token can do; exit 2 if one cannot serve
  keyvault config check --config FILE
                                     validate a config without starting
  keyvault bench --hsm --config FILE  the raw HSM ceiling of a recover or enroll
  keyvault bench --url URL --token-file FILE
                                     load a running vault over HTTP; exit 1 when
                                     too many requests failed (--max-errors)
  keyvault anchor status --config FILE
                                     the rollback anchors and the start-up check
  keyvault anchor accept --config FILE --reason TEXT
                                     accept a restored store (audited)
  keyvault version                   print the version (also --version, -v)

Run "keyvault COMMAND --help" for a command's flags.
`

// errUsage marks a usage or config error: exit status 2.
var errUsage = errors.New("usage")

type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return errUsage }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		err = cmdServe(args[1:], stderr)
	case "dev":
		err = cmdDev(args[1:], stdout, stderr)
	case "keys":
		err = cmdKeys(args[1:], stdout, stderr)
	case "config":
		err = cmdConfig(args[1:], stdout, stderr)
	case "hsm":
		err = cmdHSM(args[1:], stdout, stderr)
	case "anchor":
		err = cmdAnchor(args[1:], stdout, stderr)
	case "bench":
		err = cmdBench(args[1:], stdout, stderr)
	case "version", "--version", "-v":
		fmt.Fprintln(stdout, "keyvault", versionString())
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "keyvault: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage), errors.Is(err, server.ErrConfig):
		fmt.Fprintf(stderr, "keyvault %s: %v\n", args[0], err)
		return 2
	default:
		fmt.Fprintf(stderr, "keyvault %s: %v\n", args[0], err)
		return 1
	}
}

func versionString() string {
	v := version
	bi, ok := debug.ReadBuildInfo()
	if v == "" && ok {
		v = bi.Main.Version
	}
	if v == "" || v == "(devel)" {
		v = "dev"
	}
	if ok {
		v += " (" + bi.GoVersion + ")"
	}
	return v
}

// newFlags returns a flag set whose errors are usage errors.
func newFlags(name string, stderr io.Writer, help string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: keyvault %s\n\n", help)
		fs.PrintDefaults()
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
