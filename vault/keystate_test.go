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
	st, err := boltstore.Open(filepath.Join(t.TempDir(), "kv.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	c := &cluster{clock: &manualClock{}, logs: &syncBuffer{}}
	c.v1 = newFakeHSMVersions(t, v1Keys)
	c.v2 = c.v1.withVersions(v2Keys)
	c.hb = &movingHSM{next: c.v2.sameKeys()}
	c.hb.cur.Store(c.v1.sameKeys())
	node := func(id string, h vault.HSM, ring vault.KeyRing) *vault.Vault {
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
	c.a = node("node-a", c.v2.sameKeys(), nil)
	c.b = node("node-b", c.hb, c.hb)
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
	c.hb.refuse.Store(false)
	mustSync(t, c.b)
	if b := enrollOn(t, c.b, "moved"); b.KeyVersion != 2 {
		t.Fatalf("node-b after its reload seals under v%d, want v2", b.KeyVersion)
	}
	if n, _ := c.a.KeyUsage(bg); n.Wrap[1] != 0 || n.PIN[1] != 0 {
		t.Fatalf("records on v1 after the retire: %+v", n)
	}
}
