package client

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
)

func TestNewAdminRefuses(t *testing.T) {
	for _, tc := range []struct{ url, token string }{
		{"ftp://127.0.0.1:9090", "tok-secret"},
		{"http://", "tok-secret"},
		{"http://u:p@127.0.0.1:9090", "tok-secret"},
		{"http://127.0.0.1:9090?x=1", "tok-secret"},
		{"http://127.0.0.1:9090", ""},
		{"http://127.0.0.1:9090", "two words"},
		{"http://10.0.0.1:9090", "tok-secret"},
		{"http://vault.internal:9090", "tok-secret"},
	} {
		a, err := NewAdmin(tc.url, tc.token, nil)
		if err == nil {
			t.Errorf("NewAdmin(%q, %q) = %v, want an error", tc.url, tc.token, a)
			continue
		}
		if tc.token != "" && strings.Contains(err.Error(), tc.token) {
			t.Errorf("the error quotes the token: %v", err)
		}
	}
}

// Plain http:// goes to loopback, or elsewhere with AdminInsecurePlaintext.
func TestNewAdminPlaintext(t *testing.T) {
	for _, u := range []string{"http://127.0.0.1:9090", "http://[::1]:9090", "http://localhost:9090", "https://vault.internal:9090"} {
		if _, err := NewAdmin(u, "tok", nil); err != nil {
			t.Errorf("NewAdmin(%q): %v", u, err)
		}
	}
	if _, err := NewAdmin("http://vault.internal:9090", "tok", nil); !errors.Is(err, ErrAdminPlaintext) {
		t.Errorf("plain http:// off loopback: %v, want ErrAdminPlaintext", err)
	}
	if _, err := NewAdmin("http://vault.internal:9090", "tok", nil, AdminInsecurePlaintext()); err != nil {
		t.Errorf("plain http:// off loopback with AdminInsecurePlaintext: %v", err)
	}
}

// A vault that does not listen is a *net.OpError through the wrapping
// (keys rotate tells it from a refusal), and the text never holds the
// token.
func TestAdminUnreachable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	a, err := NewAdmin("http://"+addr, "secret-admin-token", nil)
	if err != nil {
		t.Fatal(err)
	}
	_, err = a.ReloadKeys(context.Background())
	var op *net.OpError
	if !errors.As(err, &op) {
		t.Fatalf("unreachable vault: %v, want a *net.OpError", err)
	}
	if strings.Contains(err.Error(), "secret-admin-token") || strings.Contains(a.String(), "secret-admin-token") {
		t.Errorf("the token leaks: %v / %v", err, a)
	}
}
