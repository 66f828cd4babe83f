package config

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// Defaults of the optional fields. Parse applies them before decoding, so
// they hold whenever a key is absent from the file.
const (
	DefaultListen           = "127.0.0.1:8080"
	DefaultAdminListen      = "127.0.0.1:9090"
	DefaultMaxSessions      = 8
	DefaultMaxAttempts      = 10
	DefaultMaxAttemptsLimit = 20
	DefaultLogLevel         = "info"
	DefaultLogFormat        = "json"
	// DefaultMaxConnections caps the API listener's connections: far more
	// than a few calling backends with connection pools need, and few
	// enough that a flood cannot take the file descriptors the HSM modules
	// and the store open on every operation (serve checks the sum against
	// RLIMIT_NOFILE at start).
	DefaultMaxConnections = 4096
	// DefaultAdminMaxConnections caps the admin listener's connections:
	// Prometheus, the kubelet's probes, an operator's CLI and a profile
	// need a handful.
	DefaultAdminMaxConnections = 32
)

// Defaults of http_timeouts, the same on both listeners.
const (
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultReadTimeout       = 30 * time.Second
	DefaultWriteTimeout      = 30 * time.Second
	DefaultIdleTimeout       = 2 * time.Minute
)

// Limits checked by Validate.
const (
	maxSessionsLimit        = 1024
	maxAttemptsLimitCeiling = 1000
	maxPINFileSize          = 1024 // bytes
	maxConnectionsLimit     = 1 << 20
	maxHTTPTimeout          = time.Hour
)

// Config is the whole keyvault configuration file.
type Config struct {
	// Listen is the host:port of the REST API. Default "127.0.0.1:8080".
	// Port 0 (pick a free port) is allowed, for tests. A non-loopback
	// address needs TLS or InsecurePlaintext.
	Listen string `yaml:"listen"`
	// AdminListen is the host:port of /metrics, /healthz and /readyz.
	// Default "127.0.0.1:9090". Must differ from Listen unless a port is 0.
	// With AdminTokenSHA256 set, a non-loopback address needs AdminTLS or
	// AdminInsecurePlaintext.
	AdminListen string `yaml:"admin_listen"`
	// AdminTLS enables HTTPS on AdminListen; with client_ca_file, client
	// certificates are required (mTLS). Optional; nil (the default) means
	// plain HTTP.
	AdminTLS *TLS `yaml:"admin_tls"`
	// AdminInsecurePlaintext allows the admin token over plain HTTP on a
	// non-loopback AdminListen, for deployments where TLS ends in front of
	// keyvault. Default false. Without an admin token the admin listener
	// serves nothing that needs it: metrics, health and the profiler carry
	// counts, timings and code paths, never a secret.
	AdminInsecurePlaintext bool `yaml:"admin_insecure_plaintext"`
	// MaxConnections caps the concurrent connections of Listen; the next
	// waits in the kernel's accept queue. Default 4096; 1..1048576.
	MaxConnections int `yaml:"max_connections"`
	// AdminMaxConnections caps the concurrent connections of AdminListen.
	// Default 32; 1..1048576.
	AdminMaxConnections int `yaml:"admin_max_connections"`
	// HTTPTimeouts bound the connections of both listeners alike.
	HTTPTimeouts HTTPTimeouts `yaml:"http_timeouts"`
	// AdminPprof serves Go's profiler under /debug/pprof/ on the admin
	// listener, for finding where time goes under load. Default false:
	// profiles reveal code paths and timings, not data, but they cost CPU
	// while taken and belong on a listener only operators reach.
	AdminPprof bool `yaml:"admin_pprof"`
	// AdminTokenSHA256 is the hex SHA-256 of the bearer token of the key
	// lifecycle endpoints on the admin listener (/admin/keys/...,
	// /admin/rewrap), which `keyvault keys reload|rewrap|retire|usage`
	// call; a list allows rotating it. Optional: without it those
	// endpoints are off (404).
	AdminTokenSHA256 StringList `yaml:"admin_token_sha256"`
	// InsecurePlaintext allows plain HTTP on a non-loopback Listen address,
	// for deployments where TLS ends in front of keyvault. Default false.
	InsecurePlaintext bool `yaml:"insecure_plaintext"`
	// TLS enables HTTPS on Listen. Optional; nil (the default) means plain
	// HTTP, which is allowed on loopback addresses only.
	TLS *TLS `yaml:"tls"`
	// Store is where records are kept. Required.
	Store Store `yaml:"store"`
	// HSM lists the PKCS#11 tokens that seal records. Required.
	HSM HSM `yaml:"hsm"`
	// Budget is the guess budget of every backup: its attempts and the
	// escalating delay between wrong guesses.
	Budget Budget `yaml:"budget"`
	// Clients are the callers allowed to use the API. At least one.
	Clients []Client `yaml:"clients"`
	// Log configures the process logger.
	Log Log `yaml:"log"`
	// RateLimit configures the abuse controls in front of the vault.
	RateLimit RateLimit `yaml:"ratelimit"`
}

// RateLimit configures the limits in front of the vault. A guess refused by
// any of them is answered 429 with a truthful Retry-After, and is neither
// checked nor counted.
type RateLimit struct {
	// GuessesPerUser limits recoveries and PIN changes per namespace and
	// user_id. Default 5 per minute, burst 5.
	GuessesPerUser Bucket `yaml:"guesses_per_user"`
	// RequestsPerClient limits every /v1 request per client. Default 500
	// per second, burst 1000.
	RequestsPerClient Bucket `yaml:"requests_per_client"`
	// WrongGuessesPerClient limits the wrong guesses one client may cause
	// across all its users. Default 600 per minute, burst 600.
	WrongGuessesPerClient Bucket `yaml:"wrong_guesses_per_client"`
	// HSMQueueTimeout is the longest a request waits for an HSM session
	// before it is shed with 503. Default 50ms; 0 waits as long as the
	// request may.
	HSMQueueTimeout time.Duration `yaml:"hsm_queue_timeout"`
	// AdmittedPerHSMSession bounds the requests in the vault at once: this
	// many per session of the healthy HSM members; the next waits up to
	// HSMQueueTimeout, then gets 503. A request spends most of its time
	// waiting for its store commits, not in the HSM. Default 4.
	AdmittedPerHSMSession int `yaml:"admitted_per_hsm_session"`
	// HSMSharePerClientPercent is the percentage of those requests that one
	// client may have in the vault at once, when two or more clients are
	// configured, so that a client flooding the vault leaves room for the
	// others; its next one is a 429. From 1 to 100 (100: no cap). Default 50.
	HSMSharePerClientPercent int `yaml:"hsm_share_per_client_percent"`
}

// Bucket is a token bucket: a refill rate, given per second or per minute
// (one of them), and a burst. A rate of 0 turns the limit off. A bucket
// written in the file replaces the default whole.
type Bucket struct {
	PerSecond int `yaml:"per_second"`
	PerMinute int `yaml:"per_minute"`
	Burst     int `yaml:"burst"`
}

// UnmarshalYAML decodes a bucket from scratch, so that a per_second in the
// file does not meet a default per_minute.
func (b *Bucket) UnmarshalYAML(n *yaml.Node) error {
	type plain Bucket
	var p plain
	if err := n.Decode(&p); err != nil {
		return err
	}
	*b = Bucket(p)
	return nil
}

// Rate is the bucket's refill rate in tokens per second; 0 means off.
func (b Bucket) Rate() float64 {
	if b.PerSecond > 0 {
		return float64(b.PerSecond)
	}
	return float64(b.PerMinute) / 60
}

// HTTPTimeouts bound each connection of the API and admin listeners, so
// that idle or stalled clients cannot hold connections (and the process's
// file descriptors) for long. A profile from admin_pprof extends its own
// write deadline by its duration.
type HTTPTimeouts struct {
	// ReadHeader bounds reading a request's headers. Default 10s; at most
	// Read.
	ReadHeader time.Duration `yaml:"read_header"`
	// Read bounds reading a whole request, body included. Default 30s.
	Read time.Duration `yaml:"read"`
	// Write bounds handling a request and writing its answer, from the end
	// of its headers. Default 30s.
	Write time.Duration `yaml:"write"`
	// Idle bounds the wait for the next request on a kept-alive
	// connection. Default 2m.
	Idle time.Duration `yaml:"idle"`
}

// TLS configures HTTPS on the API or the admin listener.
type TLS struct {
	// CertFile is the PEM server certificate chain. Required with tls.
	CertFile string `yaml:"cert_file"`
	// KeyFile is the PEM private key of CertFile. Required with tls.
	KeyFile string `yaml:"key_file"`
	// ClientCAFile, if set, makes client certificates (mTLS) mandatory and
	// holds the PEM CAs that sign them. Optional; default none.
	ClientCAFile string `yaml:"client_ca_file"`
}

// Store configures the record database.
type Store struct {
	// Driver is "bolt" (one bbolt file, one process) or "etcd" (an etcd
	// cluster that several keyvault processes share). Default "bolt".
	Driver string `yaml:"driver"`
	// Path is the database file. Required with driver bolt, refused with
	// etcd; its directory must exist.
	Path string `yaml:"path"`
	// RollbackAnchor keeps a digest of the store anchored in every HSM
	// member, and refuses at start a store rolled back, in whole or in
	// part, behind the anchor (docs/rollback.md). bbolt only:
	// on by default with driver bolt, refused with driver etcd. Read it
	// through Anchored.
	RollbackAnchor *bool `yaml:"rollback_anchor"`
	// Etcd configures the etcd driver. Required with driver etcd, refused
	// with bolt.
	Etcd *Etcd `yaml:"etcd"`
}

// Anchored reports whether rollback anchoring is on: with driver bolt
// unless rollback_anchor is false, never with etcd.
func (s Store) Anchored() bool {
	return (s.Driver == DriverBolt || s.Driver == "") && (s.RollbackAnchor == nil || *s.RollbackAnchor)
}

// Store drivers.
const (
	DriverBolt = "bolt"
	DriverEtcd = "etcd"
)

// Defaults of the etcd driver.
const (
	DefaultEtcdKeyPrefix      = "/keyvault/"
	DefaultEtcdDialTimeout    = 5 * time.Second
	DefaultEtcdRequestTimeout = 5 * time.Second
	DefaultEtcdHeartbeat      = 2 * time.Second
)

// Etcd configures the connection to an etcd v3 cluster.
type Etcd struct {
	// Endpoints are the client URLs of the members, http:// or https://
	// host:port. At least one.
	Endpoints []string `yaml:"endpoints"`
	// KeyPrefix is put in front of every key, so that several deployments
	// can share one cluster. Default "/keyvault/".
	KeyPrefix string `yaml:"key_prefix"`
	// TLS, when set, secures the connections (https:// endpoints).
	// Optional; default none.
	TLS *EtcdTLS `yaml:"tls"`
	// InsecurePlaintext allows http:// endpoints on non-loopback hosts.
	// Default false: etcd has no rollback anchoring, so whoever is on the
	// path could replay an older record and restore its guess counter.
	InsecurePlaintext bool `yaml:"insecure_plaintext"`
	// DialTimeout bounds the first connection. Default 5s.
	DialTimeout time.Duration `yaml:"dial_timeout"`
	// RequestTimeout bounds each request to etcd. Default 5s.
	RequestTimeout time.Duration `yaml:"request_timeout"`
	// HeartbeatInterval is how often each node reads the cluster's key
	// state and publishes the key versions it seals under (docs/etcd.md,
	// "The key lifecycle across nodes"). Default 2s.
	HeartbeatInterval time.Duration `yaml:"heartbeat_interval"`
}

// EtcdTLS holds the files of a TLS connection to etcd.
type EtcdTLS struct {
	// CAFile is the PEM CA that signs the members' certificates. Optional;
	// default the system roots.
	CAFile string `yaml:"ca_file"`
	// CertFile and KeyFile are the client certificate and key, for etcd
	// with --client-cert-auth. Optional, but both or neither.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// UnmarshalYAML decodes the etcd settings over their defaults, so that an
// absent timeout gets its default while an explicit 0 is refused.
func (e *Etcd) UnmarshalYAML(n *yaml.Node) error {
	type plain Etcd
	p := plain{KeyPrefix: DefaultEtcdKeyPrefix, DialTimeout: DefaultEtcdDialTimeout, RequestTimeout: DefaultEtcdRequestTimeout, HeartbeatInterval: DefaultEtcdHeartbeat}
	if err := n.Decode(&p); err != nil {
		return err
	}
	*e = Etcd(p)
	return nil
}

// HSM configures the PKCS#11 tokens.
type HSM struct {
	// ModuleEnv: environment variables set in the process before any
	// PKCS#11 module is loaded. SoftHSM2 reads SOFTHSM2_CONF this way; one
	// process sees one SoftHSM config. Optional; default empty. Keys must be
	// valid environment variable names.
	ModuleEnv map[string]string `yaml:"module_env"`
	// Profile is how records are sealed: "gcm" (AES-256-GCM inside the
	// HSM under an AES wrap key) or "hmac" (AES-256-GCM on the host under
	// a per-record key the HSM derives by HMAC-SHA256 from a generic
	// secret wrap key; the tokens need only HMAC-SHA256) or "gcm-hsm-iv"
	// (as gcm, for HSMs that choose the GCM IV themselves: the record
	// stores the IV the HSM returned). keys init and
	// keys rotate make the wrap key of this profile, and serve refuses a
	// store whose newest wrap key is of another. Optional; unset, a store
	// keeps the profile of its newest wrap key, and keys init makes keys
	// for hmac (docs/hsm.md says why).
	Profile string `yaml:"profile"`
	// Members are the tokens; at least one.
	Members []Member `yaml:"members"`
}

// Member is one PKCS#11 token.
type Member struct {
	// Name identifies the member in logs and metrics. Required, unique,
	// [a-z0-9-]{1,32}.
	Name string `yaml:"name"`
	// Module is the path of the PKCS#11 library (.so). Required; must exist.
	Module string `yaml:"module"`
	// TokenLabel selects the token within the module. Required.
	TokenLabel string `yaml:"token_label"`
	// PinEnv names the environment variable holding the user PIN. Exactly
	// one of PinEnv and PinFile is required.
	PinEnv string `yaml:"pin_env"`
	// PinFile is a file holding the user PIN; a trailing newline is
	// ignored. Must exist. Exactly one of PinEnv and PinFile is required.
	PinFile string `yaml:"pin_file"`
	// MaxSessions bounds the concurrent sessions opened on the token.
	// Default 8; 1..1024.
	MaxSessions int `yaml:"max_sessions"`
}

// Budget is the guess budget of every backup: how many wrong guesses a
// record allows, and how long a guess waits after wrong ones in a row. The
// vault keeps it (vault.Budget).
type Budget struct {
	// DefaultMaxAttempts applies to records created without a budget.
	// Default 10; 1 <= DefaultMaxAttempts <= MaxAttemptsLimit.
	DefaultMaxAttempts int `yaml:"default_max_attempts"`
	// MaxAttemptsLimit is the largest budget a client may ask for.
	// Default 20; at most 1000.
	MaxAttemptsLimit int `yaml:"max_attempts_limit"`
	// EscalatingDelay is kept in the record, so it holds across processes
	// and restarts: after FreeGuesses wrong guesses in a row, the next
	// guess must wait Base * 2^(k-FreeGuesses) after the last one, k being
	// the wrong guesses in a row. A guess it refuses is answered 429 with
	// a truthful Retry-After, and is neither checked nor counted. Default
	// free_guesses 5, base 1m; base 0 turns it off.
	EscalatingDelay EscalatingDelay `yaml:"escalating_delay"`
}

// EscalatingDelay configures the durable delay between wrong guesses.
type EscalatingDelay struct {
	FreeGuesses int           `yaml:"free_guesses"`
	Base        time.Duration `yaml:"base"`
}

// Client is one caller of the API, authenticated by a bearer token.
type Client struct {
	// Name identifies the client in logs and metrics. Required, unique,
	// [a-z0-9-]{1,64}.
	Name string `yaml:"name"`
	// Namespace is the record namespace the client works in. Defaults to
	// Name; [a-z0-9-]{1,64}.
	Namespace string `yaml:"namespace"`
	// TokenSHA256 is the hex SHA-256 of the client's bearer token, or a list
	// of them so that a token can be rotated without downtime. At least
	// one; 64 hex characters each, either case; no hash may appear twice in
	// the file.
	TokenSHA256 StringList `yaml:"token_sha256"`
	// ShareNamespace lets this client use a namespace another client uses.
	// Both clients must set it: sharing is a decision of both owners.
	// Default false.
	ShareNamespace bool `yaml:"share_namespace"`
}

// Log configures the process logger.
type Log struct {
	// Level is debug, info, warn or error. Default "info".
	Level string `yaml:"level"`
	// Format is json or text. Default "json".
	Format string `yaml:"format"`
	// Audit is where the audit events go, one JSON object per line, at
	// every log level: "stdout", "stderr", or the path of a file, appended
	// to and reopened on SIGHUP (for logrotate); its directory must exist.
	// Default empty: the stream the log goes to.
	Audit string `yaml:"audit"`
}

// Audit sinks besides a file path.
const (
	AuditStdout = "stdout"
	AuditStderr = "stderr"
)

// StringList is a list of strings that may be written in YAML as a single
// scalar ("abc") or as a sequence of scalars (["abc", "def"]).
type StringList []string

// UnmarshalYAML accepts a scalar or a sequence of scalars. Scalars are taken
// as written: a hash made only of digits stays a string and keeps its leading
// zeros.
func (s *StringList) UnmarshalYAML(n *yaml.Node) error {
	n = resolveAlias(n)
	switch n.Kind {
	case yaml.ScalarNode:
		*s = StringList{n.Value}
		return nil
	case yaml.SequenceNode:
		out := make(StringList, 0, len(n.Content))
		for i, item := range n.Content {
			item = resolveAlias(item)
			if item.Kind != yaml.ScalarNode || item.ShortTag() == "!!null" {
				return fmt.Errorf("line %d: item %d: expected a string, got %s", item.Line, i, describe(item))
			}
			out = append(out, item.Value)
		}
		*s = out
		return nil
	default:
		return fmt.Errorf("line %d: expected a string or a list of strings, got %s", n.Line, describe(n))
	}
}

// UnmarshalYAML decodes a member with its defaults filled in first, so that
// an absent max_sessions gets DefaultMaxSessions while an explicit 0 is kept
// (and refused by Validate).
func (m *Member) UnmarshalYAML(n *yaml.Node) error {
	type plain Member // no methods: Decode below does not recurse here
	p := plain{MaxSessions: DefaultMaxSessions}
	if err := n.Decode(&p); err != nil {
		return err
	}
	*m = Member(p)
	return nil
}

// defaults returns a Config with every optional top-level field at its
// default; the file is decoded over it.
func defaults() *Config {
	return &Config{
		Listen:              DefaultListen,
		AdminListen:         DefaultAdminListen,
		MaxConnections:      DefaultMaxConnections,
		AdminMaxConnections: DefaultAdminMaxConnections,
		HTTPTimeouts: HTTPTimeouts{
			ReadHeader: DefaultReadHeaderTimeout,
			Read:       DefaultReadTimeout,
			Write:      DefaultWriteTimeout,
			Idle:       DefaultIdleTimeout,
		},
		Store: Store{Driver: DriverBolt},
		Budget: Budget{
			DefaultMaxAttempts: DefaultMaxAttempts,
			MaxAttemptsLimit:   DefaultMaxAttemptsLimit,
			EscalatingDelay:    EscalatingDelay{FreeGuesses: 5, Base: time.Minute},
		},
		Log: Log{Level: DefaultLogLevel, Format: DefaultLogFormat},
		RateLimit: RateLimit{
			GuessesPerUser:           Bucket{PerMinute: 5, Burst: 5},
			RequestsPerClient:        Bucket{PerSecond: 500, Burst: 1000},
			WrongGuessesPerClient:    Bucket{PerMinute: 600, Burst: 600},
			HSMQueueTimeout:          50 * time.Millisecond,
			AdmittedPerHSMSession:    4,
			HSMSharePerClientPercent: 50,
		},
	}
}

// Load reads the config file at path and parses it with Parse. The error
// names path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	cfg, err := Parse(data)
	if err != nil {
		return nil, wrapProblems("config "+path, err)
	}
	return cfg, nil
}

// Parse decodes a config strictly (unknown keys, duplicate keys and wrong
// types are errors), applies the defaults and validates the result,
// including that the files it names exist. The error lists every problem,
// one per line, each starting with its key path.
func Parse(data []byte) (*Config, error) {
	return parse(data, true)
}

// ParseNoFS is Parse without the checks that files and directories exist.
// It is meant for linting configs shipped for another machine (deploy/),
// whose module, PIN and store paths do not exist where the lint runs. Do not
// use it to start a server.
func ParseNoFS(data []byte) (*Config, error) {
	return parse(data, false)
}

func parse(data []byte, checkFS bool) (*Config, error) {
	root, err := parseNode(data)
	if err != nil {
		return nil, err
	}
	// The structure check prunes what it reports, so the rest decodes and
	// is validated in the same pass: one run of config check lists a typo
	// and a bad address together.
	problems, pruned := checkStructure(root)
	cfg := defaults()
	if err := root.Decode(cfg); err != nil {
		if len(problems) > 0 {
			return nil, errors.Join(problems...)
		}
		// The structure check should have caught this; keep yaml's
		// message, which names the line.
		return nil, fmt.Errorf("decode config: %w", err)
	}
	for i := range cfg.Clients {
		if cfg.Clients[i].Namespace == "" {
			cfg.Clients[i].Namespace = cfg.Clients[i].Name
		}
	}
	if err := cfg.validate(checkFS); err != nil {
		problems = append(problems, withoutConsequences(err, pruned)...)
	}
	if len(problems) > 0 {
		return nil, errors.Join(problems...)
	}
	return cfg, nil
}

// withoutConsequences returns the problems of a validation error, less
// those at or under a key path the structure check pruned (a value of the
// wrong type is reported once, not again as "required").
func withoutConsequences(err error, pruned []string) []error {
	var all []error
	if multi, ok := err.(interface{ Unwrap() []error }); ok {
		all = multi.Unwrap()
	} else {
		all = []error{err}
	}
	out := all[:0:0]
	for _, e := range all {
		p, ok := e.(*problem)
		if ok && slices.ContainsFunc(pruned, func(q string) bool { return within(p.path, q) }) {
			continue
		}
		out = append(out, e)
	}
	return out
}

// within reports whether key path p is q or lies under it
// ("store.etcd.endpoints[0]" is within "store.etcd").
func within(p, q string) bool {
	return q != "" && strings.HasPrefix(p, q) && (len(p) == len(q) || p[len(q)] == '.' || p[len(q)] == '[')
}

// parseNode parses data as exactly one YAML document whose top level is a
// mapping and returns that mapping.
func parseNode(data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("config is empty")
		}
		return nil, fmt.Errorf("parse config: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		if err != nil {
			return nil, fmt.Errorf("parse config: %w", err)
		}
		return nil, fmt.Errorf("config must be a single YAML document; another starts at line %d", extra.Line)
	}
	root := &doc
	if root.Kind == yaml.DocumentNode {
		if len(root.Content) == 0 {
			return nil, errors.New("config is empty")
		}
		root = root.Content[0]
	}
	root = resolveAlias(root)
	if root.Kind == yaml.ScalarNode && root.ShortTag() == "!!null" {
		return nil, errors.New("config is empty")
	}
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config must be a YAML mapping of keys to values, got %s (line %d)", describe(root), root.Line)
	}
	return root, nil
}

// PIN returns the member's user PIN, read from the environment variable
// PinEnv or from the file PinFile (without its trailing newline). It is
// called when the HSM is opened, not when the config is loaded, so the PIN
// lives in memory only as long as the caller keeps it. The error names the
// member and never contains the PIN.
func (m Member) PIN() (string, error) {
	switch {
	case m.PinEnv != "" && m.PinFile != "":
		return "", fmt.Errorf("hsm member %q: set only one of pin_env and pin_file", m.Name)
	case m.PinEnv != "":
		pin, ok := os.LookupEnv(m.PinEnv)
		if !ok {
			return "", fmt.Errorf("hsm member %q: PIN environment variable %s is not set", m.Name, m.PinEnv)
		}
		if pin == "" {
			return "", fmt.Errorf("hsm member %q: PIN environment variable %s is empty", m.Name, m.PinEnv)
		}
		return pin, nil
	case m.PinFile != "":
		pin, err := readPINFile(m.PinFile)
		if err != nil {
			return "", fmt.Errorf("hsm member %q: %w", m.Name, err)
		}
		return pin, nil
	default:
		return "", fmt.Errorf("hsm member %q: no pin_env or pin_file", m.Name)
	}
}

func readPINFile(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read PIN file: %w", err)
	}
	defer f.Close()
	// Bounded read: a PIN is short, and a wrong path (a device, a log)
	// should fail rather than fill memory.
	data, err := io.ReadAll(io.LimitReader(f, maxPINFileSize+1))
	if err != nil {
		return "", fmt.Errorf("read PIN file: %w", err)
	}
	if len(data) > maxPINFileSize {
		return "", fmt.Errorf("PIN file %s is larger than %d bytes", path, maxPINFileSize)
	}
	// Editors and `echo` add a newline; it is never part of the PIN.
	pin := strings.TrimRight(string(data), "\r\n")
	if pin == "" {
		return "", fmt.Errorf("PIN file %s is empty", path)
	}
	return pin, nil
}

// SlogLevel returns the slog level for l.Level. An unknown level (which
// Validate refuses) gives slog.LevelInfo.
func (l Log) SlogLevel() slog.Level {
	switch l.Level {
	case "debug":
		return slog.LevelDebug
	case "warn":
		return slog.LevelWarn
	case "error":
		return slog.LevelError
	default:
		return slog.LevelInfo
	}
}

// TokenHashes decodes the client's hex hashes into 32-byte arrays (validated
// already). An entry that is not a valid hex SHA-256 is skipped, so a Config
// that was not validated fails closed: that token is simply not accepted.
func (c Client) TokenHashes() [][32]byte {
	out := make([][32]byte, 0, len(c.TokenSHA256))
	for _, s := range c.TokenSHA256 {
		if h, ok := decodeHash(s); ok {
			out = append(out, h)
		}
	}
	return out
}

// AdminTokenHashes decodes AdminTokenSHA256 as Client.TokenHashes does.
func (c *Config) AdminTokenHashes() [][32]byte {
	return Client{TokenSHA256: c.AdminTokenSHA256}.TokenHashes()
}

func decodeHash(s string) ([32]byte, bool) {
	var h [32]byte
	if len(s) != hex.EncodedLen(len(h)) {
		return h, false
	}
	if _, err := hex.Decode(h[:], []byte(s)); err != nil {
		return h, false
	}
	return h, true
}

// wrapProblems prefixes err with context; a list of several problems goes
// on the lines below, so that each line still starts with its key path.
func wrapProblems(context string, err error) error {
	if multi, ok := err.(interface{ Unwrap() []error }); ok && len(multi.Unwrap()) > 1 {
		return fmt.Errorf("%s: %d problems:\n%w", context, len(multi.Unwrap()), err)
	}
	return fmt.Errorf("%s: %w", context, err)
}
