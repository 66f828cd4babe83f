package stress

import (
	"bytes"
	"encoding/binary"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestTamperingAnchored is the tampering scenario with rollback anchoring
// on (store.rollback_anchor): round after round on one directory, the
// stopped vault's bbolt file gets one edit — a record's bytes flipped, two
// records swapped, a record deleted, a record put back as it was a round
// earlier (rolled back), a deleted record revived, the anchor meta edited —
// and the vault must refuse the whole store at start (tamper), never serve
// it. The untouched file, put back, must then be served as it was.
func TestTamperingAnchored(t *testing.T) {
	softhsmtest.Module(t)
	rounds := knob(t, "STRESS_ANCHOR_TAMPER_ROUNDS", 2)
	s := newTally(t, "tampering-anchored")
	defer s.summary()
	dir := t.TempDir()
	db := filepath.Join(dir, "keyvault.db")
	startDev(t, dir).Stop()
	anchorOn(t, filepath.Join(dir, "keyvault.yaml"))
	kinds := map[string]int{}
	var users []string
	secrets := map[string][]byte{}
	var earlier []byte // the bbolt file a round ago

	for round := range rounds {
		s.run()
		v := startDev(t, dir)
		c := newClient(v.API, v.Token)
		// Every round changes the store: new backups, guesses, a delete.
		for i := range 4 {
			u := randID(fmt.Sprintf("a%d-%d", round, i))
			secrets[u] = randBytes(32)
			s.op(1)
			if r, err := c.enroll(u, secrets[u], "right-pin", 5); err != nil || r.Status != http.StatusCreated {
				t.Fatalf("enroll %s: %v %v", u, r, err)
			}
			users = append(users, u)
		}
		for _, u := range users[max(0, len(users)-6):] {
			s.op(1)
			if r, err := c.recover(u, "wrong-pin"); err != nil || (r.Status != http.StatusForbidden && r.Status != http.StatusGone) {
				t.Fatalf("wrong guess on %s: %v %v", u, r, err)
			}
		}
		gone := users[0]
		users = users[1:]
		s.op(1)
		if r, err := c.call(http.MethodDelete, backupPath(gone), nil); err != nil || r.Status != http.StatusNoContent {
			t.Fatalf("delete %s: %v %v", gone, r, err)
		}
		v.Stop()
		good, err := os.ReadFile(db)
		if err != nil {
			t.Fatal(err)
		}

		kind := tamperAnchored(t, db, users, gone, earlier)
		kinds[kind]++
		v = launchDev(t, dir)
		s.op(1)
		reason, _, err := v.WaitRefusal(startTimeout)
		switch {
		case err != nil:
			s.violation("round %d, %s: %v", round, kind, err)
		case reason != "tamper":
			s.violation("round %d, %s: refused for %s, want tamper", round, kind, reason)
		}
		v.Kill()

		if err := os.WriteFile(db, good, 0o600); err != nil {
			t.Fatal(err)
		}
		v = startDev(t, dir)
		c = newClient(v.API, v.Token)
		u := users[mrand.IntN(len(users))]
		s.op(1)
		if r, err := c.status(u); err != nil || r.Status != http.StatusOK {
			s.violation("round %d: the untouched store does not serve %s: %v %v", round, u, r, err)
		}
		v.Stop()
		earlier = good
	}
	s.note("edits=%d kinds=%v", rounds, kinds)
}

// anchorOn turns store.rollback_anchor on in a dev config (the default,
// said again so that the scenario does not hang on it).
func anchorOn(t testing.TB, cfg string) { t.Helper(); kvproc.SetRollbackAnchor(t, cfg, true) }

// launchDev starts keyvault dev on dir without waiting for it to serve.
func launchDev(t testing.TB, dir string) *vault {
	t.Helper()
	return kvproc.Launch(t, keyvaultBin, dir, kvproc.DevArgs(dir)...)
}

// tamperAnchored makes one edit of a kind the round picks and names it.
func tamperAnchored(t testing.TB, db string, users []string, gone string, earlier []byte) string {
	t.Helper()
	kinds := []string{"flip", "swap", "delete", "meta"}
	if earlier != nil {
		kinds = append(kinds, "rollback", "revive")
	}
	kind := kinds[mrand.IntN(len(kinds))]
	var old map[string][]byte // records of the earlier file, by key
	if kind == "rollback" || kind == "revive" {
		old = readRecords(t, earlier)
	}
	bdb, err := bolt.Open(db, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	err = bdb.Update(func(tx *bolt.Tx) error {
		kv, meta := tx.Bucket([]byte("kv")), tx.Bucket([]byte("meta"))
		a := recordKey("dev", users[mrand.IntN(len(users))])
		switch kind {
		case "flip":
			v := bytes.Clone(kv.Get(a))
			v[revLen+mrand.IntN(len(v)-revLen)] ^= byte(1 + mrand.IntN(255))
			return kv.Put(a, v)
		case "swap":
			b := recordKey("dev", users[mrand.IntN(len(users))])
			for bytes.Equal(a, b) && len(users) > 1 {
				b = recordKey("dev", users[mrand.IntN(len(users))])
			}
			va, vb := bytes.Clone(kv.Get(a)), bytes.Clone(kv.Get(b))
			if err := kv.Put(a, vb); err != nil {
				return err
			}
			return kv.Put(b, va)
		case "delete":
			return kv.Delete(a)
		case "meta":
			v := bytes.Clone(meta.Get([]byte("anchor")))
			seq := binary.BigEndian.Uint64(v[len(v)-32-8:])
			binary.BigEndian.PutUint64(v[len(v)-32-8:], seq-1)
			return meta.Put([]byte("anchor"), v)
		case "rollback":
			// A record as it was a round ago, if it existed then.
			for _, u := range users {
				k := recordKey("dev", u)
				if v, ok := old[string(k)]; ok && !bytes.Equal(v, kv.Get(k)) {
					return kv.Put(k, v)
				}
			}
			return fmt.Errorf("no record changed since the last round")
		default: // revive: the deleted backup as it was before its delete
			k := recordKey("dev", gone)
			v, ok := old[string(k)]
			if !ok {
				return fmt.Errorf("the deleted backup was not in the earlier file")
			}
			return kv.Put(k, v)
		}
	})
	if err != nil {
		t.Fatalf("%s edit: %v", kind, err)
	}
	return kind
}

// readRecords reads every record of a bbolt file's bytes.
func readRecords(t testing.TB, file []byte) map[string][]byte {
	t.Helper()
	path := filepath.Join(t.TempDir(), "earlier.db")
	if err := os.WriteFile(path, file, 0o600); err != nil {
		t.Fatal(err)
	}
	bdb, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	out := map[string][]byte{}
	bdb.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("kv")).ForEach(func(k, v []byte) error {
			out[string(k)] = bytes.Clone(v)
			return nil
		})
	})
	return out
}
