package server

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/anchor"
	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/vault/boltstore"
)

// An etcd config is refused as a config error before anything opens.
func TestOpenAnchorAdminRefusesEtcd(t *testing.T) {
	cfg := &config.Config{Store: config.Store{Driver: config.DriverEtcd}}
	a, err := OpenAnchorAdmin(context.Background(), cfg, slog.New(slog.DiscardHandler))
	if err == nil {
		a.Close()
		t.Fatal("an etcd config opened")
	}
	if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), "bbolt only") {
		t.Errorf("error %v: want a config error saying anchoring is bbolt only", err)
	}
}

// The anchor commands' path after a restore: the status of a store
// changed behind its anchors is refused, an accept makes it pass and is
// audited with its reason, and a second accept, with nothing to accept,
// fails and is audited as failed.
func TestAnchorAdminAcceptsRestore(t *testing.T) {
	k := newKit(t, "server-anchoradmin")
	r := k.start(t)
	if r.api == "" {
		t.Fatalf("a fresh store was not served: %v\n%s", <-r.done, r.log)
	}
	if err := r.shutdown(t); err != nil {
		t.Fatal(err)
	}
	st, err := boltstore.Open(boltstore.Options{Path: k.storePath})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.CompareAndSwap(context.Background(), []byte("r/test/restored"), 0, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}

	ctx := context.Background()
	var log bytes.Buffer
	a, err := OpenAnchorAdmin(ctx, k.cfg, slog.New(slog.NewJSONHandler(&log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	before, err := a.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := anchor.IsRefused(before.Err); !ok {
		t.Fatalf("status of the changed store: %v, want a refusal", before.Err)
	}
	acc, err := a.Accept(ctx, "restored from backup", io.Discard)
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	after, err := a.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if after.Err != nil || after.Meta == nil || after.Meta.Epoch != acc.Epoch {
		t.Errorf("status after the accept: %v, meta %+v; want it to pass at epoch %d", after.Err, after.Meta, acc.Epoch)
	}
	if !strings.Contains(log.String(), "the restored store is now the vault's truth") {
		t.Errorf("the log does not say the store was accepted:\n%s", log.String())
	}
	if _, err := a.Accept(ctx, "again", io.Discard); err == nil {
		t.Error("a second accept of a store that passes succeeded")
	}
	trail, err := os.ReadFile(k.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`"op":"rollback_accept","result":"success","reason":"restored from backup"`,
		`"op":"rollback_accept","result":"failed","reason":"again"`,
	} {
		if !bytes.Contains(trail, []byte(want)) {
			t.Errorf("the audit trail lacks %s:\n%s", want, trail)
		}
	}
}
