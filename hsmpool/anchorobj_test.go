package hsmpool

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"
)

// Anchors live on each member as private, unmodifiable data objects; a
// write leaves exactly the newest one, and they outlive the process.
func TestAnchorObjects(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	if _, err := Provision([]MemberConfig{a, b}); err != nil {
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
	for _, v := range []string{"first", "second", "third"} {
		if err := p.WriteAnchor(ctx, "a", []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.WriteAnchor(ctx, "b", []byte("b's")); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteAnchor(ctx, "c", []byte("x")); err == nil {
		t.Fatal("wrote an anchor to a member that does not exist")
	}
	// Key operations still work beside the anchor session.
	if _, err := p.HMAC(ctx, pin1, []byte("m")); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{"a": "third", "b": "b's"}
	check := func(p *Pool) {
		t.Helper()
		for _, f := range p.ReadAnchors(ctx) {
			if f.Err != nil || len(f.Values) != 1 || string(f.Values[0]) != want[f.Member] {
				t.Fatalf("member %s: %q %v, want only %q", f.Member, f.Values, f.Err, want[f.Member])
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
	p.Close()

	// Outside the vault: the object is private (invisible without login)
	// and refuses edits.
	err = withSession(a, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		objs, err := findAnchors(c, s)
		if err != nil || len(objs) != 1 {
			t.Fatalf("%d anchors on a: %v", len(objs), err)
		}
		attrs, err := c.GetAttributeValue(s, objs[0], []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, nil), pkcs11.NewAttribute(pkcs11.CKA_MODIFIABLE, nil)})
		if err != nil {
			return err
		}
		if !bytes.Equal(attrs[0].Value, []byte{1}) || !bytes.Equal(attrs[1].Value, []byte{0}) {
			t.Errorf("private %v, modifiable %v; want true, false", attrs[0].Value, attrs[1].Value)
		}
		if err := c.SetAttributeValue(s, objs[0], []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, []byte("edited"))}); err == nil {
			t.Error("an anchor object was edited in place")
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
// through it (found by review: the views had no anchor session).
func TestAnchorsAfterReload(t *testing.T) {
	a := newMember(t, "a")
	if _, err := Provision([]MemberConfig{a}); err != nil {
		t.Fatal(err)
	}
	p := openPool(t, prometheus.NewRegistry(), a)
	ctx := context.Background()
	if err := p.WriteAnchor(ctx, "a", []byte("before")); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Reload(); err != nil {
		t.Fatal(err)
	}
	if err := p.WriteAnchor(ctx, "a", []byte("after")); err != nil {
		t.Fatalf("anchor write after a reload: %v", err)
	}
	if f := p.ReadAnchors(ctx); f[0].Err != nil || len(f[0].Values) != 1 || string(f[0].Values[0]) != "after" {
		t.Fatalf("anchors after a reload: %q %v", f[0].Values, f[0].Err)
	}
}
