package adminconn

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/config"
)

// Admin returns the admin client of cfg's running vault: at url, or
// without one at the base URL For gives, with the admin bearer token read
// from tokenFile, or without one from $KEYVAULT_ADMIN_TOKEN. It returns
// nil and no error when neither gives a token. Plain http:// to a host
// other than loopback needs admin_insecure_plaintext in cfg, as the vault
// does.
func Admin(cfg *config.Config, url, tokenFile string) (*client.Admin, error) {
	base, hc, err := For(cfg)
	if err != nil {
		return nil, err
	}
	if url != "" {
		base = url
	}
	token, err := Token(tokenFile)
	if err != nil || token == "" {
		return nil, err
	}
	var opts []client.AdminOption
	if cfg.AdminInsecurePlaintext {
		opts = append(opts, client.AdminInsecurePlaintext())
	}
	ac, err := client.NewAdmin(base, token, hc, opts...)
	if errors.Is(err, client.ErrAdminPlaintext) {
		return nil, fmt.Errorf("%s: the admin token would cross the network unencrypted: use https:// (admin_tls), or set admin_insecure_plaintext: true in the config", base)
	}
	return ac, err
}

// Token reads the admin bearer token from file, or without one from
// $KEYVAULT_ADMIN_TOKEN, without surrounding white space.
func Token(file string) (string, error) {
	if file == "" {
		return strings.TrimSpace(os.Getenv("KEYVAULT_ADMIN_TOKEN")), nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("--admin-token-file: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// Refusal says what an error of an admin call to url means for the
// operator: a 404 is an admin listener without admin_token_sha256, other
// refusals give the vault's detail. An error that is no answer of the
// vault is returned as it is.
func Refusal(url string, err error) error {
	var e *client.Error
	switch {
	case !errors.As(err, &e):
		return err
	case e.Status == http.StatusNotFound:
		return fmt.Errorf("%s answered 404: is admin_token_sha256 set in the running vault's config?", url)
	case e.Detail != "":
		return fmt.Errorf("refused (%d): %s", e.Status, e.Detail)
	default:
		return fmt.Errorf("%s: status %d", e.Op, e.Status)
	}
}

// WaitRewrap asks for the re-wrap job's status every interval until the
// job no longer runs, and returns the last status; progress is called
// with each status. It stops at the first failed call, or when ctx ends.
func WaitRewrap(ctx context.Context, ac *client.Admin, every time.Duration, progress func(client.RewrapStatus)) (client.RewrapStatus, error) {
	tick := time.NewTicker(every)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return client.RewrapStatus{}, ctx.Err()
		case <-tick.C:
		}
		st, err := ac.RewrapStatus(ctx)
		if err != nil {
			return st, err
		}
		progress(st)
		if !st.Running {
			return st, nil
		}
	}
}
