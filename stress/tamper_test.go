package stress

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// TestTampering edits the bbolt file while the vault is stopped, round after
// round on one directory: random bytes of single records flipped, records
// swapped between two users, a record's generation field moved to another
// generation, records cut short. Every request on a tampered backup (GET,
// the right PIN, a wrong PIN, a PIN change, the other user's PIN after a
// swap) must be refused with 500 integrity_error and carry no secret;
// untouched backups must still recover. Editing the store's 8-byte revision
// prefix is not tampering with the record (the record is intact), so edits
// land on the record itself. Rolling a record back to an older once-valid
// copy is rollback resistance's (docs/rollback.md), tested by the
// anchored scenarios.
func TestTampering(t *testing.T) {
	softhsmtest.Module(t)
	rounds := knob(t, "STRESS_TAMPER_ROUNDS", 2)
	const (
		perRound = 12 // backups enrolled each round
		tampered = 8  // of them edited
	)
	s := newTally(t, "tampering")
	defer s.summary()
	dir := t.TempDir()
	db := filepath.Join(dir, "keyvault.db")
	edits, refusals, requests := 0, 0, 0
	kinds := map[string]int{}

	for round := range rounds {
		s.run()
		v := startDevUnanchored(t, dir)
		c := newClient(v.API, v.Token)
		bs := make([]*tamperTarget, perRound)
		for i := range bs {
			b := &tamperTarget{user: randID(fmt.Sprintf("t%d-%d", round, i)), secret: randBytes(16 + mrand.IntN(64)), pin: randPIN("t")}
			// Some replaced, some with wrong guesses counted: records in
			// every state, not only fresh ones.
			for range 1 + mrand.IntN(2) {
				s.op(1)
				if r, err := c.enroll(b.user, b.secret, b.pin, 5); err != nil || r.Status >= 300 {
					t.Fatalf("enroll %s: %v %v", b.user, r, err)
				}
			}
			for range mrand.IntN(3) {
				s.op(1)
				if r, err := c.recover(b.user, "wrong-pin"); err != nil || r.Status != http.StatusForbidden {
					t.Fatalf("wrong guess on %s: %v %v", b.user, r, err)
				}
			}
			bs[i] = b
		}
		v.Stop()

		editStore(t, db, func(kv *bolt.Bucket) error {
			for i := 0; i < tampered; i++ {
				b := bs[i]
				k := recordKey("dev", b.user)
				val := bytes.Clone(kv.Get(k))
				if len(val) < revLen+62 {
					return fmt.Errorf("record of %s is %d bytes, shorter than the layout this test knows", b.user, len(val))
				}
				rec := val[revLen:]
				switch kind := []string{"flip", "flip", "swap", "generation", "truncate"}[mrand.IntN(5)]; {
				case kind == "swap" && i+1 < tampered:
					o := bs[i+1]
					ko := recordKey("dev", o.user)
					vo := bytes.Clone(kv.Get(ko))
					if err := errors.Join(kv.Put(k, vo), kv.Put(ko, val)); err != nil {
						return err
					}
					b.kind, o.kind, b.other, o.other = kind, kind, o, b
					kinds[kind] += 2
					edits += 2
					i++
					continue
				case kind == "generation":
					gen := binary.BigEndian.Uint64(rec[2:])
					binary.BigEndian.PutUint64(rec[2:], gen+uint64(mrand.IntN(2))*2-1)
					b.kind = kind
				case kind == "truncate":
					val = val[:revLen+mrand.IntN(len(rec))]
					b.kind = kind
				default:
					for range 1 + mrand.IntN(3) {
						rec[mrand.IntN(len(rec))] ^= byte(1 + mrand.IntN(255))
					}
					b.kind = "flip"
				}
				kinds[b.kind]++
				edits++
				if err := kv.Put(k, val); err != nil {
					return err
				}
			}
			return nil
		})

		v = startDevUnanchored(t, dir)
		c = newClient(v.API, v.Token)
		for _, b := range bs {
			if b.kind == "" {
				// Untouched: it must work as before.
				s.op(2)
				if r, err := c.status(b.user); err != nil || r.Status != http.StatusOK {
					s.violation("untouched %s: GET answered %v %v", b.user, r, err)
				}
				if r, err := c.recover(b.user, b.pin); err != nil || r.Status != http.StatusOK {
					s.violation("untouched %s: the right PIN answered %v %v", b.user, r, err)
				} else if a, _ := answerOf(r); a.Secret != b64(b.secret) {
					s.violation("untouched %s: the right PIN answered another secret", b.user)
				}
				continue
			}
			pins := []string{b.pin, "wrong-pin"}
			if b.other != nil {
				pins = append(pins, b.other.pin)
			}
			refused := true
			try := func(what string, r response, err error) {
				s.op(1)
				requests++
				a, _ := answerOf(r)
				switch {
				case err != nil:
					s.violation("%s %s (%s): %v", what, b.user, b.kind, err)
				case r.Status == http.StatusInternalServerError && a.Code == "integrity_error":
					refusals++
				default:
					refused = false
					s.violation("%s %s, tampered by %s: answered %v, want 500 integrity_error", what, b.user, b.kind, r)
				}
				for _, o := range bs {
					if bytes.Contains(r.Body, []byte(b64(o.secret))) {
						s.violation("%s %s (%s): the answer holds a secret", what, b.user, b.kind)
					}
				}
			}
			r, err := c.status(b.user)
			try("GET", r, err)
			for _, pin := range pins {
				r, err = c.recover(b.user, pin)
				try("recover", r, err)
				r, err = c.call(http.MethodPost, backupPath(b.user)+"/pin", map[string]string{"pin": pin, "new_pin": "new-pin-1234"})
				try("PIN change", r, err)
			}
			if !refused {
				s.violation("%s: a %s edit was not refused everywhere", b.user, b.kind)
			}
		}
		v.Stop()
		if err := checkDB(db); err != nil {
			s.violation("round %d: the DB fails its check: %v", round, err)
		}
	}
	s.note("edits=%d requests_on_tampered=%d refused=%d kinds=%v", edits, requests, refusals, kinds)
}

// tamperTarget is a backup of the tampering scenario and the edit it got.
type tamperTarget struct {
	user   string
	secret []byte
	pin    string
	kind   string        // "" when untouched
	other  *tamperTarget // the backup it swapped records with
}
