package e2e

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestTamper edits the bbolt file behind the vault's back: (a) user A's
// guess counter is set back to zero with the old MAC kept, (b) user B's
// record is copied onto user C's key, (c) user D's record is cut short.
// After a restart every use of A, C and D answers 500 integrity_error and
// never a secret, the integrity metric counts the refusals, and B still
// works.
func TestTamper(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	db := filepath.Join(dir, "keyvault.db")
	v := startDevUnanchored(t, dir)
	c := newClient(t, v.API, v.Token)

	a := enrolled{randID("tamper-a"), randBytes(32), randPIN("pa")}
	b := enrolled{randID("tamper-b"), randBytes(32), randPIN("pb")}
	cc := enrolled{randID("tamper-c"), randBytes(32), randPIN("pc")}
	d := enrolled{randID("tamper-d"), randBytes(32), randPIN("pd")}
	for _, e := range []enrolled{a, b, cc, d} {
		c.mustEnroll(t, http.StatusCreated, e.user, e.secret, e.pin, 10)
	}
	for range 3 {
		wantProblem(t, "wrong guess on A", c.recover(t, a.user, "wrong-pin"), http.StatusForbidden, "wrong_pin")
	}
	samples, _ := metrics(t, v.Admin)
	before, _ := metricSum(samples, "keyvault_integrity_failures_total", nil)
	v.Stop()

	// Edit the file while no vault runs.
	editStore(t, db, func(kv *bolt.Bucket) error {
		ka, kb, kc := recordKey("dev", a.user), recordKey("dev", b.user), recordKey("dev", cc.user)
		va, vb := bytes.Clone(kv.Get(ka)), bytes.Clone(kv.Get(kb))
		if va == nil || vb == nil || kv.Get(kc) == nil {
			return errors.New("a record is missing")
		}
		maxA, guesses, forgiven, refunds := counters(va)
		if maxA != 10 || guesses-forgiven-refunds != 3 || va[offFlags] != 0 {
			return errors.New("A's counter is not 3 of 10 used: the record layout is not the one this test knows")
		}
		// (a) Three wrong guesses forgotten; the MAC at the end stays.
		binary.BigEndian.PutUint32(va[offGuesses:], forgiven+refunds)
		if err := kv.Put(ka, va); err != nil {
			return err
		}
		// (b) B's record, revision and MAC included, under C's key.
		if err := kv.Put(kc, vb); err != nil {
			return err
		}
		// (c) D's revision, then 20 bytes of its record.
		kd := recordKey("dev", d.user)
		vd := bytes.Clone(kv.Get(kd))
		if len(vd) < 28 {
			return errors.New("D's record is missing")
		}
		return kv.Put(kd, vd[:28])
	})

	v = startDevUnanchored(t, dir)
	c = newClient(t, v.API, v.Token)
	secrets := [][]byte{a.secret, b.secret, cc.secret, d.secret}
	refused := 0
	refuse := func(what string, r response) {
		t.Helper()
		refused++
		wantProblem(t, what, r, http.StatusInternalServerError, "integrity_error")
		for _, s := range secrets {
			if n := findEncoded(r.Body, s); n != "" {
				t.Errorf("%s: the answer holds a secret (%s): %s", what, n, r.Body)
			}
		}
	}
	for _, tc := range []struct {
		name string
		user string
		pins []string
	}{
		{"A (counter reset by hand)", a.user, []string{a.pin, "wrong-pin"}},
		{"C (B's record moved onto C)", cc.user, []string{cc.pin, b.pin, "wrong-pin"}},
		{"D (record cut short)", d.user, []string{d.pin}},
	} {
		refuse(tc.name+": GET", c.status(t, tc.user))
		for _, pin := range tc.pins {
			refuse(tc.name+": recover", c.recover(t, tc.user, pin))
			refuse(tc.name+": PIN change", c.changePIN(t, tc.user, pin, "new-pin-1234"))
		}
		refuse(tc.name+": GET again", c.status(t, tc.user))
	}

	// B is untouched and works.
	if g := c.mustStatus(t, b.user); num(t, g, "attempts_remaining") != 10 {
		t.Errorf("B: %v", g)
	}
	c.mustRecover(t, b.user, b.pin, b.secret)

	samples, _ = metrics(t, v.Admin)
	after, ok := metricSum(samples, "keyvault_integrity_failures_total", nil)
	if !ok || after < float64(refused) {
		t.Errorf("keyvault_integrity_failures_total = %v (present %v, %v before the restart), want >= %d refused requests", after, ok, before, refused)
	}
	if n, ok := metricSum(samples, "keyvault_http_requests_total", map[string]string{"code": "500"}); !ok || n < float64(refused) {
		t.Errorf("keyvault_http_requests_total{code=500} = %v, want >= %d", n, refused)
	}
	v.Stop()
	checkDB(t, db)
}

// TestTamperShortValue cuts a backup's stored value to fewer bytes than the
// store's own 8-byte revision prefix: damaged data like any other edit, so
// it must be refused with integrity_error and counted, not reported as a
// passing outage (503 "retry later") that no integrity alert sees.
func TestTamperShortValue(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	db := filepath.Join(dir, "keyvault.db")
	v := startDevUnanchored(t, dir)
	c := newClient(t, v.API, v.Token)
	e := enrolled{randID("short"), randBytes(32), randPIN("pe")}
	ok := enrolled{randID("intact"), randBytes(32), randPIN("pk")}
	for _, x := range []enrolled{e, ok} {
		c.mustEnroll(t, http.StatusCreated, x.user, x.secret, x.pin, 10)
	}
	v.Stop()

	editStore(t, db, func(kv *bolt.Bucket) error {
		k := recordKey("dev", e.user)
		val := bytes.Clone(kv.Get(k))
		if len(val) < 8 {
			return errors.New("the record is missing")
		}
		return kv.Put(k, val[:5])
	})

	v = startDevUnanchored(t, dir)
	c = newClient(t, v.API, v.Token)
	refused := 0
	for _, tc := range []struct {
		what string
		r    response
	}{
		{"GET", c.status(t, e.user)},
		{"recover", c.recover(t, e.user, e.pin)},
		{"PIN change", c.changePIN(t, e.user, e.pin, "new-pin-1234")},
	} {
		refused++
		wantProblem(t, tc.what+" of a value cut short", tc.r, http.StatusInternalServerError, "integrity_error")
		if findEncoded(tc.r.Body, e.secret) != "" {
			t.Errorf("%s: the answer holds the secret", tc.what)
		}
	}
	c.mustRecover(t, ok.user, ok.pin, ok.secret)
	samples, _ := metrics(t, v.Admin)
	if n, _ := metricSum(samples, "keyvault_integrity_failures_total", nil); n < float64(refused) {
		t.Errorf("keyvault_integrity_failures_total = %v, want >= %d", n, refused)
	}
	v.Stop()
	checkDB(t, db)
}

// editStore edits the bbolt file's "kv" bucket in one transaction, while
// no vault runs.
func editStore(t *testing.T, path string, edit func(kv *bolt.Bucket) error) {
	t.Helper()
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	err = bdb.Update(func(tx *bolt.Tx) error {
		kv := tx.Bucket([]byte("kv"))
		if kv == nil {
			return errors.New(`no bucket "kv"`)
		}
		return edit(kv)
	})
	if cerr := bdb.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatalf("editing the store: %v", err)
	}
}
