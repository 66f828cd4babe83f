package vault_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/etcdtest"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
	"github.com/keyvault/keyvault/vault"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// TestMain runs the suite on bbolt, or with KEYVAULT_TEST_STORE=etcd on a
// 1-member embedded etcd started here for the whole package.
func TestMain(m *testing.M) { os.Exit(runTests(m)) }

func runTests(m *testing.M) int {
	defer softhsmtest.RemoveShared()
	if etcdtest.Want() {
		dir, err := os.MkdirTemp("", "vault-test-etcd-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		if etcdCluster, err = etcdtest.Start(dir, 1); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer etcdCluster.Close()
	}
	return m.Run()
}

// benchVault is a vault on the real parts: a SoftHSM token with keys
// generated inside it, through the HSM pool, and a bbolt file.
func benchVault(b *testing.B) *vault.Vault {
	b.Helper()
	pool, store := benchParts(b, vault.ProfileGCM)
	v, err := vault.New(context.Background(), store, pool, vault.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	return v
}

// benchParts opens a pool on a fresh SoftHSM token with keys of profile
// made inside it, and a fresh bbolt store; both close when b ends.
func benchParts(b *testing.B, profile vault.Profile) (*hsmpool.Pool, *boltstore.Store) {
	b.Helper()
	module, conf := softhsmtest.Shared(b)
	label := fmt.Sprintf("bench-%d", time.Now().UnixNano())
	softhsmtest.Token(b, conf, label, "1234")
	m := hsmpool.MemberConfig{Name: "bench", Module: module, TokenLabel: label, PIN: "1234", MaxSessions: 8}
	if _, err := hsmpool.Provision([]hsmpool.MemberConfig{m}, profile); err != nil {
		b.Fatal(err)
	}
	pool, err := hsmpool.Open([]hsmpool.MemberConfig{m}, hsmpool.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { pool.Close() })
	store, err := boltstore.Open(boltstore.Options{Path: filepath.Join(b.TempDir(), "keyvault.db")})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { store.Close() })
	return pool, store
}

// benchParallel runs op from 32 goroutines, each on users of its own, and
// reports operations per second.
func benchParallel(b *testing.B, op func(ctx context.Context, user string) error) {
	var next atomic.Int64
	start := time.Now()
	b.ResetTimer()
	b.SetParallelism(max(1, 32/runtime.GOMAXPROCS(0)))
	b.RunParallel(func(pb *testing.PB) {
		user := fmt.Sprintf("u%d", next.Add(1))
		for pb.Next() {
			if err := op(context.Background(), user); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "ops/s")
}

var (
	benchSecret = []byte("0123456789abcdef0123456789abcdef")
	benchPIN    = []byte("246810")
)

// BenchmarkRecover: right-PIN recoveries in process, on SoftHSM and bbolt,
// from 32 goroutines: the vault's hot path without HTTP. Each one is two
// durable writes (count, then reset) and two HSM calls.
//
//	go test ./vault -run '^$' -bench 'Recover|Enroll' -benchmem
func BenchmarkRecover(b *testing.B) {
	v := benchVault(b)
	for i := range 64 {
		if _, _, err := v.Enroll(context.Background(), "bench", fmt.Sprintf("u%d", i+1), benchSecret, benchPIN, 0, vault.Precondition{}); err != nil {
			b.Fatal(err)
		}
	}
	benchParallel(b, func(ctx context.Context, user string) error {
		secret, _, err := v.Recover(ctx, "bench", user, benchPIN)
		if err == nil && string(secret) != string(benchSecret) {
			return fmt.Errorf("recovered the wrong secret")
		}
		return err
	})
}

// BenchmarkEnroll: enrollments (each replacing the last) in process, from
// 32 goroutines: one durable write and two HSM calls each.
func BenchmarkEnroll(b *testing.B) {
	v := benchVault(b)
	benchParallel(b, func(ctx context.Context, user string) error {
		_, _, err := v.Enroll(ctx, "bench", user, benchSecret, benchPIN, 0, vault.Precondition{})
		return err
	})
}
