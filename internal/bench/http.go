package bench

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/keyvault/keyvault/client"
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

// user is one enrolled user as the load generator knows it. Each user
// belongs to one worker, so its state needs no lock.
type user struct {
	id     string
	pin    string
	secret []byte   // what the vault holds, as far as the answers tell
	maybe  [][]byte // secrets of enrolls whose outcome was not learnt
	wrongs int      // consecutive wrong guesses counted
}

// HTTP loads a running vault through the Go client, with retries off: the
// bench measures the vault's answers, not the client's patience.
type HTTP struct {
	kind   string
	setup  *client.Client // for the untimed enrolls: retries a shed request
	c      *client.Client
	tr     *http.Transport
	owned  [][]*user // per worker
	cursor []int     // per worker: index of the next user
	cur    []*user   // per worker: the user of the operation under way
	mix    []string  // per worker: the mixed operation under way
}

// escalatingFree stays below the default escalating delay's free guesses
// (5) and below any max_attempts of 5 or more, so "wrong" never trips them.
const escalatingFree = 4

// NewHTTP makes the workload and its users, with random PINs; it sends
// nothing. Its errors are those of the options.
func NewHTTP(o HTTPOptions) (*HTTP, error) {
	switch {
	case !slices.Contains(HTTPOps, o.Op):
		return nil, fmt.Errorf("the HTTP workload has no operation %q", o.Op)
	case o.Workers < 1 || o.Users < o.Workers:
		return nil, fmt.Errorf("%d users for %d workers: at least one each", o.Users, o.Workers)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = o.Workers * 2
	if o.RootCAs != nil {
		tr.TLSClientConfig = &tls.Config{RootCAs: o.RootCAs, MinVersion: tls.VersionTLS12}
	}
	newClient := func(retries int) (*client.Client, error) {
		return client.New(o.URL, o.Token,
			client.WithHTTPClient(&http.Client{Transport: tr, Timeout: 30 * time.Second}),
			client.WithRetry(retries, 50*time.Millisecond), client.WithUserAgent("keyvault-bench/1"))
	}
	// Set-up may retry a shed request; the measured load never does.
	setup, err := newClient(5)
	if err != nil {
		return nil, err
	}
	c, err := newClient(0)
	if err != nil {
		return nil, err
	}
	w := &HTTP{
		kind:   o.Op,
		setup:  setup,
		c:      c,
		tr:     tr,
		owned:  make([][]*user, o.Workers),
		cursor: make([]int, o.Workers),
		cur:    make([]*user, o.Workers),
		mix:    make([]string, o.Workers),
	}
	for i := range o.Users {
		u := &user{id: fmt.Sprintf("%s%07d", o.UserPrefix, i), pin: fmt.Sprintf("%06d", mrand.IntN(1e6)), secret: make([]byte, 32)}
		w.owned[i%o.Workers] = append(w.owned[i%o.Workers], u)
	}
	return w, nil
}

// EnrollAll enrolls every user, each worker its own, with a fresh counter.
func (w *HTTP) EnrollAll(ctx context.Context) error {
	var wg sync.WaitGroup
	errs := make([]error, len(w.owned))
	for i, users := range w.owned {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, u := range users {
				if errs[i] = enroll(ctx, w.setup, u); errs[i] != nil {
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

// Name is the operation.
func (w *HTTP) Name() string { return w.kind }

// Close closes the idle connections.
func (w *HTTP) Close() { w.tr.CloseIdleConnections() }

// Before picks the worker's next user and, when the next guess could be
// its escalatingFree+1-th wrong one in a row, resets it with an untimed
// right recover.
func (w *HTTP) Before(ctx context.Context, i int) error {
	users := w.owned[i]
	u := users[w.cursor[i]%len(users)]
	w.cursor[i]++
	w.cur[i] = u
	kind := w.kind
	if kind == "mixed" {
		switch n := mrand.IntN(10); {
		case n == 0:
			kind = "wrong"
		case n == 1:
			kind = "enroll"
		default:
			kind = "recover"
		}
		w.mix[i] = kind
	}
	if kind == "wrong" && u.wrongs >= escalatingFree {
		if err := w.recover(ctx, u); err != nil {
			return fmt.Errorf("reset %s before a wrong guess: %w", u.id, err)
		}
	}
	return nil
}

// Op performs the operation Before chose for worker i.
func (w *HTTP) Op(ctx context.Context, i int) error {
	u, kind := w.cur[i], w.kind
	if kind == "mixed" {
		kind = w.mix[i]
	}
	switch kind {
	case "enroll":
		return enroll(ctx, w.c, u)
	case "wrong":
		_, _, err := w.c.Recover(ctx, u.id, wrongPIN(u.pin))
		if errors.Is(err, client.ErrWrongPIN) {
			u.wrongs++
			return nil
		}
		return classify(err, "right_pin_accepted")
	default:
		return w.recover(ctx, u)
	}
}

// enroll replaces u's backup with a new secret. The bench expects the new
// secret only once the vault has taken it (200 or 201): a refused enroll
// (a 4xx such as 429) leaves the old one. One with no answer, or a 5xx,
// may have been written or not; the next recover tells which.
func enroll(ctx context.Context, c *client.Client, u *user) error {
	next := make([]byte, 32)
	rand.Read(next)
	_, _, err := c.Enroll(ctx, u.id, next, u.pin)
	var ce *client.Error
	switch {
	case err == nil:
		u.secret, u.maybe, u.wrongs = next, nil, 0
	case errors.As(err, &ce) && ce.Status >= 400 && ce.Status < 500:
	default:
		u.maybe = append(u.maybe, next)
	}
	return classify(err, "")
}

func (w *HTTP) recover(ctx context.Context, u *user) error {
	secret, _, err := w.c.Recover(ctx, u.id, u.pin)
	if err != nil {
		return classify(err, "")
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
	return classify(nil, "wrong_secret")
}

// wrongPIN is a PIN of the same length that differs from pin in its last
// digit.
func wrongPIN(pin string) string {
	last := pin[len(pin)-1]
	return pin[:len(pin)-1] + string('0'+(last-'0'+1)%10)
}
