package vault_test

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// movingHSM is a fake HSM whose key versions move on Reload, as the pool's
// do: from cur to next, unless refuse is set (a member out of service).
// It records the versions it was told to Forget.
type movingHSM struct {
	cur    atomic.Pointer[fakeHSM]
	next   *fakeHSM
	refuse atomic.Bool
	// onReload, if set, runs at the start of every Reload (which may
	// block: a slow HSM listing).
	onReload atomic.Pointer[func()]

	mu     sync.Mutex
	forgot []uint32
}

func (m *movingHSM) HMAC(ctx context.Context, id vault.KeyID, msg []byte) ([]byte, error) {
	return m.cur.Load().HMAC(ctx, id, msg)
}
func (m *movingHSM) Seal(ctx context.Context, id vault.KeyID, nonce, pt, aad []byte) ([]byte, error) {
	return m.cur.Load().Seal(ctx, id, nonce, pt, aad)
}
func (m *movingHSM) Open(ctx context.Context, id vault.KeyID, nonce, ct, aad []byte) ([]byte, error) {
	return m.cur.Load().Open(ctx, id, nonce, ct, aad)
}
func (m *movingHSM) KeyVersion(r vault.KeyRole) uint32  { return m.cur.Load().KeyVersion(r) }
func (m *movingHSM) WrapProfile(v uint32) vault.Profile { return m.cur.Load().WrapProfile(v) }

func (m *movingHSM) Reload() (map[vault.KeyRole]uint32, error) {
	if f := m.onReload.Load(); f != nil {
		(*f)()
	}
	if m.refuse.Load() {
		return nil, errors.New("reload: member hsm-b is out of service")
	}
	m.cur.Store(m.next)
	return m.next.versions, nil
}

func (m *movingHSM) Forget(version uint32) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.forgot = append(m.forgot, version)
	return nil
}

func (m *movingHSM) forgotten() []uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.forgot)
}

// manualClock is a wall clock a test moves by hand.
type manualClock struct{ off atomic.Int64 }

func (c *manualClock) now() time.Time {
	return time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC).Add(time.Duration(c.off.Load()))
}
func (c *manualClock) advance(d time.Duration) { c.off.Add(int64(d)) }

// cluster is two vault "nodes" on one store, as two processes on etcd
// would be: A already on key version 2, B on version 1 until it reloads.
type cluster struct {
	st     vault.Store
	node   func(id string, st vault.Store, h vault.HSM, ring vault.KeyRing) *vault.Vault
	a, b   *vault.Vault
	hb     *movingHSM
	clock  *manualClock
	logs   *syncBuffer
	v1, v2 *fakeHSM
}

var v1Keys = map[vault.KeyRole]uint32{vault.RoleWrap: 1, vault.RolePIN: 1, vault.RoleRoot: 1}
var v2Keys = map[vault.KeyRole]uint32{vault.RoleWrap: 2, vault.RolePIN: 2, vault.RoleRoot: 1}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	st, err := boltstore.Open(boltstore.Options{Path: filepath.Join(t.TempDir(), "kv.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	c := &cluster{st: st, clock: &manualClock{}, logs: &syncBuffer{}}
	c.v1 = newFakeHSMVersions(t, v1Keys)
	c.v2 = c.v1.withVersions(v2Keys)
	c.hb = &movingHSM{next: c.v2.sameKeys()}
	c.hb.cur.Store(c.v1.sameKeys())
	c.node = func(id string, st vault.Store, h vault.HSM, ring vault.KeyRing) *vault.Vault {
		v, err := vault.New(bg, st, h, vault.Options{
			Now:    c.clock.now,
			Logger: slog.New(slog.NewTextHandler(c.logs, nil)),
			Keys:   ring,
			// Heartbeats here are driven by hand (SyncKeys); the interval
			// sets the fence (5 heartbeats) and the ack wait.
			Cluster: vault.ClusterOptions{Shared: true, NodeID: id, Heartbeat: 50 * time.Millisecond, WriteBound: 100 * time.Millisecond},
		})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	c.a = c.node("node-a", st, c.v2.sameKeys(), nil)
	c.b = c.node("node-b", st, c.hb, c.hb)
	return c
}

func mustSync(t *testing.T, vs ...*vault.Vault) {
	t.Helper()
	for _, v := range vs {
		if err := v.SyncKeys(bg); err != nil {
			t.Fatalf("SyncKeys: %v", err)
		}
	}
}

func enrollOn(t *testing.T, v *vault.Vault, user string) vault.Backup {
	t.Helper()
	b, _, err := v.Enroll(bg, ns, user, randBytes(32), rightPIN, 5, vault.Precondition{})
	if err != nil {
		t.Fatalf("enroll %s: %v", user, err)
	}
	return b
}

// A node that cannot move off a version makes the retire refuse, naming
// it, and the version is usable again; once the node has moved and the
// last record is gone, the retire destroys the version and the other
// node lets it go.
func TestRetireRefusesWhileANodeHasNotMoved(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.hb.refuse.Store(true)
	mustSync(t, c.a, c.b) // A announces version 2; B cannot reload
	destroyed := 0
	destroy := func(uint32) error { destroyed++; return nil }
	err := c.a.RetireKeys(bg, 1, destroy)
	var lag *vault.LaggingNodesError
	if !errors.As(err, &lag) || len(lag.Nodes) != 1 || lag.Nodes[0].Node != "node-b" || lag.Nodes[0].Wrap != 1 ||
		!strings.Contains(err.Error(), "node-b (seals under wrap v1, PIN v1") {
		t.Fatalf("retire with node-b on version 1: %v", err)
	}
	if destroyed != 0 {
		t.Fatal("destroyed a version a live node seals under")
	}
	mustSync(t, c.b)
	if b := enrollOn(t, c.b, "on-b"); b.KeyVersion != 1 {
		t.Fatalf("node-b after the refused retire seals under v%d, want v1", b.KeyVersion)
	}

	c.hb.refuse.Store(false)
	mustSync(t, c.b)
	if b := enrollOn(t, c.b, "on-b-later"); b.KeyVersion != 2 || b.PINKeyVersion != 2 {
		t.Fatalf("node-b after its reload seals under %d/%d, want 2/2", b.KeyVersion, b.PINKeyVersion)
	}
	// B acknowledges on its heartbeat, which the retire waits for.
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	go c.b.RunKeySync(ctx)
	if err := c.a.RetireKeys(bg, 1, destroy); !errors.Is(err, vault.ErrKeysInUse) {
		t.Fatalf("retire with a backup on v1: %v", err)
	}
	if err := c.b.Delete(bg, ns, "on-b", vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	if err := c.a.RetireKeys(bg, 1, destroy); err != nil || destroyed != 1 {
		t.Fatalf("retire once no node and no backup uses v1: %v (destroyed %d times)", err, destroyed)
	}
	cancel()
	mustSync(t, c.b)
	if got := c.hb.forgotten(); !slices.Equal(got, []uint32{1}) {
		t.Errorf("node-b let go of %v, want [1]", got)
	}
}

// A record node B sealed under version 1 just before it acknowledged the
// retirement is refused at the write, and the enrollment seals again
// under version 2: no record under version 1 lands behind the count.
func TestRetireRefusesASealMadeBeforeTheNodeMoved(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	mustSync(t, c.b) // before A announces version 2: B stays on 1
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	c.hb.cur.Load().setHook(func(_ context.Context, id vault.KeyID, _ []byte) {
		if id.Role == vault.RolePIN && id.Version == 1 {
			once.Do(func() { close(entered); <-release })
		}
	})
	done := make(chan vault.Backup)
	go func() { done <- enrollOn(t, c.b, "straddler") }()
	<-entered // sealing under version 1
	mustSync(t, c.a)
	ctx, cancel := context.WithCancel(bg)
	defer cancel()
	go c.b.RunKeySync(ctx) // B reloads to 2, then acknowledges
	if err := c.a.RetireKeys(bg, 1, func(uint32) error { return nil }); err != nil {
		t.Fatalf("retire: %v", err)
	}
	close(release)
	if b := <-done; b.KeyVersion != 2 || b.PINKeyVersion != 2 {
		t.Fatalf("the enrollment begun under v1 landed under %d/%d, want 2/2", b.KeyVersion, b.PINKeyVersion)
	}
	if st, err := c.a.Status(bg, ns, "straddler"); err != nil || st.KeyVersion != 2 || st.PINKeyVersion != 2 {
		t.Fatalf("status: %+v %v", st, err)
	}
}

// A node cut off from the store stops sealing once its last round is
// FenceAfter old; once it has been silent for NodeGone the retire goes
// ahead without it, and when it is back it neither writes under the
// retired version nor needs more than one round to move.
func TestSilentNodeFencesItselfAndIsLeftBehind(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.hb.refuse.Store(true)
	mustSync(t, c.a, c.b)
	if b := enrollOn(t, c.b, "before"); b.KeyVersion != 1 {
		t.Fatalf("node-b seals under v%d, want v1", b.KeyVersion)
	}
	if err := c.b.Delete(bg, ns, "before", vault.Precondition{}); err != nil {
		t.Fatal(err)
	}
	opts := vault.ClusterOptions{Heartbeat: 50 * time.Millisecond, WriteBound: 100 * time.Millisecond}
	c.clock.advance(opts.FenceAfter())
	_, _, err := c.b.Enroll(bg, ns, "fenced", randBytes(32), rightPIN, 5, vault.Precondition{})
	if !errors.Is(err, vault.ErrUnavailable) || !strings.Contains(err.Error(), "has not read the cluster's key state") {
		t.Fatalf("enroll on a node silent for %v: %v", opts.FenceAfter(), err)
	}
	// The fence is logged once while it stands, and its end once.
	if _, _, err := c.b.Enroll(bg, ns, "fenced-2", randBytes(32), rightPIN, 5, vault.Precondition{}); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("a second enroll on the fenced node: %v", err)
	}
	if n := strings.Count(string(c.logs.Bytes()), "fenced: enrollments"); n != 1 {
		t.Fatalf("the fence logged %d times for two refused enrolls, want once:\n%s", n, string(c.logs.Bytes()))
	}
	if err := c.a.RetireKeys(bg, 1, func(uint32) error { return nil }); !errors.Is(err, vault.ErrNodesLagging) {
		t.Fatalf("retire while node-b is silent but not yet gone: %v", err)
	}
	c.clock.advance(opts.NodeGone())
	mustSync(t, c.a)
	if err := c.a.RetireKeys(bg, 1, func(uint32) error { return nil }); err != nil {
		t.Fatalf("retire with node-b gone: %v", err)
	}
	// Back, still unable to reload: it refuses to seal under the retired
	// version rather than writing one.
	mustSync(t, c.b)
	if _, _, err := c.b.Enroll(bg, ns, "back", randBytes(32), rightPIN, 5, vault.Precondition{}); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("enroll on node-b under a retired version: %v", err)
	}
	if n := strings.Count(string(c.logs.Bytes()), "fence lifted"); n != 1 {
		t.Fatalf("the fence's end logged %d times, want once:\n%s", n, string(c.logs.Bytes()))
	}
	c.hb.refuse.Store(false)
	mustSync(t, c.b)
	if b := enrollOn(t, c.b, "moved"); b.KeyVersion != 2 {
		t.Fatalf("node-b after its reload seals under v%d, want v2", b.KeyVersion)
	}
	if n, _ := c.a.KeyUsage(bg); n.Wrap[1] != 0 || n.PIN[1] != 0 {
		t.Fatalf("records on v1 after the retire: %+v", n)
	}
}

// A node whose key sync round read the key state before a retire marked
// the version, and publishes its heartbeat only after the retire has
// looked at the heartbeats, was invisible to it: never heard of (just
// started), or silent long enough to count as gone (back from a
// partition). Its round must not end as if it had read the key state
// then: it still seals under the version, which the retire has counted
// and destroyed meanwhile.
func TestNodeThatSyncsAcrossARetireDoesNotSealUnderIt(t *testing.T) {
	t.Parallel()
	for _, returning := range []bool{false, true} {
		t.Run(map[bool]string{false: "new node", true: "node back after counting as gone"}[returning], func(t *testing.T) {
			t.Parallel()
			c := newCluster(t)
			c.hb.refuse.Store(true) // node-b's members lack version 2
			if returning {
				mustSync(t, c.b)
				c.clock.advance(vault.ClusterOptions{Heartbeat: 50 * time.Millisecond, WriteBound: 100 * time.Millisecond}.NodeGone())
			}
			mustSync(t, c.a) // A announces version 2
			entered, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			hold := func() { once.Do(func() { close(entered); <-release }) }
			c.hb.onReload.Store(&hold)
			synced := make(chan error, 1)
			go func() { synced <- c.b.SyncKeys(bg) }() // reads the key state, then reloads (held)
			<-entered
			if err := c.a.RetireKeys(bg, 1, func(uint32) error { return nil }); err != nil {
				t.Fatalf("retire: %v", err)
			}
			close(release)
			if err := <-synced; err != nil {
				t.Fatalf("node-b's round across the retire: %v", err)
			}
			b, _, err := c.b.Enroll(bg, ns, "after", randBytes(32), rightPIN, 5, vault.Precondition{})
			if err == nil && (b.KeyVersion == 1 || b.PINKeyVersion == 1) {
				t.Fatalf("node-b sealed a new backup under retired version 1 (wrap v%d, PIN v%d)", b.KeyVersion, b.PINKeyVersion)
			}
			if n, err := c.a.KeyUsage(bg); err != nil || n.Wrap[1] != 0 || n.PIN[1] != 0 {
				t.Fatalf("records on v1 after the retire: %+v %v", n, err)
			}
		})
	}
}

// scanHookStore runs hook before each Scan of the store beneath, with the
// scan's context and prefix, and after(...) once the scan is done; either
// may block, and an error from hook fails the scan.
type scanHookStore struct {
	vault.Store
	hook  func(ctx context.Context, prefix []byte) error
	after func(ctx context.Context, prefix []byte)
}

func (s *scanHookStore) Scan(ctx context.Context, prefix []byte, fn func(key, value []byte, rev uint64) error) error {
	if err := s.hook(ctx, prefix); err != nil {
		return err
	}
	err := s.Store.Scan(ctx, prefix, fn)
	s.after(ctx, prefix)
	return err
}

// Two retires of one version at once: the second joins the first's mark.
// When the first fails and clears the mark, the nodes take the version
// back into use, so a seal begun under it before they moved may land;
// the second, which counted before that, must not destroy the version,
// even if a third retire has marked the version again by then.
func TestRetireWhoseMarkAnotherClearedRefuses(t *testing.T) {
	t.Parallel()
	for _, remarked := range []bool{false, true} {
		t.Run(map[bool]string{false: "cleared", true: "cleared and marked again"}[remarked], func(t *testing.T) {
			t.Parallel()
			retireAfterAClearedMark(t, remarked)
		})
	}
}

func retireAfterAClearedMark(t *testing.T, remarked bool) {
	c := newCluster(t)
	r1Waiting, r1Gate := make(chan struct{}), make(chan struct{})
	r2Counted, r2Gate := make(chan struct{}), make(chan struct{})
	r3Waiting, r3Gate := make(chan struct{}), make(chan struct{})
	var r1Scans, r3Scans atomic.Int32
	st := &scanHookStore{Store: c.st,
		hook: func(ctx context.Context, prefix []byte) error {
			if string(prefix) != "m\x00keys/node/" {
				return nil
			}
			switch tagOf(ctx) {
			case "r1":
				switch r1Scans.Add(1) {
				case 1:
					close(r1Waiting)
				case 2:
					<-r1Gate
					return errors.New("injected: heartbeats unreadable")
				}
			case "r3":
				if r3Scans.Add(1) == 1 {
					close(r3Waiting)
					<-r3Gate
				}
			}
			return nil
		},
		after: func(ctx context.Context, prefix []byte) {
			if tagOf(ctx) == "r2" && string(prefix) == "r" {
				close(r2Counted)
				<-r2Gate
			}
		},
	}
	x := c.node("node-x", st, c.v2.sameKeys(), nil)

	mustSync(t, c.b) // B seals under version 1
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	c.hb.cur.Load().setHook(func(_ context.Context, id vault.KeyID, _ []byte) {
		if id.Role == vault.RolePIN && id.Version == 1 {
			once.Do(func() { close(entered); <-release })
		}
	})
	straddler := make(chan vault.Backup, 1)
	go func() {
		b, _, err := c.b.Enroll(bg, ns, "straddler", randBytes(32), rightPIN, 5, vault.Precondition{})
		if err != nil {
			t.Errorf("enroll: %v", err)
		}
		straddler <- b
	}()
	<-entered           // B seals under version 1
	mustSync(t, x, c.b) // X announces version 2; B moves to it

	destroyed := atomic.Int32{}
	destroy := func(uint32) error { destroyed.Add(1); return nil }
	r1, r2 := make(chan error, 1), make(chan error, 1)
	go func() { r1 <- x.RetireKeys(withTag(bg, "r1"), 1, destroy) }()
	<-r1Waiting // marked; waiting for B
	go func() { r2 <- x.RetireKeys(withTag(bg, "r2"), 1, destroy) }()
	mustSync(t, c.b) // B acknowledges
	<-r2Counted      // the second retire has counted: nothing under version 1
	close(r1Gate)
	if err := <-r1; err == nil {
		t.Fatal("the first retire succeeded with its heartbeats unreadable")
	}
	mustSync(t, c.b) // the mark is cleared: B takes version 1 back into use
	close(release)
	b := <-straddler
	r3 := make(chan error, 1)
	if remarked {
		go func() { r3 <- x.RetireKeys(withTag(bg, "r3"), 1, destroy) }()
		<-r3Waiting // marked again; waiting for acknowledgements
	}
	close(r2Gate)
	err := <-r2
	close(r3Gate)
	if remarked {
		mustSync(t, c.b) // B acknowledges the new mark
		if err3 := <-r3; !errors.Is(err3, vault.ErrKeysInUse) {
			t.Errorf("the third retire, with the straddler on version 1: %v, want keys in use", err3)
		}
	}
	if n, _ := c.a.KeyUsage(bg); err == nil && (n.Wrap[1] > 0 || n.PIN[1] > 0) {
		t.Fatalf("version 1 destroyed (%d times) with backups on it: %+v (the straddler landed on %d/%d)", destroyed.Load(), n, b.KeyVersion, b.PINKeyVersion)
	}
}
