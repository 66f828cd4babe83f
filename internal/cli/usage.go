package cli

import (
	"flag"
	"fmt"
	"io"
	"strings"
)

// usageLine is the first line of every usage text.
func usageLine(program, name, synopsis string) string {
	return strings.TrimRight("Usage: "+program+" "+name+" "+synopsis, " ")
}

// Usage prints the top-level usage: the usage line, About and every
// leaf with its summary.
func (t *Table) Usage(w io.Writer) {
	fmt.Fprintln(w, usageLine(t.Program, "<command> [<subcommand>]", "FLAGS"))
	fmt.Fprint(w, "\n"+t.About+"\n\nCommands:\n")
	listCommands(w, t.Commands, "")
	fmt.Fprintf(w, "\nRun \"%s help COMMAND\" or \"%s COMMAND --help\" for a command's flags.\n", t.Program, t.Program)
}

func (t *Table) groupUsage(w io.Writer, group string) {
	fmt.Fprintln(w, usageLine(t.Program, group+" <subcommand>", "FLAGS"))
	fmt.Fprintf(w, "\n%s\n\nSubcommands:\n", t.Groups[group].Desc)
	listCommands(w, t.subcommands(group), group+" ")
}

// listCommands prints one line per command: its name without prefix, its
// synopsis and its summary, the summary on a line of its own below a long
// head.
func listCommands(w io.Writer, cs []Command, prefix string) {
	for _, c := range cs {
		head := strings.TrimRight(strings.TrimPrefix(c.Name, prefix)+" "+c.Synopsis, " ")
		if len(head) > 34 {
			fmt.Fprintf(w, "  %s\n  %-34s %s\n", head, "", c.Summary)
		} else {
			fmt.Fprintf(w, "  %-34s %s\n", head, c.Summary)
		}
	}
}

// leafUsage prints a command's usage: the usage line, the description and
// the flags of fs.
func leafUsage(program string, w io.Writer, c Command, fs *flag.FlagSet) {
	fmt.Fprintf(w, "%s\n\n%s\n", usageLine(program, c.Name, c.Synopsis), wrap(c.Desc, 79))
	n := 0
	fs.VisitAll(func(*flag.Flag) { n++ })
	if n > 0 {
		fmt.Fprint(w, "\nFlags:\n")
		fs.PrintDefaults()
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
