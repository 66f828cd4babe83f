package bench

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/internal/loadgen"
)

// HTTPOps are the operations HTTP performs:
//
//	recover  recover with the right PIN; a wrong secret back is an error
//	enroll   replace the backup with a new secret
//	wrong    a wrong PIN, expected to answer 403; before a user's 5th wrong
//	         guess in a row, an untimed right recover resets its counter
//	mixed    per request: 80% recover, 10% wrong, 10% enroll
var HTTPOps = []string{"recover", "enroll", "wrong", "mixed"}

// HTTPOptions says which vault HTTP loads, and how.
type HTTPOptions struct {
	URL        string         // the API's base URL
	Token      string         // the bearer token
	RootCAs    *x509.CertPool // the CAs the vault's certificate chains to; nil: the system's
	Op         string         // one of HTTPOps
	Workers    int            // loadgen's Concurrency
	Users      int            // users to enroll, at least Workers
	UserPrefix string         // of the users' IDs
}

// user is one enrolled user as the load generator knows it, with its
// requests' targets and bodies written once. Each user belongs to one
// worker, so its state needs no lock. Its PIN and secrets are the bench's
// own random values, so its buffers are not wiped.
type user struct {
	id       string
	pin      string
	target   string // PUT target: /v1/backups/{id}
	recover  string // POST target: .../recover
	pinBody  []byte // {"pin":...}
	wrongPIN []byte // the same with a wrong PIN
	secret   []byte // what the vault holds, as far as the answers tell: its base64, as the JSON carries it
	maybe    [][]byte
	wrongs   int // consecutive wrong guesses counted
}

// worker is the state of one loadgen worker: its connection, its users
// and the request it writes.
type worker struct {
	conn   *loadgen.HTTPConn
	head   []byte // the header lines of every request, shared
	id     []byte // "X-Request-Id: bench-<worker>-", before a sequence number
	seq    uint64
	idLine []byte // the request ID's header line being written
	users  []*user
	cursor int    // index of the next user
	cur    *user  // the user of the operation under way
	mix    string // the mixed operation under way
	req    []byte // the request being written
	body   []byte // an enroll's body being written
	secret [32]byte
	rng    *mrand.ChaCha8 // draws enroll secrets
}

// HTTP loads a running vault. The untimed enrolls of EnrollAll go through
// the Go client, which retries a shed request. The measured requests are
// written whole on one keep-alive HTTP/1.1 connection per worker
// (loadgen.HTTPConn), with their bodies prepared once per user and no
// retries: the bench measures the vault's answers, and on a shared
// machine every microsecond the generator spends is one the vault does
// not get.
type HTTP struct {
	kind    string
	setup   *client.Client
	tr      *http.Transport
	workers []*worker
}

// escalatingFree stays below the default escalating delay's free guesses
// (5) and below any max_attempts of 5 or more, so "wrong" never trips them.
const escalatingFree = 4

// requestTimeout bounds one measured request, above the vault's own 25 s
// request limit.
const requestTimeout = 30 * time.Second

// NewHTTP makes the workload and its users, with random PINs; it sends
// nothing. Its errors are those of the options.
func NewHTTP(o HTTPOptions) (*HTTP, error) {
	switch {
	case !slices.Contains(HTTPOps, o.Op):
		return nil, fmt.Errorf("the HTTP workload has no operation %q", o.Op)
	case o.Workers < 1 || o.Users < o.Workers:
		return nil, fmt.Errorf("%d users for %d workers: at least one each", o.Users, o.Workers)
	}
	var tlsConfig *tls.Config
	if o.RootCAs != nil {
		tlsConfig = &tls.Config{RootCAs: o.RootCAs, MinVersion: tls.VersionTLS12}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = o.Workers
	tr.TLSClientConfig = tlsConfig
	// Set-up retries a shed request; the measured load never does. The
	// client also checks the URL and the token.
	setup, err := client.New(o.URL, o.Token,
		client.WithHTTPClient(&http.Client{Transport: tr, Timeout: requestTimeout}),
		client.WithRetry(5, 50*time.Millisecond), client.WithUserAgent(userAgent))
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(o.URL)
	if err != nil {
		return nil, err
	}
	prefix := strings.TrimRight(u.EscapedPath(), "/")
	head := []byte("Host: " + u.Host + "\r\nAuthorization: Bearer " + o.Token + "\r\nContent-Type: application/json\r\n" +
		"Accept: application/json, application/problem+json\r\nUser-Agent: " + userAgent + "\r\n")
	w := &HTTP{kind: o.Op, setup: setup, tr: tr, workers: make([]*worker, o.Workers)}
	for i := range w.workers {
		conn, err := loadgen.NewHTTPConn(o.URL, tlsConfig, requestTimeout)
		if err != nil {
			return nil, err
		}
		var seed [32]byte
		rand.Read(seed[:])
		w.workers[i] = &worker{conn: conn, head: head, id: fmt.Appendf(nil, "X-Request-Id: bench-%d-", i), rng: mrand.NewChaCha8(seed)}
	}
	for i := range o.Users {
		id := fmt.Sprintf("%s%07d", o.UserPrefix, i)
		pin := fmt.Sprintf("%06d", mrand.IntN(1e6))
		u := &user{id: id, pin: pin, target: prefix + "/v1/backups/" + id, recover: prefix + "/v1/backups/" + id + "/recover",
			pinBody: []byte(`{"pin":"` + pin + `"}`), wrongPIN: []byte(`{"pin":"` + wrongPIN(pin) + `"}`),
			secret: base64.StdEncoding.AppendEncode(nil, make([]byte, 32))}
		wk := w.workers[i%o.Workers]
		wk.users = append(wk.users, u)
	}
	return w, nil
}

const userAgent = "keyvault-bench/1"

// EnrollAll enrolls every user, each worker its own, with a fresh counter.
func (w *HTTP) EnrollAll(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, len(w.workers))
	for i, wk := range w.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, u := range wk.users {
				if errs[i] = setupEnroll(ctx, w.setup, u); errs[i] != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("enroll the bench users: %w", err)
	}
	return nil
}

// setupEnroll enrolls u with a new secret through the client.
func setupEnroll(ctx context.Context, c *client.Client, u *user) error {
	next := make([]byte, 32)
	rand.Read(next)
	if _, _, err := c.Enroll(ctx, u.id, next, u.pin); err != nil {
		return classify(err, "")
	}
	u.secret, u.maybe, u.wrongs = base64.StdEncoding.AppendEncode(nil, next), nil, 0
	return nil
}

// Name is the operation.
func (w *HTTP) Name() string { return w.kind }

// Close closes the connections.
func (w *HTTP) Close() {
	for _, wk := range w.workers {
		wk.conn.Close()
	}
	w.tr.CloseIdleConnections()
}

// Before picks the worker's next user and, when the next guess could be
// its escalatingFree+1-th wrong one in a row, resets it with an untimed
// right recover. A reset a limit refuses is that turn's answer: it counts
// as rate_limited, and the wrong guess is not sent. Any other failed reset
// ends the run.
func (w *HTTP) Before(ctx context.Context, i int) error {
	wk := w.workers[i]
	u := wk.users[wk.cursor%len(wk.users)]
	wk.cursor++
	wk.cur = u
	kind := w.kind
	if kind == "mixed" {
		switch n := wk.rng.Uint64() % 10; {
		case n == 0:
			kind = "wrong"
		case n == 1:
			kind = "enroll"
		default:
			kind = "recover"
		}
		wk.mix = kind
	}
	if kind == "wrong" && u.wrongs >= escalatingFree {
		if err := wk.recover(ctx, u); err != nil {
			err = fmt.Errorf("reset %s before a wrong guess: %w", u.id, err)
			if loadgen.Code(err) == client.CodeRateLimited {
				return &loadgen.Outcome{Err: err}
			}
			return err
		}
	}
	return nil
}

// Op performs the operation Before chose for worker i.
func (w *HTTP) Op(ctx context.Context, i int) error {
	wk := w.workers[i]
	u, kind := wk.cur, w.kind
	if kind == "mixed" {
		kind = wk.mix
	}
	switch kind {
	case "enroll":
		return wk.enroll(ctx, u)
	case "wrong":
		status, body, err := wk.do(ctx, "POST", u.recover, u.wrongPIN)
		switch {
		case err != nil:
			return transportError("wrong", err)
		case status == http.StatusForbidden && bytes.Contains(body, []byte(`"code":"wrong_pin"`)):
			u.wrongs++
			return nil
		case status == http.StatusOK:
			return &codedError{code: "right_pin_accepted"}
		}
		return answerError("wrong", status, body)
	default:
		return wk.recover(ctx, u)
	}
}

// do sends one request of the worker, with a request ID of its own.
func (wk *worker) do(ctx context.Context, method, target string, body []byte) (int, []byte, error) {
	wk.seq++
	wk.idLine = strconv.AppendUint(append(wk.idLine[:0], wk.id...), wk.seq, 10)
	wk.idLine = append(wk.idLine, "\r\n"...)
	wk.req = loadgen.AppendRequest(wk.req[:0], method, target, body, wk.head, wk.idLine)
	return wk.conn.Do(ctx, wk.req)
}

// enroll replaces u's backup with a new secret. The bench expects the new
// secret only once the vault has taken it (200 or 201): a refused enroll
// (a 4xx such as 429) leaves the old one. One with no answer, or a 5xx,
// may have been written or not; the next recover tells which.
func (wk *worker) enroll(ctx context.Context, u *user) error {
	wk.rng.Read(wk.secret[:])
	next := base64.StdEncoding.AppendEncode(make([]byte, 0, base64.StdEncoding.EncodedLen(len(wk.secret))), wk.secret[:])
	b := append(wk.body[:0], `{"secret":"`...)
	b = append(b, next...)
	b = append(b, `","pin":"`...)
	b = append(b, u.pin...)
	wk.body = append(b, `"}`...)
	status, body, err := wk.do(ctx, "PUT", u.target, wk.body)
	switch {
	case err != nil:
		u.maybe = append(u.maybe, next)
		return transportError("enroll", err)
	case status == http.StatusOK || status == http.StatusCreated:
		u.secret, u.maybe, u.wrongs = next, nil, 0
		return nil
	case status >= 400 && status < 500:
	default:
		u.maybe = append(u.maybe, next)
	}
	return answerError("enroll", status, body)
}

// recover recovers u's secret and checks it is the one the vault was
// last seen to take, or one whose enroll had no known outcome.
func (wk *worker) recover(ctx context.Context, u *user) error {
	status, body, err := wk.do(ctx, "POST", u.recover, u.pinBody)
	if err != nil {
		return transportError("recover", err)
	}
	if status != http.StatusOK {
		return answerError("recover", status, body)
	}
	secret, ok := secretOf(body)
	if !ok {
		// The body of a 200 may hold a secret in a form secretOf missed:
		// its size is told, not its bytes.
		return &codedError{code: "bad_answer", err: fmt.Errorf("recover: the 200 answer (%d bytes) holds no secret", len(body))}
	}
	u.wrongs = 0
	if subtle.ConstantTimeCompare(secret, u.secret) == 1 {
		u.maybe = nil
		return nil
	}
	for _, m := range u.maybe {
		if subtle.ConstantTimeCompare(secret, m) == 1 {
			u.secret, u.maybe = m, nil
			return nil
		}
	}
	return &codedError{code: "wrong_secret"}
}

// secretOf finds the secret in a recover's answer, as the JSON string
// carries it (standard base64, which JSON never escapes): directly in
// the vault's compact JSON, else by decoding it.
func secretOf(body []byte) ([]byte, bool) {
	const key = `"secret":"`
	if i := bytes.Index(body, []byte(key)); i >= 0 {
		rest := body[i+len(key):]
		if j := bytes.IndexByte(rest, '"'); j >= 0 && bytes.IndexByte(rest[:j], '\\') < 0 {
			return rest[:j], true
		}
	}
	var j struct {
		Secret *string `json:"secret"`
	}
	if json.Unmarshal(body, &j) != nil || j.Secret == nil {
		return nil, false
	}
	return []byte(*j.Secret), true
}

// answerError codes an answer other than the expected one by its
// problem code, or by its HTTP status when it is not a problem document.
func answerError(op string, status int, body []byte) error {
	var p struct {
		Code   string `json:"code"`
		Title  string `json:"title"`
		Detail string `json:"detail"`
	}
	if json.Unmarshal(body, &p) != nil || p.Code == "" {
		return &codedError{code: fmt.Sprintf("http_%d", status), err: fmt.Errorf("%s: %d %s", op, status, http.StatusText(status))}
	}
	e := &codedError{code: p.Code, err: fmt.Errorf("%s: %d %s: %s", op, status, p.Title, p.Detail)}
	if p.Code == client.CodeRateLimited {
		e.limiter = limiterOf(p.Detail)
	}
	return e
}

// transportError codes a request that got no answer: "timeout" when its
// time or the run's ran out, else "transport".
func transportError(op string, err error) error {
	code := "transport"
	if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		code = "timeout"
	}
	return &codedError{code: code, err: fmt.Errorf("%s: %w", op, err)}
}

// wrongPIN is a PIN of the same length that differs from pin in its last
// digit.
func wrongPIN(pin string) string {
	last := pin[len(pin)-1]
	return pin[:len(pin)-1] + string('0'+(last-'0'+1)%10)
}
