// Package cli holds the command table of a program with subcommands and
// everything made from it: dispatch by path, the usage texts (a leaf's
// --help, a group's, the top-level list and help COMMAND), the shell
// completion scripts for bash, zsh and fish, and the man page in roff.
// Because all of them read one Table, none of them can miss a command.
//
// # Table
//
// A Table holds leaves ("serve", "keys rotate") and the groups that only
// hold subcommands ("keys"). A leaf's Run parses its flags with
// Table.NewFlags and ParseFlags: its --help is then the uniform one, and
// the completions and the man page take its flags from the flag set the
// command itself parses. A leaf named "help" is the help command: its Run
// is Table.Help, and it completes the command names.
//
// # Errors
//
// errors.Is matches a usage error (a bad flag, a missing subcommand) to
// ErrUsage; a command name not in the table is an
// UnknownCommandError. --help returns flag.ErrHelp after printing the usage
// to stdout.
package cli
