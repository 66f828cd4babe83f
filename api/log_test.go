package api

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"log/slog"
	"strings"
	"testing"

	"github.com/keyvault/keyvault/vault"
)

// The request log and the audit events, line by line: the fields, their
// order and their values (time and durations aside) are what operators'
// queries and routing read.
func TestLogLines(t *testing.T) {
	t.Parallel()
	var logBuf, auditBuf bytes.Buffer
	// Time and durations vary; everything else is compared exactly.
	steady := func(_ []string, a slog.Attr) slog.Attr {
		switch a.Key {
		case slog.TimeKey:
			return slog.Attr{}
		case "duration_ms":
			return slog.Float64("duration_ms", 0)
		}
		return a
	}
	opts := &slog.HandlerOptions{ReplaceAttr: steady}
	tokA := sha256.Sum256([]byte("token-a"))
	s := &logIDStub{}
	h := NewRouter(s, Options{
		Logger:  slog.New(slog.NewJSONHandler(&logBuf, opts)),
		Audit:   slog.New(slog.NewJSONHandler(&auditBuf, opts)),
		Clients: []Client{{Name: "a", Namespace: "ns-a", TokenHashes: [][32]byte{tokA}}},
	})
	s.secretOut = []byte("0123456789abcdef")
	do(h, "POST", "/v1/backups/alice/recover", "token-a", `{"pin":"1234"}`, "X-Request-Id", "req-1")
	do(h, "POST", "/v1/backups/alice/recover", "token-a", `{"pin":"1234","PIN":"5678"}`, "X-Request-Id", "req-2")
	do(h, "GET", "/v1/backups/alice", "token-x", "", "X-Request-Id", "req-3")
	do(h, "PATCH", "/v1/backups/alice", "token-a", "", "X-Request-Id", "req-4")
	do(h, "GET", "/nowhere", "", "", "X-Request-Id", "req-5")
	s.err = errors.New("store: disk on fire")
	do(h, "DELETE", "/v1/backups/alice", "token-a", "", "X-Request-Id", "req-6")
	s.err = &vault.WrongPINError{Remaining: 2}
	do(h, "POST", "/v1/backups/alice/pin", "token-a", `{"pin":"1234","new_pin":"5678"}`, "X-Request-Id", "req-7")

	wantLog := `{"level":"INFO","msg":"request","request_id":"req-1","client":"a","method":"POST","route":"/v1/backups/{user_id}/recover","status":200,"duration_ms":0}
{"level":"INFO","msg":"request","request_id":"req-2","client":"a","method":"POST","route":"/v1/backups/{user_id}/recover","status":400,"duration_ms":0}
{"level":"INFO","msg":"request","request_id":"req-3","method":"GET","route":"/v1/*","status":401,"duration_ms":0}
{"level":"INFO","msg":"request","request_id":"req-4","client":"a","method":"other","route":"/v1/*","status":405,"duration_ms":0}
{"level":"INFO","msg":"request","request_id":"req-5","method":"GET","route":"unmatched","status":404,"duration_ms":0}
{"level":"ERROR","msg":"internal error","request_id":"req-6","client":"a","error":"store: disk on fire"}
{"level":"INFO","msg":"request","request_id":"req-6","client":"a","method":"DELETE","route":"/v1/backups/{user_id}","status":500,"duration_ms":0}
{"level":"INFO","msg":"request","request_id":"req-7","client":"a","method":"POST","route":"/v1/backups/{user_id}/pin","status":403,"duration_ms":0}
`
	wantAudit := `{"level":"INFO","msg":"audit","request_id":"req-1","client":"a","op":"recover","namespace":"ns-a","user":"h(ns-a)","result":"success","duration_ms":0}
{"level":"INFO","msg":"audit","request_id":"req-2","client":"a","op":"recover","namespace":"ns-a","user":"h(ns-a)","result":"invalid_request","duration_ms":0}
{"level":"INFO","msg":"audit","request_id":"req-6","client":"a","op":"delete","namespace":"ns-a","user":"h(ns-a)","result":"internal","duration_ms":0}
{"level":"INFO","msg":"audit","request_id":"req-7","client":"a","op":"change_pin","namespace":"ns-a","user":"h(ns-a)","result":"wrong_pin","duration_ms":0}
`
	for _, c := range []struct{ name, got, want string }{
		{"request log", logBuf.String(), wantLog},
		{"audit log", auditBuf.String(), wantAudit},
	} {
		if c.got != c.want {
			t.Errorf("%s:\n%s\nwant:\n%s", c.name, c.got, c.want)
		}
	}
	if strings.Contains(logBuf.String()+auditBuf.String(), "1234") {
		t.Error("a PIN in the logs")
	}
}
