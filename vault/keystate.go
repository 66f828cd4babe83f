package vault

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"slices"
	"sort"
	"strings"
	"time"
)

// The key lifecycle across nodes. Several vault processes sharing one
// store (etcd) must agree on which key versions may seal new records, or
// one node retiring a version destroys it under another still sealing
// with it. They agree through two kinds of store entries, outside the
// record prefix:
//
//   - the key state (keyStateKey): the newest key version announced, the
//     versions being retired, and those retired (destroyed, or being);
//   - one heartbeat per node (nodePrefix + node ID): the wrap and PIN
//     versions it seals under, the retiring versions it has taken out of
//     use, the key state revision it last applied, and when.
//
// Every Heartbeat each node reads the key state: it reloads its HSM keys
// when a newer version is announced, takes retiring and retired versions
// into its local mark (write refuses fresh seals under them, under a lock
// held across the compare-and-swap), lets go of retired versions, and
// then publishes its heartbeat. So once a heartbeat acknowledges a
// retiring version, no write from that node under it can land later.
//
// RetireKeys marks the version in the key state, waits until every live
// node has acknowledged it at or after the mark, and only then counts the
// records that use it: the count's read comes after every write a node
// made before acknowledging, so none is missed. A node that stopped
// heartbeating is live until NodeGone has passed since its last
// heartbeat. It cannot write a fresh seal past FenceAfter from its last
// successful round (the fence in write), and a write takes at most
// WriteBound to land, so once it counts as gone, any write it still had
// under the version has landed and is counted.
//
// With a store of one process (bbolt) the same path runs with no
// heartbeats and no fence: the process is the only node, and it
// acknowledges a mark as it writes it.

// KeyRing is what the key lifecycle needs of the HSMs beyond HSM.
// Implementations are safe for concurrent use.
type KeyRing interface {
	// Reload looks every member's keys up again and seals new records
	// under the newest versions every member holds; it returns them.
	Reload() (map[KeyRole]uint32, error)
	// Forget stops using version of the wrap and PIN keys without
	// destroying them: another node is destroying them, or has.
	Forget(version uint32) error
}

// ClusterOptions configure how a vault takes part in the key lifecycle
// of the nodes sharing its store. The zero value of each field has the
// documented default.
type ClusterOptions struct {
	// Shared means several processes share the store (etcd): the node
	// publishes heartbeats and fences itself (see FenceAfter). Default
	// false (bbolt: one process).
	Shared bool
	// NodeID names this process in heartbeats and refusals (default: the
	// host name, the process ID and a random suffix).
	NodeID string
	// Heartbeat is how often the node reads the key state and publishes
	// its heartbeat (default 2s).
	Heartbeat time.Duration
	// WriteBound is the longest a write may take to land in the store
	// once it passed the fence: the store's request timeout, with room
	// (default 10s).
	WriteBound time.Duration
}

// maxClockSkew is how far node clocks may disagree (docs/etcd.md: run
// NTP).
const maxClockSkew = 5 * time.Second

// FenceAfter is how long after its last successful round a shared node
// still writes freshly sealed records: five heartbeats.
func (o ClusterOptions) FenceAfter() time.Duration { return 5 * o.Heartbeat }

// NodeGone is how long after its last heartbeat a node counts as gone:
// by then it has fenced itself and any write it had in flight has landed.
func (o ClusterOptions) NodeGone() time.Duration {
	return o.FenceAfter() + o.WriteBound + maxClockSkew
}

// ackWait bounds how long RetireKeys waits for live nodes to acknowledge.
func (o ClusterOptions) ackWait() time.Duration { return o.FenceAfter() + 2*o.Heartbeat }

func (o *ClusterOptions) setDefaults() {
	if o.Heartbeat <= 0 {
		o.Heartbeat = 2 * time.Second
	}
	if o.WriteBound <= 0 {
		o.WriteBound = 10 * time.Second
	}
	if o.NodeID == "" {
		host, _ := os.Hostname()
		suffix := make([]byte, 4)
		rand.Read(suffix)
		o.NodeID = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), hex.EncodeToString(suffix))
	}
}

var (
	keyStateKey = []byte("m\x00keys/state")
	nodePrefix  = []byte("m\x00keys/node/")
)

// keyState is the cluster's key lifecycle record.
type keyState struct {
	// Newest is the newest key version any node announced: nodes below
	// it reload.
	Newest uint32 `json:"newest"`
	// Retiring are versions no node may seal under any more; RetireKeys
	// waits for every live node to acknowledge them.
	Retiring []uint32 `json:"retiring,omitempty"`
	// MarkIDs names each retiring version's mark, so that a retire that
	// joined a mark can tell it from a later one set after it was cleared.
	MarkIDs map[uint32]string `json:"mark_ids,omitempty"`
	// Retired are versions destroyed, or being destroyed: never used again.
	Retired []uint32 `json:"retired,omitempty"`
}

// heartbeat is one node's published view.
type heartbeat struct {
	Node string `json:"node"`
	Wrap uint32 `json:"wrap"`
	PIN  uint32 `json:"pin"`
	// Acked are the retiring versions the node writes no record under.
	Acked []uint32 `json:"acked,omitempty"`
	// StateRev is the revision of the key state the node applied.
	StateRev uint64 `json:"state_rev"`
	// At is when the node began the round (unix nanoseconds), before it
	// read the key state.
	At int64 `json:"at"`
}

// sealMeta MACs a lifecycle entry like a record, under its store key, so
// that whoever can write the store cannot forge one.
func (v *Vault) sealMeta(key, body []byte) []byte {
	out := binary.BigEndian.AppendUint32(nil, v.macVersion)
	out = append(out, body...)
	return appendRecordMAC(out, v.macKeys[v.macVersion], key, out)
}

func (v *Vault) openMeta(key, raw []byte) ([]byte, error) {
	if len(raw) < 4+macLen {
		return nil, errors.New("malformed")
	}
	body, mac := raw[:len(raw)-macLen], raw[len(raw)-macLen:]
	k, ok := v.macKeys[binary.BigEndian.Uint32(body)]
	if !ok || !verifyRecordMAC(k, mac, key, body) {
		return nil, errors.New("MAC mismatch")
	}
	return body[4:], nil
}

// readKeyState reads the key state and its revision (0: none yet).
func (v *Vault) readKeyState(ctx context.Context) (keyState, uint64, error) {
	raw, rev, err := v.store.Get(ctx, keyStateKey)
	if err != nil {
		return keyState{}, 0, fmt.Errorf("%w: read key state: %w", ErrUnavailable, err)
	}
	var ks keyState
	if raw == nil {
		return ks, 0, nil
	}
	body, err := v.openMeta(keyStateKey, raw)
	if err == nil {
		err = json.Unmarshal(body, &ks)
	}
	if err != nil {
		v.integrityFailure(keyStateKey, "key state", err)
		return keyState{}, 0, fmt.Errorf("%w: key state: %w", ErrIntegrity, err)
	}
	return ks, rev, nil
}

// changeKeyState applies fn to the key state by compare-and-swap until it
// lands, and returns the new state and revision. fn returns false to
// write nothing.
func (v *Vault) changeKeyState(ctx context.Context, fn func(*keyState) (bool, error)) (keyState, uint64, error) {
	for range 100 {
		ks, rev, err := v.readKeyState(ctx)
		if err != nil {
			return keyState{}, 0, err
		}
		change, err := fn(&ks)
		if err != nil || !change {
			return ks, rev, err
		}
		body, err := json.Marshal(ks)
		if err != nil {
			return keyState{}, 0, err
		}
		// A lost answer is resolved by reading again: the change is
		// idempotent, so fn finds it applied, or applies it again.
		nrev, err := v.store.CompareAndSwap(context.WithoutCancel(ctx), keyStateKey, rev, v.sealMeta(keyStateKey, body))
		if err == nil {
			return ks, nrev, nil
		}
		if !errors.Is(err, ErrConflict) {
			time.Sleep(50 * time.Millisecond)
		}
	}
	return keyState{}, 0, fmt.Errorf("%w: the key state did not settle", ErrUnavailable)
}

func addVersion(s []uint32, v uint32) []uint32 {
	if slices.Contains(s, v) {
		return s
	}
	s = append(s, v)
	slices.Sort(s)
	return s
}

func dropVersion(s []uint32, v uint32) []uint32 {
	return slices.DeleteFunc(s, func(x uint32) bool { return x == v })
}

// fenced reports why this node may not write a freshly sealed record
// now: on a shared store, when its last successful round began more than
// FenceAfter ago, it may have missed a retirement.
func (v *Vault) fenced() error {
	if !v.opts.Cluster.Shared {
		return nil
	}
	at := v.syncedAt.Load()
	if at == nil {
		return fmt.Errorf("%w: this node has not read the cluster's key state yet: it seals nothing until it has", ErrUnavailable)
	}
	// On the monotonic clock where there is one: a wall clock set back
	// must not stretch the fence.
	if age := v.opts.Now().Sub(*at); age >= v.opts.Cluster.FenceAfter() {
		err := fmt.Errorf("%w: this node has not read the cluster's key state for %v (more than %v): it seals nothing until it has",
			ErrUnavailable, age.Round(time.Millisecond), v.opts.Cluster.FenceAfter())
		if v.fenceShown.CompareAndSwap(false, true) {
			v.log.Warn("fenced: enrollments, PIN changes and re-seals answer 503 until a key sync round succeeds", "error", err.Error())
		}
		return err
	}
	return nil
}

// mayWrite is the guard of a freshly sealed record: the fence, and the
// local retirement mark. The caller holds retireMu (read).
func (v *Vault) mayWrite(r *record) error {
	if err := v.fenced(); err != nil {
		return err
	}
	if r.freshWrap && v.retired[r.WrapVersion] || r.freshPIN && v.retired[r.PINVersion] {
		return fmt.Errorf("%w: key version %d/%d is being retired", errRetiring, r.WrapVersion, r.PINVersion)
	}
	return nil
}

// errRetiring: a record was sealed under a version being retired, before
// this node learnt of it; the caller seals again under the newest.
var errRetiring = fmt.Errorf("%w: key version being retired", ErrUnavailable)

// mayUse reports whether new seals may use the wrap and PIN versions now,
// before any HSM operation under them.
func (v *Vault) mayUse(wrap, pin uint32) error {
	if err := v.fenced(); err != nil {
		return err
	}
	v.retireMu.RLock()
	defer v.retireMu.RUnlock()
	if v.retired[wrap] || v.retired[pin] {
		return fmt.Errorf("%w: key version %d/%d is being retired and this node has no newer one", ErrUnavailable, wrap, pin)
	}
	return nil
}

// SyncKeys runs one round of the key lifecycle (see the top of this
// file): it reads the key state, reloads, marks, lets go, announces, and
// publishes the heartbeat. It runs once before the node serves, then
// every Heartbeat (RunKeySync).
func (v *Vault) SyncKeys(ctx context.Context) error {
	v.syncMu.Lock()
	defer v.syncMu.Unlock()
	for range 3 {
		again, err := v.syncRound(ctx)
		if err != nil || !again {
			return err
		}
	}
	return fmt.Errorf("key sync: %w: the key state kept changing during the round", ErrUnavailable)
}

// sameMarks reports whether two key states retire the same versions.
func sameMarks(a, b keyState) bool {
	return slices.Equal(a.Retiring, b.Retiring) && slices.Equal(a.Retired, b.Retired)
}

// syncRound is one round of SyncKeys. again means the retirement marks
// changed while it ran: its heartbeat may have landed after a retire
// looked at the heartbeats, to which this node was unknown or gone, so
// the round does not count as having read the key state (the fence
// stays) and the caller runs another. The caller holds syncMu.
func (v *Vault) syncRound(ctx context.Context) (again bool, err error) {
	began := v.opts.Now()
	ks, rev, err := v.readKeyState(ctx)
	if err != nil {
		return false, fmt.Errorf("key sync: %w", err)
	}
	wrap, pin := v.hsm.KeyVersion(RoleWrap), v.hsm.KeyVersion(RolePIN)
	if v.keys != nil && (ks.Newest > wrap || ks.Newest > pin) {
		vs, err := v.keys.Reload()
		if err == nil {
			wrap, pin = vs[RoleWrap], vs[RolePIN]
			if ks.Newest > wrap || ks.Newest > pin {
				err = fmt.Errorf("the HSM members do not all hold version %d (this node has wrap v%d, PIN v%d)", ks.Newest, wrap, pin)
			}
		}
		v.noteReload(ks.Newest, err)
	}
	// Mark what is retired, and what is being retired if this node seals
	// under something newer; a version it still needs it cannot
	// acknowledge, and RetireKeys names the node.
	want := map[uint32]bool{}
	var acked []uint32
	for _, r := range ks.Retired {
		want[r] = true
	}
	for _, r := range ks.Retiring {
		if r < wrap && r < pin {
			want[r] = true
			acked = append(acked, r)
		} else {
			v.log.Warn("a key version is being retired, but this node still seals under it", "version", r, "wrap_version", wrap, "pin_version", pin)
		}
	}
	v.setRetired(want)
	for _, r := range ks.Retired {
		if v.keys == nil || v.forgotten[r] {
			continue
		}
		if err := v.keys.Forget(r); err != nil {
			v.log.Warn("letting go of a retired key version", "version", r, "error", err.Error())
			continue
		}
		v.forgotten[r] = true
	}
	// Announce a newer version this node holds (after `keys rotate` and a
	// reload here, or a node started after it). A store of one process
	// has no one to tell.
	if n := min(wrap, pin); v.opts.Cluster.Shared && n > ks.Newest {
		if _, rev, err = v.changeKeyState(ctx, func(cur *keyState) (bool, error) {
			again = again || !sameMarks(*cur, ks)
			if cur.Newest >= n {
				return false, nil
			}
			cur.Newest = n
			return true, nil
		}); err != nil {
			return false, fmt.Errorf("key sync: announce version %d: %w", n, err)
		}
		v.log.Info("key version announced to the cluster", "version", n)
	}
	if v.opts.Cluster.Shared {
		hb := heartbeat{Node: v.opts.Cluster.NodeID, Wrap: wrap, PIN: pin, Acked: acked, StateRev: rev, At: began.UnixNano()}
		if err := v.putHeartbeat(ctx, hb); err != nil {
			return false, fmt.Errorf("key sync: %w", err)
		}
		// A retire that marked a version after the read above and looked
		// at the heartbeats before this one landed did not wait for this
		// node: read the marks again, after the heartbeat is visible.
		now, _, err := v.readKeyState(ctx)
		if err != nil {
			return false, fmt.Errorf("key sync: %w", err)
		}
		if again = again || !sameMarks(now, ks); again {
			return true, nil
		}
	}
	v.syncedAt.Store(&began)
	if v.fenceShown.Swap(false) {
		v.log.Info("fence lifted: a key sync round succeeded")
	}
	return false, nil
}

// noteReload logs a reload triggered by the key state: every success (a
// node reaches a version once), a failure once per reason, not every round.
func (v *Vault) noteReload(newest uint32, err error) {
	if err == nil {
		v.lastReload = ""
		v.log.Info("keys reloaded: a newer version was announced", "version", newest,
			"wrap_version", v.hsm.KeyVersion(RoleWrap), "pin_version", v.hsm.KeyVersion(RolePIN))
		return
	}
	if msg := err.Error(); msg != v.lastReload {
		v.lastReload = msg
		v.log.Error("a newer key version is announced, but this node cannot take it into use", "version", newest, "error", msg)
	}
}

// setRetired makes the local mark exactly want. Taking the write lock
// waits for every fresh write in flight, so once this returns, none
// under a newly marked version can land.
func (v *Vault) setRetired(want map[uint32]bool) {
	v.retireMu.RLock()
	same := len(want) == len(v.retired)
	for r := range want {
		same = same && v.retired[r]
	}
	v.retireMu.RUnlock()
	if same {
		return
	}
	v.retireMu.Lock()
	v.retired = want
	v.retireMu.Unlock()
}

func (v *Vault) heartbeatKey() []byte {
	return append(bytes.Clone(nodePrefix), v.opts.Cluster.NodeID...)
}

func (v *Vault) putHeartbeat(ctx context.Context, hb heartbeat) error {
	key := v.heartbeatKey()
	body, err := json.Marshal(hb)
	if err != nil {
		return err
	}
	val := v.sealMeta(key, body)
	for range 10 {
		_, rev, err := v.store.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("read heartbeat: %w", err)
		}
		if _, err = v.store.CompareAndSwap(context.WithoutCancel(ctx), key, rev, val); err == nil {
			return nil
		} else if !errors.Is(err, ErrConflict) {
			// Unknown outcome: the next round writes it again, and until
			// one is known to have landed the fence holds.
			return fmt.Errorf("publish heartbeat: %w", err)
		}
	}
	return errors.New("publish heartbeat: conflicts (is another process using this node ID?)")
}

// heartbeats reads every node's heartbeat. Unreadable ones are skipped
// (and counted as integrity failures): they acknowledge nothing.
func (v *Vault) heartbeats(ctx context.Context) ([]heartbeat, error) {
	var out []heartbeat
	err := v.store.Scan(ctx, nodePrefix, func(key, value []byte, _ uint64) error {
		body, err := v.openMeta(key, value)
		var hb heartbeat
		if err == nil {
			err = json.Unmarshal(body, &hb)
		}
		if err != nil {
			v.integrityFailure(key, "node heartbeat", err)
			return nil
		}
		out = append(out, hb)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w: read heartbeats: %w", ErrUnavailable, err)
	}
	return out, nil
}

// RunKeySync runs SyncKeys every Heartbeat until ctx ends.
func (v *Vault) RunKeySync(ctx context.Context) {
	tick := time.NewTicker(v.opts.Cluster.Heartbeat)
	defer tick.Stop()
	var last string
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		err := v.SyncKeys(ctx)
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		if msg != last && ctx.Err() == nil {
			if err != nil {
				v.log.Warn("key sync round failed; retrying", "error", msg)
			} else {
				v.log.Info("key sync rounds succeed again")
			}
		}
		last = msg
	}
}

// ReloadKeys looks the HSM keys up again (KeyRing.Reload) and announces
// a newer version to the other nodes sharing the store, which take it
// into use within a heartbeat or two.
func (v *Vault) ReloadKeys(ctx context.Context) (map[KeyRole]uint32, error) {
	if v.keys == nil {
		return nil, errors.New("reload: this vault has no key ring")
	}
	vs, err := v.keys.Reload()
	if err != nil {
		return nil, err
	}
	if err := v.SyncKeys(ctx); err != nil {
		return vs, fmt.Errorf("reloaded here, but could not tell the other nodes: %w", err)
	}
	return vs, nil
}

// LaggingNodesError: RetireKeys refused, because live nodes did not
// acknowledge the retirement in time.
type LaggingNodesError struct {
	Version uint32
	Nodes   []NodeLag
}

// NodeLag is one node that did not acknowledge a retirement.
type NodeLag struct {
	Node      string
	Wrap, PIN uint32        // the versions its last heartbeat says it seals under
	Silent    time.Duration // since its last heartbeat
}

func (e *LaggingNodesError) Error() string {
	parts := make([]string, len(e.Nodes))
	for i, n := range e.Nodes {
		parts[i] = fmt.Sprintf("%s (seals under wrap v%d, PIN v%d; last heartbeat %v ago)", n.Node, n.Wrap, n.PIN, n.Silent.Round(time.Millisecond))
	}
	return fmt.Sprintf("key version %d: not every live node has moved off it: %s", e.Version, strings.Join(parts, ", "))
}

// ErrNodesLagging is matched by a *LaggingNodesError.
var ErrNodesLagging = errors.New("nodes have not moved off the key version")

// Is makes errors.Is(err, ErrNodesLagging) true.
func (e *LaggingNodesError) Is(target error) bool { return target == ErrNodesLagging }

// awaitAcks waits until every live node has acknowledged version at or
// after the key state revision markRev, or until ackWait has passed: then
// it returns the laggards.
func (v *Vault) awaitAcks(ctx context.Context, version uint32, markRev uint64) error {
	c := v.opts.Cluster
	deadline := time.Now().Add(c.ackWait())
	for {
		hbs, err := v.heartbeats(ctx)
		if err != nil {
			return err
		}
		now := v.now()
		var lag []NodeLag
		for _, hb := range hbs {
			silent := time.Duration(now - hb.At)
			if silent >= c.NodeGone() {
				continue // fenced itself long ago; its writes have all landed
			}
			if hb.StateRev >= markRev && slices.Contains(hb.Acked, version) {
				continue
			}
			lag = append(lag, NodeLag{Node: hb.Node, Wrap: hb.Wrap, PIN: hb.PIN, Silent: silent})
		}
		if len(lag) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			sort.Slice(lag, func(i, j int) bool { return lag[i].Node < lag[j].Node })
			return &LaggingNodesError{Version: version, Nodes: lag}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w: waiting for nodes to acknowledge: %w", ErrUnavailable, ctx.Err())
		case <-time.After(c.Heartbeat / 4):
		}
	}
}
