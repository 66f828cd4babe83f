package client

import (
	"errors"
	"io"
	"sync"
)

// wipeBuffer holds a request body that carries a PIN or a secret, and
// wipes it once nothing can read it any more. The transport may read a
// request body, and close it, after Client.Do has returned (and again,
// through GetBody, when it resends on a fresh connection), so the call and
// every reader each hold a reference; the last one released wipes the
// bytes. Reads and the wipe exclude each other, so a late read sees an
// error, never a half-wiped PIN.
type wipeBuffer struct {
	mu    sync.Mutex
	b     []byte
	refs  int
	wiped bool
}

// newWipeBuffer takes ownership of b, with one reference for the caller.
func newWipeBuffer(b []byte) *wipeBuffer { return &wipeBuffer{b: b, refs: 1} }

func (w *wipeBuffer) len() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.b)
}

// release drops the caller's reference.
func (w *wipeBuffer) release() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.unref()
}

func (w *wipeBuffer) unref() {
	w.refs--
	if w.refs == 0 {
		clear(w.b)
		w.b, w.wiped = nil, true
	}
}

var errBodyGone = errors.New("keyvault client: request body already wiped")

// reader returns a new reader of the whole body, holding a reference until
// it is closed.
func (w *wipeBuffer) reader() (io.ReadCloser, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.wiped {
		return nil, errBodyGone
	}
	w.refs++
	return &wipeReader{w: w}, nil
}

type wipeReader struct {
	w      *wipeBuffer
	off    int
	closed bool
}

func (r *wipeReader) Read(p []byte) (int, error) {
	r.w.mu.Lock()
	defer r.w.mu.Unlock()
	if r.closed {
		return 0, errBodyGone
	}
	if r.off >= len(r.w.b) {
		return 0, io.EOF
	}
	n := copy(p, r.w.b[r.off:])
	r.off += n
	return n, nil
}

func (r *wipeReader) Close() error {
	r.w.mu.Lock()
	defer r.w.mu.Unlock()
	if !r.closed {
		r.closed = true
		r.w.unref()
	}
	return nil
}

var errResponseTooLarge = errors.New("keyvault client: response body too large")

// readBody reads a response body of at most limit bytes into one buffer,
// wiping every smaller buffer it outgrows, so that a recovered secret is
// left in no copy the client cannot wipe (the transport's own buffers
// aside).
func readBody(r io.Reader, limit int, hint int64) ([]byte, error) {
	size := 512
	if hint >= 0 && hint <= int64(limit) {
		size = int(hint) + 1 // room to see EOF without growing
	}
	buf := make([]byte, 0, size)
	for {
		if len(buf) == cap(buf) {
			if len(buf) > limit {
				clear(buf)
				return nil, errResponseTooLarge
			}
			grown := make([]byte, len(buf), min(2*cap(buf), limit+1))
			copy(grown, buf)
			clear(buf)
			buf = grown
		}
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if len(buf) > limit {
			clear(buf)
			return nil, errResponseTooLarge
		}
		if errors.Is(err, io.EOF) {
			return buf, nil
		}
		if err != nil {
			clear(buf)
			return nil, err
		}
	}
}
