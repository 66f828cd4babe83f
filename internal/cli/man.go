package cli

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// ManPage is the Run of the command "man", which prints the program's
// page in section 1, in roff: Man's text around a section per leaf with
// its synopsis, description and flags.
func (t *Table) ManPage(args []string, stdout, stderr io.Writer) error {
	fs := t.NewFlags("man", stderr)
	if err := ParseFlags(fs, args); err != nil {
		return err
	}
	t.writeMan(stdout)
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

func (t *Table) writeMan(w io.Writer) {
	p := t.Program
	fmt.Fprintf(w, ".TH %s 1 \"\" \"%s %s\" \"User Commands\"\n", strings.ToUpper(p), p, roffWord(t.Man.Version))
	fmt.Fprintf(w, ".SH NAME\n%s \\- %s\n", p, roffWord(t.Man.Name))
	fmt.Fprintf(w, ".SH SYNOPSIS\n.B %s\n.I command\n.RI [ subcommand ]\n.RI [ flags ]\n", p)
	fmt.Fprint(w, ".SH DESCRIPTION\n", t.Man.Description, ".SH COMMANDS\n")
	for _, c := range t.Commands {
		fmt.Fprintf(w, ".SS \"%s %s\"\n", p, c.Name)
		if c.Synopsis != "" {
			fmt.Fprintf(w, ".B %s %s\n%s", p, c.Name, roff(c.Synopsis))
			fmt.Fprint(w, ".PP\n")
		}
		fmt.Fprint(w, roff(c.Desc))
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
	fmt.Fprint(w, t.Man.Sections)
}
