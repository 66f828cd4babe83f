package api

import "net/http"

// MaxConcurrentStreams is how many requests one HTTP/2 connection may have
// open at once. Go's server runs at most that many handlers per connection
// and closes a connection that queues four times as many (its defence
// against rapid reset, CVE-2023-44487), so this also bounds the handlers
// one connection can keep busy. A backend needs no more on one connection
// than the HSM admission lets into the vault; beyond it, it opens another.
const MaxConcurrentStreams = 100

// HTTP2Config is the API server's HTTP/2 settings (http.Server.HTTP2),
// which apply when it serves TLS, where clients negotiate HTTP/2. The
// server's other limits hold for HTTP/2 too: MaxHeaderBytes sets the
// header list size it advertises, and ReadTimeout and WriteTimeout bound
// each stream, so a stream whose body stalls is reset. A body is read in
// full before the HSM admission, so a stalled stream never holds an HSM
// place.
func HTTP2Config() *http.HTTP2Config {
	return &http.HTTP2Config{MaxConcurrentStreams: MaxConcurrentStreams}
}
