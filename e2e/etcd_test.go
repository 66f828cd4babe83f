package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/keyvault/keyvault/internal/etcdtest"
	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// etcdRounds is how many storms each etcd test runs: a few in make test,
// more with KEYVAULT_ETCD_ROUNDS (make stress, or by hand).
func etcdRounds(t *testing.T, short int) int {
	if s := os.Getenv("KEYVAULT_ETCD_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("KEYVAULT_ETCD_ROUNDS=%q: want a positive integer", s)
		}
		return n
	}
	return short
}

// etcdNodes starts n keyvault processes (`serve`) on one dev directory
// (one SoftHSM token, one set of keys) whose store is the etcd cluster,
// under a key prefix of their own, with the rate limits off.
func etcdNodes(t *testing.T, cluster *etcdtest.Cluster, n int) []*vault {
	t.Helper()
	dir := t.TempDir()
	startDevLimited(t, dir).Stop()
	cfg := filepath.Join(dir, "keyvault.yaml")
	kvproc.SetLimitsOff(t, cfg)
	kvproc.SetSection(t, cfg, "store", fmt.Sprintf(
		"store:\n  driver: etcd\n  etcd:\n    endpoints: [%s]\n    key_prefix: /e2e-%s/\n    dial_timeout: 2s\n    request_timeout: 2s\n",
		strings.Join(cluster.Endpoints(), ", "), randID("p")))
	// Each node on ports of its own.
	data, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	data = regexp.MustCompile(`(?m)^(listen|admin_listen): .*$`).ReplaceAll(data, []byte("$1: 127.0.0.1:0"))
	if err := os.WriteFile(cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	nodes := make([]*vault, n)
	for i := range n {
		nodes[i] = startServe(t, dir, cfg)
	}
	return nodes
}

// stormResult tallies the answers of one storm of wrong guesses.
type stormResult struct {
	left           []int // attempts_remaining of each 403, sorted
	n410, n503     int
	transport      int // no HTTP answer (the node was killed)
	unexpected     []string
	acknowledged   []string // users whose enrollment during the storm answered 201
	enrollsStarted int
	afterChaos     int // guesses answered (or not) after the chaos began: it was mid-storm
}

// storm sends `requests` concurrent wrong guesses at user, spread over the
// nodes' clients; during it, chaos runs once the first answers are back,
// and alongside it enrollments of fresh users go to every node.
func storm(clients []*client, user string, requests int, chaosAfter int, chaos func()) stormResult {
	var (
		res     stormResult
		mu      sync.Mutex
		wg      sync.WaitGroup
		start   = make(chan struct{})
		answers = make(chan struct{}, requests)
		chaosOn atomic.Bool
	)
	for i := range requests {
		c := clients[i%len(clients)]
		wg.Go(func() {
			<-start
			r, err := c.call(http.MethodPost, backupPath(user)+"/recover", map[string]string{"pin": fmt.Sprintf("wrong-%d", i)})
			answers <- struct{}{}
			mu.Lock()
			defer mu.Unlock()
			if chaosOn.Load() {
				res.afterChaos++
			}
			if err != nil {
				res.transport++
				return
			}
			var p struct {
				Code              string `json:"code"`
				AttemptsRemaining *int   `json:"attempts_remaining"`
			}
			_ = json.Unmarshal(r.Body, &p)
			switch {
			case r.Status == http.StatusForbidden && p.Code == "wrong_pin" && p.AttemptsRemaining != nil:
				res.left = append(res.left, *p.AttemptsRemaining)
			case r.Status == http.StatusGone && p.Code == "locked":
				res.n410++
			case r.Status == http.StatusServiceUnavailable && p.Code == "unavailable":
				res.n503++
			default:
				res.unexpected = append(res.unexpected, r.String())
			}
		})
	}
	if chaos != nil {
		// Enrollments of fresh users on every node while the chaos runs:
		// each one answered 201 must survive.
		for i := range 3 * len(clients) {
			c := clients[i%len(clients)]
			u := fmt.Sprintf("%s-enr-%d", user, i)
			res.enrollsStarted++
			wg.Go(func() {
				<-start
				r, err := c.call(http.MethodPut, backupPath(u), map[string]any{"secret": b64(randBytes(32)), "pin": "right-pin-1", "max_attempts": 5})
				if err == nil && r.Status == http.StatusCreated {
					mu.Lock()
					res.acknowledged = append(res.acknowledged, u)
					mu.Unlock()
				}
			})
		}
		wg.Go(func() {
			<-start
			for range chaosAfter {
				<-answers
			}
			chaosOn.Store(true)
			chaos()
		})
	}
	close(start)
	wg.Wait()
	slices.Sort(res.left)
	return res
}

// TestEtcdThreeNodesOneBudget: three keyvault processes on one 3-member
// etcd; 64 concurrent wrong guesses spread over them at a backup with
// max_attempts 5 give exactly 4 answers 403 (1, 2, 3 and 4 left) and 60
// answers 410, round after round.
func TestEtcdThreeNodesOneBudget(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	cluster := etcdtest.New(t, 3)
	nodes := etcdNodes(t, cluster, 3)
	var clients []*client
	for _, n := range nodes {
		clients = append(clients, newClient(t, n.API, n.Token))
	}
	rounds := etcdRounds(t, 8)
	for round := range rounds {
		u := randID(fmt.Sprintf("etcd%d", round))
		pin := randPIN("right")
		clients[round%3].mustEnroll(t, http.StatusCreated, u, randBytes(32), pin, 5)
		res := storm(clients, u, 64, 0, nil)
		if len(res.unexpected) > 0 || res.transport > 0 || res.n503 > 0 {
			t.Fatalf("round %d: unexpected answers %v, %d without an answer, %d 503", round, res.unexpected, res.transport, res.n503)
		}
		if !slices.Equal(res.left, []int{1, 2, 3, 4}) || res.n410 != 60 {
			t.Fatalf("round %d: 403s with attempts_remaining %v and %d 410s; want [1 2 3 4] and 60", round, res.left, res.n410)
		}
		// Every node sees the lock.
		for i, c := range clients {
			wantProblem(t, fmt.Sprintf("round %d: right PIN on node %d after the storm", round, i), c.recover(t, u, pin), http.StatusGone, "locked")
		}
	}
	for i, n := range nodes {
		if r := get(t, n.Admin+"/readyz"); r.Status != http.StatusOK {
			t.Errorf("node %d /readyz: %v", i, r)
		}
	}
}

// checkAfterChaos holds what must be true after a storm with a failure in
// it: no more than 4 wrong guesses answered 403 (each with its own count),
// no other answer than 403, 410 or 503, service back within 20s, the
// backup locked or with no more attempts left than the 403s allow, and
// every acknowledged enrollment present.
func checkAfterChaos(t *testing.T, round int, clients []*client, u, pin string, res stormResult) {
	t.Helper()
	if len(res.unexpected) > 0 {
		t.Fatalf("round %d: unexpected answers %v", round, res.unexpected)
	}
	if res.afterChaos == 0 {
		t.Fatalf("round %d: every guess was answered before the failure began: not a mid-storm test", round)
	}
	if len(res.left) > 4 || len(slices.Compact(slices.Clone(res.left))) != len(res.left) {
		t.Fatalf("round %d: 403s with attempts_remaining %v: more wrong guesses checked than the budget", round, res.left)
	}
	c := clients[0]
	deadline := time.Now().Add(20 * time.Second)
	var st response
	for {
		var err error
		st, err = c.call(http.MethodGet, backupPath(u), nil)
		if err == nil && st.Status == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("round %d: service not back after 20s: %v %v", round, st, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var g struct {
		Locked            bool `json:"locked"`
		AttemptsRemaining int  `json:"attempts_remaining"`
	}
	json.Unmarshal(st.Body, &g)
	if !g.Locked && g.AttemptsRemaining > 5-len(res.left) {
		t.Fatalf("round %d: %d 403s, yet %d attempts remain", round, len(res.left), g.AttemptsRemaining)
	}
	if g.Locked {
		wantProblem(t, fmt.Sprintf("round %d: right PIN after the storm", round), c.recover(t, u, pin), http.StatusGone, "locked")
	}
	for _, e := range res.acknowledged {
		if r := c.do(t, http.MethodGet, backupPath(e), nil); r.Status != http.StatusOK {
			t.Fatalf("round %d: acknowledged enrollment %s lost: %v", round, e, r)
		}
	}
	if len(res.acknowledged) == 0 {
		t.Fatalf("round %d: none of %d enrollments was acknowledged", round, res.enrollsStarted)
	}
}

// TestEtcdLeaderKilledMidStorm kills the etcd leader (no handover) while 64 wrong guesses
// are in flight on three nodes. A 3-member cluster keeps its quorum, so
// the budget holds, acknowledged enrollments stay, and service resumes.
func TestEtcdLeaderKilledMidStorm(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	for round := range etcdRounds(t, 1) {
		cluster := etcdtest.New(t, 3)
		nodes := etcdNodes(t, cluster, 3)
		var clients []*client
		for _, n := range nodes {
			clients = append(clients, newClient(t, n.API, n.Token))
		}
		u, pin := randID("leader"), randPIN("right")
		clients[0].mustEnroll(t, http.StatusCreated, u, randBytes(32), pin, 5)
		leader := cluster.Leader()
		if leader < 0 {
			t.Fatal("no etcd leader")
		}
		res := storm(clients, u, 64, 1, func() { cluster.Kill(leader) })
		t.Logf("round %d: leader %d killed with %d of 64 guesses still in flight: 403s %v, %d 410, %d 503, %d/%d enrollments acknowledged",
			round, leader, res.afterChaos, res.left, res.n410, res.n503, len(res.acknowledged), res.enrollsStarted)
		if res.transport > 0 {
			t.Fatalf("round %d: %d requests got no HTTP answer", round, res.transport)
		}
		checkAfterChaos(t, round, clients, u, pin, res)
		cluster.Close()
		for _, n := range nodes {
			n.Stop()
		}
	}
}

// TestEtcdNodeKilledMidStorm SIGKILLs one of three keyvault nodes while 64
// wrong guesses are in flight. Its in-flight guesses may be counted and
// never answered (counted, as a crash after counting must be); the budget
// holds over the answers the others gave, and the survivors serve on.
func TestEtcdNodeKilledMidStorm(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	cluster := etcdtest.New(t, 1)
	// One round in make test: a guess counted by the killed node that used
	// the last attempt leaves a pending lock the others wait out (20s).
	for round := range etcdRounds(t, 1) {
		nodes := etcdNodes(t, cluster, 3)
		var clients []*client
		for _, n := range nodes {
			clients = append(clients, newClient(t, n.API, n.Token))
		}
		u, pin := randID("nodekill"), randPIN("right")
		clients[0].mustEnroll(t, http.StatusCreated, u, randBytes(32), pin, 5)
		res := storm(clients, u, 64, 4, func() { nodes[2].Signal(syscall.SIGKILL) })
		<-nodes[2].Exited()
		t.Logf("round %d: node 2 killed with %d of 64 guesses still in flight: 403s %v, %d 410, %d 503, %d unanswered, %d/%d enrollments acknowledged",
			round, res.afterChaos, res.left, res.n410, res.n503, res.transport, len(res.acknowledged), res.enrollsStarted)
		checkAfterChaos(t, round, clients[:2], u, pin, res)
		nodes[0].Stop()
		nodes[1].Stop()
	}
}

// /readyz follows etcd: ready with the cluster up, 503 naming the store
// once it is gone, while /healthz (the process) stays 200.
func TestEtcdReadyz(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	cluster := etcdtest.New(t, 1)
	node := etcdNodes(t, cluster, 1)[0]
	if r := get(t, node.Admin+"/readyz"); r.Status != http.StatusOK {
		t.Fatalf("/readyz with etcd up: %v", r)
	}
	cluster.Kill(0)
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := get(t, node.Admin+"/readyz")
		if r.Status == http.StatusServiceUnavailable && strings.Contains(string(r.Body), "store") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz 10s after etcd died: %v", r)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if r := get(t, node.Admin+"/healthz"); r.Status != http.StatusOK {
		t.Fatalf("/healthz: %v", r)
	}
	c := newClient(t, node.API, node.Token)
	wantProblem(t, "enroll with etcd gone", c.enroll(t, randID("gone"), randBytes(32), "right-pin-1", 5), http.StatusServiceUnavailable, "unavailable")
}
