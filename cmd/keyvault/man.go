package main

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// cmdMan prints keyvault(1) in roff, made from the commands table.
func cmdMan(args []string, stdout, stderr io.Writer) error {
	fs := newFlags("man", stderr)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	manPage(stdout)
	return nil
}

// roffWord escapes text inside a roff line.
func roffWord(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\e`), "-", `\-`)
}

// roff escapes text as roff body lines, each ended by a newline.
func roff(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(roffWord(s), "\n") {
		if strings.HasPrefix(line, ".") || strings.HasPrefix(line, "'") {
			line = `\&` + line
		}
		b.WriteString(line + "\n")
	}
	return b.String()
}

func manPage(w io.Writer) {
	fmt.Fprint(w, `.TH KEYVAULT 1 "" "keyvault `+roffWord(versionString())+`" "User Commands"
.SH NAME
keyvault \- a PIN\-protected key\-backup vault in front of PKCS#11 HSMs
.SH SYNOPSIS
.B keyvault
.I command
.RI [ subcommand ]
.RI [ flags ]
.SH DESCRIPTION
One binary runs the vault, sets up a development instance, manages the key
versions on the HSM members, checks HSMs and configs, handles the rollback
anchors and measures throughput.
Every command prints its usage with \fB\-\-help\fR, as does
\fBkeyvault help\fR \fIcommand\fR.
.SH COMMANDS
`)
	for _, c := range commands {
		fmt.Fprintf(w, ".SS \"keyvault %s\"\n", c.name)
		if c.synopsis != "" {
			fmt.Fprintf(w, ".B keyvault %s\n%s", c.name, roff(c.synopsis))
			fmt.Fprint(w, ".PP\n")
		}
		fmt.Fprint(w, roff(c.desc))
		if fs := commandFlags(c); fs != nil {
			fs.VisitAll(func(f *flag.Flag) {
				name, usage := flag.UnquoteUsage(f)
				fmt.Fprintf(w, ".TP\n.BR \\-\\-%s", roffWord(f.Name))
				if name != "" {
					fmt.Fprintf(w, " \" \\fI%s\\fR\"", roffWord(name))
				}
				fmt.Fprint(w, "\n", roff(usage))
				if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" {
					fmt.Fprint(w, ".br\nDefault: ", roff(f.DefValue))
				}
			})
		}
	}
	fmt.Fprint(w, `.SH EXIT STATUS
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
`)
}
