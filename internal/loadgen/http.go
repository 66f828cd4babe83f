package loadgen

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"time"
)

// HTTPConn is one worker's HTTP/1.1 connection to one server, kept alive
// from request to request and dialled again after a failure. The caller
// writes each request whole (AppendRequest), HTTPConn sends it in one
// write and reads the answer into a buffer it reuses: a request costs the
// generator a write, a read and no allocation, so that a co-located run
// measures the server rather than the generator. It is not safe for
// concurrent use; each worker has its own. It understands what a Go
// net/http server answers (a Content-Length or chunked body, "Connection:
// close"), not HTTP/1.1 in full: no 1xx answers, no trailers.
type HTTPConn struct {
	addr    string      // host:port to dial
	tls     *tls.Config // nil: plain TCP
	timeout time.Duration

	conn    net.Conn
	br      *bufio.Reader
	watched context.Context // the context whose end breaks off conn's request
	stop    func() bool     // ends that watch
	body    []byte          // the last answer's body
}

// MaxResponseBytes bounds an answer's body.
const MaxResponseBytes = 64 << 10

// NewHTTPConn makes a connection to the server of base (http:// or
// https://; the path is the caller's), dialled at the first request.
// With https it speaks TLS with tlsConfig (nil: the system's roots),
// offering HTTP/1.1 alone. Each request must be answered within timeout.
func NewHTTPConn(base string, tlsConfig *tls.Config, timeout time.Duration) (*HTTPConn, error) {
	u, err := url.Parse(base)
	if err != nil {
		return nil, err
	}
	c := &HTTPConn{addr: u.Host, timeout: timeout}
	switch u.Scheme {
	case "http":
		if u.Port() == "" {
			c.addr = net.JoinHostPort(u.Hostname(), "80")
		}
	case "https":
		if u.Port() == "" {
			c.addr = net.JoinHostPort(u.Hostname(), "443")
		}
		cfg := &tls.Config{MinVersion: tls.VersionTLS12}
		if tlsConfig != nil {
			cfg = tlsConfig.Clone()
		}
		if cfg.ServerName == "" {
			cfg.ServerName = u.Hostname()
		}
		cfg.NextProtos = []string{"http/1.1"}
		c.tls = cfg
	default:
		return nil, fmt.Errorf("%q: not an http:// or https:// URL", u.Scheme)
	}
	return c, nil
}

// Close closes the connection; the next request dials again.
func (c *HTTPConn) Close() {
	if c.conn == nil {
		return
	}
	c.stop()
	c.conn.Close()
	c.conn, c.br = nil, nil
}

func (c *HTTPConn) dial(ctx context.Context) error {
	d := net.Dialer{Timeout: c.timeout}
	conn, err := d.DialContext(ctx, "tcp", c.addr)
	if err != nil {
		return err
	}
	if c.tls != nil {
		tc := tls.Client(conn, c.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return err
		}
		conn = tc
	}
	c.conn, c.br = conn, bufio.NewReaderSize(conn, 8<<10)
	c.watch(ctx)
	return nil
}

// watch makes the end of ctx break off the request under way on the
// connection: one watch per connection and context, not one per request.
func (c *HTTPConn) watch(ctx context.Context) {
	conn := c.conn
	c.watched = ctx
	c.stop = context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
}

// Do sends req, a whole HTTP/1.1 request, and returns the answer's status
// and body. The body is valid until the next call. After any error the
// connection is closed; whether the server got the request is unknown.
func (c *HTTPConn) Do(ctx context.Context, req []byte) (status int, body []byte, err error) {
	if c.conn != nil && ctx != c.watched {
		// The watch of an ended context may be about to break the
		// connection off: then it is dialled again.
		if c.stop() {
			c.watch(ctx)
		} else {
			c.Close()
		}
	}
	if c.conn == nil {
		if err := c.dial(ctx); err != nil {
			return 0, nil, err
		}
	}
	if err := ctx.Err(); err != nil {
		return 0, nil, err
	}
	status, body, keep, err := c.roundTrip(req)
	if err != nil {
		c.Close()
		if ctx.Err() != nil {
			err = fmt.Errorf("%w: %w", ctx.Err(), err)
		}
		return 0, nil, err
	}
	if !keep {
		c.Close()
	}
	return status, body, nil
}

var (
	errMalformed = errors.New("malformed HTTP answer")
	errTooLarge  = errors.New("HTTP answer body too large")
)

func (c *HTTPConn) roundTrip(req []byte) (status int, body []byte, keep bool, err error) {
	if err := c.conn.SetDeadline(time.Now().Add(c.timeout)); err != nil {
		return 0, nil, false, err
	}
	if _, err := c.conn.Write(req); err != nil {
		return 0, nil, false, err
	}
	line, err := c.br.ReadSlice('\n')
	if err != nil {
		return 0, nil, false, err
	}
	// "HTTP/1.1 200 OK\r\n"
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.")) || line[8] != ' ' {
		return 0, nil, false, errMalformed
	}
	for _, d := range line[9:12] {
		if d < '0' || d > '9' {
			return 0, nil, false, errMalformed
		}
		status = status*10 + int(d-'0')
	}
	keep = line[7] == '1' // HTTP/1.0 closes by default
	length, chunked := -1, false
	for {
		line, err := c.br.ReadSlice('\n')
		if err != nil {
			return 0, nil, false, err
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			break
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			return 0, nil, false, errMalformed
		}
		value = bytes.TrimSpace(value)
		switch {
		case asciiEqualFold(name, "Content-Length"):
			n, err := strconv.Atoi(string(value))
			if err != nil || n < 0 {
				return 0, nil, false, errMalformed
			}
			length = n
		case asciiEqualFold(name, "Transfer-Encoding"):
			chunked = asciiEqualFold(value, "chunked")
			if !chunked {
				return 0, nil, false, errMalformed
			}
		case asciiEqualFold(name, "Connection"):
			if asciiEqualFold(value, "close") {
				keep = false
			}
		}
	}
	c.body = c.body[:0]
	switch {
	case status == 204 || status == 304:
	case chunked:
		err = c.readChunked()
	case length >= 0:
		err = c.readN(length)
	default: // the body ends with the connection
		keep = false
		err = c.readN(-1)
	}
	if err != nil {
		return 0, nil, false, err
	}
	return status, c.body, keep, nil
}

// readN appends n bytes of body, or every byte up to EOF when n < 0.
func (c *HTTPConn) readN(n int) error {
	if n < 0 {
		b, err := io.ReadAll(io.LimitReader(c.br, MaxResponseBytes+1))
		if err != nil {
			return err
		}
		if len(b) > MaxResponseBytes {
			return errTooLarge
		}
		c.body = append(c.body, b...)
		return nil
	}
	if len(c.body)+n > MaxResponseBytes {
		return errTooLarge
	}
	start := len(c.body)
	c.body = append(c.body, make([]byte, n)...)[:start+n]
	_, err := io.ReadFull(c.br, c.body[start:])
	return err
}

func (c *HTTPConn) readChunked() error {
	for {
		line, err := c.br.ReadSlice('\n')
		if err != nil {
			return err
		}
		size, _, _ := bytes.Cut(bytes.TrimRight(line, "\r\n"), []byte(";"))
		n, err := strconv.ParseInt(string(bytes.TrimSpace(size)), 16, 32)
		if err != nil || n < 0 {
			return errMalformed
		}
		if n > 0 {
			if err := c.readN(int(n)); err != nil {
				return err
			}
		}
		// The CRLF after a chunk's data, or after the last chunk (no
		// trailers).
		if line, err = c.br.ReadSlice('\n'); err != nil {
			return err
		}
		if len(bytes.TrimRight(line, "\r\n")) != 0 {
			return errMalformed
		}
		if n == 0 {
			return nil
		}
	}
}

// asciiEqualFold compares a header name or token with s, ignoring ASCII
// case, without allocating.
func asciiEqualFold(b []byte, s string) bool {
	if len(b) != len(s) {
		return false
	}
	for i := range len(b) {
		x, y := b[i], s[i]
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// AppendRequest appends to dst an HTTP/1.1 request: the request line of
// method and target (the path and query), the header lines of each head
// (each line "Name: value\r\n", Host among them), a Content-Length, and
// body.
func AppendRequest(dst []byte, method, target string, body []byte, head ...[]byte) []byte {
	dst = append(dst, method...)
	dst = append(dst, ' ')
	dst = append(dst, target...)
	dst = append(dst, " HTTP/1.1\r\n"...)
	for _, h := range head {
		dst = append(dst, h...)
	}
	dst = append(dst, "Content-Length: "...)
	dst = strconv.AppendInt(dst, int64(len(body)), 10)
	dst = append(dst, "\r\n\r\n"...)
	return append(dst, body...)
}
