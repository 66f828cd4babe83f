package hsmpool

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	mrand "math/rand/v2"

	"github.com/keyvault/keyvault/vault"
)

// fail takes a member out and starts probing it, unless the pool is
// closing or a probe already runs.
func (p *Pool) fail(m *member, op string, err error) {
	if m.healthy.CompareAndSwap(true, false) {
		p.metrics.up.WithLabelValues(m.name).Set(0)
		p.metrics.ejections.WithLabelValues(m.name).Inc()
		p.log.Error("HSM member taken out", "member", m.name, "op", op, "error", err.Error())
	}
	p.startProbe(m)
}

func (p *Pool) startProbe(m *member) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.closed && m.probing.CompareAndSwap(false, true) {
		p.wg.Add(1)
		go p.probe(m)
	}
}

// probe tests the member with exponential backoff and jitter and puts it
// back once it passes. A member whose token fails is configured again from
// scratch: after a token is re-initialised or restored, every cached key
// handle is stale (CKR_OBJECT_HANDLE_INVALID), and SoftHSM only sees a token
// change after the library is finalised and initialised again, so the old
// context is closed before the new one opens. A member whose keys differ
// from the pool's stays out. A refused PIN stops the probe: logging in again
// and again could lock the token for every process.
func (p *Pool) probe(m *member) {
	defer p.wg.Done()
	wait := p.opts.ProbeBackoff
	if m.refusal.Load() != nil {
		wait = p.opts.RefusedProbeInterval
	}
	for {
		jitter := time.Duration(mrand.Int64N(int64(wait)/2 + 1))
		select {
		case <-p.stop:
			return
		case <-time.After(wait/2 + jitter):
		}
		err := m.state().healthCheck(p.ref())
		if err != nil && m.reopen != nil {
			err = p.reopen(m)
		}
		switch {
		case err == nil:
			// Probing ends before the member is back, so that a failure
			// right after starts a new probe.
			m.probing.Store(false)
			m.healthy.Store(true)
			p.metrics.up.WithLabelValues(m.name).Set(1)
			p.metrics.keyMismatch.WithLabelValues(m.name).Set(0)
			p.metrics.readmissions.WithLabelValues(m.name).Inc()
			p.log.Info("HSM member back in service", "member", m.name)
			return
		case isPINError(err):
			p.log.Error("HSM member left out until restart: its PIN is refused, and retrying could lock the token", "member", m.name, "error", err.Error())
			return
		case errors.Is(err, errKeyMismatch):
			p.metrics.keyMismatch.WithLabelValues(m.name).Set(1)
			p.log.Error("HSM member refused: its keys differ from the pool's", "member", m.name, "error", err.Error())
		case m.refusal.Load() != nil:
			wait = p.opts.RefusedProbeInterval
			continue
		}
		wait = min(2*wait, p.opts.ProbeBackoffMax)
	}
}

// reopen replaces a member's token with a freshly configured one that is
// admitted against the pool's keys. While it runs, and after it fails,
// the member's state is a brokenToken; after a failure, one that says
// why.
func (p *Pool) reopen(m *member) (err error) {
	broken := brokenState(nil)
	old := m.st.Swap(broken)
	defer func() {
		if err != nil {
			m.st.CompareAndSwap(broken, brokenState(err))
		}
	}()
	if err := closeToken(old.tok); err != nil {
		p.log.Warn("closing a failed HSM member", "member", m.name, "error", err.Error())
	}
	t, err := m.reopen()
	if err != nil {
		p.log.Warn("HSM member still failing", "member", m.name, "error", err.Error())
		return err
	}
	if err := p.checkCapabilities(m, t, p.profileOf(p.keys.Load())); err != nil {
		closeToken(t)
		if m.refusal.Load() == nil {
			p.log.Warn("HSM member still failing", "member", m.name, "error", err.Error())
		}
		return err
	}
	st, err := admit(t, p.ref())
	if errors.Is(err, errKeyMismatch) {
		// The member may have lost a version another node retired while
		// holding a newer one: then the pool moves to it, with every
		// member, rather than leave the member out.
		p.rotateMu.Lock()
		_, rerr := p.reload(m, t)
		p.rotateMu.Unlock()
		if rerr == nil {
			p.log.Info("HSM member re-admitted with the keys it holds now; the pool reloaded", "member", m.name)
			return nil
		}
		err = fmt.Errorf("%w (and reloading with it: %w)", err, rerr)
	}
	if err != nil {
		closeToken(t)
		p.log.Warn("HSM member still failing", "member", m.name, "error", err.Error())
		return err
	}
	m.st.Store(st)
	p.noteCopies(m, st.tok)
	return nil
}

// closeTimeout bounds how long closing a token may block: crypto11's Close
// waits for every pooled session to come back, and a session stuck in a
// dead HSM never does.
const closeTimeout = 5 * time.Second

// closeToken closes t, abandoning it if Close does not return in time.
func closeToken(t token) error {
	done := make(chan error, 1)
	go func() { done <- t.Close() }()
	select {
	case err := <-done:
		return err
	case <-time.After(closeTimeout):
		return errors.New("token close did not return; abandoned")
	}
}

// brokenToken stands in for a member with no working token: one that
// failed to open or to be admitted (why is its error), or is being
// re-opened (no error).
type brokenToken struct{ why error }

func brokenState(why error) *tokenState { return &tokenState{tok: brokenToken{why}} }

var errNoToken = errors.New("member has no open token")

// err is errNoToken, with why the member has none when it is known.
func (b brokenToken) err() error {
	if b.why == nil {
		return errNoToken
	}
	return fmt.Errorf("%w: %w", errNoToken, b.why)
}

func (b brokenToken) HMAC(vault.KeyID, []byte) ([]byte, error) { return nil, b.err() }
func (b brokenToken) Seal(vault.KeyID, []byte, []byte, []byte) ([]byte, error) {
	return nil, b.err()
}
func (b brokenToken) Open(vault.KeyID, []byte, []byte, []byte) ([]byte, error) {
	return nil, b.err()
}
func (brokenToken) Versions(vault.KeyRole) []uint32  { return nil }
func (brokenToken) WrapProfile(uint32) vault.Profile { return "" }
func (brokenToken) Close() error                     { return nil }

// isPINError reports a login refused for the PIN. crypto11 flattens
// PKCS#11 errors into text, so the codes are matched by name.
func isPINError(err error) bool {
	for _, code := range []string{"CKR_PIN_INCORRECT", "CKR_PIN_LOCKED", "CKR_PIN_EXPIRED", "CKR_PIN_INVALID", "CKR_PIN_LEN_RANGE"} {
		if strings.Contains(err.Error(), code) {
			return true
		}
	}
	return false
}

var ckrCode = regexp.MustCompile(`CKR_[A-Z0-9_]+`)

// reasonOf names a member failure for the errors metric: the PKCS#11 return
// code when there is one (a bounded set), else a word.
func reasonOf(err error) string {
	switch {
	case errors.Is(err, errStalled):
		return "stalled"
	case errors.Is(err, errNoToken):
		return "no_token"
	}
	if c := ckrCode.FindString(err.Error()); c != "" {
		return c
	}
	return "other"
}
