package config

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// problem is one thing wrong with the config, at a key path such as
// "hsm.members[0].module".
type problem struct {
	path string
	msg  string
}

func (p *problem) Error() string {
	if p.path == "" {
		return p.msg
	}
	return p.path + ": " + p.msg
}

var (
	memberNameRE = regexp.MustCompile(`^[a-z0-9-]{1,32}$`)
	clientNameRE = regexp.MustCompile(`^[a-z0-9-]{1,64}$`)
	envNameRE    = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
)

// validator collects problems so that Validate reports all of them at once.
type validator struct {
	checkFS bool // false in ParseNoFS: skip os.Stat checks
	errs    []error
}

func (v *validator) add(path, format string, args ...any) {
	v.errs = append(v.errs, &problem{path: path, msg: fmt.Sprintf(format, args...)})
}

// Validate checks every field of c and returns all problems joined with
// errors.Join, each as "key.path: message", or nil. It checks that the files
// and directories c names exist. It applies no defaults: Parse does that
// before it calls Validate.
func (c *Config) Validate() error {
	return c.validate(true)
}

func (c *Config) validate(checkFS bool) error {
	v := &validator{checkFS: checkFS}
	v.listeners(c)
	v.tls("tls", c.TLS)
	v.tls("admin_tls", c.AdminTLS)
	v.connections(c)
	v.store(c.Store)
	v.hsm(c.HSM)
	v.budget(c.Budget)
	v.clients(c.Clients)
	v.adminToken(c)
	v.log(c.Log)
	v.rateLimit(c.RateLimit)
	return errors.Join(v.errs...)
}

func (v *validator) listeners(c *Config) {
	apiHost, apiPort, apiOK := v.address("listen", c.Listen)
	adminHost, adminPort, adminOK := v.address("admin_listen", c.AdminListen)

	// Without TLS, bearer tokens and secrets cross the network in clear
	// text; allow that only where it cannot leave the machine, or where the
	// operator says TLS ends in front of us.
	if apiOK && c.TLS == nil && !c.InsecurePlaintext && !isLoopback(apiHost) {
		v.add("listen", "plain HTTP on a non-loopback address needs tls or insecure_plaintext: true")
	}
	// The admin token changes what protects every backup (key reload,
	// re-wrap, retire): the same rule, for the admin listener, where that
	// token is sent. Without one, nothing there needs hiding.
	if adminOK && len(c.AdminTokenSHA256) > 0 && c.AdminTLS == nil && !c.AdminInsecurePlaintext && !isLoopback(adminHost) {
		v.add("admin_listen", "plain HTTP on a non-loopback address with admin_token_sha256 set needs admin_tls or admin_insecure_plaintext: true")
	}
	if apiOK && adminOK && apiPort != "0" && apiPort == adminPort && hostsOverlap(apiHost, adminHost) {
		v.add("admin_listen", "must differ from listen (both use port %s)", apiPort)
	}
}

// address checks a host:port listen address with a numeric port.
func (v *validator) address(path, addr string) (host, port string, ok bool) {
	if addr == "" {
		v.add(path, "required (host:port)")
		return "", "", false
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		v.add(path, "invalid address %q: want host:port", addr)
		return "", "", false
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		v.add(path, "invalid port in %q: want a number 0..65535", addr)
		return "", "", false
	}
	return host, port, true
}

// isLoopback reports whether host is only reachable from this machine. An
// empty host listens on every interface, so it is not loopback.
func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// hostsOverlap reports whether listeners on the same port of these hosts
// would collide: the same host, or one of them on every interface.
func hostsOverlap(a, b string) bool {
	wildcard := func(h string) bool {
		ip := net.ParseIP(h)
		return h == "" || (ip != nil && ip.IsUnspecified())
	}
	return strings.EqualFold(a, b) || wildcard(a) || wildcard(b)
}

// tls checks the tls or admin_tls section, named by key.
func (v *validator) tls(key string, t *TLS) {
	if t == nil {
		return
	}
	// The certificate and its key only make sense together.
	v.requiredFile(key+".cert_file", t.CertFile)
	v.requiredFile(key+".key_file", t.KeyFile)
	if t.ClientCAFile != "" {
		v.file(key+".client_ca_file", t.ClientCAFile)
	}
}

// connections checks the listeners' connection caps and timeouts.
func (v *validator) connections(c *Config) {
	for _, x := range []struct {
		key string
		n   int
	}{{"max_connections", c.MaxConnections}, {"admin_max_connections", c.AdminMaxConnections}} {
		if x.n < 1 || x.n > maxConnectionsLimit {
			v.add(x.key, "must be from 1 to %d", maxConnectionsLimit)
		}
	}
	t := c.HTTPTimeouts
	for _, x := range []struct {
		key string
		d   time.Duration
	}{{"read_header", t.ReadHeader}, {"read", t.Read}, {"write", t.Write}, {"idle", t.Idle}} {
		if x.d <= 0 || x.d > maxHTTPTimeout {
			v.add("http_timeouts."+x.key, "must be positive and at most %v", maxHTTPTimeout)
		}
	}
	if t.Read > 0 && t.ReadHeader > t.Read {
		v.add("http_timeouts.read_header", "must not exceed http_timeouts.read (%v)", t.Read)
	}
}

func (v *validator) store(s Store) {
	switch s.Driver {
	case DriverBolt, "": // "": a Config built by hand before drivers existed
		if s.Etcd != nil {
			v.add("store.etcd", "only with driver etcd")
		}
	case DriverEtcd:
		if s.Path != "" {
			v.add("store.path", "not used with driver etcd")
		}
		if s.RollbackAnchor != nil && *s.RollbackAnchor {
			v.add("store.rollback_anchor", "not available with driver etcd: rollback anchoring is bbolt only (docs/etcd.md)")
		}
		v.etcd(s.Etcd)
		return
	default:
		v.add("store.driver", "must be bolt or etcd")
		return
	}
	if s.Path == "" {
		v.add("store.path", "required")
		return
	}
	if !v.checkFS {
		return
	}
	dir := filepath.Dir(s.Path)
	switch fi, err := os.Stat(dir); {
	case errors.Is(err, fs.ErrNotExist):
		v.add("store.path", "directory %q does not exist", dir)
	case err != nil:
		v.add("store.path", "%v", err)
	case !fi.IsDir():
		v.add("store.path", "%q is not a directory", dir)
	}
	if fi, err := os.Stat(s.Path); err == nil && fi.IsDir() {
		v.add("store.path", "%q is a directory; want the database file", s.Path)
	}
}

func (v *validator) etcd(e *Etcd) {
	if e == nil {
		v.add("store.etcd", "required with driver etcd")
		return
	}
	if len(e.Endpoints) == 0 {
		v.add("store.etcd.endpoints", "at least one endpoint required")
	}
	for i, ep := range e.Endpoints {
		u, err := url.Parse(ep)
		switch {
		case err != nil || u.Scheme != "http" && u.Scheme != "https" || u.Port() == "" || u.Hostname() == "" || u.Path != "" && u.Path != "/":
			v.add(indexKey("store.etcd.endpoints", i), "want http:// or https://host:port")
		case u.Scheme == "http" && !e.InsecurePlaintext && !isLoopback(u.Hostname()):
			// etcd has no rollback anchoring: an on-path attacker who
			// replays an older record restores that backup's counter.
			// (The etcd client never uses TLS for an http:// endpoint,
			// whatever the tls section says.)
			v.add(indexKey("store.etcd.endpoints", i), "plain http:// to a non-loopback host needs https:// or store.etcd.insecure_plaintext: true")
		}
	}
	if e.KeyPrefix == "" {
		v.add("store.etcd.key_prefix", "must not be empty")
	}
	if e.DialTimeout <= 0 {
		v.add("store.etcd.dial_timeout", "must be positive")
	}
	if e.RequestTimeout <= 0 {
		v.add("store.etcd.request_timeout", "must be positive")
	}
	if e.HeartbeatInterval <= 0 {
		v.add("store.etcd.heartbeat_interval", "must be positive")
	}
	if t := e.TLS; t != nil {
		if t.CAFile != "" {
			v.file("store.etcd.tls.ca_file", t.CAFile)
		}
		if (t.CertFile == "") != (t.KeyFile == "") {
			v.add("store.etcd.tls", "cert_file and key_file go together")
		} else if t.CertFile != "" {
			v.file("store.etcd.tls.cert_file", t.CertFile)
			v.file("store.etcd.tls.key_file", t.KeyFile)
		}
	}
}

func (v *validator) hsm(h HSM) {
	for _, k := range slices.Sorted(maps.Keys(h.ModuleEnv)) {
		if !envNameRE.MatchString(k) {
			v.add(fieldKey("hsm.module_env", k), "not a valid environment variable name")
		}
	}
	if h.Profile != "" && h.Profile != "gcm" && h.Profile != "hmac" && h.Profile != "gcm-hsm-iv" {
		v.add("hsm.profile", "must be gcm, hmac or gcm-hsm-iv, not %q", h.Profile)
	}
	if len(h.Members) == 0 {
		v.add("hsm.members", "at least one member required")
		return
	}
	firstByName := map[string]int{}
	firstByToken := map[[2]string]int{}
	for i, m := range h.Members {
		path := indexKey("hsm.members", i)
		// Two members on one token would look redundant and be one HSM.
		if j, dup := firstByToken[[2]string{m.Module, m.TokenLabel}]; dup && m.TokenLabel != "" {
			v.add(path+".token_label", "hsm.members[%d] already uses this module and token", j)
		} else {
			firstByToken[[2]string{m.Module, m.TokenLabel}] = i
		}
		switch {
		case m.Name == "":
			v.add(path+".name", "required")
		case !memberNameRE.MatchString(m.Name):
			v.add(path+".name", "must match [a-z0-9-]{1,32}")
		default:
			if j, dup := firstByName[m.Name]; dup {
				v.add(path+".name", "%q is already the name of hsm.members[%d]", m.Name, j)
			} else {
				firstByName[m.Name] = i
			}
		}
		v.requiredFile(path+".module", m.Module)
		if m.TokenLabel == "" {
			v.add(path+".token_label", "required")
		}
		switch {
		case m.PinEnv != "" && m.PinFile != "":
			v.add(path, "set exactly one of pin_env and pin_file, not both")
		case m.PinEnv == "" && m.PinFile == "":
			v.add(path+".pin_env", "required (or pin_file)")
		case m.PinEnv != "":
			// Only the name is checked: the variable is read when the HSM
			// is opened (Member.PIN), and may be set by then.
			if !envNameRE.MatchString(m.PinEnv) {
				v.add(path+".pin_env", "not a valid environment variable name")
			}
			if _, inline := h.ModuleEnv[m.PinEnv]; inline {
				v.add(path+".pin_env", "names a variable that hsm.module_env sets: that would put the PIN in the config")
			}
		default:
			v.file(path+".pin_file", m.PinFile)
		}
		if m.MaxSessions < 1 || m.MaxSessions > maxSessionsLimit {
			v.add(path+".max_sessions", "must be between 1 and %d", maxSessionsLimit)
		}
	}
}

func (v *validator) budget(b Budget) {
	if b.DefaultMaxAttempts < 1 {
		v.add("budget.default_max_attempts", "must be at least 1")
	}
	switch {
	case b.MaxAttemptsLimit < 1:
		v.add("budget.max_attempts_limit", "must be at least 1")
	case b.MaxAttemptsLimit > maxAttemptsLimitCeiling:
		v.add("budget.max_attempts_limit", "must be at most %d", maxAttemptsLimitCeiling)
	}
	if b.DefaultMaxAttempts > b.MaxAttemptsLimit {
		v.add("budget.default_max_attempts", "must not exceed budget.max_attempts_limit (%d)", b.MaxAttemptsLimit)
	}
	if b.EscalatingDelay.Base < 0 || b.EscalatingDelay.Base > 24*time.Hour {
		v.add("budget.escalating_delay.base", "must be from 0s (off) to 24h")
	}
	if b.EscalatingDelay.FreeGuesses < 0 {
		v.add("budget.escalating_delay.free_guesses", "must not be negative")
	}
}

func (v *validator) clients(cs []Client) {
	if len(cs) == 0 {
		v.add("clients", "at least one client required")
		return
	}
	firstByName := map[string]int{}
	firstByNamespace := map[string]int{}
	firstByHash := map[[32]byte]string{} // hash -> path where it first appears
	for i, c := range cs {
		path := indexKey("clients", i)
		switch {
		case c.Name == "":
			v.add(path+".name", "required")
		case !clientNameRE.MatchString(c.Name):
			v.add(path+".name", "must match [a-z0-9-]{1,64}")
		default:
			if j, dup := firstByName[c.Name]; dup {
				v.add(path+".name", "%q is already the name of clients[%d]", c.Name, j)
			} else {
				firstByName[c.Name] = i
			}
		}

		switch {
		case c.Namespace == "":
			v.add(path+".namespace", "required")
		case !clientNameRE.MatchString(c.Namespace):
			v.add(path+".namespace", "must match [a-z0-9-]{1,64}")
		default:
			// A namespace holds records; letting a second client into it
			// must be a decision written down for both clients.
			if j, used := firstByNamespace[c.Namespace]; used {
				if !c.ShareNamespace || !cs[j].ShareNamespace {
					v.add(path+".namespace", "%q is also used by clients[%d]; both need share_namespace: true", c.Namespace, j)
				}
			} else {
				firstByNamespace[c.Namespace] = i
			}
		}

		if len(c.TokenSHA256) == 0 {
			v.add(path+".token_sha256", "required")
		}
		for k, s := range c.TokenSHA256 {
			hpath := indexKey(path+".token_sha256", k)
			h, ok := decodeHash(s)
			if !ok {
				// The value is not echoed: it may be the bearer token
				// itself, pasted where its hash belongs.
				v.add(hpath, "must be the hex SHA-256 of the token: 64 hex characters, got %d characters", len(s))
				continue
			}
			// One token must identify one client.
			if first, dup := firstByHash[h]; dup {
				v.add(hpath, "same token hash as %s", first)
				continue
			}
			firstByHash[h] = hpath
		}
	}
}

// adminToken checks the admin token hashes; none of them may also be a
// client's, so that no API token opens the key lifecycle endpoints.
func (v *validator) adminToken(c *Config) {
	clients := map[[32]byte]bool{}
	for _, cl := range c.Clients {
		for _, h := range cl.TokenHashes() {
			clients[h] = true
		}
	}
	for k, s := range c.AdminTokenSHA256 {
		path := indexKey("admin_token_sha256", k)
		h, ok := decodeHash(s)
		switch {
		case !ok:
			v.add(path, "must be the hex SHA-256 of the token: 64 hex characters, got %d characters", len(s))
		case clients[h]:
			v.add(path, "is also a client's token hash; the admin token must be its own")
		}
	}
}

func (v *validator) log(l Log) {
	switch l.Level {
	case "debug", "info", "warn", "error":
	default:
		v.add("log.level", "must be one of debug, info, warn, error")
	}
	switch l.Format {
	case "json", "text":
	default:
		v.add("log.format", "must be json or text")
	}
	switch l.Audit {
	case "", AuditStdout, AuditStderr:
	default:
		v.auditFile(l.Audit)
	}
}

// auditFile checks a file sink: its directory must exist, and the file, if
// it does, must not be a directory.
func (v *validator) auditFile(path string) {
	if !v.checkFS {
		return
	}
	dir := filepath.Dir(path)
	switch fi, err := os.Stat(dir); {
	case errors.Is(err, fs.ErrNotExist):
		v.add("log.audit", "directory %q does not exist", dir)
	case err != nil:
		v.add("log.audit", "%v", err)
	case !fi.IsDir():
		v.add("log.audit", "%q is not a directory", dir)
	}
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		v.add("log.audit", "%q is a directory; want a file", path)
	}
}

// requiredFile checks that name is set and, with filesystem checks on, is an
// existing file.
func (v *validator) requiredFile(path, name string) {
	if name == "" {
		v.add(path, "required")
		return
	}
	v.file(path, name)
}

// file checks that name is an existing file (not a directory).
func (v *validator) file(path, name string) {
	if !v.checkFS {
		return
	}
	switch fi, err := os.Stat(name); {
	case errors.Is(err, fs.ErrNotExist):
		v.add(path, "file %q does not exist", name)
	case err != nil:
		v.add(path, "%v", err)
	case fi.IsDir():
		v.add(path, "%q is a directory, not a file", name)
	}
}

func (v *validator) rateLimit(r RateLimit) {
	buckets := []struct {
		key string
		b   Bucket
	}{
		{"ratelimit.guesses_per_user", r.GuessesPerUser},
		{"ratelimit.requests_per_client", r.RequestsPerClient},
		{"ratelimit.wrong_guesses_per_client", r.WrongGuessesPerClient},
	}
	for _, x := range buckets {
		switch {
		case x.b.PerSecond < 0 || x.b.PerMinute < 0 || x.b.Burst < 0:
			v.add(x.key, "must not be negative")
		case x.b.PerSecond > 0 && x.b.PerMinute > 0:
			v.add(x.key, "set per_second or per_minute, not both")
		case x.b.Rate() > 0 && x.b.Burst < 1:
			v.add(x.key+".burst", "must be at least 1 when the limit is on")
		}
	}
	if r.AdmittedPerHSMSession < 1 || r.AdmittedPerHSMSession > 1000 {
		v.add("ratelimit.admitted_per_hsm_session", "must be from 1 to 1000")
	}
	if r.HSMSharePerClientPercent < 1 || r.HSMSharePerClientPercent > 100 {
		v.add("ratelimit.hsm_share_per_client_percent", "must be from 1 to 100 (100: no cap)")
	}
	if r.HSMQueueTimeout < 0 {
		v.add("ratelimit.hsm_queue_timeout", "must not be negative")
	}
}
