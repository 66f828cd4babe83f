package hsmpool

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/vault"
)

// latencyToken answers like an HSM on the far side of a network: every
// operation takes a fixed time. Its HMAC is the standard library's under
// one fixed key, so every member agrees.
type latencyToken struct{ delay time.Duration }

func (l latencyToken) HMAC(k vault.KeyID, msg []byte) ([]byte, error) {
	time.Sleep(l.delay)
	m := hmac.New(sha256.New, []byte(k.Label()))
	m.Write(msg)
	return m.Sum(nil), nil
}

func (l latencyToken) Seal(k vault.KeyID, nonce, pt, aad []byte) ([]byte, error) {
	time.Sleep(l.delay)
	return append(pt[:len(pt):len(pt)], make([]byte, 16)...), nil
}

func (l latencyToken) Open(k vault.KeyID, nonce, ct, aad []byte) ([]byte, error) {
	time.Sleep(l.delay)
	return ct[:len(ct)-16], nil
}

func (latencyToken) Versions(vault.KeyRole) []uint32  { return []uint32{1} }
func (latencyToken) WrapProfile(uint32) vault.Profile { return vault.ProfileGCM }
func (latencyToken) Close() error                     { return nil }

// BenchmarkPoolScaling: throughput of PIN-check HMACs through the pool
// with 1, 2 and 4 members of 2 ms latency and 4 sessions each, under more
// concurrent callers than all sessions together. The goal is at least
// 0.9 x N times the one-member figure:
//
//	go test ./hsmpool -run '^$' -bench PoolScaling -benchtime 3s
func BenchmarkPoolScaling(b *testing.B) {
	const delay, sessions = 2 * time.Millisecond, 4
	for _, n := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("members=%d", n), func(b *testing.B) {
			cfgs := make([]MemberConfig, n)
			toks := make([]token, n)
			for i := range n {
				cfgs[i] = MemberConfig{Name: fmt.Sprintf("m%d", i), MaxSessions: sessions}
				toks[i] = latencyToken{delay}
			}
			p, err := newPool(cfgs, toks, make([]error, n), Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			// About four callers per session in the pool: RunParallel
			// starts parallelism x GOMAXPROCS goroutines.
			b.SetParallelism(max(1, 4*n*sessions/runtime.GOMAXPROCS(0)))
			key := vault.KeyID{Role: vault.RolePIN, Version: 1}
			start := time.Now()
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := p.HMAC(context.Background(), key, []byte("pin check")); err != nil {
						b.Error(err)
					}
				}
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "ops/s")
		})
	}
}

// instantToken answers every HMAC at once with the same bytes, and seals
// and opens as latencyToken does with no delay.
type instantToken struct{ latencyToken }

var instantMAC = make([]byte, 32)

func (instantToken) HMAC(vault.KeyID, []byte) ([]byte, error) { return instantMAC, nil }

// BenchmarkPoolOverhead: what the pool itself costs per operation (a
// member picked, a session slot, the deadline, the metrics) around a
// token that answers at once, called from one goroutine:
//
//	go test ./hsmpool -run '^$' -bench PoolOverhead -benchmem
func BenchmarkPoolOverhead(b *testing.B) {
	p, err := newPool([]MemberConfig{{Name: "m0", MaxSessions: 4}}, []token{instantToken{}}, make([]error, 1), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	ctx, key, msg := context.Background(), vault.KeyID{Role: vault.RolePIN, Version: 1}, []byte("pin check")
	for b.Loop() {
		if _, err := p.HMAC(ctx, key, msg); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAnchorWrite: one rollback-anchor write to a SoftHSM member (an
// in-place update of a private token object, which every anchored batch
// waits for) against a baseline measured in the same loop on the same
// token, one PIN-check HMAC under a token key:
//
//	go test ./hsmpool -run '^$' -bench AnchorWrite -benchtime 3s
func BenchmarkAnchorWrite(b *testing.B) {
	p := provisionedPool(b, newMember(b, "a"), vault.ProfileGCM, Options{})
	defer p.Close()
	keys := anchor.Keys{Anchor: make([]byte, 32), Digest: make([]byte, 32), Meta: make([]byte, 32)}
	// An anchor of the size the vault writes with two members.
	value, err := keys.MarshalAnchor(anchor.Anchor{Member: "a", Epoch: 1, Live: []string{"a", "b"}})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	var w uint64
	var writing, checking time.Duration
	for b.Loop() {
		w++
		start := time.Now()
		if err := p.WriteAnchor(ctx, "a", w, value); err != nil {
			b.Fatal(err)
		}
		wrote := time.Now()
		if _, err := p.HMAC(ctx, vault.KeyID{Role: vault.RolePIN, Version: 1}, []byte("pin check")); err != nil {
			b.Fatal(err)
		}
		writing, checking = writing+wrote.Sub(start), checking+time.Since(wrote)
	}
	b.ReportMetric(float64(writing.Microseconds())/float64(w), "anchor-µs")
	b.ReportMetric(float64(checking.Microseconds())/float64(w), "hmac-µs")
	b.ReportMetric(float64(writing)/float64(checking), "anchor/hmac")
}

// BenchmarkSoftHSMOps: the raw cost of each pool operation on one SoftHSM
// member (4 sessions, as many callers as sessions), the ceiling every
// recover and enroll sits under, served from the token keys and from
// session copies of them, in one run; recover is a PIN check then an
// open, two keys, as a recovery makes:
//
//	go test ./hsmpool -run '^$' -bench SoftHSMOps -benchtime 3s
func BenchmarkSoftHSMOps(b *testing.B) {
	m := newMember(b, "a")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
		b.Fatal(err)
	}
	for _, keys := range []string{"token-keys", "session-copies"} {
		b.Run(keys, func(b *testing.B) {
			mods := NewModules()
			mods.noCopies = keys == "token-keys"
			defer mods.Close()
			p, err := Open([]MemberConfig{m}, Options{Modules: mods})
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			if err := viewOf(b, p, 0).sessionCopies(); (err == nil) != (keys == "session-copies") {
				b.Fatalf("%s: session copies %v", keys, err)
			}
			benchOps(b, p, m.MaxSessions)
		})
	}
}

// BenchmarkSoftHSMOpsHMACProfile: BenchmarkSoftHSMOps's operations under
// a wrap key of the hmac profile, served from session copies: each seal
// and open derives its record key in the token (one C_Sign) and runs GCM
// on the host:
//
//	go test ./hsmpool -run '^$' -bench SoftHSMOpsHMACProfile -benchtime 3s
func BenchmarkSoftHSMOpsHMACProfile(b *testing.B) {
	m := newMember(b, "a")
	p := provisionedPool(b, m, vault.ProfileHMAC, Options{})
	defer p.Close()
	if err := viewOf(b, p, 0).sessionCopies(); err != nil {
		b.Fatalf("session copies: %v", err)
	}
	benchOps(b, p, m.MaxSessions)
}

func benchOps(b *testing.B, p *Pool, sessions int) {
	ctx := context.Background()
	nonce, aad, pt := make([]byte, 12), []byte("keyvault/v1/aad"), make([]byte, 32)
	ct, err := p.Seal(ctx, wrap1, nonce, pt, aad)
	if err != nil {
		b.Fatal(err)
	}
	pinInput := []byte("pin check, 64 bytes of input as the vault's PIN check has....")
	ops := []struct {
		name string
		fn   func() ([]byte, error)
	}{
		{"hmac", func() ([]byte, error) { return p.HMAC(ctx, pin1, pinInput) }},
		{"seal", func() ([]byte, error) { return p.Seal(ctx, wrap1, nonce, pt, aad) }},
		{"open", func() ([]byte, error) { return p.Open(ctx, wrap1, nonce, ct, aad) }},
		{"recover", func() ([]byte, error) {
			if _, err := p.HMAC(ctx, pin1, pinInput); err != nil {
				return nil, err
			}
			return p.Open(ctx, wrap1, nonce, ct, aad)
		}},
	}
	for _, op := range ops {
		b.Run(op.name, func(b *testing.B) {
			b.SetParallelism(max(1, sessions/runtime.GOMAXPROCS(0)))
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if _, err := op.fn(); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "ops/s")
		})
	}
}

// BenchmarkTokenKeyCheck: what the token key check costs on a SoftHSM
// member holding 20 versions, against the operation it rides on. check
// is one check of a key (its token key's label and check value), which
// an operation under that key makes at most every tokenCheckInterval;
// hmac is one PIN-check HMAC on its copy with no check due; probe checks
// every key of the member, as the probe and a failed anchor write do:
//
//	go test ./hsmpool -run '^$' -bench TokenKeyCheck
func BenchmarkTokenKeyCheck(b *testing.B) {
	m := newMember(b, "a")
	if _, err := Provision([]MemberConfig{m}, vault.ProfileGCM); err != nil {
		b.Fatal(err)
	}
	for range 19 {
		if _, _, err := Rotate([]MemberConfig{m}, ""); err != nil {
			b.Fatal(err)
		}
	}
	p, err := Open([]MemberConfig{m}, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	tok := viewOf(b, p, 0)
	if err := tok.sessionCopies(); err != nil {
		b.Fatal(err)
	}
	for _, id := range []vault.KeyID{pin1, wrap1} {
		b.Run("check/"+string(id.Role), func(b *testing.B) {
			cp := tok.checked[id]
			for b.Loop() {
				if err := tok.raw.with(func(s pkcs11.SessionHandle) error { return tok.checkCopy(s, cp) }); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("hmac", func(b *testing.B) {
		msg := []byte("pin check, 64 bytes of input as the vault's PIN check has....")
		for b.Loop() {
			for _, cp := range tok.checked {
				cp.lastCheck.Store(time.Now().UnixNano())
			}
			if _, err := tok.HMAC(pin1, msg); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run(fmt.Sprintf("probe/%d-keys", len(tok.checked)), func(b *testing.B) {
		for b.Loop() {
			if err := tok.checkTokenKeys(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
