package boltstore_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// The rollback-anchor protocol across restarts, accepts, adoption and
// write numbers: each test below is a way a stale member or a failed start
// could make a rolled-back store pass, or a clean one fail.

// openAnchored opens the store at path and runs the start-up check.
func openAnchored(t *testing.T, path string, keys anchor.Keys, fa *ctlAnchors) (*boltstore.Store, error) {
	t.Helper()
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Anchor(bg, keys, fa, nil, nil); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// noStart runs the start-up check and fails the test if it passes.
func noStart(t *testing.T, path string, keys anchor.Keys, fa *ctlAnchors, why string) {
	t.Helper()
	if s, err := openAnchored(t, path, keys, fa); err == nil {
		s.Close()
		t.Fatal(why)
	}
}

// A restart whose newest anchor is a failed write (it reached only a
// member outside the live set the write had to reach) takes that anchor's
// live set as the set the start-up write must reach. But the members
// still holding the last successful anchor name an older live set, which
// neither the failed write nor the start-up write reached: such a member
// keeps an anchor that names only itself, and stands in for the current
// member once that one is hidden.
//
//	W1 (start)  reaches {a}      live {a,b}
//	W2 (x)      reaches {a,b}    live {a}     a keeps W2 for good
//	W3 (y)      reaches {b}      live {a,b}   fails: must reach {a}
//	restart: best W3, must reach {a,b}
//	W4 (start)  reaches {b}      live {b}
//	W5 (z)      reaches {b}      live {b}     z answered
//	hide b, restore the store at x: a's W2 (live {a}) vouches for it.
func TestRestartOnAFailedAnchorLeavesAStaleMemberStanding(t *testing.T) {
	s, path, keys, fa := openLiveAHeldByAB(t)
	atX, _ := os.ReadFile(path)
	fa.set("a")
	if _, err := s.CompareAndSwap(bg, []byte("y"), 0, []byte("v")); !errors.Is(err, vault.ErrWithheld) {
		t.Fatalf("y: %v, want ErrWithheld (its anchor reached only b)", err) // W3 on b only
	}
	s.Close()

	// Restart with a still failing writes (it answers reads): the start
	// must reach a, which holds W2 naming only itself, and fails closed.
	noStart(t, path, keys, fa, "started without reaching a, whose anchor names only itself")
	// a takes writes again: the start catches it up.
	fa.set()
	s, err := openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("restart: %v", err)
	}
	mustCAS(t, s, "z", 0, "released") // z's answer is out
	s.Close()

	// The attack: the store as it was at x, and b hidden.
	if err := os.WriteFile(path, atX, 0o600); err != nil {
		t.Fatal(err)
	}
	fa.set("b")
	fa.silent = map[string]bool{"b": true}
	for _, m := range []string{"a", "b"} {
		if len(fa.values[m]) > 0 {
			a, _ := keys.ParseAnchor(fa.values[m][0])
			t.Logf("%s: W=%d live=%v base=%d", m, a.W, a.Live, a.Base.Seq)
		}
	}
	noStart(t, path, keys, fa, "the store from before y and z (z answered) was accepted on the stale member a while b is hidden")
}

// An accept raises the epoch on the members it reaches; it succeeds when it
// reaches any one. A member it did not reach keeps its anchor of the old
// epoch, and if that anchor's live set names only members the accept did
// not reach either, it vouches on its own for the pre-restore store once
// the members holding the new epoch are hidden: every answer of the new
// epoch is lost.
func TestAcceptReachingOneMemberLeavesTheOldEpochStanding(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "store.db")
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a", "b"}, values: map[string][][]byte{}}
	fa.set()
	s, err := openAnchored(t, path, keys, fa) // W1 on a, b
	if err != nil {
		t.Fatal(err)
	}
	mustCAS(t, s, "k", 0, "v")
	backup, _ := os.ReadFile(path) // the backup the operator restores later
	fa.set("a")                    // a drops out; b carries on
	mustCAS(t, s, "p1", 0, "v")    // live {a,b} -> reaches {b}
	mustCAS(t, s, "p2", 0, "v")    // names live {b}
	s.Close()
	preRestore, _ := os.ReadFile(path) // the store the restore replaced

	halfFailedAccept(t, path, keys, fa, backup, preRestore)
}

func mustRev(t *testing.T, s *boltstore.Store, key string) uint64 {
	t.Helper()
	_, rev, err := s.Get(bg, []byte(key))
	if err != nil {
		t.Fatal(err)
	}
	return rev
}

// Adoption writes the store's first meta, then the first anchor. A kill
// (or a failed anchor write) between the two leaves a clean store with
// records and a meta but no anchor anywhere, which every later start
// refuses as no_anchor.
func TestAdoptionCutOffBeforeItsFirstAnchor(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	mustCAS(t, s, "kept-without-anchoring", 0, "v") // anchoring off
	s.Close()
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a"}, values: map[string][][]byte{}}
	fa.set("a") // the first anchor write fails (as a kill right before it would)
	noStart(t, path, keys, fa, "adopted without an anchor")
	fa.set()
	s, err = openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("the untouched store, after an adoption cut off before its first anchor: %v", err)
	}
	s.Close()
}

// A start takes up the write numbers after the newest anchor it can read;
// a silent member outside that anchor's live set may hold a higher one (a
// write that failed because it reached no member it had to). The start-up
// anchor then reuses that number with another content, and once every
// member answers again, the clean store is refused as tampered with.
func TestStartReusesAWriteNumberASilentMemberHolds(t *testing.T) {
	path := filepath.Join(t.TempDir(), "store.db")
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a", "b", "c"}, values: map[string][][]byte{}}
	fa.set("b", "c")
	s, err := openAnchored(t, path, keys, fa) // W1 on a; named {a,b,c}
	if err != nil {
		t.Fatal(err)
	}
	fa.set("b")
	time.Sleep(1100 * time.Millisecond) // c's retry is due
	mustCAS(t, s, "x", 0, "v")          // W2 on a, c (live {a}); b failed again
	fa.set("a", "c")
	time.Sleep(2100 * time.Millisecond) // b's retry is due
	if _, err := s.CompareAndSwap(bg, []byte("y"), 0, []byte("v")); !errors.Is(err, vault.ErrWithheld) {
		t.Fatalf("y: %v, want ErrWithheld", err) // W3 on b only (live {a,c}); must reach {a}
	}
	s.Close()
	// Restart with b and c silent: W2 on a is the newest readable one.
	fa.silent = map[string]bool{"b": true, "c": true}
	fa.set("b", "c")
	s, err = openAnchored(t, path, keys, fa) // W3 again, on a, live {a}
	if err != nil {
		t.Fatalf("restart with b and c silent: %v", err)
	}
	s.Close()
	fa.silent = nil
	fa.set()
	s, err = openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("clean store, every member back: %v", err)
	}
	s.Close()
}

// halfFailedAccept plays an accept that misses a member, then the attack
// on it: the operator puts backup in place and accepts it while b's writes
// fail, so the accept reaches a alone and fails; the next start must reach
// b too, so it fails until b takes writes, then serves an answer; then the
// store from before the restore is put back with a hidden, and must be
// refused.
func halfFailedAccept(t *testing.T, path string, keys anchor.Keys, fa *ctlAnchors, backup, preRestore []byte) {
	t.Helper()
	if err := os.WriteFile(path, backup, 0o600); err != nil {
		t.Fatal(err)
	}
	fa.set("b")
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.AcceptRestore(bg, keys, fa); err == nil {
		t.Fatal("an accept that reached only a succeeded")
	}
	s.Close()
	noStart(t, path, keys, fa, "started after a half-failed accept without reaching b, which holds the old epoch")
	fa.set()
	s, err = openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("start after the half-failed accept, b back: %v", err)
	}
	mustCAS(t, s, "k", mustRev(t, s, "k"), "attempts=1") // answered after the accept
	s.Close()

	if err := os.WriteFile(path, preRestore, 0o600); err != nil {
		t.Fatal(err)
	}
	fa.set("a")
	fa.silent = map[string]bool{"a": true}
	noStart(t, path, keys, fa, "the store from before the restore was accepted on b while a, holding the accepted epoch, is hidden")
}

// The restart and accept rules when a member held an older anchor.

// liveAHeldByAB makes a store whose newest anchor, W2 (live {a}), is on
// members a and b, and closes it: W1 reached only a (b failing), and W2
// both, once b's retry was due.
func liveAHeldByAB(t *testing.T) (string, anchor.Keys, *ctlAnchors) {
	t.Helper()
	s, path, keys, fa := openLiveAHeldByAB(t)
	s.Close()
	return path, keys, fa
}

// openLiveAHeldByAB is liveAHeldByAB with the store left open.
func openLiveAHeldByAB(t *testing.T) (*boltstore.Store, string, anchor.Keys, *ctlAnchors) {
	t.Helper()
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
	return s, path, keys, fa
}

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
//
// A write goes to a member outside the sets it must reach only once it has
// reached them, so start 1 does not touch b; the clean restarts are the
// test.
func TestStartAfterAFailedStartReusesItsWriteNumber(t *testing.T) {
	path, keys, fa := liveAHeldByAB(t)

	// Start 1: a fails writes (or the process is killed after b took it).
	fa.set("a")
	noStart(t, path, keys, fa, "started without reaching a")
	// Start 2: b does not answer; a takes writes. Then a clean stop.
	fa.set("b")
	fa.silent = map[string]bool{"b": true}
	s, err := openAnchored(t, path, keys, fa)
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
	s, err := boltstore.Open(boltstore.Options{Path: path})
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

	halfFailedAccept(t, path, keys, fa, backup, preRestore)
}

// The recorded write-number block ("anchor-block")
// is outside the digest and under no MAC: whoever holds the database can
// set it to any value. takeBlock adds one to it and shifts it left by 32
// bits in uint64, so a value of 2^32-1 or more wraps the process's write
// numbers round to 0. Its anchors then rank below every older anchor of
// the same epoch, and a member hidden at that start keeps an anchor that
// outranks every newer one: it vouches for the store it names once the
// members come back. An edit of the key must cost liveness, never safety.
//
//	start 1      W=B1+1, B1+2 (k=0) on a,b              <- copy "old"
//	start 2      W=B2+1 on a,b (base: old); b fails
//	             W=B2+2 live {a,b}, W=B2+3 live {a} on a (k=5, p)
//	edit anchor-block = MaxUint64; hide b
//	start 3      block wraps: W=1 on a; W=2 (k=6, answered) on a
//	put old back, every member answers: b's W=B2+1 (live {a,b}) is newest
func TestEditedAnchorBlockWrapsWriteNumbers(t *testing.T) {
	path, keys, fa := anchoredAB(t, "attempts=0")
	old, _ := os.ReadFile(path)

	s, err := openAnchored(t, path, keys, fa) // B2+1 on a, b: base is old
	if err != nil {
		t.Fatal(err)
	}
	fa.set("b")
	mustCAS(t, s, "k", mustRev(t, s, "k"), "attempts=5") // B2+2 on a
	mustCAS(t, s, "p", 0, "v")                           // B2+3 on a, live {a}
	s.Close()

	// The attacker edits the unauthenticated block record and hides b.
	setAnchorBlock(t, path, math.MaxUint64)
	fa.silent = map[string]bool{"b": true}
	s, err = openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("start with b hidden: %v", err) // refusing here would be fine
	}
	mustCAS(t, s, "k", mustRev(t, s, "k"), "attempts=6") // answered
	s.Close()
	for _, m := range []string{"a", "b"} {
		a, _ := keys.ParseAnchor(fa.values[m][0])
		t.Logf("%s: W=%#x live=%v base=%d", m, a.W, a.Live, a.Base.Seq)
	}

	// The rollback: the store from before attempts=5 and attempts=6.
	if err := os.WriteFile(path, old, 0o600); err != nil {
		t.Fatal(err)
	}
	fa.silent = nil
	fa.set()
	noStart(t, path, keys, fa, "the store from before released answers was accepted: the edited anchor-block wrapped the write numbers, and b's older anchor outranks a's newer ones")
}

// Start-up writes that fail (they must reach a, which fails writes) must
// not land on b. If they did, b would keep an anchor from a failed start
// that names only itself, with a write number above every number a holds;
// the next start, with b hidden, would read only a, number its writes below
// b's and serve answers, and b's anchor from the failed start would then
// outrank a's newer ones and vouch for the store before them: with a
// hidden (b's anchor names only b), and, once the attacker has edited the
// anchor-block record so the next start cannot learn b's block, with every
// member answering. The old store must be refused in both cases.
//
//	W1 (fresh)  reaches {a}; W2 (x) reaches {a,b} live {a}   <- copy "old"
//	start 1a    on b only: fails (must reach {a})
//	start 1b    on b only, live {b}: fails
//	(edit anchor-block); hide b
//	start 2     on a; y answered
//	put old back: b's anchor vouches for x
func TestFailedStartsLetAHiddenMemberOutrank(t *testing.T) {
	for _, edit := range []bool{false, true} {
		path, keys, fa := liveAHeldByAB(t)
		old, _ := os.ReadFile(path)

		fa.set("a") // a answers reads but fails writes
		noStart(t, path, keys, fa, "start 1a without reaching a")
		noStart(t, path, keys, fa, "start 1b without reaching a")

		if edit {
			setAnchorBlock(t, path, math.MaxUint64)
		}
		fa.silent = map[string]bool{"b": true}
		fa.set("b")
		s, err := openAnchored(t, path, keys, fa)
		if err != nil {
			t.Fatalf("edit %v: start with b hidden: %v", edit, err)
		}
		mustCAS(t, s, "y", 0, "v") // answered
		s.Close()

		if err := os.WriteFile(path, old, 0o600); err != nil {
			t.Fatal(err)
		}
		fa.set()
		fa.silent = map[string]bool{"a": true}
		noStart(t, path, keys, fa, fmt.Sprintf("edit %v, a hidden: the store from before y's answer was accepted on b's anchor from a failed start", edit))
		fa.silent = nil
		noStart(t, path, keys, fa, fmt.Sprintf("edit %v, every member answering: the store from before y's answer was accepted on b's anchor from a failed start", edit))
	}
}

// Write numbers never wrap, so an epoch can use them up (an attacker who
// edits the store between some 65,000 starts could). A start then fails,
// and an accept, though the store passes the check, starts a new epoch
// in which they start over.
func TestExhaustedWriteNumbersStartOverOnAccept(t *testing.T) {
	path, keys, fa := anchoredAB(t, "v")
	// The members' anchors, renumbered into the last block.
	for _, m := range fa.names {
		a, err := keys.ParseAnchor(fa.values[m][0])
		if err != nil {
			t.Fatal(err)
		}
		a.W |= math.MaxUint32 << 32
		if fa.values[m][0], err = keys.MarshalAnchor(a); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := openAnchored(t, path, keys, fa); err == nil || !strings.Contains(err.Error(), "used up") {
		t.Fatalf("start with the write numbers used up: %v, want a refusal saying so", err)
	}
	s, err := boltstore.Open(boltstore.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	acc, err := s.AcceptRestore(bg, keys, fa)
	s.Close()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	if acc.BatchesLost != 0 || len(acc.Members) != 2 {
		t.Fatalf("accept: %+v", acc)
	}
	s, err = openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatalf("start after the accept: %v", err)
	}
	mustCAS(t, s, "k", mustRev(t, s, "k"), "w")
	s.Close()
	a, _ := keys.ParseAnchor(fa.values["a"][0])
	if a.Epoch != 2 || a.W>>32 > 10 {
		t.Fatalf("anchor after the accept: epoch %d, W %#x; want epoch 2, numbers started over", a.Epoch, a.W)
	}
	// A store that passes, with numbers to spare, has nothing to accept.
	s, _ = boltstore.Open(boltstore.Options{Path: path})
	defer s.Close()
	if _, err := s.AcceptRestore(bg, keys, fa); err == nil {
		t.Fatal("accept of a store that passes the check, with write numbers left")
	}
}

// setAnchorBlock edits the store's unauthenticated write-number block
// record, as an attacker with the file can.
func setAnchorBlock(t *testing.T, path string, block uint64) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("meta")).Put([]byte("anchor-block"), binary.BigEndian.AppendUint64(nil, block))
	}); err != nil {
		t.Fatal(err)
	}
}

// anchoredAB makes a store anchored on members a and b, both up, holding
// k=val, and closes it.
func anchoredAB(t *testing.T, val string) (string, anchor.Keys, *ctlAnchors) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "store.db")
	keys := anchorKeys()
	fa := &ctlAnchors{names: []string{"a", "b"}, values: map[string][][]byte{}}
	fa.set()
	s, err := openAnchored(t, path, keys, fa)
	if err != nil {
		t.Fatal(err)
	}
	mustCAS(t, s, "k", 0, val)
	s.Close()
	return path, keys, fa
}
