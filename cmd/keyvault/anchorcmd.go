package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/internal/server"
	"github.com/keyvault/keyvault/vault/boltstore"
)

const anchorStatusHelp = `Shows each HSM member's rollback anchor (epoch, the batch it vouches for,
write number as block.count, the live set), the store's position, and
whether the store passes the start-up check. It opens the store: stop the
vault first.`

const anchorAcceptHelp = `The audited path after a legitimate restore of the store: raises the epoch
in the store and in every member, so the vault starts on the restored store
and refuses older copies and the pre-restore store from then on; logs how
many anchored batches the restore lost. It opens the store: stop the vault
first.`

// cmdAnchor runs anchor status and anchor accept.
func cmdAnchor(sub string, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("anchor "+sub, stderr)
	path := fs.String("config", "", "the YAML config `file` (required)")
	reason := fs.String("reason", "", "why the store was restored (accept; required, logged)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *path == "" {
		return usageError{errors.New("--config is required")}
	}
	if sub == "accept" && strings.TrimSpace(*reason) == "" {
		return usageError{errors.New("accept needs --reason: the audit log keeps it")}
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	ctx := context.Background()
	a, err := server.OpenAnchorAdmin(ctx, cfg, newLogger(cfg, stderr))
	if err != nil {
		return err
	}
	defer a.Close()
	if sub == "status" {
		st, err := a.Status(ctx)
		if err != nil {
			return err
		}
		printAnchorStatus(stdout, st)
		return st.Err
	}
	acc, err := a.Accept(ctx, *reason, stderr)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "accepted: epoch %d, seq %d; %d anchored batches lost; anchored on %s\n",
		acc.Epoch, acc.Seq, acc.BatchesLost, strings.Join(acc.Members, ", "))
	return nil
}

func printAnchorStatus(w io.Writer, st boltstore.Status) {
	if st.Meta == nil {
		fmt.Fprintf(w, "store: no anchor meta, %d records\n", st.Records)
	} else {
		fmt.Fprintf(w, "store: epoch %d, seq %d, %d records\n", st.Meta.Epoch, st.Meta.Seq, st.Records)
	}
	for _, f := range st.Found {
		switch {
		case f.Err != nil:
			fmt.Fprintf(w, "member %s: no answer: %v\n", f.Member, f.Err)
		case len(st.Anchors[f.Member]) == 0:
			fmt.Fprintf(w, "member %s: no anchor (%d objects)\n", f.Member, len(f.Values))
		}
		// Newest first; a member keeps the anchor before its newest too,
		// in case a write is cut off.
		as := slices.SortedFunc(slices.Values(st.Anchors[f.Member]), func(a, b anchor.Anchor) int {
			return cmp.Or(cmp.Compare(b.Epoch, a.Epoch), cmp.Compare(b.Base.Seq, a.Base.Seq), cmp.Compare(b.W, a.W))
		})
		for i, a := range as {
			who := "member " + f.Member
			if i > 0 {
				who = "  older"
			}
			// A write number is a process's block and its count in it.
			fmt.Fprintf(w, "%s: epoch %d, base seq %d, write %d.%d, live %s\n",
				who, a.Epoch, a.Base.Seq, a.W>>32, a.W&math.MaxUint32, strings.Join(slices.Sorted(slices.Values(a.Live)), ","))
		}
	}
	if st.Err != nil {
		fmt.Fprintf(w, "check: refused: %v\n", st.Err)
	} else {
		fmt.Fprintln(w, "check: passes")
	}
}
