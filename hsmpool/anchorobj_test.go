package hsmpool

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// Anchors live on each member in two private slot objects written in
// turn, so a member keeps its newest anchor and the one before; a write
// never takes a member backwards; anchors outlive the process; and the
// first write of a process starts over from one object.
func TestAnchorObjects(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	if _, err := Provision([]MemberConfig{a, b}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	p, err := Open([]MemberConfig{a, b}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := p.Members(); len(got) != 2 || got[0] != "a" || got[1] != "b" {
		t.Fatalf("members %v", got)
	}
	for _, f := range p.ReadAnchors(ctx) {
		if f.Err != nil || len(f.Values) != 0 {
			t.Fatalf("fresh member %s: %d anchors, %v", f.Member, len(f.Values), f.Err)
		}
	}
	for i, v := range []string{"first", "second", "third"} {
		if err := p.WriteAnchor(ctx, "a", uint64(i+1), []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.WriteAnchor(ctx, "b", 1, []byte("b's")); err != nil {
		t.Fatal(err)
	}
	for _, w := range []uint64{3, 2} {
		if err := p.WriteAnchor(ctx, "a", w, []byte("stale")); !errors.Is(err, errStaleAnchor) {
			t.Fatalf("write %d after write 3: %v, want errStaleAnchor", w, err)
		}
	}
	if err := p.WriteAnchor(ctx, "c", 1, []byte("x")); err == nil {
		t.Fatal("wrote an anchor to a member that does not exist")
	}
	// Key operations still work beside the anchor session.
	if _, err := p.HMAC(ctx, pin1, []byte("m")); err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{"a": {"second", "third"}, "b": {"b's", "b's"}}
	check := func(p *Pool) {
		t.Helper()
		for _, f := range p.ReadAnchors(ctx) {
			var got []string
			for _, v := range f.Values {
				got = append(got, string(v))
			}
			slices.Sort(got)
			if f.Err != nil || !slices.Equal(got, want[f.Member]) {
				t.Fatalf("member %s: %q %v, want %q", f.Member, got, f.Err, want[f.Member])
			}
		}
	}
	check(p)
	p.Close()
	p, err = Open([]MemberConfig{a, b}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	check(p)
	// A new process does not know which slot is older: it starts over,
	// creating both slots, then updates them in place, oldest first.
	for i, w := range []string{"fourth", "fifth", "sixth", "seventh"} {
		if err := p.WriteAnchor(ctx, "a", uint64(4+i), []byte(w)); err != nil {
			t.Fatal(err)
		}
		want["a"] = [][]string{{"fourth", "fourth"}, {"fifth", "fourth"}, {"fifth", "sixth"}, {"seventh", "sixth"}}[i]
		slices.Sort(want["a"])
		check(p)
	}
	p.Close()

	// Outside the vault: two private objects, invisible without login.
	err = withSession(a, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		objs, err := findAnchors(c, s)
		if err != nil || len(objs) != 2 {
			t.Fatalf("%d anchors on a: %v", len(objs), err)
		}
		for _, o := range objs {
			attrs, err := c.GetAttributeValue(s, o, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil), pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
			if err != nil {
				return err
			}
			if !bytes.Equal(attrs[0].Value, []byte{1}) {
				t.Errorf("private %v, want true", attrs[0].Value)
			}
			// tpm2-pkcs11 refuses a data object without CKA_VALUE.
			if !bytes.Equal(attrs[1].Value, anchorSlotValue) {
				t.Errorf("CKA_VALUE %q, want %q", attrs[1].Value, anchorSlotValue)
			}
		}
		return nil
	}, func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
}

// A member whose token keeps no anchors (or does not answer) is reported
// with an error, never left out.
func TestReadAnchorsReportsSilentMembers(t *testing.T) {
	p, err := newPool([]MemberConfig{{Name: "x", MaxSessions: 1}}, []token{latencyToken{}}, make([]error, 1), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	f := p.ReadAnchors(context.Background())
	if len(f) != 1 || f[0].Member != "x" || !errors.Is(f[0].Err, errNoAnchors) {
		t.Fatalf("%+v", f)
	}
}

// A key reload (SIGHUP, keys reload) or retire swaps each member's token
// for a view with other keys; anchors must still be written and read
// through it: a view shares its member's anchor session.
func TestAnchorsAfterReload(t *testing.T) {
	a := newMember(t, "a")
	if _, err := Provision([]MemberConfig{a}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), a)
	ctx := context.Background()
	if err := p.WriteAnchor(ctx, "a", 1, []byte("before")); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteAnchor(ctx, "a", 2, []byte("after")); err != nil {
		t.Fatalf("anchor write after a reload: %v", err)
	}
	if f := p.ReadAnchors(ctx); f[0].Err != nil || len(f[0].Values) != 2 || !slices.ContainsFunc(f[0].Values, func(v []byte) bool { return string(v) == "after" }) {
		t.Fatalf("anchors after a reload: %q %v", f[0].Values, f[0].Err)
	}
}

// A reopened member gets a new anchorObjects. A write abandoned on the old
// one after its timeout (queued behind a hung call, whose error reset its
// slots) may run after the new one has taken newer writes: starting over,
// it would destroy them and take the member back to the abandoned anchor.
// The refusal of a write number not above the last one taken belongs to
// the token, not to one instance, so the token refuses it.
func TestAbandonedWriteOnAReopenedMemberCannotTakeItBack(t *testing.T) {
	a := newMember(t, "a")
	if _, err := Provision([]MemberConfig{a}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), a) // logs the token in
	ctx := context.Background()
	// The old token's instance, made by the pool's Modules as every
	// instance of the member's token is, its slots unknown; write 5
	// waits on it.
	old := p.opts.Modules.anchorObjects(a.Module, a.TokenLabel)
	defer old.close()
	// Meanwhile the re-opened member (a new instance) takes writes 6 and 7.
	for _, w := range []uint64{6, 7} {
		if err := p.WriteAnchor(ctx, "a", w, []byte{byte('0' + w)}); err != nil {
			t.Fatal(err)
		}
	}
	// The abandoned write 5 runs now.
	err := old.WriteAnchor(ctx, 5, []byte("5"))
	if !errors.Is(err, errStaleAnchor) {
		t.Errorf("the abandoned write 5 after write 7: %v, want errStaleAnchor", err)
	}
	f := p.ReadAnchors(ctx)
	var got []string
	for _, v := range f[0].Values {
		got = append(got, string(v))
	}
	if !slices.Contains(got, "7") {
		t.Fatalf("after the abandoned write 5 (err %v) the member holds %q: write 7 is gone", err, got)
	}
}

// A call that hangs holding the token's turn (the case the shared guard is
// for: a member reopened while an abandoned write is stuck on the old
// session) costs the writes after it their deadline, not a goroutine and
// a session each, blocked for ever.
func TestAnchorWriteBehindAHungOneKeepsItsDeadline(t *testing.T) {
	label := "hung-" + rand.Text()[:8]
	mods := NewModules()
	old := mods.anchorObjects("/nonexistent/module.so", label)
	old.guard.turn <- struct{}{} // stuck inside a PKCS#11 call, for ever
	reopened := mods.anchorObjects("/nonexistent/module.so", label)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- reopened.WriteAnchor(ctx, 1, []byte("anchor")) }()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("write behind a hung one: %v, want its deadline", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("an anchor write behind a hung one on the same token is still blocked after 5 s")
	}
}

// The guards belong to the Modules that made them: two independent pools
// in one process (two tests) share none, so a write hung on one token's
// turn in one holds back nothing in the other.
func TestAnchorGuardsBelongToTheirModules(t *testing.T) {
	label := "owned-" + rand.Text()[:8]
	hung := NewModules().anchorObjects("/nonexistent/module.so", label)
	hung.guard.turn <- struct{}{}
	other := NewModules().anchorObjects("/nonexistent/module.so", label)
	if other.guard == hung.guard {
		t.Fatal("two Modules share a token's anchor guard")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	// It gets the turn and fails to load the module, not its deadline.
	if err := other.WriteAnchor(ctx, 1, []byte("anchor")); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("write through another Modules: %v, want the module's load error", err)
	}
}
