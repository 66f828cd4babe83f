// Package etcdtest runs embedded etcd clusters (go.etcd.io/etcd/server/v3/embed)
// inside a test process: one member for most tests, three for failover.
// Only tests import it; the keyvault binary links the etcd client alone.
package etcdtest

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// Cluster is a running embedded etcd cluster.
type Cluster struct {
	mu      sync.Mutex
	members []*embed.Etcd // nil once stopped
	clients []string
}

// Start starts an n-member cluster with its data under dir and waits until
// every member is ready (at most 30s).
func Start(dir string, n int) (*Cluster, error) {
	peers := make([]string, n)
	clients := make([]string, n)
	for i := range n {
		p, err := freeAddr()
		if err != nil {
			return nil, err
		}
		c, err := freeAddr()
		if err != nil {
			return nil, err
		}
		peers[i], clients[i] = "http://"+p, "http://"+c
	}
	var initial []string
	for i := range n {
		initial = append(initial, fmt.Sprintf("m%d=%s", i, peers[i]))
	}
	c := &Cluster{clients: clients}
	errs := make([]error, n)
	var wg sync.WaitGroup
	c.members = make([]*embed.Etcd, n)
	for i := range n {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i)
		cfg.Dir = filepath.Join(dir, cfg.Name)
		cfg.LogLevel = "fatal" // its close logs a harmless "use of closed network connection" at error level
		cfg.ListenPeerUrls = []url.URL{mustURL(peers[i])}
		cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
		cfg.ListenClientUrls = []url.URL{mustURL(clients[i])}
		cfg.AdvertiseClientUrls = cfg.ListenClientUrls
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = "keyvault-test"
		// etcd's default timing (100 ms ticks, 1 s elections): shorter
		// ones make spurious elections likely on a loaded CI machine.
		cfg.TickMs, cfg.ElectionMs = 100, 1000
		wg.Add(1)
		go func() { // members of a new cluster must start together
			defer wg.Done()
			e, err := embed.StartEtcd(cfg)
			if err != nil {
				errs[i] = fmt.Errorf("start etcd member %d: %w", i, err)
				return
			}
			c.mu.Lock()
			c.members[i] = e
			c.mu.Unlock()
			select {
			case <-e.Server.ReadyNotify():
			case <-time.After(30 * time.Second):
				errs[i] = fmt.Errorf("etcd member %d not ready after 30s", i)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// New starts an n-member cluster in t.TempDir() and stops it at cleanup.
func New(t testing.TB, n int) *Cluster {
	t.Helper()
	c, err := Start(t.TempDir(), n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	return c
}

// Endpoints are the client URLs of every member, stopped ones included.
func (c *Cluster) Endpoints() []string { return append([]string(nil), c.clients...) }

// Leader is the index of the member that is leader now, or -1.
func (c *Cluster) Leader() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	for i, e := range c.members {
		if e != nil && e.Server.Leader() == e.Server.MemberID() {
			return i
		}
	}
	return -1
}

// Stop stops member i (its data stays).
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	e := c.members[i]
	c.members[i] = nil
	c.mu.Unlock()
	if e != nil {
		e.Close()
	}
}

// Kill stops member i abruptly: no leadership transfer first, as when its
// machine dies (Stop lets a leader hand over).
func (c *Cluster) Kill(i int) {
	c.mu.Lock()
	e := c.members[i]
	c.members[i] = nil
	c.mu.Unlock()
	if e != nil {
		e.Server.HardStop()
		e.Close()
	}
}

// Close stops every member.
func (c *Cluster) Close() {
	for i := range c.members {
		c.Stop(i)
	}
}

// Env is the variable that makes a test binary run its store tests on etcd.
const Env = "KEYVAULT_TEST_STORE"

// Want reports whether KEYVAULT_TEST_STORE=etcd asks for etcd.
func Want() bool { return os.Getenv(Env) == "etcd" }

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func mustURL(s string) url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return *u
}
