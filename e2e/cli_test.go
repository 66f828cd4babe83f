package e2e

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"go.yaml.in/yaml/v3"

	"github.com/keyvault/keyvault/internal/kvproc"
	"github.com/keyvault/keyvault/internal/softhsm/softhsmtest"
)

// runCLI runs the binary to completion and returns its exit status and
// combined output.
func runCLI(t testing.TB, args ...string) (int, string) {
	t.Helper()
	return runBin(t, keyvaultBin, args...)
}

// runBin is runCLI on bin, the keyvault binary or a link to it.
func runBin(t testing.TB, bin string, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("keyvault %s did not finish within 60s:\n%s", strings.Join(args, " "), out.String())
	}
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, out.String()
	case errors.As(err, &exit):
		return exit.ExitCode(), out.String()
	default:
		t.Fatalf("keyvault %s: %v", strings.Join(args, " "), err)
		return -1, ""
	}
}

// keyLines matches `keys list` output: a key label and its check value.
var keyLines = regexp.MustCompile(`(keyvault-(?:wrap|pin|root)-v1)\s+check value\s+([0-9a-f]{6,})`)

// TestDevReuse restarts `keyvault dev` on its directory and serves the same
// directory with `keyvault serve`, checking the data and the bearer token
// survive; then runs the key and usage commands against it.
func TestDevReuse(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keyvault.yaml")
	v := startDev(t, dir)
	token := v.Token
	if token == "" {
		t.Fatalf("no bearer token in %s/token", dir)
	}
	if !bytes.Contains(v.Logs(), []byte(token)) {
		t.Errorf("keyvault dev did not print its bearer token:\n%s", v.Logs())
	}
	c := newClient(t, v.API, token)
	e := enrolled{randID("reuse"), randBytes(32), randPIN("reuse")}
	c.mustEnroll(t, http.StatusCreated, e.user, e.secret, e.pin, 0)
	wantProblem(t, "a wrong guess", c.recover(t, e.user, "wrong-pin"), http.StatusForbidden, "wrong_pin")
	v.Stop()

	// dev again: same token, same data, the counted guess still counted.
	v = startDev(t, dir)
	if v.Token != token {
		t.Errorf("the second dev run has token %q, want the first run's %q", v.Token, token)
	}
	c = newClient(t, v.API, token)
	if g := c.mustStatus(t, e.user); num(t, g, "attempts_remaining") != 9 {
		t.Errorf("after a restart: %v, want attempts_remaining 9", g)
	}
	c.mustRecover(t, e.user, e.pin, e.secret)
	// A second process on the same directory must refuse, and leave the
	// first one serving.
	code, out := runCLI(t, "dev", "--dir", dir, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0")
	if code != 1 {
		t.Errorf("a second dev on a served directory: exit %d, want 1:\n%s", code, out)
	}
	c.mustRecover(t, e.user, e.pin, e.secret)
	v.Stop()

	// serve on the dev config; the addresses are set to free ports so the
	// test binds nothing fixed.
	raw, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfg, []byte(portZero(t, string(raw))), 0o600); err != nil {
		t.Fatal(err)
	}
	v = startServe(t, dir, cfg)
	c = newClient(t, v.API, token)
	c.mustRecover(t, e.user, e.pin, e.secret)
	e2 := enrolled{randID("reuse2"), randBytes(32), randPIN("reuse2")}
	c.mustEnroll(t, http.StatusCreated, e2.user, e2.secret, e2.pin, 0)
	v.Stop()

	// keys list, then keys init on existing keys.
	code, out = runCLI(t, "keys", "list", "--config", cfg)
	if code != 0 {
		t.Fatalf("keys list: exit %d, want 0:\n%s", code, out)
	}
	kcv := map[string]string{}
	for _, m := range keyLines.FindAllStringSubmatch(out, -1) {
		kcv[m[1]] = m[2]
	}
	for _, label := range []string{"keyvault-wrap-v1", "keyvault-pin-v1", "keyvault-root-v1"} {
		if kcv[label] == "" {
			t.Errorf("keys list does not show %s with a check value:\n%s", label, out)
		}
	}
	code, out2 := runCLI(t, "keys", "init", "--config", cfg)
	if code != 1 {
		t.Errorf("keys init over existing keys: exit %d, want 1:\n%s", code, out2)
	}
	code, out3 := runCLI(t, "keys", "list", "--config", cfg)
	if code != 0 || out3 != out {
		t.Errorf("keys list after keys init: exit %d, output\n%s\nwant exit 0 and the same output as before\n%s", code, out3, out)
	}
	v = startDev(t, dir)
	c = newClient(t, v.API, token)
	c.mustRecover(t, e.user, e.pin, e.secret)
	c.mustRecover(t, e2.user, e2.pin, e2.secret)
	v.Stop()

	// version and usage errors.
	if code, out := runCLI(t, "version"); code != 0 || !strings.HasPrefix(out, "keyvault ") {
		t.Errorf("keyvault version: exit %d, output %q; want 0 and \"keyvault ...\"", code, out)
	}
	if code, out := runCLI(t, "serve"); code != 2 || !strings.Contains(out, "--config") {
		t.Errorf("keyvault serve without --config: exit %d, output %q; want 2 and a word about --config", code, out)
	}
	for _, tc := range []struct {
		name, key, edit string
	}{
		{"top level", "bogus_top_key", "bogus_top_key: 1\n"},
		{"nested", "max_attemps_limit", "budget:\n  max_attemps_limit: 20\n"},
	} {
		text := portZero(t, string(raw))
		if tc.name == "nested" {
			text = strings.Replace(text, "budget:\n", tc.edit, 1)
		} else {
			text += tc.edit
		}
		bad := filepath.Join(dir, "bad-"+tc.key+".yaml")
		if err := os.WriteFile(bad, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		code, out := runCLI(t, "serve", "--config", bad)
		if code != 2 || !strings.Contains(out, tc.key) {
			t.Errorf("serve with an unknown %s key: exit %d, output %q; want 2 and a message naming %s", tc.name, code, out, tc.key)
		}
	}
}

// TestConfigCheck: keyvault config check validates a config as serve would
// and exits 2 naming every problem by its key path.
func TestConfigCheck(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	startDev(t, dir).Stop()
	good := filepath.Join(dir, "keyvault.yaml")
	if code, out := runCLI(t, "config", "check", "--config", good); code != 0 || !strings.Contains(out, "ok") {
		t.Fatalf("config check of the dev config: exit %d: %s", code, out)
	}
	data, err := os.ReadFile(good)
	if err != nil {
		t.Fatal(err)
	}
	// The config dev writes passes the schema editors use, too.
	if err := schemaCheck(t, data); err != nil {
		t.Errorf("the dev config is refused by config/keyvault.schema.json: %v", err)
	}
	bad := filepath.Join(dir, "bad.yaml")
	// Two unknown keys, a key in its former place, a value of the wrong
	// type and two bad values: one run names all six.
	broken := strings.Replace(string(data), "budget:\n", "budget:\n  max_attempts: 3\n", 1) + "lisen: 127.0.0.1:1\n"
	broken = strings.Replace(broken, "ratelimit:\n", "ratelimit:\n  escalating_delay: {base: 0s}\n", 1)
	broken = strings.Replace(broken, "default_max_attempts: 10", "default_max_attempts: 30", 1)
	broken = strings.Replace(broken, "max_sessions: 8", "max_sessions: many", 1)
	broken = strings.Replace(broken, "level: info", "level: loud", 1)
	if err := os.WriteFile(bad, []byte(broken), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out := runCLI(t, "config", "check", "--config", bad)
	want := []string{
		"6 problems:",
		"budget.max_attempts: unknown key",
		"ratelimit.escalating_delay: moved to budget.escalating_delay, with the same fields",
		"lisen: unknown key",
		"hsm.members[0].max_sessions: expected an integer, got a string",
		"budget.default_max_attempts: must not exceed budget.max_attempts_limit (20)",
		"log.level: must be one of",
	}
	for _, w := range want {
		if code != 2 || !strings.Contains(out, w) {
			t.Errorf("config check of a config with six problems: exit %d, output lacks %q:\n%s", code, w, out)
		}
	}
	if code, _ := runCLI(t, "config", "check"); code != 2 {
		t.Fatalf("config check without --config: exit %d, want 2", code)
	}
}

// makeCmd is make run in the module root as a user runs it: not as a
// sub-make of make test, whose MAKEFLAGS and MAKELEVEL would change what
// it prints.
func makeCmd(args ...string) *exec.Cmd {
	cmd := exec.Command("make", append([]string{"--no-print-directory"}, args...)...)
	cmd.Dir = moduleRoot
	for _, kv := range os.Environ() {
		switch name, _, _ := strings.Cut(kv, "="); name {
		case "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES":
		default:
			cmd.Env = append(cmd.Env, kv)
		}
	}
	return cmd
}

// TestVersion: --version and -v print what `keyvault version` prints, and
// make build stamps the version git describe gives (or "dev" outside git).
func TestVersion(t *testing.T) {
	t.Parallel()
	code, want := runCLI(t, "version")
	if code != 0 || !strings.HasPrefix(want, "keyvault ") {
		t.Fatalf("keyvault version: exit %d, output %q; want 0 and \"keyvault ...\"", code, want)
	}
	for _, flag := range []string{"--version", "-v"} {
		if code, out := runCLI(t, flag); code != 0 || out != want {
			t.Errorf("keyvault %s: exit %d, output %q; want 0 and %q", flag, code, out, want)
		}
	}

	release := strings.TrimSpace(string(readFile(t, filepath.Join(moduleRoot, "VERSION"))))
	if !regexp.MustCompile(`^\d+\.\d+\.\d+$`).MatchString(release) {
		t.Fatalf("VERSION holds %q, want MAJOR.MINOR.PATCH", release)
	}
	// The chart and the changelog name the same release.
	if chart := readFile(t, filepath.Join(moduleRoot, "deploy", "helm", "keyvault", "Chart.yaml")); !strings.Contains(string(chart), "\nappVersion: \""+release+"\"\n") {
		t.Errorf("deploy/helm/keyvault/Chart.yaml: appVersion is not %q", release)
	}
	if log := readFile(t, filepath.Join(moduleRoot, "CHANGELOG.md")); !strings.Contains(string(log), "\n## ["+release+"]") {
		t.Errorf("CHANGELOG.md has no section for %s", release)
	}
	describe := exec.Command("git", "describe", "--always", "--dirty")
	describe.Dir = moduleRoot
	commit, err := describe.Output()
	if err != nil {
		t.Fatalf("git describe in %s: %v", moduleRoot, err)
	}
	tag := release + "-dev+" + strings.TrimSpace(string(commit))
	if exact, err := exec.Command("git", "-C", moduleRoot, "describe", "--tags", "--exact-match", "--dirty").Output(); err == nil && strings.TrimSpace(string(exact)) == "v"+release {
		tag = release
	}
	bin := filepath.Join(t.TempDir(), "keyvault")
	mk := makeCmd("build", "BIN="+bin)
	if out, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("make build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil {
		t.Fatalf("%s --version: %v", bin, err)
	}
	if prefix := "keyvault " + tag + " ("; !strings.HasPrefix(string(out), prefix) {
		t.Errorf("make build's binary says %q, want it to start %q (VERSION and git describe)", out, prefix)
	}

	// Outside a git checkout (GIT_DIR names no repository) the stamp is
	// the release's dev version.
	dry := makeCmd("-n", "build")
	dry.Env = append(dry.Env, "GIT_DIR="+t.TempDir())
	plan, err := dry.CombinedOutput()
	if err != nil {
		t.Fatalf("make -n build: %v\n%s", err, plan)
	}
	if !strings.Contains(string(plan), "-X main.version="+release+"-dev\"") {
		t.Errorf("make -n build outside git:\n%s\nwant -X main.version=%s-dev", plan, release)
	}
}

// devBanner matches the addresses in keyvault dev's "serving" banner.
var devBanner = regexp.MustCompile(`keyvault dev: serving .*\n  API    http://(\S+)\n  admin  http://(\S+)\n`)

// yamlAddrs reads the top-level listen and admin_listen of a config file.
func yamlAddrs(t *testing.T, path string) (listen, admin string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "listen: "); ok {
			listen = strings.Fields(v)[0]
		}
		if v, ok := strings.CutPrefix(l, "admin_listen: "); ok {
			admin = strings.Fields(v)[0]
		}
	}
	return listen, admin
}

// freeAddr is a loopback address with a port no one listens on just now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestDevPorts: keyvault dev prints its banner with the addresses it is
// bound to, writes them into its keyvault.yaml (so the admin commands that
// read the file reach it), updates them when run again with other flags,
// and serves there again when run without them.
func TestDevPorts(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keyvault.yaml")
	check := func(v *vault, wantAPI, wantAdmin string) {
		t.Helper()
		m := devBanner.FindStringSubmatch(string(v.Logs()))
		if m == nil {
			t.Fatalf("no serving banner:\n%s", v.Logs())
		}
		api, admin, _ := servingLine(v.Logs())
		listen, adminListen := yamlAddrs(t, cfg)
		if m[1] != api || m[2] != admin || listen != api || adminListen != admin {
			t.Errorf("bound to API %s, admin %s; the banner says %s, %s; keyvault.yaml says %s, %s", api, admin, m[1], m[2], listen, adminListen)
		}
		if wantAPI != "" && (api != wantAPI || admin != wantAdmin) {
			t.Errorf("bound to API %s, admin %s; want %s, %s", api, admin, wantAPI, wantAdmin)
		}
		if strings.HasSuffix(api, ":0") || strings.HasSuffix(admin, ":0") {
			t.Errorf("bound to port 0: API %s, admin %s", api, admin)
		}
	}

	v := startDevLimited(t, dir) // --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
	check(v, "", "")
	v.Stop()

	// The admin commands read the address from the file.
	adminToken := "kvadmin_" + randID("tok")
	sum := sha256.Sum256([]byte(adminToken))
	f, err := os.OpenFile(cfg, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := fmt.Fprintf(f, "admin_token_sha256: %x\n", sum); err != nil {
		t.Fatal(err)
	}
	f.Close()
	tokenFile := filepath.Join(dir, "admin-token")
	if err := os.WriteFile(tokenFile, []byte(adminToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	v = startDevLimited(t, dir)
	check(v, "", "")
	if code, out := runCLI(t, "keys", "usage", "--config", cfg, "--admin-token-file", tokenFile); code != 0 {
		t.Errorf("keys usage --config of the dev config: exit %d:\n%s", code, out)
	}
	v.Stop()

	// Other flags: the file follows; no flags: the same addresses again.
	api, admin := freeAddr(t), freeAddr(t)
	v = startVault(t, dir, "dev", "--dir", dir, "--listen", api, "--admin-listen", admin)
	check(v, api, admin)
	v.Stop()
	v = startVault(t, dir, "dev", "--dir", dir)
	check(v, api, admin)
	v.Stop()
}

// TestStoreInUse: every command that opens a bbolt store held by a running
// vault says that the store is in use, and the way out.
func TestStoreInUse(t *testing.T) {
	softhsmtest.Module(t)
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "keyvault.yaml")
	v := startDev(t, dir)
	raw, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(dir, "other.yaml")
	if err := os.WriteFile(other, []byte(portZero(t, string(raw))), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"serve", "--config", other},
		kvproc.DevArgs(dir),
		{"anchor", "status", "--config", other},
		{"anchor", "accept", "--config", other, "--reason", "test"},
	} {
		code, out := runCLI(t, args...)
		if code != 1 || !strings.Contains(out, "is in use by another process") ||
			!strings.Contains(out, "stop the other process") || !strings.Contains(out, "another store") {
			t.Errorf("keyvault %s while a vault serves the store: exit %d:\n%s\nwant 1, \"is in use by another process\" and the way out",
				strings.Join(args, " "), code, out)
		}
		if strings.Contains(out, "serving") {
			t.Errorf("keyvault %s printed a serving banner without serving:\n%s", strings.Join(args, " "), out)
		}
	}
	// The vault that holds the store still serves.
	if r := newClient(t, v.API, v.Token).do(t, http.MethodGet, "/v1/backups/nobody", nil); r.Status != http.StatusNotFound {
		t.Errorf("GET a missing backup after the refusals: %s, want 404", r)
	}
	v.Stop()
}

// TestMakeRunPorts: make run passes LISTEN and ADMIN_LISTEN to keyvault
// dev, and neither flag when they are not set (the config's then apply).
func TestMakeRunPorts(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		vars []string
		want string
	}{
		{[]string{"LISTEN=127.0.0.1:18081", "ADMIN_LISTEN=127.0.0.1:19091"}, "dev --listen 127.0.0.1:18081 --admin-listen 127.0.0.1:19091\n"},
		{[]string{"ADMIN_LISTEN=127.0.0.1:19091"}, "dev --admin-listen 127.0.0.1:19091\n"},
		{nil, "dev\n"},
	} {
		dry := makeCmd(append([]string{"-n", "run"}, tc.vars...)...)
		plan, err := dry.CombinedOutput()
		if err != nil {
			t.Fatalf("make -n run %v: %v\n%s", tc.vars, err, plan)
		}
		if !strings.HasSuffix(string(plan), "/keyvault "+tc.want) {
			t.Errorf("make -n run %v:\n%s\nwant its last line to end \"keyvault %s\"", tc.vars, plan, tc.want)
		}
	}
}

// schemaCheck validates a YAML config against config/keyvault.schema.json.
func schemaCheck(t *testing.T, data []byte) error {
	t.Helper()
	sch, err := jsonschema.NewCompiler().Compile(filepath.Join(moduleRoot, "config", "keyvault.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := yaml.Unmarshal(data, &v); err != nil {
		return err
	}
	j, err := json.Marshal(v)
	if err != nil {
		return err
	}
	inst, err := jsonschema.UnmarshalJSON(bytes.NewReader(j))
	if err != nil {
		return err
	}
	return sch.Validate(inst)
}

// cliCommands returns the commands the binary's top-level help lists, as
// the words before their flags: "serve", "keys init", "help".
func cliCommands(t *testing.T) [][]string {
	t.Helper()
	code, out := runCLI(t, "--help")
	if code != 0 {
		t.Fatalf("keyvault --help: exit %d:\n%s", code, out)
	}
	_, list, ok := strings.Cut(out, "\nCommands:\n")
	if !ok {
		t.Fatalf("keyvault --help has no Commands: list:\n%s", out)
	}
	var cmds [][]string
	for _, line := range strings.Split(list, "\n") {
		if !strings.HasPrefix(line, "  ") || strings.HasPrefix(line, "   ") {
			continue // a summary on a line of its own, or the end
		}
		// Two spaces part the command and its flags from the summary.
		head, _, _ := strings.Cut(strings.TrimSpace(line), "  ")
		var words []string
		for _, w := range strings.Fields(head) {
			if strings.ContainsAny(w[:1], "-[<") {
				break
			}
			words = append(words, w)
		}
		cmds = append(cmds, words)
	}
	if len(cmds) < 20 {
		t.Fatalf("keyvault --help lists %d commands:\n%s", len(cmds), out)
	}
	return cmds
}

// TestCLIHelp: every command the top-level help lists answers --help, and
// help COMMAND, with exit 0 and "Usage: keyvault COMMAND"; usage errors
// exit 2.
func TestCLIHelp(t *testing.T) {
	t.Parallel()
	for _, words := range cliCommands(t) {
		name := strings.Join(words, " ")
		code, out := runCLI(t, append(words, "--help")...)
		line, _, _ := strings.Cut(out, "\n")
		if code != 0 || (line != "Usage: keyvault "+name && !strings.HasPrefix(line, "Usage: keyvault "+name+" ")) {
			t.Errorf("keyvault %s --help: exit %d, first line %q; want 0 and \"Usage: keyvault %s ...\"", name, code, line, name)
		}
		if code2, out2 := runCLI(t, append([]string{"help"}, words...)...); code2 != 0 || out2 != out {
			t.Errorf("keyvault help %s: exit %d, output\n%s\nwant 0 and what %s --help prints", name, code2, out2, name)
		}
	}
	for _, args := range [][]string{{}, {"nosuch"}, {"keys"}, {"keys", "nosuch"}, {"serve", "--nosuch"}, {"completion", "tcsh"}} {
		if code, out := runCLI(t, args...); code != 2 {
			t.Errorf("keyvault %s: exit %d, want 2:\n%s", strings.Join(args, " "), code, out)
		}
	}
}

// TestCLICompletion: the completion scripts name every command; each
// shell parses its own, and bash and fish, loaded with it, complete
// subcommands and flags.
func TestCLICompletion(t *testing.T) {
	t.Parallel()
	cmds := cliCommands(t)
	for _, shell := range []string{"bash", "zsh", "fish"} {
		cmd := exec.Command(keyvaultBin, "completion", shell)
		script, err := cmd.Output()
		if err != nil {
			t.Fatalf("keyvault completion %s: %v", shell, err)
		}
		for _, words := range cmds {
			for _, w := range words {
				if !bytes.Contains(script, []byte(w)) {
					t.Errorf("completion %s does not name %q", shell, w)
				}
			}
		}
		switch shell {
		case "zsh":
			zshParses(t, script)
			continue
		case "fish":
			fishCompletes(t, script)
			continue
		}
		check := exec.Command("bash", "-n")
		check.Stdin = bytes.NewReader(script)
		if out, err := check.CombinedOutput(); err != nil {
			t.Errorf("bash -n on the bash completion: %v\n%s", err, out)
		}
		// Loaded, it completes subcommands and flags, and leaves a flag's
		// value to bash's file names.
		for line, want := range map[string]string{
			"keyvault keys r":            "rotate reload rewrap retire",
			"keyvault anchor accept --r": "--reason",
			"keyvault serve --config k":  "",
		} {
			words := strings.Fields(line)
			try := exec.Command("bash", "-c", `source /dev/stdin; COMP_WORDS=(`+line+`); COMP_CWORD=`+fmt.Sprint(len(words)-1)+`; _keyvault; echo "${COMPREPLY[*]}"`)
			try.Stdin = bytes.NewReader(script)
			out, err := try.CombinedOutput()
			if err != nil || strings.TrimSpace(string(out)) != want {
				t.Errorf("bash completion of %q: %v, %q; want %q", line, err, out, want)
			}
		}
	}
}

// zshParses checks the zsh completion script with zsh -n.
func zshParses(t *testing.T, script []byte) {
	t.Helper()
	_, err := exec.LookPath("zsh")
	needTool(t, "zsh (make test-deps installs it)", err)
	check := exec.Command("zsh", "-n")
	check.Stdin = bytes.NewReader(script)
	if out, err := check.CombinedOutput(); err != nil {
		t.Errorf("zsh -n on the zsh completion: %v\n%s", err, out)
	}
}

// fishCompletes checks the fish completion script with fish --no-execute,
// then loads it and asks fish what it completes.
func fishCompletes(t *testing.T, script []byte) {
	t.Helper()
	_, err := exec.LookPath("fish")
	needTool(t, "fish (make test-deps installs it)", err)
	file := filepath.Join(t.TempDir(), "keyvault.fish")
	if err := os.WriteFile(file, script, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("fish", "--no-execute", file).CombinedOutput(); err != nil {
		t.Fatalf("fish --no-execute on the fish completion: %v\n%s", err, out)
	}
	for line, want := range map[string][]string{
		"keyvault keys r":            {"reload", "retire", "rewrap", "rotate"},
		"keyvault anchor accept --r": {"--reason"},
		"keyvault hsm ":              {"check"},
	} {
		out, err := exec.Command("fish", "--no-config", "-c", "source "+file+"; complete -C '"+line+"'").CombinedOutput()
		if err != nil {
			t.Errorf("fish completion of %q: %v\n%s", line, err, out)
			continue
		}
		var got []string
		for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			word, _, _ := strings.Cut(l, "\t")
			got = append(got, word)
		}
		if !slices.Equal(got, want) {
			t.Errorf("fish completion of %q: %q, want %q", line, got, want)
		}
	}
}

// TestCLIManPage: keyvault man writes a page that man (or groff) renders
// and that names every command.
func TestCLIManPage(t *testing.T) {
	t.Parallel()
	page, err := exec.Command(keyvaultBin, "man").Output()
	if err != nil {
		t.Fatalf("keyvault man: %v", err)
	}
	file := filepath.Join(t.TempDir(), "keyvault.1")
	if err := os.WriteFile(file, page, 0o600); err != nil {
		t.Fatal(err)
	}
	var render *exec.Cmd
	if _, err := exec.LookPath("man"); err == nil {
		render = exec.Command("man", "-l", file)
		render.Env = append(os.Environ(), "MANPAGER=cat", "PAGER=cat", "MANWIDTH=200", "MAN_KEEP_FORMATTING=")
	} else if _, err := exec.LookPath("groff"); err == nil {
		render = exec.Command("groff", "-man", "-Tutf8", "-P-cbou", file)
	}
	text := string(page)
	if render == nil {
		t.Log("neither man nor groff installed: the roff source is checked")
		if !strings.HasPrefix(text, ".TH KEYVAULT 1 ") {
			t.Fatalf("the page does not start with .TH KEYVAULT 1:\n%.200s", text)
		}
	} else {
		var out, errs bytes.Buffer
		render.Stdout, render.Stderr = &out, &errs
		if err := render.Run(); err != nil || errs.Len() > 0 {
			t.Fatalf("%s: %v\n%s", strings.Join(render.Args, " "), err, errs.String())
		}
		// Strip overstriking (c\bc) that man may leave.
		text = regexp.MustCompile(".\b").ReplaceAllString(out.String(), "")
		if !strings.Contains(text, "KEYVAULT(1)") {
			t.Fatalf("the rendered page has no KEYVAULT(1) header:\n%.400s", text)
		}
	}
	for _, words := range cliCommands(t) {
		if name := "keyvault " + strings.Join(words, " "); !strings.Contains(text, name) {
			t.Errorf("the man page does not name %q", name)
		}
	}
}
