package client

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// A request body is wiped only when the call and every reader the
// transport took are done with it, and a late read gets an error, not
// zeros.
func TestWipeBuffer(t *testing.T) {
	secret := []byte(`{"pin":"2468"}`)
	w := newWipeBuffer(secret)
	r1, err := w.reader()
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(r1)
	if err != nil || string(got) != `{"pin":"2468"}` {
		t.Fatalf("read %q, %v", got, err)
	}
	r2, err := w.reader() // as GetBody would, for a resend
	if err != nil {
		t.Fatal(err)
	}
	w.release() // the call returned; the transport still holds r1 and r2
	if !bytes.Contains(secret, []byte("2468")) {
		t.Fatal("wiped while a reader was open")
	}
	r1.Close()
	r1.Close() // twice is harmless
	if !bytes.Contains(secret, []byte("2468")) {
		t.Fatal("wiped while a reader was open")
	}
	r2.Close()
	if !bytes.Equal(secret, make([]byte, len(secret))) {
		t.Fatalf("not wiped after the last reader closed: %q", secret)
	}
	if _, err := r2.Read(make([]byte, 4)); err == nil {
		t.Fatal("a read after Close succeeded")
	}
	if _, err := w.reader(); err == nil {
		t.Fatal("a new reader of a wiped buffer")
	}
}

func TestReadBody(t *testing.T) {
	long := strings.Repeat("x", 3000)
	for _, tc := range []struct {
		name  string
		body  string
		hint  int64
		limit int
		ok    bool
	}{
		{"empty", "", 0, 100, true},
		{"exact hint", "hello", 5, 100, true},
		{"unknown length", long, -1, 4000, true},
		{"wrong hint", long, 10, 4000, true},
		{"at the limit", long, -1, 3000, true},
		{"over the limit", long, -1, 2999, false},
		{"over the limit with hint", long, 3000, 2999, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := readBody(iotest.HalfReader(strings.NewReader(tc.body)), tc.limit, tc.hint)
			if tc.ok && (err != nil || string(got) != tc.body) {
				t.Fatalf("got %d bytes, %v; want %d bytes", len(got), err, len(tc.body))
			}
			if !tc.ok && !errors.Is(err, errResponseTooLarge) {
				t.Fatalf("got %d bytes, %v; want errResponseTooLarge", len(got), err)
			}
		})
	}
	if _, err := readBody(iotest.ErrReader(io.ErrUnexpectedEOF), 100, -1); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read error: got %v", err)
	}
}
