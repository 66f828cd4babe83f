package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/keyvault/keyvault/internal/etcdtest"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/etcdstore"
	"github.com/keyvault/keyvault/vault/storetest"
)

var (
	bg      = context.Background()
	cluster *etcdtest.Cluster // one 1-member cluster for the package; tests use their own prefixes
	prefixN atomic.Int64
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "etcdstore-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cluster, err = etcdtest.Start(dir, 1)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	cluster.Close()
	os.RemoveAll(dir)
	os.Exit(code)
}

func open(t *testing.T, opts etcdstore.Options) *etcdstore.Store {
	t.Helper()
	if opts.Endpoints == nil {
		opts.Endpoints = cluster.Endpoints()
	}
	if opts.KeyPrefix == "" {
		opts.KeyPrefix = fmt.Sprintf("/test-%d/", prefixN.Add(1))
	}
	s, err := etcdstore.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) vault.Store { return open(t, etcdstore.Options{}) })
}

// Keys of one prefix are invisible to a store on another: nodes of two
// deployments may share a cluster.
func TestPrefixesAreSeparate(t *testing.T) {
	a, b := open(t, etcdstore.Options{}), open(t, etcdstore.Options{})
	if _, err := a.CompareAndSwap(bg, []byte("k"), 0, []byte("a")); err != nil {
		t.Fatal(err)
	}
	if v, _, err := b.Get(bg, []byte("k")); v != nil || err != nil {
		t.Fatalf("another prefix sees the key: %q %v", v, err)
	}
	n := 0
	b.Scan(bg, nil, func(_, _ []byte, _ uint64) error { n++; return nil })
	if n != 0 {
		t.Fatalf("another prefix scans %d keys", n)
	}
}

// failingTxn applies every Txn, then answers it with an error, as etcd does
// when a deadline or a leader change hits after the write was proposed.
type failingTxn struct{ clientv3.KV }

func (f failingTxn) Txn(ctx context.Context) clientv3.Txn { return &appliedTxn{Txn: f.KV.Txn(ctx)} }

type appliedTxn struct{ clientv3.Txn }

func (a *appliedTxn) If(c ...clientv3.Cmp) clientv3.Txn  { a.Txn = a.Txn.If(c...); return a }
func (a *appliedTxn) Then(o ...clientv3.Op) clientv3.Txn { a.Txn = a.Txn.Then(o...); return a }
func (a *appliedTxn) Else(o ...clientv3.Op) clientv3.Txn { a.Txn = a.Txn.Else(o...); return a }
func (a *appliedTxn) Commit() (*clientv3.TxnResponse, error) {
	if _, err := a.Txn.Commit(); err != nil {
		return nil, err
	}
	return nil, context.DeadlineExceeded
}

// An error after the Txn was applied is reported as an error, never as a
// conflict: a caller that took it for "not applied" and retried after a
// re-read could apply a change twice.
func TestAmbiguousErrorIsNotAConflict(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := open(t, etcdstore.Options{Registerer: reg, WrapKV: func(kv clientv3.KV) clientv3.KV { return failingTxn{kv} }})
	_, err := s.CompareAndSwap(bg, []byte("k"), 0, []byte("v"))
	if err == nil || errors.Is(err, vault.ErrConflict) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("applied Txn answered with an error: got %v", err)
	}
	if v, rev, _ := s.Get(bg, []byte("k")); string(v) != "v" || rev == 0 {
		t.Fatalf("the injector did not apply the write: %q", v)
	}
	if got := counter(t, reg, "keyvault_etcd_request_errors_total"); got != 1 {
		t.Fatalf("errors metric %v, want 1", got)
	}
}

// counter is the summed value of a counter family in reg.
func counter(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

func TestMetricsLint(t *testing.T) {
	reg := prometheus.NewRegistry()
	s := open(t, etcdstore.Options{Registerer: reg})
	s.CompareAndSwap(bg, []byte("k"), 0, []byte("v"))
	s.CompareAndSwap(bg, []byte("k"), 0, []byte("v"))
	problems, err := testutil.GatherAndLint(reg)
	if err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	if n, _ := testutil.GatherAndCount(reg, "keyvault_etcd_cas_conflicts_total"); n != 1 {
		t.Fatalf("conflict metric series: %d", n)
	}
}

// /readyz's check: fine on a healthy cluster, failing with the NOSPACE
// alarm raised, and failing (within the request timeout) when etcd is gone.
func TestPing(t *testing.T) {
	s := open(t, etcdstore.Options{RequestTimeout: time.Second})
	if err := s.Ping(bg); err != nil {
		t.Fatalf("ping a healthy cluster: %v", err)
	}

	cli, err := clientv3.New(clientv3.Config{Endpoints: cluster.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	st, err := cli.Status(bg, cluster.Endpoints()[0])
	if err != nil {
		t.Fatal(err)
	}
	alarm := &etcdserverpb.AlarmRequest{Action: etcdserverpb.AlarmRequest_ACTIVATE, MemberID: st.Header.MemberId, Alarm: etcdserverpb.AlarmType_NOSPACE}
	if _, err := etcdserverpb.NewMaintenanceClient(cli.ActiveConnection()).Alarm(bg, alarm); err != nil {
		t.Fatalf("raise NOSPACE: %v", err)
	}
	err = s.Ping(bg)
	alarm.Action = etcdserverpb.AlarmRequest_DEACTIVATE
	if _, derr := etcdserverpb.NewMaintenanceClient(cli.ActiveConnection()).Alarm(bg, alarm); derr != nil {
		t.Fatalf("disarm NOSPACE: %v", derr)
	}
	if !errors.Is(err, etcdstore.ErrNoSpace) {
		t.Fatalf("ping with NOSPACE raised: %v", err)
	}
	if err := s.Ping(bg); err != nil {
		t.Fatalf("ping after disarm: %v", err)
	}

	gone := open(t, etcdstore.Options{Endpoints: []string{"http://127.0.0.1:1"}, RequestTimeout: 300 * time.Millisecond, DialTimeout: 300 * time.Millisecond})
	start := time.Now()
	if err := gone.Ping(bg); err == nil || time.Since(start) > 3*time.Second {
		t.Fatalf("ping an unreachable etcd: %v after %v", err, time.Since(start))
	}
	if _, err := gone.CompareAndSwap(bg, []byte("k"), 0, []byte("v")); err == nil || errors.Is(err, vault.ErrConflict) || !strings.Contains(err.Error(), "outcome unknown") {
		t.Fatalf("CAS on an unreachable etcd: %v", err)
	}
}
