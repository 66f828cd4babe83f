package api

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strings"
	"time"
)

type ctxKey struct{}

// reqInfo is what the middleware learns about a request, shared by pointer
// so that the outer request log sees the client that auth found.
type reqInfo struct {
	id     string
	log    *slog.Logger // the listener's, without the request's attributes
	client *Client
}

func info(ctx context.Context) *reqInfo {
	if i, ok := ctx.Value(ctxKey{}).(*reqInfo); ok {
		return i
	}
	return &reqInfo{log: slog.Default()}
}

func requestID(ctx context.Context) string { return info(ctx).id }

func clientOf(ctx context.Context) *Client { return info(ctx).client }

// logger is the request's logger: every line names the request ID and,
// once auth has found it, the client.
func logger(ctx context.Context) *slog.Logger {
	i, ok := ctx.Value(ctxKey{}).(*reqInfo)
	if !ok {
		return slog.Default()
	}
	if i.client != nil {
		return i.log.With("request_id", i.id, "client", i.client.Name)
	}
	return i.log.With("request_id", i.id)
}

// logRequest writes the request log's line as logger(ctx) would, its
// request ID and client first, without building a logger for it.
func (i *reqInfo) logRequest(attrs ...slog.Attr) {
	all := make([]slog.Attr, 0, 8)
	all = append(all, slog.String("request_id", i.id))
	if i.client != nil {
		all = append(all, slog.String("client", i.client.Name))
	}
	i.log.LogAttrs(context.Background(), slog.LevelInfo, "request", append(all, attrs...)...)
}

// validRequestID accepts a caller's X-Request-Id if it is short and plain,
// so that it can go into logs and headers as is.
func validRequestID(id string) bool {
	if len(id) == 0 || len(id) > 128 {
		return false
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || strings.IndexByte("-_.:", c) >= 0) {
			return false
		}
	}
	return true
}

// withRequest sets up each request's context, once, since each
// r.WithContext copies the whole Request. It echoes the caller's
// X-Request-Id, or makes one, on every response, and gives the request a
// logger that carries it. A nonzero timeout bounds the time a request may
// spend in the vault: waiting for an HSM session, or for a concurrent
// last-attempt guess to settle. What has been counted by then stays
// counted.
func withRequest(l *slog.Logger, timeout time.Duration) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			id := r.Header.Get("X-Request-Id")
			if !validRequestID(id) {
				id = rand.Text()
			}
			w.Header().Set("X-Request-Id", id)
			ctx := r.Context()
			if timeout != 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, timeout)
				defer cancel()
			}
			i := &reqInfo{id: id, log: l}
			next.ServeHTTP(w, r.WithContext(context.WithValue(ctx, ctxKey{}, i)))
		})
	}
}

// recoverer turns a panic into a 500. The log holds the stack, never the
// panic's value, which could quote request data.
func recoverer(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v)
				}
				logger(r.Context()).Error("panic in handler", "stack", string(debug.Stack()))
				writeError(w, r, &apiError{http.StatusInternalServerError, codeInternal, "Internal error."})
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// authenticate finds the client whose token hash matches the bearer token,
// and applies the client's request limit.
// It hashes the token and compares it with every configured hash in
// constant time, so timing reveals neither a near match nor which client.
func authenticate(clients []Client, limits Limiter) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
			var found *Client
			if ok && strings.EqualFold(scheme, "Bearer") && token != "" {
				sum := sha256.Sum256([]byte(token))
				for i := range clients {
					for _, h := range clients[i].TokenHashes {
						if subtle.ConstantTimeCompare(sum[:], h[:]) == 1 && found == nil {
							found = &clients[i]
						}
					}
				}
			}
			if found == nil {
				writeError(w, r, &apiError{http.StatusUnauthorized, codeUnauthorized, "Send Authorization: Bearer <token> with a configured token."})
				return
			}
			info(r.Context()).client = found
			if limits != nil {
				if err := limits.Request(found.Name); err != nil {
					writeError(w, r, err)
					return
				}
			}
			next.ServeHTTP(w, r)
		})
	}
}
