package anchor

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"testing"
)

func testKeys() Keys {
	k := Keys{Anchor: make([]byte, 32), Digest: make([]byte, 32), Meta: make([]byte, 32)}
	rand.Read(k.Anchor)
	rand.Read(k.Digest)
	rand.Read(k.Meta)
	return k
}

func TestDigestIsAKeyedMultisetHash(t *testing.T) {
	h := NewHasher(bytes.Repeat([]byte{7}, 32))
	recs := [][2]string{{"a", "1"}, {"b", "2"}, {"c", "3"}}
	var fwd, rev Digest
	for _, r := range recs {
		fwd = h.AddRecord(fwd, []byte(r[0]), []byte(r[1]))
	}
	for i := len(recs) - 1; i >= 0; i-- {
		rev = h.AddRecord(rev, []byte(recs[i][0]), []byte(recs[i][1]))
	}
	if fwd != rev {
		t.Fatal("the digest depends on the order of the records")
	}
	// Replacing a record is removing the old pair and adding the new one.
	upd := h.AddRecord(h.RemoveRecord(fwd, []byte("b"), []byte("2")), []byte("b"), []byte("9"))
	var direct Digest
	for _, r := range [][2]string{{"a", "1"}, {"b", "9"}, {"c", "3"}} {
		direct = h.AddRecord(direct, []byte(r[0]), []byte(r[1]))
	}
	if upd != direct {
		t.Fatal("an update differs from the digest of the updated set")
	}
	if h.RemoveRecord(h.AddRecord(fwd, []byte("x"), nil), []byte("x"), nil) != fwd {
		t.Fatal("removing is not the inverse of adding")
	}
	// The key and value are separated: ("ab","c") is not ("a","bc"), and
	// a record is not the meta.
	var z Digest
	if h.AddRecord(z, []byte("ab"), []byte("c")) == h.AddRecord(z, []byte("a"), []byte("bc")) {
		t.Fatal("key and value boundaries collide")
	}
	if h.AddRecord(z, nil, []byte("m")) == h.AddMeta(z, []byte("m")) {
		t.Fatal("a record and the meta hash alike")
	}
	// A second copy of a record changes the digest (a multiset, not a set).
	if h.AddRecord(fwd, []byte("a"), []byte("1")) == fwd {
		t.Fatal("a duplicate record left the digest unchanged")
	}
	// Another key gives another digest.
	h2 := NewHasher(bytes.Repeat([]byte{8}, 32))
	var other Digest
	for _, r := range recs {
		other = h2.AddRecord(other, []byte(r[0]), []byte(r[1]))
	}
	if other == fwd {
		t.Fatal("the digest does not depend on its key")
	}
}

func TestDigestArithmeticWraps(t *testing.T) {
	max := Digest{^uint64(0), ^uint64(0), ^uint64(0), ^uint64(0)}
	one := Digest{0, 0, 0, 1}
	if got := max.add(one); got != (Digest{}) {
		t.Fatalf("max + 1 = %v, want 0", got)
	}
	if got := (Digest{}).sub(one); got != max {
		t.Fatalf("0 - 1 = %v, want max", got)
	}
	carry := Digest{0, 0, 1, ^uint64(0)}
	if got := carry.add(one); got != (Digest{0, 0, 2, 0}) {
		t.Fatalf("carry across limbs: %v", got)
	}
}

func TestMetaRoundTripAndTamper(t *testing.T) {
	k := testKeys()
	m := Meta{Epoch: 3, Seq: 99}
	rand.Read(m.VaultID[:])
	raw := k.MarshalMeta(m)
	got, err := k.ParseMeta(raw)
	if err != nil || got != m {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	for i := range raw {
		bad := bytes.Clone(raw)
		bad[i] ^= 1
		if _, err := k.ParseMeta(bad); !errors.Is(err, ErrTampered) {
			t.Fatalf("byte %d flipped: %v", i, err)
		}
	}
	other := testKeys()
	if _, err := other.ParseMeta(raw); !errors.Is(err, ErrTampered) {
		t.Fatal("meta verified under another key")
	}
}

func sampleAnchor() Anchor {
	a := Anchor{Member: "hsm-a", Epoch: 2, W: 41, Live: []string{"hsm-b", "hsm-a"}, Base: Point{Seq: 10}}
	rand.Read(a.VaultID[:])
	rand.Read(a.Base.Tag[:])
	return a
}

func TestAnchorRoundTripAndTamper(t *testing.T) {
	k := testKeys()
	a := sampleAnchor()
	raw, err := k.MarshalAnchor(a)
	if err != nil {
		t.Fatal(err)
	}
	got, err := k.ParseAnchor(raw)
	if err != nil {
		t.Fatal(err)
	}
	a.Live = []string{"hsm-a", "hsm-b"} // stored sorted
	if !sameAnchor(got, a) || got.Member != a.Member || got.W != a.W {
		t.Fatalf("round trip: %+v, want %+v", got, a)
	}
	for i := range raw {
		bad := bytes.Clone(raw)
		bad[i] ^= 0x80
		if _, err := k.ParseAnchor(bad); !errors.Is(err, ErrTampered) {
			t.Fatalf("byte %d flipped: %v", i, err)
		}
	}
	if _, err := k.ParseAnchor(raw[:len(raw)-1]); !errors.Is(err, ErrTampered) {
		t.Fatal("a truncated anchor parsed")
	}
	for _, a := range []Anchor{{Member: "m"}, {Member: "", Live: []string{"m"}}, {Member: "m", Live: []string{string(make([]byte, 65))}}} {
		if _, err := k.MarshalAnchor(a); err == nil {
			t.Errorf("%+v marshalled", a)
		}
	}
}

func FuzzParseAnchor(f *testing.F) {
	k := Keys{Anchor: []byte("fuzz-anchor-key-fuzz-anchor-key!"), Digest: []byte("d"), Meta: []byte("fuzz-meta")}
	raw, _ := k.MarshalAnchor(sampleAnchor())
	f.Add(raw)
	f.Add(k.MarshalMeta(Meta{Seq: 1}))
	f.Add([]byte(anchorMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		if a, err := k.ParseAnchor(b); err == nil {
			again, err := k.MarshalAnchor(a)
			if err != nil || !bytes.Equal(again, b) {
				t.Fatalf("a parsed anchor does not encode back to its bytes: %v", err)
			}
		}
		if m, err := k.ParseMeta(b); err == nil && !bytes.Equal(k.MarshalMeta(m), b) {
			t.Fatal("a parsed meta does not encode back to its bytes")
		}
	})
}

// world is a store and its members, as the writer would leave them.
type world struct {
	k      Keys
	h      *Hasher
	meta   Meta
	recs   map[string]string
	w      uint64
	live   []string
	anchor map[string][][]byte // member -> anchor object values
}

func newWorld(members ...string) *world {
	k := testKeys()
	w := &world{k: k, h: NewHasher(k.Digest), recs: map[string]string{}, live: members, anchor: map[string][][]byte{}}
	rand.Read(w.meta.VaultID[:])
	return w
}

func (w *world) recordDigest() Digest {
	var d Digest
	for key, v := range w.recs {
		d = w.h.AddRecord(d, []byte(key), []byte(v))
	}
	return d
}

// state is the store as a scan finds it. Its meta is w.meta as the writer
// left it: records edited since keep the meta's record digest stale, as
// an attacker without the meta key must.
func (w *world) state() State {
	raw, r := w.k.MarshalMeta(w.meta), w.recordDigest()
	return State{Meta: raw, Digest: w.h.AddMeta(r, raw), RecordDigest: r, Records: len(w.recs)}
}

func (w *world) tag() Point {
	return Point{Seq: w.meta.Seq, Tag: w.k.Tag(w.meta.VaultID, w.meta.Epoch, w.meta.Seq, w.state().Digest)}
}

// writeAnchor writes the next anchor, with base, to the given members
// (default: all live).
func (w *world) writeAnchor(base Point, to ...string) {
	if to == nil {
		to = w.live
	}
	w.w++
	for _, m := range to {
		raw, err := w.k.MarshalAnchor(Anchor{VaultID: w.meta.VaultID, Member: m, Epoch: w.meta.Epoch, W: w.w, Live: to, Base: base})
		if err != nil {
			panic(err)
		}
		w.anchor[m] = append(w.anchor[m], raw)
	}
}

// batch commits a batch of writes as the writer does: on the current
// position, which its meta names as parent. The anchor that vouches for
// it comes after (vouch).
func (w *world) batch(set map[string]string) {
	parent := w.tag()
	recs := map[string]string{}
	for k, v := range w.recs {
		recs[k] = v
	}
	for k, v := range set {
		recs[k] = v
	}
	w.recs = recs
	w.meta.Seq++
	w.meta.Parent = parent.Tag
	w.meta.Records = w.recordDigest()
}

// vouch writes the anchor for the current position.
func (w *world) vouch() { w.writeAnchor(w.tag()) }

func (w *world) clone() *world {
	c := *w
	c.recs = map[string]string{}
	for k, v := range w.recs {
		c.recs[k] = v
	}
	return &c
}

func (w *world) found(hidden ...string) []Found {
	var out []Found
	for _, m := range w.live {
		f := Found{Member: m, Values: w.anchor[m]}
		for _, h := range hidden {
			if h == m {
				f = Found{Member: m, Err: errors.New("no answer")}
			}
		}
		out = append(out, f)
	}
	return out
}

func wantRefused(t *testing.T, err error, want Reason) {
	t.Helper()
	if r, ok := IsRefused(err); !ok || r != want {
		t.Fatalf("got %v, want a refusal for %s", err, want)
	}
}

func TestCheck(t *testing.T) {
	w := newWorld("a", "b")
	check := func(w *world, st State, hidden ...string) error {
		_, err := w.k.Check(w.found(hidden...), st)
		return err
	}
	if d, err := w.k.Check(w.found(), State{}); err != nil || !d.Fresh {
		t.Fatalf("empty store, no anchors: %+v %v", d, err)
	}
	w.vouch()
	if err := check(w, w.state()); err != nil {
		t.Fatalf("first anchor: %v", err)
	}
	w.batch(map[string]string{"u1": "g1", "u2": "g1", "u3": "g1"})
	w.vouch()
	old := w.clone() // a backup taken at seq 1
	w.batch(map[string]string{"u1": "g2", "u2": "locked"})
	w.vouch()
	before := w.clone()
	w.batch(map[string]string{"u3": "g2"})
	// Killed after the commit, before its anchor: one batch past the
	// anchor, written on it.
	if d, err := w.k.Check(w.found(), w.state()); err != nil || !d.Past {
		t.Fatalf("store one batch past its anchor: %+v %v", d, err)
	}
	// Killed before the commit: the store is still at base.
	if err := check(w, before.state()); err != nil {
		t.Fatalf("store at base, batch not committed: %v", err)
	}
	w.vouch()
	if err := check(w, w.state()); err != nil {
		t.Fatalf("store at base: %v", err)
	}
	if err := check(w, before.state()); err == nil {
		t.Fatal("the store from before the batch passes after the batch's anchor")
	}

	t.Run("an older copy of the store", func(t *testing.T) {
		wantRefused(t, check(w, old.state()), ReasonRollback)
	})
	t.Run("one record rolled back", func(t *testing.T) {
		r := w.clone()
		r.recs["u1"] = "g1"
		wantRefused(t, check(w, r.state()), ReasonTamper)
	})
	t.Run("a locked record revived", func(t *testing.T) {
		r := w.clone()
		r.recs["u2"] = "g1"
		wantRefused(t, check(w, r.state()), ReasonTamper)
	})
	t.Run("a deleted record brought back", func(t *testing.T) {
		r := w.clone()
		r.recs["gone"] = "g1"
		wantRefused(t, check(w, r.state()), ReasonTamper)
	})
	t.Run("the current meta spliced onto an old store", func(t *testing.T) {
		r := old.clone()
		r.meta = w.meta
		wantRefused(t, check(w, r.state()), ReasonTamper)
	})
	t.Run("a meta edited by hand", func(t *testing.T) {
		st := w.state()
		st.Meta = append([]byte(nil), st.Meta...)
		st.Meta[len(st.Meta)-1] ^= 1
		wantRefused(t, check(w, st), ReasonTamper)
	})
	t.Run("a store ahead of every anchor", func(t *testing.T) {
		r := w.clone()
		r.meta.Seq += 2
		wantRefused(t, check(w, r.state()), ReasonAhead)
		r = w.clone()
		r.batch(map[string]string{"u9": "g1"})
		r.batch(map[string]string{"u9": "g2"})
		wantRefused(t, check(w, r.state()), ReasonAhead)
	})
	t.Run("one batch past the anchor, records edited", func(t *testing.T) {
		r := w.clone()
		r.batch(map[string]string{"u9": "g2"})
		r.recs["u1"] = "g1"
		wantRefused(t, check(w, r.state()), ReasonTamper)
		r = w.clone()
		r.batch(map[string]string{"u9": "g2"})
		delete(r.recs, "u9")
		wantRefused(t, check(w, r.state()), ReasonTamper)
	})
	t.Run("one batch past the anchor, written on another position", func(t *testing.T) {
		// A fork: before the last batch, the store went another way (an
		// old copy was put back and the vault went on from it); that
		// branch's next batch does not descend from the anchored position.
		fork := before.clone()
		fork.batch(map[string]string{"u3": "forked"})
		fork.batch(map[string]string{"u1": "forked"})
		if fork.meta.Seq != w.meta.Seq+1 {
			t.Fatalf("fork at seq %d, want %d", fork.meta.Seq, w.meta.Seq+1)
		}
		wantRefused(t, check(w, fork.state()), ReasonTamper)
	})
	t.Run("a store with records and no anchor", func(t *testing.T) {
		c := w.clone()
		c.anchor = map[string][][]byte{}
		wantRefused(t, check(c, w.state()), ReasonNoAnchor)
	})
	t.Run("a store kept with anchoring off is adopted", func(t *testing.T) {
		c := w.clone()
		c.anchor = map[string][][]byte{}
		st := w.state()
		st.Meta = nil // never anchored: no meta
		if d, err := c.k.Check(c.found(), st); err != nil || !d.Fresh || !d.Adopted {
			t.Fatalf("%+v %v, want fresh and adopted", d, err)
		}
		// Not with a member silent (it may hold the anchors), nor where
		// anchors exist (a copy from before anchoring was turned on).
		wantRefused(t, check(c, st, "b"), ReasonMemberMissing)
		wantRefused(t, check(w, st), ReasonRollback)
	})
	t.Run("an empty store where anchors exist", func(t *testing.T) {
		wantRefused(t, check(w, State{}), ReasonRollback)
	})
	t.Run("a live member hidden", func(t *testing.T) {
		wantRefused(t, check(w, w.state(), "b"), ReasonMemberMissing)
	})
	t.Run("another epoch", func(t *testing.T) {
		r := w.clone()
		r.meta.Epoch++
		wantRefused(t, check(w, r.state()), ReasonEpoch)
	})
	t.Run("an anchor copied from another member", func(t *testing.T) {
		c := w.clone()
		c.anchor = map[string][][]byte{"a": w.anchor["a"], "b": w.anchor["a"]}
		c.live = []string{"a", "b"}
		d, err := c.k.Check(c.found(), w.state())
		if err != nil || d.Ignored != len(w.anchor["a"]) {
			t.Fatalf("copies on b are ignored, a's count: %+v %v", d, err)
		}
	})

	// Member b fails: the next anchors reach only a, and drop b.
	w.live = []string{"a"}
	w.batch(map[string]string{"u1": "g3"})
	w.vouch()
	w.live = []string{"a", "b"} // both configured
	if err := check(w, w.state(), "b"); err != nil {
		t.Fatalf("b out of the live set and down: %v", err)
	}
	t.Run("the stale member alone cannot stand in for the current one", func(t *testing.T) {
		// a is hidden; b's newest anchor names a as live.
		wantRefused(t, check(w, w.state(), "a"), ReasonMemberMissing)
		wantRefused(t, check(w, before.state(), "a"), ReasonMemberMissing)
	})
	t.Run("two members disagree at one write number", func(t *testing.T) {
		c := w.clone()
		c.anchor = map[string][][]byte{}
		c.w = 100
		c.live = []string{"a", "b"}
		c.writeAnchor(c.tag())
		c.w--
		c.writeAnchor(c.tag(), "b") // same position, live {b}
		wantRefused(t, check(c, c.state()), ReasonTamper)
	})
	// The seq ranks before the write number: an anchor of a newer
	// position outranks one with a higher write number, which a process
	// may have written at a member the next start could not read.
	t.Run("a newer position outranks a higher write number", func(t *testing.T) {
		c := w.clone()
		c.anchor = map[string][][]byte{}
		c.live = []string{"a", "b"}
		c.w = 100
		c.writeAnchor(c.tag(), "b") // W 101 at this position
		atX := c.state()
		c.w = 10
		c.batch(map[string]string{"k": "newer"})
		c.writeAnchor(c.tag()) // W 11, one position on
		if err := check(c, c.state()); err != nil {
			t.Fatalf("the newest position: %v", err)
		}
		wantRefused(t, check(c, atX), ReasonRollback)
	})
}

func TestRefusedErrorText(t *testing.T) {
	err := fmt.Errorf("start: %w", refuse(ReasonRollback, "store at %d", 3))
	if r, ok := IsRefused(err); !ok || r != ReasonRollback || err.Error() != "start: rollback check refused the store (rollback): store at 3" {
		t.Fatalf("%v %v %q", r, ok, err)
	}
}

// An accept raises the epoch; its anchor outranks the old epoch's even
// with a lower write number, which members missed by nothing can keep.
func TestNewerEpochOutranksHigherWriteNumber(t *testing.T) {
	w := newWorld("a", "b")
	w.writeAnchor(w.tag())
	w.w = 50
	w.writeAnchor(w.tag(), "b") // old epoch, high write number, on b
	w.meta.Epoch++
	w.w = 3
	w.writeAnchor(w.tag(), "a") // new epoch, low write number, on a
	d, err := w.k.Check(w.found(), w.state())
	if err != nil || d.Anchor.Epoch != w.meta.Epoch || d.Anchor.W != 4 {
		t.Fatalf("chose %+v, %v; want the new epoch's anchor", d.Anchor, err)
	}
}

// A Sealer MACs exactly as its Keys do, however often it is reused, and
// keys nothing anew: the store's writer uses one for every commit.
func TestSealerMatchesKeys(t *testing.T) {
	k := testKeys()
	s := k.Sealer()
	for i := range 3 {
		m := Meta{Epoch: 3, Seq: uint64(99 + i), Records: Digest{1, 2, 3, uint64(i)}}
		rand.Read(m.VaultID[:])
		rand.Read(m.Parent[:])
		if got, want := s.MarshalMeta(m), k.MarshalMeta(m); !bytes.Equal(got, want) {
			t.Fatalf("meta %d: Sealer %x, Keys %x", i, got, want)
		}
		if got, want := s.Tag(m.VaultID, m.Epoch, m.Seq, m.Records), k.Tag(m.VaultID, m.Epoch, m.Seq, m.Records); got != want {
			t.Fatalf("tag %d: Sealer %x, Keys %x", i, got, want)
		}
		a := sampleAnchor()
		a.W += uint64(i)
		got, err := s.MarshalAnchor(a)
		want, err2 := k.MarshalAnchor(a)
		if err != nil || err2 != nil || !bytes.Equal(got, want) {
			t.Fatalf("anchor %d: Sealer %x (%v), Keys %x (%v)", i, got, err, want, err2)
		}
		if _, err := k.ParseAnchor(got); err != nil {
			t.Fatalf("anchor %d: %v", i, err)
		}
	}
	if _, err := s.MarshalAnchor(Anchor{Member: "a"}); err == nil {
		t.Fatal("Sealer marshalled an anchor with no live member")
	}
	var d Digest
	if n := testing.AllocsPerRun(10, func() { s.Tag([VaultIDLen]byte{}, 1, 2, d) }); n != 0 {
		t.Errorf("Sealer.Tag allocates %v times", n)
	}
	if n := testing.AllocsPerRun(10, func() { s.MarshalMeta(Meta{}) }); n != 1 {
		t.Errorf("Sealer.MarshalMeta allocates %v times, want 1 (its result)", n)
	}
	h, key, value := NewHasher(k.Digest), []byte("key"), []byte("value")
	if n := testing.AllocsPerRun(10, func() { d = h.AddRecord(d, key, value) }); n != 0 {
		t.Errorf("Hasher.AddRecord allocates %v times", n)
	}
}
