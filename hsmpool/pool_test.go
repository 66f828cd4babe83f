package hsmpool

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
	"github.com/keyvault/keyvault/vault"
)

// The SoftHSM tier: one token directory for the whole test binary, since
// SoftHSM reads its config once per process.
var (
	hsmOnce   sync.Once
	hsmDir    string
	hsmModule string
	hsmConf   string
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "hsmpool-test-")
	if err != nil {
		panic(err)
	}
	hsmDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// member returns the config of a fresh, empty token.
func newMember(t testing.TB, name string) MemberConfig {
	t.Helper()
	hsmOnce.Do(func() { hsmModule, hsmConf = softhsmtest.Setup(t, hsmDir) })
	if hsmModule == "" {
		softhsmtest.Module(t) // skips or fails as the first call did
	}
	label := name + "-" + rand.Text()[:8]
	softhsmtest.Token(t, hsmConf, label, "1234")
	return MemberConfig{Name: name, Module: hsmModule, TokenLabel: label, PIN: "1234", MaxSessions: 4}
}

// withSession runs check then fn on a logged-in session of the member's
// token, on modules of its own.
func withSession(c MemberConfig, fn func(*pkcs11.Ctx, pkcs11.SessionHandle) error, check func(*pkcs11.Ctx, pkcs11.SessionHandle, string) error) error {
	m := NewModules()
	defer m.Close()
	return m.withSession(c, fn, check)
}

func openPool(t *testing.T, reg prometheus.Registerer, cfgs ...MemberConfig) *Pool {
	t.Helper()
	p, err := Open(cfgs, Options{Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

var (
	wrap1 = vault.KeyID{Role: vault.RoleWrap, Version: 1}
	pin1  = vault.KeyID{Role: vault.RolePIN, Version: 1}
	root1 = vault.KeyID{Role: vault.RoleRoot, Version: 1}
)

func TestSingleMemberKeysStayInHSM(t *testing.T) {
	m := newMember(t, "a")
	inHSM, err := Provision([]MemberConfig{m}, vault.ProfileGCM)
	if err != nil || !inHSM {
		t.Fatalf("Provision: inHSM=%v err=%v", inHSM, err)
	}
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); !errors.Is(err, ErrKeysExist) {
		t.Fatalf("second Provision: %v, want ErrKeysExist", err)
	}
	reg := prometheus.NewRegistry()
	p := openPool(t, reg, m)
	for _, r := range vault.Roles {
		if v := p.KeyVersion(r); v != 1 {
			t.Errorf("KeyVersion(%s) = %d, want 1", r, v)
		}
	}
	ctx := context.Background()

	a, err := p.HMAC(ctx, pin1, []byte("msg"))
	if err != nil || len(a) != 32 {
		t.Fatalf("HMAC: %x %v", a, err)
	}
	b, _ := p.HMAC(ctx, pin1, []byte("msg"))
	c, _ := p.HMAC(ctx, root1, []byte("msg"))
	if !bytes.Equal(a, b) || bytes.Equal(a, c) {
		t.Fatal("HMAC must be deterministic per key and differ between keys")
	}
	if _, err := p.HMAC(ctx, wrap1, []byte("msg")); err == nil {
		t.Fatal("HMAC under the wrap key must fail")
	}

	nonce := make([]byte, 12)
	rand.Read(nonce)
	ct, err := p.Seal(ctx, wrap1, nonce, []byte("sixteen byte key"), []byte("aad"))
	if err != nil {
		t.Fatal(err)
	}
	pt, err := p.Open(ctx, wrap1, nonce, ct, []byte("aad"))
	if err != nil || string(pt) != "sixteen byte key" {
		t.Fatalf("Open: %q %v", pt, err)
	}
	if _, err := p.Seal(ctx, wrap1, nil, []byte("x"), nil); err == nil {
		t.Fatal("Seal with no nonce must fail, not use a zero IV")
	}

	// A damaged ciphertext or wrong AAD is the record's fault, not the
	// member's: ErrIntegrity, and the member stays in service.
	ct[0] ^= 1
	if _, err := p.Open(ctx, wrap1, nonce, ct, []byte("aad")); !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("Open of a damaged ciphertext: %v, want ErrIntegrity", err)
	}
	ct[0] ^= 1
	if _, err := p.Open(ctx, wrap1, nonce, ct, []byte("other")); !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("Open with other AAD: %v, want ErrIntegrity", err)
	}
	if p.Healthy() != 1 || testutil.ToFloat64(p.metrics.up.WithLabelValues("a")) != 1 {
		t.Fatal("a bad ciphertext took the member out")
	}
	if problems, err := testutil.CollectAndLint(reg); err != nil || len(problems) > 0 {
		t.Fatalf("metric lint: %v %+v", err, problems)
	}
}

func TestSeveralMembersShareKeyMaterial(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	inHSM, err := Provision([]MemberConfig{a, b}, vault.ProfileGCM)
	if err != nil || inHSM {
		t.Fatalf("Provision: inHSM=%v err=%v", inHSM, err)
	}
	pa := openPool(t, nil, a)
	pb := openPool(t, nil, b)
	ctx := context.Background()
	nonce := make([]byte, 12)
	rand.Read(nonce)
	ct, err := pa.Seal(ctx, wrap1, nonce, []byte("secret"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if pt, err := pb.Open(ctx, wrap1, nonce, ct, nil); err != nil || string(pt) != "secret" {
		t.Fatalf("member b cannot open what a sealed: %q %v", pt, err)
	}
	ha, _ := pa.HMAC(ctx, pin1, []byte("m"))
	hb, _ := pb.HMAC(ctx, pin1, []byte("m"))
	if !bytes.Equal(ha, hb) {
		t.Fatal("members compute different PIN MACs")
	}
	both := openPool(t, nil, a, b)
	keys := both.Keys()
	if len(keys) != 2 || len(keys[0].Keys) != 3 {
		t.Fatalf("Keys() = %+v", keys)
	}
	for i := range keys[0].Keys {
		if keys[0].Keys[i] != keys[1].Keys[i] {
			t.Fatalf("check values differ: %+v vs %+v", keys[0].Keys[i], keys[1].Keys[i])
		}
	}
}

func TestMemberWithOtherKeysIsLeftOut(t *testing.T) {
	a, c := newMember(t, "a"), newMember(t, "c")
	for _, m := range []MemberConfig{a, c} {
		if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
			t.Fatal(err)
		}
	}
	p := openPool(t, nil, a, c)
	if p.Healthy() != 1 || !p.members[0].healthy.Load() || p.members[1].healthy.Load() {
		t.Fatalf("members in use: %d; want only a", p.Healthy())
	}
	if testutil.ToFloat64(p.metrics.keyMismatch.WithLabelValues("c")) != 1 {
		t.Fatal("keyvault_hsm_member_key_mismatch{member=c} is not 1")
	}
}

func TestWrongPINIsReportedNotRetried(t *testing.T) {
	a := newMember(t, "a")
	if _, err := Provision([]MemberConfig{a}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	bad := a
	bad.PIN = "999999"
	_, err := Open([]MemberConfig{bad}, Options{})
	if err == nil {
		t.Fatal("Open with a wrong PIN succeeded")
	}
	if bytes.Contains([]byte(err.Error()), []byte("999999")) {
		t.Fatal("error text holds the PIN")
	}
}

// flaky wraps a real token and fails every operation while broken is set,
// as a member that lost its device would.
type flaky struct {
	token
	broken atomic.Bool
}

func (f *flaky) HMAC(k vault.KeyID, m []byte) ([]byte, error) {
	if f.broken.Load() {
		return nil, errors.New("CKR_DEVICE_ERROR")
	}
	return f.token.HMAC(k, m)
}

func (f *flaky) Open(k vault.KeyID, n, c, a []byte) ([]byte, error) {
	if f.broken.Load() {
		panic("CKR_GENERAL_ERROR") // as crypto11 does
	}
	return f.token.Open(k, n, c, a)
}

func TestFailoverLosesNoRequest(t *testing.T) {
	var fa *flaky
	reg := prometheus.NewRegistry()
	p := twoMembers(t, Options{Registerer: reg, ProbeBackoff: 10 * time.Millisecond}, func(t token) token {
		fa = &flaky{token: t}
		return fa
	})
	tb := p.members[1].state().tok
	ctx := context.Background()
	nonce := make([]byte, 12)
	ct, err := p.Seal(ctx, wrap1, nonce, []byte("x"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Under concurrent load, both members get traffic.
	var load sync.WaitGroup
	for range 64 {
		load.Go(func() {
			for range 20 {
				if _, err := p.HMAC(ctx, pin1, []byte("m")); err != nil {
					t.Error(err)
				}
			}
		})
	}
	load.Wait()
	for _, name := range []string{"a", "b"} {
		if n := testutil.ToFloat64(p.metrics.ops.WithLabelValues(name, "hmac")); n == 0 {
			t.Fatalf("member %s got no traffic", name)
		}
	}
	fa.broken.Store(true)
	var wg sync.WaitGroup
	var failed atomic.Int32
	for range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := p.HMAC(ctx, pin1, []byte("m")); err != nil {
				failed.Add(1)
			}
			if _, err := p.Open(ctx, wrap1, nonce, ct, nil); err != nil {
				failed.Add(1)
			}
		}()
	}
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d operations failed while member b was healthy", failed.Load())
	}
	if testutil.ToFloat64(p.metrics.up.WithLabelValues("a")) != 0 {
		t.Fatal("broken member a still marked up")
	}
	// Both broken: no result, ErrUnavailable, never ErrIntegrity.
	fb := &flaky{token: tb}
	fb.broken.Store(true)
	swapToken(p.members[1], fb)
	if _, err := p.Open(ctx, wrap1, nonce, ct, nil); !errors.Is(err, vault.ErrUnavailable) || errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("Open with every member down: %v, want ErrUnavailable", err)
	}
	if p.Ready() == nil {
		t.Fatal("Ready with no healthy member")
	}
	// Repaired members come back through the probe.
	fa.broken.Store(false)
	fb.broken.Store(false)
	deadline := time.Now().Add(10 * time.Second)
	for p.Healthy() != 2 {
		if time.Now().After(deadline) {
			t.Fatal("repaired members not back after 10s of probing")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := p.Open(ctx, wrap1, nonce, ct, nil); err != nil {
		t.Fatal(err)
	}
	if testutil.ToFloat64(p.metrics.ejections.WithLabelValues("a")) < 1 || testutil.ToFloat64(p.metrics.readmissions.WithLabelValues("a")) < 1 {
		t.Fatal("ejection and readmission of member a not counted")
	}
	// a failed on whichever operation met it first, with the code its
	// device gave (flaky fails HMACs with CKR_DEVICE_ERROR and panics in
	// opens with CKR_GENERAL_ERROR, as crypto11 does).
	if n := testutil.ToFloat64(p.metrics.errors.WithLabelValues("a", "hmac", "CKR_DEVICE_ERROR")) +
		testutil.ToFloat64(p.metrics.errors.WithLabelValues("a", "open", "CKR_GENERAL_ERROR")); n < 1 {
		t.Fatal("member a's errors are not counted by reason")
	}
}

// stalling holds every HMAC until release is closed, as a hung HSM would.
type stalling struct {
	token
	release chan struct{}
}

func (s *stalling) HMAC(k vault.KeyID, m []byte) ([]byte, error) {
	<-s.release
	return s.token.HMAC(k, m)
}

// pickyOpen fails to open one ciphertext, and only that one: a member
// whose fault the self-test does not show.
type pickyOpen struct {
	token
	bad []byte
}

func (p *pickyOpen) Open(k vault.KeyID, n, c, a []byte) ([]byte, error) {
	if bytes.Equal(c, p.bad) {
		return nil, errors.New("CKR_GENERAL_ERROR")
	}
	return p.token.Open(k, n, c, a)
}

// twoMembers provisions two members with the same keys and builds a pool
// on their tokens, wrapped by wrapA.
func twoMembers(t *testing.T, opts Options, wrapA func(token) token) *Pool {
	t.Helper()
	a, b := newMember(t, "a"), newMember(t, "b")
	if _, err := Provision([]MemberConfig{a, b}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	ta, err := NewModules().openToken(a)
	if err != nil {
		t.Fatal(err)
	}
	tb, err := NewModules().openToken(b)
	if err != nil {
		t.Fatal(err)
	}
	p, err := newPool([]MemberConfig{a, b}, []token{ta, tb}, make([]error, 2), opts)
	if err != nil {
		t.Fatal(err)
	}
	swapToken(p.members[0], wrapA(ta))
	t.Cleanup(func() { p.Close() })
	return p
}

func TestStalledMemberIsSkipped(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	p := twoMembers(t, Options{OpTimeout: 50 * time.Millisecond, ProbeBackoff: time.Hour}, func(t token) token {
		return &stalling{token: t, release: release}
	})
	for i := range 20 {
		if _, err := p.HMAC(context.Background(), pin1, []byte("m")); err != nil {
			t.Fatalf("HMAC %d with one member stalled: %v", i, err)
		}
	}
	if p.members[0].healthy.Load() {
		t.Fatal("the stalled member is still in service")
	}
	// A caller that gives up gets ErrUnavailable, and the member it was
	// waiting on is not blamed for it.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := p.HMAC(ctx, pin1, []byte("m")); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("HMAC with a cancelled context: %v", err)
	}
	if !p.members[1].healthy.Load() {
		t.Fatal("a cancelled caller took a healthy member out")
	}
}

// A caller whose deadline passes while every member stalls gets
// ErrUnavailable then, not after the members' OpTimeout: the vault bounds a
// last-attempt guess's HSM work by its context, so that the guess is
// refunded while it may still undo its lock.
func TestCallerDeadlineEndsAStalledCall(t *testing.T) {
	release := make(chan struct{})
	defer close(release)
	p := twoMembers(t, Options{OpTimeout: time.Hour, ProbeBackoff: time.Hour}, func(t token) token {
		return &stalling{token: t, release: release}
	})
	swapToken(p.members[1], &stalling{token: p.members[1].state().tok, release: release})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := p.HMAC(ctx, pin1, []byte("m"))
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, vault.ErrUnavailable) || ctx.Err() == nil {
			t.Fatalf("HMAC with every member stalled: %v (context: %v), want ErrUnavailable once the deadline passed", err, ctx.Err())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("HMAC with every member stalled did not return when its caller's deadline passed")
	}
}

func TestIntegrityNeedsEveryHealthyMember(t *testing.T) {
	nonce := make([]byte, 12)
	rand.Read(nonce)
	var picky *pickyOpen
	p := twoMembers(t, Options{ProbeBackoff: time.Hour}, func(t token) token {
		picky = &pickyOpen{token: t}
		return picky
	})
	ctx := context.Background()
	ct, err := p.Seal(ctx, wrap1, nonce, []byte("secret"), nil)
	if err != nil {
		t.Fatal(err)
	}
	// Member a cannot open this ciphertext although it passes its
	// self-test; b can. The open succeeds and a is taken out.
	picky.bad = ct
	for i := 0; i < 200 && p.members[0].healthy.Load(); i++ { // until a is picked
		if pt, err := p.Open(ctx, wrap1, nonce, ct, nil); err != nil || string(pt) != "secret" {
			t.Fatalf("Open: %q %v", pt, err)
		}
	}
	if p.members[0].healthy.Load() {
		t.Fatal("the member that could not open a good ciphertext stayed in service")
	}
	// A damaged ciphertext fails everywhere: ErrIntegrity, and the members
	// that tried it stay in service.
	p.members[0].healthy.Store(true)
	picky.bad = nil
	damaged := bytes.Clone(ct)
	damaged[0] ^= 1
	if _, err := p.Open(ctx, wrap1, nonce, damaged, nil); !errors.Is(err, vault.ErrIntegrity) {
		t.Fatalf("Open of a damaged ciphertext: %v, want ErrIntegrity", err)
	}
	if p.Healthy() != 2 {
		t.Fatalf("%d members healthy after a damaged record, want 2", p.Healthy())
	}
}

// A key object with keyvault's label that the HSM would let out is not
// keyvault's: the member is refused.
func TestExtractableKeyIsRefused(t *testing.T) {
	m := newMember(t, "x")
	err := withSession(m, func(p *pkcs11.Ctx, s pkcs11.SessionHandle) error {
		for _, id := range keyVersion1() {
			tmpl := keyTemplate(id, bytes.Repeat([]byte{7}, 32), vault.ProfileGCM)
			if id.Role == vault.RoleWrap {
				for i, a := range tmpl {
					if a.Type == pkcs11.CKA_EXTRACTABLE {
						tmpl[i] = pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, true)
					}
				}
			}
			if _, err := p.CreateObject(s, tmpl); err != nil {
				return err
			}
		}
		return nil
	}, absent(keyVersion1()))
	if err != nil {
		t.Fatal(err)
	}
	_, err = Open([]MemberConfig{m}, Options{})
	if err == nil || !strings.Contains(err.Error(), "not a sensitive, non-extractable token object") {
		t.Fatalf("Open with an extractable wrap key: %v", err)
	}
}

// swapToken puts t, wrapping the member's admitted token, in its place.
func swapToken(m *member, t token) {
	st := *m.state()
	st.tok = t
	m.st.Store(&st)
}

// A member that comes back with other keys (re-initialised, say) is
// refused at readmission and shows in keyvault_hsm_member_key_mismatch;
// the pool keeps serving from the good member.
func TestReadmissionChecksKeys(t *testing.T) {
	// Every token exists before the module is loaded: SoftHSM does not see
	// tokens made by softhsm2-util after that.
	a, b, c := newMember(t, "a"), newMember(t, "b"), newMember(t, "c")
	if _, err := Provision([]MemberConfig{a, b}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	if _, err := Provision([]MemberConfig{c}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	var toks []token
	for _, m := range []MemberConfig{a, b, c} {
		tok, err := NewModules().openToken(m)
		if err != nil {
			t.Fatal(err)
		}
		toks = append(toks, tok)
	}
	defer toks[2].Close()
	fb := &flaky{token: toks[1]}
	p, err := newPool([]MemberConfig{a, b}, []token{toks[0], fb}, make([]error, 2), Options{ProbeBackoff: 5 * time.Millisecond, ProbeBackoffMax: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// b fails (as the first operation that meets its dead device would
	// report), and "comes back" holding c's keys.
	fb.broken.Store(true)
	swapToken(p.members[1], toks[2])
	p.fail(p.members[1], "hmac", errors.New("CKR_DEVICE_REMOVED"))
	ctx := context.Background()
	deadline := time.Now().Add(5 * time.Second)
	for testutil.ToFloat64(p.metrics.keyMismatch.WithLabelValues("b")) != 1 {
		if time.Now().After(deadline) {
			t.Fatal("a member with other keys was not flagged at readmission")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if p.members[1].healthy.Load() {
		t.Fatal("a member with other keys was readmitted")
	}
	if _, err := p.HMAC(ctx, pin1, []byte("m")); err != nil {
		t.Fatal(err)
	}
}

// A wrong PIN on one member: it is reported, its login is not retried,
// and the other member serves.
func TestWrongPINOnOneMember(t *testing.T) {
	a, b := newMember(t, "a"), newMember(t, "b")
	if _, err := Provision([]MemberConfig{a, b}, vault.ProfileGCM); err != nil {
		t.Fatal(err)
	}
	b.PIN = "99999999"
	var logs bytes.Buffer
	var mu sync.Mutex
	reg := prometheus.NewRegistry()
	p, err := Open([]MemberConfig{a, b}, Options{
		Registerer:   reg,
		Logger:       slog.New(slog.NewTextHandler(&lockedWriter{w: &logs, mu: &mu}, nil)),
		ProbeBackoff: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := p.HMAC(context.Background(), pin1, []byte("m")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(50 * time.Millisecond) // fifty probe periods, were b probed
	mu.Lock()
	out := logs.String()
	mu.Unlock()
	if !strings.Contains(out, "PIN is refused") || strings.Contains(out, "99999999") {
		t.Fatalf("log: %s", out)
	}
	if !strings.Contains(out, "share a PKCS#11 module path") {
		t.Fatalf("two members on one module, and no warning: %s", out)
	}
	if p.members[1].healthy.Load() || p.members[1].probing.Load() {
		t.Fatal("the member with a wrong PIN is in service or being probed (its login retried)")
	}
	if testutil.ToFloat64(p.metrics.up.WithLabelValues("b")) != 0 || testutil.ToFloat64(p.metrics.up.WithLabelValues("a")) != 1 {
		t.Fatal("up gauges wrong")
	}
}

type lockedWriter struct {
	w  *bytes.Buffer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}

// With every session busy, an operation waits no longer than QueueTimeout,
// then is shed with ErrUnavailable, and counted.
func TestQueueTimeoutSheds(t *testing.T) {
	release := make(chan struct{})
	cfgs := []MemberConfig{{Name: "slow", MaxSessions: 1}}
	p, err := newPool(cfgs, []token{latencyToken{}}, make([]error, 1),
		Options{QueueTimeout: 20 * time.Millisecond, OpTimeout: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// Stall only once admitted: admission itself computes HMACs.
	swapToken(p.members[0], &stalling{token: latencyToken{}, release: release})
	busy := make(chan error, 1)
	go func() {
		_, err := p.HMAC(context.Background(), pin1, []byte("m"))
		busy <- err
	}()
	for p.members[0].inFlight.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	if _, err := p.HMAC(context.Background(), pin1, []byte("m")); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("an operation with every session busy: %v, want ErrUnavailable", err)
	}
	if waited := time.Since(start); waited > time.Second {
		t.Fatalf("shed after %v, want about the 20ms queue timeout", waited)
	}
	if testutil.ToFloat64(p.metrics.shed.WithLabelValues("session")) != 1 || !p.members[0].healthy.Load() {
		t.Fatal("the shed operation was not counted, or blamed the member")
	}
	close(release)
	if err := <-busy; err != nil {
		t.Fatal(err)
	}
}

// Admit holds one pool session per request: past them, a request waits at
// most QueueTimeout and is shed.
func TestAdmit(t *testing.T) {
	cfgs := []MemberConfig{{Name: "a", MaxSessions: 2}, {Name: "b", MaxSessions: 1}}
	p, err := newPool(cfgs, []token{latencyToken{}, latencyToken{}}, make([]error, 2), Options{QueueTimeout: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx := context.Background()
	var releases []func()
	for range 3 {
		release, err := p.Admit(ctx)
		if err != nil {
			t.Fatalf("admission within the 3 sessions: %v", err)
		}
		releases = append(releases, release)
	}
	start := time.Now()
	if _, err := p.Admit(ctx); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("a fourth request: %v, want ErrUnavailable", err)
	}
	if time.Since(start) > time.Second {
		t.Fatal("shedding took far longer than the queue timeout")
	}
	if testutil.ToFloat64(p.metrics.shed.WithLabelValues("admission")) != 1 {
		t.Fatal("the shed request was not counted")
	}
	releases[0]()
	if release, err := p.Admit(ctx); err != nil {
		t.Fatalf("after a release: %v", err)
	} else {
		release()
	}
	// A waiter is admitted as soon as a request leaves, within the timeout.
	last, err := p.Admit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	go func() { time.Sleep(5 * time.Millisecond); last() }()
	if release, err := p.Admit(ctx); err != nil {
		t.Fatalf("a waiter when a request left: %v", err)
	} else {
		release()
	}
	for _, r := range releases[1:] {
		r()
	}
	// Only healthy members' sessions count: with a (2 sessions) out, one
	// request is admitted, not three.
	p.members[0].healthy.Store(false)
	one, err := p.Admit(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Admit(ctx); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("a second request with only b's session: %v", err)
	}
	one()
	// AdmitPerSession multiplies the healthy sessions: b's one session
	// admits three requests.
	p.opts.AdmitPerSession = 3
	var three []func()
	for range 3 {
		release, err := p.Admit(ctx)
		if err != nil {
			t.Fatalf("admission within 3 per session: %v", err)
		}
		three = append(three, release)
	}
	if _, err := p.Admit(ctx); !errors.Is(err, vault.ErrUnavailable) {
		t.Fatalf("a fourth request with 3 per session of one session: %v", err)
	}
	for _, r := range three {
		r()
	}
	// With no member healthy, a request is refused at once: no wait.
	p.members[1].healthy.Store(false)
	start = time.Now()
	if _, err := p.Admit(context.Background()); !errors.Is(err, vault.ErrUnavailable) || time.Since(start) > 10*time.Millisecond {
		t.Fatalf("admission with no healthy member: %v after %v", err, time.Since(start))
	}
}
