package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/keyvault/keyvault/client"
	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/adminconn"
	"github.com/keyvault/keyvault/internal/provision"
)

// cmdKeysLifecycle runs keys rotate, reload, usage, rewrap and retire.
// All but the HSM part of rotate speak to the running vault's admin
// listener: bbolt lets one process open the store, and the vault must
// take new key versions into use itself.
func cmdKeysLifecycle(sub string, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("keys "+sub, stderr)
	path := fs.String("config", "", "the YAML config `file` (required)")
	adminURL := fs.String("admin-url", "", "the running vault's admin `URL` (default: http://, or https:// with admin_tls, and the config's admin_listen)")
	tokenFile := fs.String("admin-token-file", "", "a `file` holding the admin bearer token (default: $KEYVAULT_ADMIN_TOKEN)")
	rate := fs.Float64("rate", 100, "rewrap: records per second, 0 for no limit")
	status := fs.Bool("status", false, "rewrap: report progress, start nothing")
	wait := fs.Bool("wait", false, "rewrap: wait until the job ends, printing progress")
	version := fs.Uint("version", 0, "retire: the key `version` to destroy")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *path == "" {
		return usageError{errors.New("--config is required")}
	}
	if sub == "retire" && *version == 0 {
		return usageError{errors.New("--version is required")}
	}
	cfg, err := loadConfig(*path)
	if err != nil {
		return err
	}
	ac, err := adminconn.Admin(cfg, *adminURL, *tokenFile)
	if err != nil {
		return usageError{err}
	}
	// rotate without a token only says how to take the version into use.
	if ac == nil && sub != "rotate" {
		return usageError{errors.New("no admin token: set KEYVAULT_ADMIN_TOKEN or --admin-token-file (its SHA-256 is the config's admin_token_sha256)")}
	}
	ctx := context.Background()
	switch sub {
	case "rotate":
		return keysRotate(ctx, cfg, ac, stdout)
	case "reload":
		return keysReload(ctx, ac, stdout)
	case "usage":
		return keysShowUsage(ctx, ac, stdout)
	case "rewrap":
		return keysRewrap(ctx, ac, *rate, *status, *wait, stdout)
	default:
		return keysRetire(ctx, ac, uint32(*version), stdout)
	}
}

func keysRotate(ctx context.Context, cfg *config.Config, ac *client.Admin, stdout io.Writer) error {
	// One load and initialisation of each module for the rotation and
	// the listing after it.
	mods := hsmpool.NewModules()
	defer mods.Close()
	version, err := provision.Rotate(cfg, mods, stdout)
	if err != nil {
		return err
	}
	if err := keysList(cfg, stdout); err != nil {
		return err
	}
	if ac == nil {
		fmt.Fprintf(stdout, "No admin token given: have the running vault take version %d into use with\n"+
			"  keyvault keys reload --config FILE   (or send it SIGHUP)\n", version)
		return nil
	}
	err = keysReload(ctx, ac, stdout)
	var unreachable *net.OpError
	if errors.As(err, &unreachable) {
		fmt.Fprintf(stdout, "No vault answered at %s: a vault started from now on uses version %d.\n", ac.URL(), version)
		return nil
	}
	return err
}

func keysReload(ctx context.Context, ac *client.Admin, stdout io.Writer) error {
	out, err := ac.ReloadKeys(ctx)
	if err != nil {
		return fmt.Errorf("keys reload: %w", adminconn.Refusal(ac.URL(), err))
	}
	fmt.Fprintf(stdout, "The running vault holds every key on every member and seals new backups under wrap key v%d and PIN key v%d.\n",
		out.Versions["wrap"], out.Versions["pin"])
	return nil
}

func keysShowUsage(ctx context.Context, ac *client.Admin, stdout io.Writer) error {
	out, err := ac.KeyUsage(ctx)
	if err != nil {
		return fmt.Errorf("keys usage: %w", adminconn.Refusal(ac.URL(), err))
	}
	for _, role := range []struct {
		name string
		n    map[uint32]int
	}{{"wrap", out.Wrap}, {"pin", out.PIN}} {
		for _, v := range slices.Sorted(maps.Keys(role.n)) {
			fmt.Fprintf(stdout, "%-4s key v%-4d %d backups\n", role.name, v, role.n[v])
		}
	}
	return nil
}

// rewrapLine is one line of re-wrap progress.
func rewrapLine(s client.RewrapStatus) string {
	state := "finished"
	if s.Running {
		state = "running"
	}
	line := fmt.Sprintf("re-wrap to wrap key v%d %s: %d of %d records moved, %d skipped, %d errors", s.Target, state, s.Done, s.Total, s.Skipped, s.Errors)
	if s.LastError != "" {
		line += " (last: " + s.LastError + ")"
	}
	return line
}

func keysRewrap(ctx context.Context, ac *client.Admin, rate float64, statusOnly, wait bool, stdout io.Writer) error {
	var st client.RewrapStatus
	var err error
	if statusOnly {
		st, err = ac.RewrapStatus(ctx)
	} else {
		st, _, err = ac.StartRewrap(ctx, rate)
	}
	if err != nil {
		return fmt.Errorf("keys rewrap: %w", adminconn.Refusal(ac.URL(), err))
	}
	fmt.Fprintln(stdout, rewrapLine(st))
	if wait && st.Running {
		st, err = adminconn.WaitRewrap(ctx, ac, time.Second, func(st client.RewrapStatus) { fmt.Fprintln(stdout, rewrapLine(st)) })
		if err != nil {
			return fmt.Errorf("keys rewrap: %w", adminconn.Refusal(ac.URL(), err))
		}
	}
	if wait && st.Errors > 0 {
		return fmt.Errorf("keys rewrap: %d records could not be moved; run it again", st.Errors)
	}
	return nil
}

func keysRetire(ctx context.Context, ac *client.Admin, version uint32, stdout io.Writer) error {
	out, err := ac.RetireKeys(ctx, version)
	if err != nil {
		return fmt.Errorf("keys retire: %w", adminconn.Refusal(ac.URL(), err))
	}
	fmt.Fprintf(stdout, "Key version %d retired: no backup used it.\n", version)
	for _, m := range slices.Sorted(maps.Keys(out.Destroyed)) {
		fmt.Fprintf(stdout, "  member %s: destroyed %s\n", m, strings.Join(out.Destroyed[m], ", "))
	}
	return nil
}
