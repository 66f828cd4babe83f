package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/keyvault/keyvault/config"
	"github.com/keyvault/keyvault/hsmpool"
	"github.com/keyvault/keyvault/internal/server"
	"github.com/keyvault/keyvault/vault"
)

const keysLifecycleUsage = `keys rotate --config FILE [--admin-url URL] [--admin-token-file FILE]
       keyvault keys reload --config FILE [--admin-url URL] [--admin-token-file FILE]
       keyvault keys usage --config FILE [--admin-url URL] [--admin-token-file FILE]
       keyvault keys rewrap --config FILE [--rate N] [--status] [--wait] [--admin-url URL] [--admin-token-file FILE]
       keyvault keys retire --config FILE --version V [--admin-url URL] [--admin-token-file FILE]

The admin token comes from --admin-token-file or KEYVAULT_ADMIN_TOKEN; its
SHA-256 is admin_token_sha256 in the config.`

// cmdKeysLifecycle runs keys rotate, reload, usage, rewrap and retire.
// All but the HSM part of rotate speak to the running vault's admin
// listener: bbolt lets one process open the store, and the vault must
// take new key versions into use itself.
func cmdKeysLifecycle(sub string, args []string, stdout, stderr io.Writer) error {
	fs := newFlags("keys "+sub, stderr, keysLifecycleUsage)
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
	base, hc, err := adminHTTP(cfg)
	if err != nil {
		return err
	}
	ac := &adminClient{url: strings.TrimSuffix(*adminURL, "/"), hc: hc}
	if ac.url == "" {
		ac.url = base
	}
	ac.token, err = adminToken(*tokenFile)
	if err != nil {
		return err
	}
	switch sub {
	case "rotate":
		return keysRotate(cfg, ac, stdout)
	case "reload":
		return keysReload(ac, stdout)
	case "usage":
		return keysShowUsage(ac, stdout)
	case "rewrap":
		return keysRewrap(ac, *rate, *status, *wait, stdout)
	default:
		return keysRetire(ac, uint32(*version), stdout)
	}
}

func keysRotate(cfg *config.Config, ac *adminClient, stdout io.Writer) error {
	members, err := server.MemberConfigs(cfg)
	if err != nil {
		return err
	}
	// One load and initialisation of each module for the rotation and
	// the listing after it.
	mods := hsmpool.NewModules()
	defer mods.Close()
	version, inHSM, err := mods.Rotate(members, vault.Profile(cfg.HSM.Profile))
	if err != nil {
		return fmt.Errorf("keys rotate: %w", err)
	}
	if inHSM {
		fmt.Fprintf(stdout, "Created version %d of the wrap and PIN keys inside the HSM; the material never left it.\n", version)
	} else {
		fmt.Fprintf(stdout, "Created version %d of the wrap and PIN keys on %d members: the material was generated\n"+
			"in this process's memory, imported into each member as sensitive, non-extractable\ntoken objects, and wiped.\n", version, len(members))
	}
	if err := keysList(cfg, stdout); err != nil {
		return err
	}
	if ac.token == "" {
		fmt.Fprintf(stdout, "No admin token given: have the running vault take version %d into use with\n"+
			"  keyvault keys reload --config FILE   (or send it SIGHUP)\n", version)
		return nil
	}
	err = keysReload(ac, stdout)
	var unreachable *net.OpError
	if errors.As(err, &unreachable) {
		fmt.Fprintf(stdout, "No vault answered at %s: a vault started from now on uses version %d.\n", ac.url, version)
		return nil
	}
	return err
}

func keysReload(ac *adminClient, stdout io.Writer) error {
	var out struct {
		Versions map[string]uint32 `json:"versions"`
	}
	if err := ac.call(http.MethodPost, "/admin/keys/reload", nil, &out, http.StatusOK); err != nil {
		return fmt.Errorf("keys reload: %w", err)
	}
	fmt.Fprintf(stdout, "The running vault holds every key on every member and seals new backups under wrap key v%d and PIN key v%d.\n",
		out.Versions["wrap"], out.Versions["pin"])
	return nil
}

func keysShowUsage(ac *adminClient, stdout io.Writer) error {
	var out map[string]map[string]int
	if err := ac.call(http.MethodGet, "/admin/keys/usage", nil, &out, http.StatusOK); err != nil {
		return fmt.Errorf("keys usage: %w", err)
	}
	for _, role := range []string{"wrap", "pin"} {
		vs := make([]string, 0, len(out[role]))
		for v := range out[role] {
			vs = append(vs, v)
		}
		sort.Slice(vs, func(i, j int) bool { return len(vs[i]) < len(vs[j]) || len(vs[i]) == len(vs[j]) && vs[i] < vs[j] })
		for _, v := range vs {
			fmt.Fprintf(stdout, "%-4s key v%-4s %d backups\n", role, v, out[role][v])
		}
	}
	return nil
}

type rewrapStatus struct {
	Running   bool   `json:"running"`
	Target    uint32 `json:"target_version"`
	Total     int    `json:"total"`
	Done      int    `json:"done"`
	Skipped   int    `json:"skipped"`
	Errors    int    `json:"errors"`
	LastError string `json:"last_error"`
}

func (s rewrapStatus) String() string {
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

func keysRewrap(ac *adminClient, rate float64, statusOnly, wait bool, stdout io.Writer) error {
	var st rewrapStatus
	if statusOnly {
		if err := ac.call(http.MethodGet, "/admin/rewrap", nil, &st, http.StatusOK); err != nil {
			return fmt.Errorf("keys rewrap: %w", err)
		}
	} else {
		if err := ac.call(http.MethodPost, "/admin/rewrap", map[string]float64{"per_second": rate}, &st, http.StatusAccepted, http.StatusOK); err != nil {
			return fmt.Errorf("keys rewrap: %w", err)
		}
	}
	fmt.Fprintln(stdout, st)
	for wait && st.Running {
		time.Sleep(time.Second)
		if err := ac.call(http.MethodGet, "/admin/rewrap", nil, &st, http.StatusOK); err != nil {
			return fmt.Errorf("keys rewrap: %w", err)
		}
		fmt.Fprintln(stdout, st)
	}
	if wait && st.Errors > 0 {
		return fmt.Errorf("keys rewrap: %d records could not be moved; run it again", st.Errors)
	}
	return nil
}

func keysRetire(ac *adminClient, version uint32, stdout io.Writer) error {
	var out struct {
		Destroyed map[string][]string `json:"destroyed"`
	}
	if err := ac.call(http.MethodPost, "/admin/keys/retire", map[string]uint32{"version": version}, &out, http.StatusOK); err != nil {
		return fmt.Errorf("keys retire: %w", err)
	}
	members := make([]string, 0, len(out.Destroyed))
	for m := range out.Destroyed {
		members = append(members, m)
	}
	sort.Strings(members)
	fmt.Fprintf(stdout, "Key version %d retired: no backup used it.\n", version)
	for _, m := range members {
		fmt.Fprintf(stdout, "  member %s: destroyed %s\n", m, strings.Join(out.Destroyed[m], ", "))
	}
	return nil
}

// adminClient calls the running vault's admin listener.
type adminClient struct {
	url, token string
	hc         *http.Client
}

// call sends body as JSON and decodes a reply of one of the want statuses
// into out; another status is an error with the reply's detail.
func (c *adminClient) call(method, path string, body, out any, want ...int) error {
	if c.token == "" {
		return usageError{errors.New("no admin token: set KEYVAULT_ADMIN_TOKEN or --admin-token-file (its SHA-256 is the config's admin_token_sha256)")}
	}
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.url+path, rd)
	if err != nil {
		return usageError{fmt.Errorf("admin URL: %w", err)}
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	for _, w := range want {
		if resp.StatusCode == w {
			return json.Unmarshal(raw, out)
		}
	}
	var p struct {
		Detail string `json:"detail"`
	}
	_ = json.Unmarshal(raw, &p)
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return fmt.Errorf("%s answered 404: is admin_token_sha256 set in the running vault's config?", c.url)
	case p.Detail != "":
		return fmt.Errorf("refused (%d): %s", resp.StatusCode, p.Detail)
	default:
		return fmt.Errorf("%s %s: status %d", method, path, resp.StatusCode)
	}
}

// adminToken reads the admin token from file, or from KEYVAULT_ADMIN_TOKEN.
func adminToken(file string) (string, error) {
	if file == "" {
		return strings.TrimSpace(os.Getenv("KEYVAULT_ADMIN_TOKEN")), nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", usageError{fmt.Errorf("--admin-token-file: %w", err)}
	}
	return strings.TrimSpace(string(b)), nil
}

// dialable turns a listen address into one to connect to: a wildcard
// host becomes the loopback address.
func dialable(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}
