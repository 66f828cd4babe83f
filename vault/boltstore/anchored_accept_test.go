package boltstore_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/keyvault/keyvault/vault/boltstore"
)

// Found by a second review of the restart and accept rules; each failed
// before its fix.

// writeBlock assumes every start reads an anchor of the last process's
// block. A process whose start-up write failed (or was killed) had no
// successful write: its one anchor, W = B1+1, may sit on a member alone.
// If that member is silent at the next start, that start reads only the
// block before and numbers its writes in B1 again: its start-up anchor is
// B1+1 too, with another live set. Once both members answer, the clean
// store is refused as tamper.
//
//	W1 (fresh)   reaches {a}      b failing
//	W2 (x)       reaches {a,b}    live {a}
//	start 1      W=B1+1 live {a,b} reaches {b} only: fails (must reach {a})
//	start 2      b silent: best W2 on a; W=B1+1 live {a} on a; stop idle
//	start 3      everyone answers: a and b hold W=B1+1, different live sets
func TestStartAfterAFailedStartReusesItsWriteNumber(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a", "b"}, values: map[string][][]byte{}}
	fa.set("b")
	s, err := openAnchored(t, path, keys, fa) // W1 on a
	if err != nil {
		t.Fatal(err)
	}
	fa.set()
	time.Sleep(1100 * time.Millisecond) // b's retry is due
	mustCAS(t, s, "x", 0, "v")          // W2 on a and b, live {a}
	s.Close()

	// Start 1: a fails writes (or the process is killed after b took it).
	fa.set("a")
	noStart(t, path, keys, fa, "started without reaching a")
	// Start 2: b does not answer; a takes writes. Then a clean stop.
	fa.set("b")
	fa.silent = map[string]bool{"b": true}
	s, err = openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("start with b silent: %v", err)
	}
	s.Close()
	for _, m := range []string{"a", "b"} {
		a, _ := keys.ParseAnchor(fa.values[m][0])
		t.Logf("%s: W=%#x live=%v base=%d", m, a.W, a.Live, a.Base.Seq)
	}
	// Start 3: every member answers and takes writes; nothing was touched.
	fa.silent = nil
	fa.set()
	s, err = openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("clean store, every member back: %v", err)
	}
	s.Close()
}

// An accept of a store with no meta (a backup from before anchoring was
// on) gives the store a new vault ID. Anchors of the old vault ID are
// invisible to the start-up reach rule (newestAnchors filters them), so a
// start after an accept that missed a member does not have to reach it:
// that member keeps an anchor of the old vault naming only itself, and
// vouches for the pre-restore store once the members of the new vault are
// hidden: every answer released since the accept is lost.
func TestAcceptOfAStoreWithoutMetaLeavesTheOldVaultStanding(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store.db")
	s, err := boltstore.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	mustCAS(t, s, "k", 0, "attempts=0") // anchoring off
	s.Close()
	backup, _ := os.ReadFile(path) // no meta

	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a", "b"}, values: map[string][][]byte{}}
	fa.set()
	s, err = openAnchored(t, path, keys, fa) // adopted; W1 on a, b
	if err != nil {
		t.Fatal(err)
	}
	fa.set("a")                                          // a drops out; b carries on
	mustCAS(t, s, "k", mustRev(t, s, "k"), "attempts=5") // W2 live {a,b}, on b
	mustCAS(t, s, "p", 0, "v")                           // W3 live {b}, on b
	s.Close()
	preRestore, _ := os.ReadFile(path)

	// The operator restores the meta-less backup and accepts it; b answers
	// but its writes fail, so the accept fails, having reached a.
	if err := os.WriteFile(path, backup, 0o600); err != nil {
		t.Fatal(err)
	}
	fa.set("b")
	s, err = boltstore.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.AcceptRestore(bg, keys, fa); err == nil {
		t.Fatal("an accept that reached only a succeeded")
	}
	s.Close()
	// The next start must finish the accept: reach b, which holds the old
	// epoch of the same vault. It fails while b's writes fail.
	noStart(t, path, keys, fa, "started after a half-failed accept without reaching b")
	fa.set()
	s, err = openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("start after the half-failed accept, b back: %v", err)
	}
	mustCAS(t, s, "k", mustRev(t, s, "k"), "attempts=1") // answered after the accept
	s.Close()

	// The attack: the pre-restore store, a hidden.
	if err := os.WriteFile(path, preRestore, 0o600); err != nil {
		t.Fatal(err)
	}
	fa.set("a")
	fa.silent = map[string]bool{"a": true}
	noStart(t, path, keys, fa, "the pre-restore store of the old vault was accepted on b while a, holding the accepted vault, is hidden")
}
