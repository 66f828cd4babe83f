package hsmpool

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/vault"
)

// noAnchors is a real member's token seen without its anchor objects: a
// token that serves keys but keeps no anchors.
type noAnchors struct{ token }

// The anchor probe passes on SoftHSM and leaves nothing behind; the pool
// keeps its anchors on the members that can, names the one that cannot,
// and refuses, naming the ways out, when none can.
func TestAnchorMembers(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	if _, err := Provision([]MemberConfig{a, b}, vault.ProfileHMAC); err != nil {
		t.Fatal(err)
	}
	for _, c := range Check([]MemberConfig{a, b}, "") {
		if c.Err != nil || c.Anchors != nil || c.AnchorLine() != "yes" {
			t.Fatalf("member %s: %v, anchors %s", c.Member, c.Err, c.AnchorLine())
		}
	}
	if err := CheckAnchors(Check([]MemberConfig{a}, "")); err != nil {
		t.Fatal(err)
	}
	// The probe's object is gone, and no anchor object was made.
	err := withSession(a, func(c *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		objs, err := findObjects(c, s, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_DATA)})
		if err == nil && len(objs) != 0 {
			t.Errorf("%d data objects left on the token", len(objs))
		}
		return err
	}, func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error { return nil })
	if err != nil {
		t.Fatal(err)
	}

	open := func(c MemberConfig, hide bool) token {
		tok, err := NewModules().openToken(c)
		if err != nil {
			t.Fatal(err)
		}
		if hide {
			return noAnchors{tok}
		}
		return tok
	}
	p, err := newPool([]MemberConfig{a, b}, []token{open(a, false), open(b, true)}, make([]error, 2), Options{Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx := context.Background()
	am, err := p.AnchorMembers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := am.Members(); !slices.Equal(got, []string{"a"}) || len(am.Refused) != 1 || am.Refused[0].Member != "b" {
		t.Fatalf("anchor members %v, refused %v", got, am.Refused)
	}
	if err := am.WriteAnchor(ctx, "a", 1, []byte("on a")); err != nil {
		t.Fatal(err)
	}
	if err := am.WriteAnchor(ctx, "b", 2, []byte("on b")); err == nil {
		t.Fatal("wrote an anchor to a member left out")
	}
	if f := am.ReadAnchors(ctx); len(f) != 1 || f[0].Member != "a" || f[0].Err != nil || len(f[0].Values) != 2 {
		t.Fatalf("read %+v", f)
	}

	only, err := newPool([]MemberConfig{b}, []token{open(b, true)}, make([]error, 1), Options{Registerer: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	defer only.Close()
	_, err = only.AnchorMembers(ctx)
	if !errors.Is(err, ErrNoAnchorMember) || !strings.Contains(err.Error(), "member b") || !strings.Contains(err.Error(), "store.rollback_anchor: false") {
		t.Fatalf("no member keeps anchors: %v", err)
	}
}

// A member whose token did not open is a silent member, not one that
// keeps no anchors: beside a member that keeps them it stays in, and its
// anchor reads fail with why it is not open; when it is the only member
// that might keep them, the refusal names its open failure.
func TestAnchorMembersNotOpen(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	if _, err := Provision([]MemberConfig{b}, vault.ProfileHMAC); err != nil {
		t.Fatal(err)
	}
	gone := a
	gone.Name, gone.TokenLabel = "gone", "no-such-token-"+a.TokenLabel
	mods := NewModules()
	defer mods.Close()
	_, openErr := mods.openToken(gone)
	if openErr == nil {
		t.Fatal("a token that does not exist opened")
	}
	ctx := context.Background()
	pool := func(hide bool) *Pool {
		t.Helper()
		tok, err := mods.openToken(b)
		if err != nil {
			t.Fatal(err)
		}
		var bt token = tok
		if hide {
			bt = noAnchors{tok}
		}
		p, err := newPool([]MemberConfig{gone, b}, []token{nil, bt}, []error{openErr, nil}, Options{Registerer: prometheus.NewRegistry()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		return p
	}

	_, err := pool(true).AnchorMembers(ctx)
	if !errors.Is(err, ErrNoAnchorMember) || !strings.Contains(err.Error(), openErr.Error()) ||
		strings.Contains(err.Error(), "member gone: "+errNoAnchors.Error()) || !strings.Contains(err.Error(), "bring member gone back") {
		t.Fatalf("with b keeping no anchors and gone not open: %v, want a refusal naming gone's open failure", err)
	}
	t.Logf("refusal: %v", err)

	am, err := pool(false).AnchorMembers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := am.Members(); !slices.Equal(got, []string{"gone", "b"}) || len(am.Refused) != 0 {
		t.Fatalf("anchor members %v, refused %v; want gone kept as a silent member", got, am.Refused)
	}
	f := am.ReadAnchors(ctx)
	if len(f) != 2 || f[0].Member != "gone" || !errors.Is(f[0].Err, errNoToken) || errors.Is(f[0].Err, errNoAnchors) ||
		!strings.Contains(f[0].Err.Error(), openErr.Error()) || f[1].Err != nil {
		t.Fatalf("read %+v, want gone's read failing with its open failure", f)
	}
}
