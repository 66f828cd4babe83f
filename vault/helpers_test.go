package vault_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/keyvault/keyvault/internal/etcdtest"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
	"github.com/keyvault/keyvault/vault/etcdstore"
)

// testStore is a store driver the env can open and close: bbolt by default,
// etcd when KEYVAULT_TEST_STORE=etcd (see TestMain).
type testStore interface {
	vault.Store
	Close() error
}

// etcdCluster is the package's 1-member embedded etcd when the suite runs
// on etcd; each env uses a key prefix of its own.
var (
	etcdCluster *etcdtest.Cluster
	etcdPrefix  atomic.Int64
)

// onEtcd reports whether the suite runs on etcd.
func onEtcd() bool { return etcdCluster != nil }

const ns = "messenger"

// env is one vault on a real store (a bbolt file in t.TempDir(), or a key
// prefix of an embedded etcd) and a fake HSM.
type env struct {
	t     *testing.T
	etcd  []string // the etcd endpoints it runs on; nil: a bbolt file
	path  string   // the bbolt file; on etcd, the key prefix
	opts  vault.Options
	store testStore
	hsm   *fakeHSM
	reg   *prometheus.Registry
	v     *vault.Vault
	logs  *syncBuffer

	closeStore func() // closes the current store once

	mu        sync.Mutex
	sensitive [][]byte // must never appear in the logs
}

// newEnv opens a store and a vault. opts.Registerer, Logger and Now are
// set by the env (a fresh registry, a captured log, a stepping clock).
func newEnv(t *testing.T, opts vault.Options) *env {
	t.Helper()
	var endpoints []string
	if onEtcd() {
		endpoints = etcdCluster.Endpoints()
	}
	return newEnvOn(t, opts, endpoints)
}

// newBoltEnv is newEnv on a bbolt file whichever store the suite runs on,
// for tests that inspect the file itself.
func newBoltEnv(t *testing.T, opts vault.Options) *env {
	t.Helper()
	return newEnvOn(t, opts, nil)
}

// newEnvOn is newEnv on the etcd at endpoints, or on a bbolt file (nil).
func newEnvOn(t *testing.T, opts vault.Options, endpoints []string) *env {
	t.Helper()
	path := filepath.Join(t.TempDir(), "keyvault.db")
	if endpoints != nil {
		path = fmt.Sprintf("/vault-test-%d/", etcdPrefix.Add(1))
	}
	e := &env{
		t:    t,
		etcd: endpoints,
		path: path,
		opts: opts,
		hsm:  newFakeHSM(t),
		logs: &syncBuffer{},
	}
	e.open()
	t.Cleanup(e.checkLogs)
	return e
}

func (e *env) open() {
	e.t.Helper()
	var st testStore
	var err error
	if e.etcd != nil {
		st, err = etcdstore.Open(etcdstore.Options{Endpoints: e.etcd, KeyPrefix: e.path})
	} else {
		st, err = boltstore.Open(boltstore.Options{Path: e.path})
	}
	if err != nil {
		e.t.Fatalf("open store: %v", err)
	}
	e.store = st
	var closed atomic.Bool
	e.t.Cleanup(func() {
		if !closed.Swap(true) {
			st.Close()
		}
	})
	e.closeStore = func() {
		if !closed.Swap(true) {
			if err := st.Close(); err != nil {
				e.t.Errorf("close store: %v", err)
			}
		}
	}
	e.reg = prometheus.NewRegistry()
	e.v = e.newVault(e.store, e.hsm, e.reg)
}

// newVault builds a Vault with the env's options on any store and HSM.
func (e *env) newVault(st vault.Store, hsm vault.HSM, reg *prometheus.Registry) *vault.Vault {
	e.t.Helper()
	opts := e.opts
	opts.Registerer = reg
	opts.Logger = slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{
		Level: slog.LevelDebug,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey && len(groups) == 0 {
				return slog.Attr{} // no clock digits to match by chance
			}
			return a
		},
	}))
	if opts.Now == nil {
		opts.Now = steppingClock()
	}
	v, err := vault.New(context.Background(), st, hsm, opts)
	if err != nil {
		e.t.Fatalf("vault.New: %v", err)
	}
	return v
}

// profiles are the sealing profiles tests of the stored layers run under.
var profiles = []vault.Profile{vault.ProfileGCM, vault.ProfileHMAC, vault.ProfileGCMHSMIV}

// newEnvProfile is newEnv on an HSM whose wrap keys are of profile.
func newEnvProfile(t *testing.T, opts vault.Options, profile vault.Profile) *env {
	t.Helper()
	e := newEnv(t, opts)
	e.reopenWith(map[uint32]vault.Profile{1: profile, 2: profile})
	return e
}

// reopenWith is reopen on an HSM whose wrap key versions have the given
// profiles, as after a rotation to another profile.
func (e *env) reopenWith(profiles map[uint32]vault.Profile) {
	e.t.Helper()
	e.closeStore()
	e.hsm = e.hsm.withProfiles(profiles)
	e.open()
}

// reopen stops the vault and starts a new one on the same store and
// the same HSM keys, with fresh metrics and HSM counters.
func (e *env) reopen() {
	e.t.Helper()
	e.closeStore()
	e.hsm = e.hsm.sameKeys()
	e.open()
}

func steppingClock() func() time.Time {
	var n atomic.Int64
	base := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	return func() time.Time { return base.Add(time.Duration(n.Add(1)) * time.Second) }
}

// remember marks values that must never appear in the logs.
func (e *env) remember(vals ...[]byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, v := range vals {
		e.sensitive = append(e.sensitive, bytes.Clone(v))
	}
}

func (e *env) checkLogs() {
	logs := e.logs.Bytes()
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, s := range e.sensitive {
		for _, form := range [][]byte{s, []byte(hex.EncodeToString(s)), []byte(base64.StdEncoding.EncodeToString(s))} {
			if len(form) >= 8 && bytes.Contains(logs, form) {
				e.t.Errorf("the vault's logs hold a secret, PIN or raw user_id (%d bytes)", len(s))
			}
		}
	}
}

// enroll enrolls or fails the test.
func (e *env) enroll(userID string, secret, pin []byte, maxAttempts int) vault.Backup {
	e.t.Helper()
	e.remember([]byte(userID), secret, pin)
	b, _, err := e.v.Enroll(context.Background(), ns, userID, secret, pin, maxAttempts, vault.Precondition{})
	if err != nil {
		e.t.Fatalf("enroll %s: %v", userID, err)
	}
	return b
}

func (e *env) status(userID string) vault.Backup {
	e.t.Helper()
	b, err := e.v.Status(context.Background(), ns, userID)
	if err != nil {
		e.t.Fatalf("status %s: %v", userID, err)
	}
	return b
}

// wrong makes one wrong guess and checks that it was answered as wrong with
// the given attempts remaining.
func (e *env) wrong(userID string, wantRemaining int) {
	e.t.Helper()
	_, _, err := e.v.Recover(context.Background(), ns, userID, []byte("0000-wrong"))
	var w *vault.WrongPINError
	if !errors.As(err, &w) || w.Remaining != wantRemaining {
		e.t.Fatalf("wrong guess: got %v, want WrongPINError with %d remaining", err, wantRemaining)
	}
}

// raw reads the stored bytes of a backup through the store and parses them.
func (e *env) raw(nsp, userID string) (*vault.Record, []byte) {
	e.t.Helper()
	val, _, err := e.store.Get(context.Background(), vault.RecordKey(nsp, userID))
	if err != nil {
		e.t.Fatalf("store get: %v", err)
	}
	if val == nil {
		return nil, nil
	}
	r, err := vault.ParseRecord(val)
	if err != nil {
		e.t.Fatalf("parse raw record: %v", err)
	}
	return r, val
}

// put overwrites the raw value under key through the store's CAS.
func (e *env) put(key, val []byte) {
	e.t.Helper()
	_, rev, err := e.store.Get(context.Background(), key)
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.store.CompareAndSwap(context.Background(), key, rev, val); err != nil {
		e.t.Fatalf("store CAS: %v", err)
	}
}

// metric is the value of a counter or gauge in the env's registry; labels
// are name, value pairs. A metric that is missing fails the test.
func (e *env) metric(name string, labels ...string) float64 {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, lp := range m.GetLabel() {
				have[lp.GetName()] = lp.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue next
				}
			}
			switch {
			case m.Counter != nil:
				return m.GetCounter().GetValue()
			case m.Gauge != nil:
				return m.GetGauge().GetValue()
			}
		}
	}
	e.t.Fatalf("metric %s%v not found", name, labels)
	return 0
}

func randBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) Bytes() []byte {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.Clone(b.buf.Bytes())
}
