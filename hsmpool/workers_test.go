package hsmpool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/keyvault/keyvault/vault"
)

// jitterToken answers HMACs after a random delay of up to max.
type jitterToken struct {
	latencyToken
	max time.Duration
}

func (j jitterToken) HMAC(k vault.KeyID, msg []byte) ([]byte, error) {
	time.Sleep(time.Duration(mrand.Int64N(int64(j.max))))
	return j.latencyToken.HMAC(k, msg)
}

// Under many callers, some of whom give up while their operation runs,
// every operation is answered with its own result or abandoned, a member never has more
// workers than session slots, every slot comes back, and no abandoned
// operation blames the member.
func TestWorkersStayWithinSessions(t *testing.T) {
	const sessions = 3
	p, err := newPool([]MemberConfig{{Name: "a", MaxSessions: sessions}}, []token{latencyToken{}}, make([]error, 1), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	m := p.members[0]
	swapToken(m, jitterToken{max: 300 * time.Microsecond})
	var wg sync.WaitGroup
	errs := make(chan error, 1)
	for g := range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 100 {
				ctx, cancel := context.Background(), context.CancelFunc(func() {})
				if (g+i)%3 == 0 {
					ctx, cancel = context.WithTimeout(ctx, 100*time.Microsecond)
				}
				// Each message its own, so that an answer delivered to
				// another caller (a job reused while its abandoned
				// operation still ran) is seen.
				msg := fmt.Appendf(nil, "caller %d, operation %d", g, i)
				out, err := p.HMAC(ctx, pin1, msg)
				cancel()
				if err != nil && !(ctx.Err() != nil && errors.Is(err, vault.ErrUnavailable)) {
					select {
					case errs <- fmt.Errorf("HMAC %d of caller %d: %w", i, g, err):
					default:
					}
					return
				}
				if want, _ := (latencyToken{}).HMAC(pin1, msg); err == nil && !bytes.Equal(out, want) {
					select {
					case errs <- fmt.Errorf("HMAC %d of caller %d answered with another operation's result", i, g):
					default:
					}
					return
				}
				if n := m.workers.Load(); n > sessions {
					select {
					case errs <- fmt.Errorf("%d workers for %d sessions", n, sessions):
					default:
					}
				}
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errs:
		t.Fatal(err)
	default:
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(m.sessions) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d session slots still held after every operation returned", len(m.sessions))
		}
		time.Sleep(time.Millisecond)
	}
	if !m.healthy.Load() {
		t.Fatal("callers that gave up took the member out")
	}
	// A closed pool's workers are gone: an operation still gets an answer.
	p.Close()
	done := make(chan error, 1)
	go func() {
		_, err := p.HMAC(context.Background(), pin1, []byte("m"))
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("HMAC after Close: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("an operation after Close got no answer")
	}
}

// goexitToken ends the goroutine of every HMAC, as a failing test's fake
// token does with t.FailNow.
type goexitToken struct{ latencyToken }

func (goexitToken) HMAC(vault.KeyID, []byte) ([]byte, error) { runtime.Goexit(); return nil, nil }

// TestSlotOutlivesGoexit: an operation that ends its worker's goroutine
// still gives its session slot back; its caller is answered by OpTimeout.
func TestSlotOutlivesGoexit(t *testing.T) {
	p, err := newPool([]MemberConfig{{Name: "a", MaxSessions: 1}}, []token{latencyToken{}}, make([]error, 1), Options{OpTimeout: 50 * time.Millisecond, ProbeBackoff: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	m := p.members[0]
	swapToken(m, goexitToken{})
	if _, err := p.HMAC(context.Background(), pin1, []byte("m")); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("HMAC whose goroutine ended: %v, want ErrUnavailable after OpTimeout", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(m.sessions) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d session slots still held after the operation ended", len(m.sessions))
		}
		time.Sleep(time.Millisecond)
	}
}
