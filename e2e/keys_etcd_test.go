package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/keyvault/keyvault/internal/etcdtest"
	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// etcdKeyNodes is etcdNodes with an admin token and a 500 ms heartbeat:
// n `serve` processes on one SoftHSM token and one etcd key prefix. It
// returns the nodes, the admin token file, the config and the prefix.
func etcdKeyNodes(t *testing.T, cluster *etcdtest.Cluster, n int) (nodes []*vault, tokenFile, cfg, prefix string) {
	t.Helper()
	dir := t.TempDir()
	startDevLimited(t, dir).Stop()
	cfg = filepath.Join(dir, "keyvault.yaml")
	kvproc.SetLimitsOff(t, cfg)
	prefix = "/e2e-" + randID("keys") + "/"
	kvproc.SetSection(t, cfg, "store", fmt.Sprintf(
		"store:\n  driver: etcd\n  etcd:\n    endpoints: [%s]\n    key_prefix: %s\n    dial_timeout: 2s\n    request_timeout: 2s\n    heartbeat_interval: 500ms\n",
		strings.Join(cluster.Endpoints(), ", "), prefix))
	adminToken := randID("admin")
	tokenFile = filepath.Join(dir, "admin-token")
	if err := os.WriteFile(tokenFile, []byte(adminToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	data = regexp.MustCompile(`(?m)^(listen|admin_listen): .*$`).ReplaceAll(data, []byte("$1: 127.0.0.1:0"))
	sum := sha256.Sum256([]byte(adminToken))
	data = append(data, []byte("admin_token_sha256: "+hex.EncodeToString(sum[:])+"\n")...)
	if err := os.WriteFile(cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	for range n {
		nodes = append(nodes, startServe(t, dir, cfg))
	}
	return nodes, tokenFile, cfg, prefix
}

// padRecords writes n undecodable values under the record prefix, so
// that a scan of the records takes a while; the vault skips them when it
// counts records by key version.
func padRecords(t *testing.T, cluster *etcdtest.Cluster, prefix string, n int) {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: cluster.Endpoints(), DialTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	val := strings.Repeat("p", 400)
	for i := 0; i < n; {
		var ops []clientv3.Op
		for ; len(ops) < 128 && i < n; i++ {
			ops = append(ops, clientv3.OpPut(fmt.Sprintf("%sr\x03pad%07d", prefix, i), val))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := cli.Txn(ctx).Then(ops...).Commit()
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestEtcdRetireWhileAnotherNodeEnrolls: two `serve` nodes share an
// embedded etcd and one SoftHSM token. `keys rotate` goes through node A
// only; node B enrolls without pause while `keys retire --version 1` runs
// through A over a record prefix padded so that its count takes a while.
// B moves to version 2 on its own (the key state), the retire succeeds,
// every enrollment on B is acknowledged (a 503 from a node that fenced
// itself on a slow etcd is retried, as a client would) and recovers with
// its PIN on either node, no backup is left on version 1, and both nodes
// stay ready throughout, with no member refused as a key mismatch.
func TestEtcdRetireWhileAnotherNodeEnrolls(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	cluster := etcdtest.New(t, 1)
	nodes, tokenFile, cfg, prefix := etcdKeyNodes(t, cluster, 2)
	a, b := nodes[0], nodes[1]
	padRecords(t, cluster, prefix, 40000)
	ca, cb := newClient(t, a.API, a.Token), newClient(t, b.API, b.Token)

	// Both nodes must answer /readyz 200 from here to the end.
	var stopWatch atomic.Bool
	var notReady atomic.Value
	var watch sync.WaitGroup
	for i, n := range nodes {
		watch.Go(func() {
			for !stopWatch.Load() {
				resp, err := http.Get(n.Admin + "/readyz")
				if err == nil {
					resp.Body.Close()
				}
				if err != nil || resp.StatusCode != http.StatusOK {
					notReady.CompareAndSwap(nil, fmt.Sprintf("node %d /readyz: %v %v", i, resp, err))
				}
				time.Sleep(25 * time.Millisecond)
			}
		})
	}

	keys := func(n *vault, args ...string) (int, string) {
		args = append(append([]string{"keys"}, args...), "--config", cfg, "--admin-url", n.Admin, "--admin-token-file", tokenFile)
		return runCLI(t, args...)
	}
	if code, out := keys(a, "rotate"); code != 0 || !strings.Contains(out, "wrap key v2 and PIN key v2") {
		t.Fatalf("keys rotate through node A: exit %d:\n%s", code, out)
	}

	type backup struct {
		user, pin string
		secret    []byte
	}
	var (
		mu           sync.Mutex
		acked        []backup
		failures     []string
		retireStart  atomic.Int64
		retireEnd    atomic.Int64
		duringRetire atomic.Int64 // enrollments begun after the retire began and answered before it ended
		retried      atomic.Int64 // 503 answers retried
		stopEnroll   atomic.Bool
		enrollers    sync.WaitGroup
	)
	// B learns of version 2 through the store alone. Whether or not it
	// does, the race below runs: B enrolls from just after the retire
	// began (the CLI started, the count's first read done) to after it
	// ended.
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(string(b.Logs()), "keys reloaded: a newer version was announced") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	retireStart.Store(time.Now().UnixNano())
	for w := range 4 {
		enrollers.Go(func() {
			time.Sleep(150 * time.Millisecond)
			for i := 0; !stopEnroll.Load(); i++ {
				bk := backup{fmt.Sprintf("b-%d-%d", w, i), randPIN("pin"), randBytes(32)}
				began := time.Now().UnixNano()
				put := func() (response, error) {
					return cb.call(http.MethodPut, backupPath(bk.user), map[string]any{"secret": b64(bk.secret), "pin": bk.pin})
				}
				r, err := put()
				// A node that could not read the key state for 5
				// heartbeats fences itself and answers 503 (docs/etcd.md),
				// which a loaded etcd can cause here: a client retries.
				for try := 0; err == nil && r.Status == http.StatusServiceUnavailable && try < 40; try++ {
					retried.Add(1)
					time.Sleep(250 * time.Millisecond)
					r, err = put()
				}
				ended := time.Now().UnixNano()
				mu.Lock()
				if err != nil || r.Status != http.StatusCreated {
					failures = append(failures, fmt.Sprintf("enroll %s on B: %v %v", bk.user, r, err))
				} else {
					acked = append(acked, bk)
					if s, e := retireStart.Load(), retireEnd.Load(); s != 0 && began > s && (e == 0 || ended < e) {
						duringRetire.Add(1)
					}
				}
				mu.Unlock()
			}
		})
	}
	code, out := keys(a, "retire", "--version", "1")
	retireEnd.Store(time.Now().UnixNano())
	time.Sleep(500 * time.Millisecond)
	stopEnroll.Store(true)
	enrollers.Wait()
	retireTook := time.Duration(retireEnd.Load() - retireStart.Load())
	t.Logf("retire took %v; B acknowledged %d enrollments, %d of them begun and answered during the retire; %d 503s retried; %d failed",
		retireTook.Round(time.Millisecond), len(acked), duringRetire.Load(), retried.Load(), len(failures))
	if retried.Load() > 0 {
		for _, line := range strings.Split(string(b.Logs()), "\n") {
			if strings.Contains(line, `"level":"WARN"`) || strings.Contains(line, `"level":"ERROR"`) || strings.Contains(line, "fence") {
				t.Logf("B: %s", line)
			}
		}
	}
	if code != 0 || !strings.Contains(out, "Key version 1 retired") {
		t.Errorf("keys retire --version 1 through node A: exit %d:\n%s", code, out)
	}
	if !strings.Contains(string(b.Logs()), "keys reloaded: a newer version was announced") {
		t.Errorf("node B did not reload on the version announced through the store:\n%s", b.Logs())
	}
	if len(failures) > 0 {
		t.Errorf("%d enrollments on B failed; first: %s\nB's log:\n%s", len(failures), failures[0], b.Logs())
	}
	if duringRetire.Load() == 0 {
		t.Errorf("no enrollment on B ran inside the retire (%v): not the race under test", retireTook)
	}

	// Every acknowledged backup recovers, on either node.
	lost := 0
	for i, bk := range acked {
		c := []*client{ca, cb}[i%2]
		r, err := c.call(http.MethodPost, backupPath(bk.user)+"/recover", map[string]string{"pin": bk.pin})
		if err != nil || r.Status != http.StatusOK || r.JSON(t)["secret"] != b64(bk.secret) {
			if lost++; lost <= 3 {
				t.Errorf("acknowledged backup %s does not recover: %v %v", bk.user, r, err)
			}
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d acknowledged backups are unrecoverable", lost, len(acked))
	}
	// Both nodes seal under version 2 and hold no record on version 1.
	for i, c := range []*client{ca, cb} {
		u := randID(fmt.Sprintf("after-%d", i))
		if r := c.enroll(t, u, randBytes(32), "right-pin-1", 0); r.Status != http.StatusCreated {
			t.Errorf("enroll on node %d after the retire: %v", i, r)
		} else if w, p := keyVersions(t, c.status(t, u)); w != 2 || p != 2 {
			t.Errorf("enroll on node %d after the retire: versions %v/%v, want 2/2", i, w, p)
		}
	}
	if code, out := keys(b, "usage"); code != 0 || strings.Contains(out, "v1 ") {
		t.Errorf("keys usage after the retire: exit %d:\n%s", code, out)
	}
	stopWatch.Store(true)
	watch.Wait()
	if s := notReady.Load(); s != nil {
		t.Errorf("a node was not ready: %v", s)
	}
	for i, n := range nodes {
		samples, _ := metrics(t, n.Admin)
		if v, _ := metricSum(samples, "keyvault_hsm_member_key_mismatch", nil); v != 0 {
			t.Errorf("node %d: keyvault_hsm_member_key_mismatch is %v", i, v)
		}
		if v, _ := metricSum(samples, "keyvault_hsm_member_up", nil); v == 0 {
			t.Errorf("node %d: no HSM member up", i)
		}
	}
}
